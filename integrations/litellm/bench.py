"""What the plugin adds to one litellm Router request, side by side with litellm's own filter.

    python integrations/litellm/bench.py [--requests 2000] [--rounds 5] [--deployments 2]

Three Routers over the same `mock_response` deployments (offline price map), measured in the
same process and run, interleaved round by round so that drift hits them alike:

* `none`     -- no budget filter;
* `litellm`  -- litellm's own provider budget filter (`provider_budget_config`, in-memory:
               `RouterBudgetLimiting` without Redis);
* `plugin`   -- `ProviderBudgets` against a real `provider-budgets serve` started here;
* `nullfilt` -- a `CustomLogger` whose `async_filter_deployments` returns its input: what
               litellm itself spends on running any routing-filter callback.

Budgets are large: nothing is ever filtered out, each request runs the filter, the pick, the
mock call and the success hooks (which record the spend: in memory for litellm, a background
POST /v1/spend for the plugin). Requests are sequential; each one's wall time includes the
background work of the previous ones that runs meanwhile. Printed: median and p99 wall time per
request and the difference to `none`; this Python process's CPU time per request (background
work included; the sidecar's own CPU is not), which a loaded machine disturbs much less than
wall time; the filter hook alone (`async_filter_deployments`); and the success hook alone
(`async_log_success_event` on one real call's event; the plugin's background post is not in
it).

The sidecar binary: `$PROVIDER_BUDGETS_BIN`, else `target/release/provider-budgets`, else
`target/debug/provider-budgets` (the figures of a debug build are not representative).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
os.environ.setdefault("LITELLM_LOG", "ERROR")

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE / "tests"))

import litellm  # noqa: E402
from litellm import Router  # noqa: E402
from litellm.integrations.custom_logger import CustomLogger  # noqa: E402
from litellm.router_strategy.budget_limiter import RouterBudgetLimiting  # noqa: E402

import conftest  # noqa: E402  (the tests' Sidecar helper)
from provider_budgets_litellm import ProviderBudgets  # noqa: E402

MODELS = ["openai/gpt-4o", "anthropic/claude-haiku-4-5", "openai/gpt-4o-mini", "anthropic/claude-sonnet-4-5"]
MESSAGES = [{"role": "user", "content": "hello"}]


class Capture(CustomLogger):
    """Keeps the last success event's arguments (to time each success hook alone)."""

    def __init__(self):
        super().__init__()
        self.event = None

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        self.event = (kwargs, response_obj, start_time, end_time)


class NullFilter(CustomLogger):
    async def async_filter_deployments(
        self, model, healthy_deployments, messages, request_kwargs=None, parent_otel_span=None
    ):
        return healthy_deployments


def pick_binary() -> str:
    explicit = os.environ.get("PROVIDER_BUDGETS_BIN")
    if explicit:
        return explicit
    target = Path(os.environ.get("CARGO_TARGET_DIR") or REPO / "target")
    for profile in ("release", "debug"):
        path = target / profile / "provider-budgets"
        if path.exists():
            return str(path)
    sys.exit("no sidecar binary: cargo build --release --bin provider-budgets")


def pct(samples, q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))]


def model_list(n: int):
    return [
        {"model_name": "m", "litellm_params": {"model": MODELS[i % len(MODELS)], "mock_response": "hi"}}
        for i in range(n)
    ]


async def main(args) -> None:
    binary = pick_binary()
    os.environ["PROVIDER_BUDGETS_BIN"] = binary
    providers = sorted({m.split("/")[0] for m in MODELS})
    side = conftest.Sidecar({p: "1000000" for p in providers}).start()
    try:
        await run(args, side, providers, binary)
    finally:
        side.close()


