"""Fixtures: a real `provider-budgets serve` process per test, litellm offline.

The sidecar binary is `$PROVIDER_BUDGETS_BIN`, else `<repo>/target/debug/provider-budgets`
(built with `cargo build --bin provider-budgets` when missing). When it
cannot be built or started the tests are skipped, except under `CI`, where they fail.
"""

from __future__ import annotations

import os

# Before litellm is imported anywhere: use the bundled price map, never the network.
os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_LOG", "ERROR")

import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Callable, Dict, Optional

import pytest

REPO = Path(__file__).resolve().parents[3]
IN_CI = bool(os.environ.get("CI"))


def unavailable(reason: str):
    """A real component is missing: fail under CI, skip elsewhere."""
    if IN_CI:
        pytest.fail(f"{reason} (CI is set: failing instead of skipping)", pytrace=False)
    pytest.skip(reason)


def nanos(cost) -> int:
    """A cost as the sidecar counts it: the float's repr, exact, half-up at the tenth decimal."""
    d = Decimal(repr(cost)) if isinstance(cost, float) else Decimal(str(cost))
    return int((d * 10**9).to_integral_value(rounding=ROUND_HALF_UP))


def usd(n: int) -> str:
    """Nano-dollars as an exact decimal string for a config file."""
    return format(Decimal(n) / 10**9, "f")


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0, interval: float = 0.01):
    deadline = time.monotonic() + timeout
    while True:
        if cond():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


_BIN: Optional[str] = None


def sidecar_binary() -> str:
    global _BIN
    if _BIN is not None:
        return _BIN
    explicit = os.environ.get("PROVIDER_BUDGETS_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            unavailable(f"PROVIDER_BUDGETS_BIN={explicit} is not an executable file")
        _BIN = explicit
        return _BIN
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    path = target / "debug" / "provider-budgets"
    if not path.exists():
        cargo = shutil.which("cargo") or str(Path.home() / ".cargo" / "bin" / "cargo")
        try:
            build = subprocess.run(
                [cargo, "build", "--bin", "provider-budgets"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=1800,
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            unavailable(f"cannot build the sidecar with cargo: {e}")
        if build.returncode != 0 or not path.exists():
            unavailable(f"`cargo build --bin provider-budgets` failed:\n{build.stderr[-3000:]}")
    _BIN = str(path)
    return _BIN


class Sidecar:
    """One `provider-budgets serve` process on a loopback port, with its own data dir."""

    def __init__(
        self,
        budgets: Dict[str, str],
        period: str = "1d",
        config_text: Optional[str] = None,
        token: Optional[str] = None,
    ):
        """`config_text`, when given, is the whole config file (e.g. a litellm proxy config);
        otherwise a `provider_budget_config` block is written from `budgets`. `token`: the
        sidecar runs with it (`PROVIDER_BUDGETS_AUTH_TOKEN`)."""
        self.token = token
        self.dir = Path(tempfile.mkdtemp(prefix="pb-litellm-"))
        self.data_dir = self.dir / "data"
        self.config = self.dir / "config.yaml"
        if config_text is None:
            lines = ["provider_budget_config:"]
            for provider, limit in budgets.items():
                lines.append(f'  {provider}: {{ budget_limit: "{limit}", time_period: {period} }}')
            config_text = "\n".join(lines) + "\n"
        self.config.write_text(config_text)
        # First start on port 0 (the sidecar picks a free port and prints `listening on ADDR`);
        # a restart reuses that port, so that clients see the same URL come back.
        self.port = 0
        self.url = ""
        self.proc: Optional[subprocess.Popen] = None
        self.log = self.dir / "sidecar.log"

    def start(self) -> "Sidecar":
        binary = sidecar_binary()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PROVIDER_BUDGETS_")}
        env.setdefault("RUST_LOG", "warn")
        if self.token is not None:
            env["PROVIDER_BUDGETS_AUTH_TOKEN"] = self.token
        log_start = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    binary,
                    "--config",
                    str(self.config),
                    "--data-dir",
                    str(self.data_dir),
                    "serve",
                    "--listen",
                    f"127.0.0.1:{self.port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=env,
            )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                unavailable(f"sidecar exited with {self.proc.returncode} at start:\n{self.log.read_text()[-3000:]}")
            if self.port == 0:
                match = re.search(r"listening on 127\.0\.0\.1:(\d+)", self.log.read_text()[log_start:])
                if match is None:
                    time.sleep(0.01)
                    continue
                self.port = int(match.group(1))
                self.url = f"http://127.0.0.1:{self.port}"
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=1) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.02)
        self.stop()
        unavailable(f"sidecar did not answer /healthz within 20s:\n{self.log.read_text()[-3000:]}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def request(self, method: str, path: str, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("content-type", "application/json")
        if self.token is not None:
            req.add_header("authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")

    def spend_nanos(self) -> Dict[str, int]:
        status, body = self.request("GET", "/v1/budgets")
        assert status == 200, body
        return {b["provider"]: int(b["spend_nanos"]) for b in body["budgets"]}

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def sidecars():
    """Factory: `sidecars({"openai": "0.001"})` starts a sidecar; all are stopped at teardown."""
    started = []

    def make(
        budgets: Dict[str, str],
        period: str = "1d",
        config_text: Optional[str] = None,
        token: Optional[str] = None,
    ) -> Sidecar:
        s = Sidecar(budgets, period, config_text, token)
        started.append(s)
        return s.start()

    yield make
    for s in started:
        s.close()


@pytest.fixture(autouse=True)
def clean_litellm_callbacks():
    import litellm

    litellm.logging_callback_manager._reset_all_callbacks()
    yield
    litellm.logging_callback_manager._reset_all_callbacks()


# The mock deployments every test routes over, with the cost of one call to each.
PROMPT = [{"role": "user", "content": "hello"}]
OPENAI = "openai/gpt-4o"
ANTHROPIC = "anthropic/claude-haiku-4-5"


@pytest.fixture(scope="session")
def call_cost() -> Dict[str, float]:
    """litellm's `response_cost` of one mock call (PROMPT, reply "hi") per deployment model."""
    import litellm

    out = {}
    for model in (OPENAI, ANTHROPIC):
        resp = litellm.completion(model=model, messages=PROMPT, mock_response="hi")
        cost = resp._hidden_params["response_cost"]
        assert cost and cost > 0, f"litellm computed no cost for {model}: {cost!r}"
        out[model] = cost
    return out


def deployments(*models: str, group: str = "m"):
    return [{"model_name": group, "litellm_params": {"model": m, "mock_response": "hi"}} for m in models]
