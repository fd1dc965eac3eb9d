#!/usr/bin/env python3
"""Refresh the builtin price catalog from an installed litellm.

The catalog is litellm's `model_prices_and_context_window_backup.json` (MIT licence), copied
byte for byte from the litellm release the plugin is tested with
(`integrations/litellm/tests/requirements.txt`), with its version and SHA-256 in
`src/pricing/data/catalog.meta` (the test `builtin_catalog_matches_its_meta` checks both).

    python3 -m venv /tmp/venv-pricing
    /tmp/venv-pricing/bin/pip install litellm==1.110.2
    /tmp/venv-pricing/bin/python scripts/refresh_catalog.py

Run it with the venv's Python: it reads the file from the litellm package that Python
imports, and refuses to run when that litellm is not the pinned version (pass `--any-version`
to take it anyway, e.g. when bumping the pin: then update requirements.txt too). After a
refresh, regenerate the parity fixtures (`scripts/pricing_fixtures.py`).
"""
import argparse
import hashlib
import os
import importlib.metadata
import pathlib
import re
import shutil
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
DATA = ROOT / "src" / "pricing" / "data"
NAME = "model_prices_and_context_window.json"
REQUIREMENTS = ROOT / "integrations" / "litellm" / "tests" / "requirements.txt"


def pinned_version() -> str:
    m = re.search(r"^litellm==(\S+)", REQUIREMENTS.read_text(), re.M)
    if not m:
        sys.exit(f"no litellm==VERSION line in {REQUIREMENTS}")
    return m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--any-version", action="store_true", help="accept another litellm version")
    args = ap.parse_args()
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network fetch of the live map
    import litellm  # noqa: F401  (the installed package, not a checkout)

    version = importlib.metadata.version("litellm")
    want = pinned_version()
    if version != want and not args.any_version:
        sys.exit(f"installed litellm is {version}, the pin is {want} (pass --any-version to take it)")
    source = pathlib.Path(litellm.__file__).parent / "model_prices_and_context_window_backup.json"
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    DATA.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, DATA / NAME)
    (DATA / "catalog.meta").write_text(
        "# The builtin price catalog: litellm's model_prices_and_context_window_backup.json (MIT),\n"
        "# copied by scripts/refresh_catalog.py. Checked by a test; do not edit by hand.\n"
        f"litellm_version={version}\n"
        f"sha256={digest}\n"
        f"bytes={len(data)}\n"
    )
    print(f"{DATA / NAME}: litellm {version}, {len(data)} bytes, sha256 {digest}")


if __name__ == "__main__":
    main()