async def run(args, side, providers, binary) -> None:
    deps = model_list(args.deployments)
    plugin = ProviderBudgets(url=side.url)
    budget = {p: {"budget_limit": 1_000_000, "time_period": "1d"} for p in providers}

    litellm.logging_callback_manager._reset_all_callbacks()
    routers = {"none": Router(model_list=deps, num_retries=0)}
    litellm.logging_callback_manager._reset_all_callbacks()
    routers["litellm"] = Router(model_list=deps, num_retries=0, provider_budget_config=budget)
    limiter = next(cb for cb in litellm.callbacks if isinstance(cb, RouterBudgetLimiting))
    litellm.logging_callback_manager._reset_all_callbacks()
    routers["plugin"] = Router(model_list=deps, num_retries=0)
    routers["nullfilt"] = Router(model_list=deps, num_retries=0)
    callbacks = {"none": [], "litellm": [limiter], "plugin": [plugin], "nullfilt": [NullFilter()]}

    samples = {name: [] for name in routers}
    cpu = {name: 0 for name in routers}  # this process's CPU time, background work included
    filter_samples = {"litellm": [], "plugin": []}
    hooks = {"litellm": limiter, "plugin": plugin}
    per_round = max(1, args.requests // args.rounds)
    for rnd in range(args.rounds + 1):  # round 0 warms up and is discarded
        for name, router in routers.items():
            litellm.logging_callback_manager._reset_all_callbacks()
            litellm.callbacks = list(callbacks[name])
            out = samples[name]
            cpu0 = time.process_time_ns()
            for _ in range(per_round if rnd else 50):
                t0 = time.perf_counter_ns()
                await router.acompletion(model="m", messages=MESSAGES)
                dt = time.perf_counter_ns() - t0
                if rnd:
                    out.append(dt)
            await plugin.flush(30)
            if rnd:
                cpu[name] += time.process_time_ns() - cpu0
            if name in hooks:
                hook = hooks[name]
                for _ in range(per_round if rnd else 50):
                    t0 = time.perf_counter_ns()
                    await hook.async_filter_deployments("m", deps, MESSAGES, {})
                    dt = time.perf_counter_ns() - t0
                    if rnd:
                        filter_samples[name].append(dt)
    success = await time_success_hooks(routers["none"], hooks, per_round * args.rounds)
    await plugin.aclose(30)
    litellm.logging_callback_manager._reset_all_callbacks()

    spend = side.spend_nanos()
    print(f"# litellm {litellm_version()}, python {platform.python_version()}, {os.cpu_count()} cpus, sidecar {binary}")
    print(
        f"# {args.deployments} deployments, {per_round * args.rounds} requests per config "
        f"({args.rounds} interleaved rounds), sidecar spend recorded: "
        f"{sum(spend.values()) / 1e9:.6f} USD, posts {plugin.stats.posted}, dropped {plugin.stats.dropped}"
    )
    base = statistics.median(samples["none"])
    base_cpu = cpu["none"] / len(samples["none"])
    print(
        f"{'config':<10} {'median µs':>10} {'p99 µs':>10} {'added (median) µs':>18} {'CPU/req µs':>11} {'added CPU µs':>13}"
    )
    for name, s in samples.items():
        med = statistics.median(s)
        c = cpu[name] / len(s)
        print(
            f"{name:<10} {med / 1e3:>10.1f} {pct(s, 0.99) / 1e3:>10.1f} {(med - base) / 1e3:>18.1f}"
            f" {c / 1e3:>11.1f} {(c - base_cpu) / 1e3:>13.1f}"
        )
    print(f"{'filter hook alone':<20} {'median µs':>10} {'p99 µs':>10}")
    for name, s in filter_samples.items():
        print(f"{name:<20} {statistics.median(s) / 1e3:>10.1f} {pct(s, 0.99) / 1e3:>10.1f}")
    print(f"{'success hook alone':<20} {'median µs':>10} {'p99 µs':>10}  (background work it starts: not included)")
    for name, s in success.items():
        print(f"{name:<20} {statistics.median(s) / 1e3:>10.1f} {pct(s, 0.99) / 1e3:>10.1f}")


async def time_success_hooks(router, hooks, n: int):
    """Each filter's `async_log_success_event` alone, on one real call's event (the plugin's
    repeats carry the call's idempotency key: the sidecar counts them once)."""
    capture = Capture()
    litellm.logging_callback_manager._reset_all_callbacks()
    litellm.callbacks = [capture]
    await router.acompletion(model="m", messages=MESSAGES)
    for _ in range(200):
        if capture.event is not None:
            break
        await asyncio.sleep(0.01)
    out = {name: [] for name in hooks}
    for _ in range(2):  # interleaved halves
        for name, hook in hooks.items():
            for _ in range(n // 2):
                t0 = time.perf_counter_ns()
                await hook.async_log_success_event(*capture.event)
                out[name].append(time.perf_counter_ns() - t0)
            if hasattr(hook, "flush"):
                await hook.flush(30)
    return out


def litellm_version() -> str:
    try:
        from importlib.metadata import version

        return version("litellm")
    except Exception:
        return "?"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per config")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds")
    parser.add_argument("--deployments", type=int, default=2, help="deployments in the model group")
    asyncio.run(main(parser.parse_args()))
