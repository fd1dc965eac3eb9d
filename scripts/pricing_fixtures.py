#!/usr/bin/env python3
"""Write tests/fixtures/pricing_parity.jsonl: litellm's cost of generated (model, usage) cases.

The Rust test `pricing::tests::parity_with_litellm` prices every line with the builtin
catalog and compares with litellm's `cost_per_token` (to within one nano-dollar: ours is
exact and rounded up once, litellm's is a float sum).

    python3 -m venv /tmp/venv-pricing
    /tmp/venv-pricing/bin/pip install litellm==1.110.2
    /tmp/venv-pricing/bin/python scripts/pricing_fixtures.py

Deterministic (seeded): rerunning it with the same litellm and catalog rewrites the same file.
Cases: models drawn across the whole catalog (every entry that prices tokens, minus the kinds
`docs/guide/pricing.md` lists as out of scope: `tiered_pricing` tables, `off_peak_pricing`,
non-token modes), every model with `_above_N_tokens` tiers at and around its thresholds, and
usages mixing input, output, cache read, cache creation and reasoning tokens. Each line:

    {"model": ..., "usage": {"input": P, "output": C, "cache_read": R, "cache_creation": W,
     "reasoning": X}, "litellm": "<repr of prompt_cost + completion_cost>",
     "prompt": "<repr>", "completion": "<repr>"}

`model` is the catalog key, or `provider/key` for a share of the bare keys (litellm is then
called without `custom_llm_provider`, so its own provider parsing is exercised).
"""
import json
import os
import pathlib
import random
import re
import sys

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # the packaged catalog, no network

ROOT = pathlib.Path(__file__).resolve().parent.parent
CATALOG = ROOT / "src" / "pricing" / "data" / "model_prices_and_context_window.json"
OUT = ROOT / "tests" / "fixtures" / "pricing_parity.jsonl"
TOKEN_MODES = {None, "chat", "completion", "responses", "embedding"}
TIER = re.compile(
    r"^(input_cost_per_token|output_cost_per_token|cache_read_input_token_cost|"
    r"cache_creation_input_token_cost)_above_(\d+)(k?)_tokens$"
)


def thresholds(entry: dict) -> list[int]:
    out = set()
    for key in entry:
        m = TIER.match(key)
        if m:
            out.add(int(m.group(2)) * (1000 if m.group(3) else 1))
    return sorted(out)


def in_scope(entry: dict) -> bool:
    if not isinstance(entry, dict):
        return False
    if "input_cost_per_token" not in entry and "output_cost_per_token" not in entry:
        return False
    if "tiered_pricing" in entry or "off_peak_pricing" in entry:
        return False
    return entry.get("mode") in TOKEN_MODES


def usage(rng: random.Random, prompt: int | None = None) -> dict:
    p = prompt if prompt is not None else rng.choice([0, 1, 7, 999, 12_345, 100_000, rng.randrange(0, 2_000_000)])
    c = rng.choice([0, 1, 3, 500, 4_096, rng.randrange(0, 200_000)])
    r = rng.randrange(0, p + 1) if p and rng.random() < 0.5 else 0
    w = rng.randrange(0, p - r + 1) if p - r > 0 and rng.random() < 0.3 else 0
    x = rng.randrange(0, c + 1) if c and rng.random() < 0.4 else 0
    return {"input": p, "output": c, "cache_read": r, "cache_creation": w, "reasoning": x}


def litellm_cost(litellm, model: str, provider: str | None, u: dict) -> tuple[float, float]:
    from litellm.types.utils import CompletionTokensDetailsWrapper, PromptTokensDetailsWrapper, Usage

    usage_object = Usage(
        prompt_tokens=u["input"],
        completion_tokens=u["output"],
        total_tokens=u["input"] + u["output"],
        prompt_tokens_details=PromptTokensDetailsWrapper(
            cached_tokens=u["cache_read"], cache_creation_tokens=u["cache_creation"]
        ),
        completion_tokens_details=CompletionTokensDetailsWrapper(reasoning_tokens=u["reasoning"]),
        cache_creation_input_tokens=u["cache_creation"],
        cache_read_input_tokens=u["cache_read"],
    )
    return litellm.cost_per_token(model=model, custom_llm_provider=provider, usage_object=usage_object)


def cases(catalog: dict, rng: random.Random):
    keys = sorted(k for k, v in catalog.items() if k != "sample_spec" and in_scope(v))
    tiered = [k for k in keys if thresholds(catalog[k])]
    for key in rng.sample(keys, min(len(keys), 1100)):
        yield key, usage(rng)
    for key in tiered:
        for t in thresholds(catalog[key]):
            for p in (t - 1, t, t + 1, t + rng.randrange(1, 500_000)):
                yield key, usage(rng, prompt=max(p, 0))


def main() -> None:
    import litellm

    catalog = json.loads(CATALOG.read_text())
    rng = random.Random(22)
    lines, failed = [], 0
    for key, u in cases(catalog, rng):
        provider = catalog[key].get("litellm_provider")
        model = key
        # A share of the bare keys asked for as provider/key. litellm is never told the
        # provider: it parses it from the name, as our lookup has to (a router passes the
        # deployment's model string; with `custom_llm_provider` litellm would try
        # `provider/key` first, another entry for a few keys).
        if "/" not in key and provider and rng.random() < 0.25:
            model = f"{provider}/{key}"
        try:
            prompt, completion = litellm_cost(litellm, model, None, u)
        except Exception as e:  # noqa: BLE001  (a case litellm cannot price is left out)
            failed += 1
            print(f"skipped {model}: {type(e).__name__}: {str(e)[:100]}", file=sys.stderr)
            continue
        lines.append(
            json.dumps(
                {
                    "model": model,
                    "usage": u,
                    "litellm": repr(prompt + completion),
                    "prompt": repr(prompt),
                    "completion": repr(completion),
                },
                sort_keys=True,
            )
        )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print(f"{OUT}: {len(lines)} cases ({failed} left out: litellm raised)")


if __name__ == "__main__":
    main()
