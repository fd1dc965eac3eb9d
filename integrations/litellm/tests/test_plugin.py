"""The plugin against the real litellm Router (mock_response deployments, offline price map) and
a real `provider-budgets serve` process."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from collections import Counter
from typing import Dict, List, Tuple

import litellm
import pytest
from conftest import ANTHROPIC, OPENAI, PROMPT, deployments, nanos, unavailable, usd
from litellm import Router
from litellm.integrations.custom_logger import CustomLogger
from litellm.router_strategy.budget_limiter import RouterBudgetLimiting
from litellm.types.router import RouterErrors

import provider_budgets_litellm
from provider_budgets_litellm import NoDeploymentsAvailable, ProviderBudgets, cost_to_decimal_str

CROSSED = RouterErrors.no_deployments_with_provider_budget_routing.value
LOGGER = "provider_budgets_litellm"


async def await_condition(cond, what: str, timeout: float = 10.0):
    """Poll `cond()` (sync) while letting the event loop run the plugin's background posts."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


def provider_of(resp) -> str:
    return resp._hidden_params["custom_llm_provider"]


class CostRecorder(CustomLogger):
    """What litellm reports per successful call: (provider, response_cost)."""

    def __init__(self):
        super().__init__()
        self.seen: List[Tuple[str, float]] = []

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        slo = kwargs["standard_logging_object"]
        self.seen.append((slo["custom_llm_provider"], slo["response_cost"]))


# Every Router here has `num_retries=0`: with litellm's default retries a refused request (by
# litellm's own filter as by this plugin) takes ~4.7 s of backoff before the error surfaces.
async def call(router: Router, content: str = "hello"):
    return await router.acompletion(model="m", messages=[{"role": "user", "content": content}])


# ---- routing ---------------------------------------------------------------------------------


def test_routes_away_from_a_provider_exactly_when_its_budget_is_spent(sidecars, call_cost):
    c_o, c_a = nanos(call_cost[OPENAI]), nanos(call_cost[ANTHROPIC])
    # Limits of exactly 3 and 2 calls: spend == limit is exhausted (litellm: spend >= limit).
    side = sidecars({"openai": usd(3 * c_o), "anthropic": usd(2 * c_a)})

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI, ANTHROPIC))
        served: Counter = Counter()
        expected = {"openai": 0, "anthropic": 0}
        for i in range(5):
            # Before the call, every provider that still has budget must be offered.
            left = await plugin.async_filter_deployments("m", deployments(OPENAI, ANTHROPIC), PROMPT)
            offered = {litellm.get_llm_provider(d["litellm_params"]["model"])[1] for d in left}
            assert offered == {
                p for p, n in (("openai", 3 - served["openai"]), ("anthropic", 2 - served["anthropic"])) if n > 0
            }, f"call {i}: offered {offered} after {dict(served)}"
            resp = await call(router)
            p = provider_of(resp)
            served[p] += 1
            expected[p] += c_o if p == "openai" else c_a
            await await_condition(lambda: side.spend_nanos() == expected, f"spend {expected} after call {i}")
        assert served == Counter({"openai": 3, "anthropic": 2})
        for _ in range(2):
            with pytest.raises(ValueError) as info:
                await call(router)
            msg = str(info.value)
            assert msg.startswith(f"{CROSSED}: "), msg
            # litellm's wording, one line per exhausted provider, with the sidecar's exact amounts.
            assert sorted(msg.split(": ", 1)[1].splitlines()) == [
                f"Exceeded budget for provider anthropic: {usd(2 * c_a)} >= {usd(2 * c_a)}",
                f"Exceeded budget for provider openai: {usd(3 * c_o)} >= {usd(3 * c_o)}",
            ], msg
        assert side.spend_nanos() == {"openai": 3 * c_o, "anthropic": 2 * c_a}
        await plugin.aclose()

    asyncio.run(main())


def _run_sequence(router: Router, calls: int, settle) -> Tuple[Counter, str, type]:
    async def main():
        served: Counter = Counter()
        error = None
        for _ in range(calls):
            try:
                resp = await call(router)
            except Exception as e:  # the sequence ends at the first refusal
                error = e
                break
            served[provider_of(resp)] += 1
            await settle(served)
        return served, error

    return main()


def test_same_routing_and_error_as_litellms_own_provider_budget_filter(sidecars, call_cost):
    # Limits half-way between two calls, so that float (litellm) and exact (sidecar) sums agree:
    # 3 openai calls and 2 anthropic calls fit, then nothing is left.
    limits = {"openai": call_cost[OPENAI] * 2.5, "anthropic": call_cost[ANTHROPIC] * 1.5}
    side = sidecars({p: usd(nanos(v)) for p, v in limits.items()})
    unit = {"openai": call_cost[OPENAI], "anthropic": call_cost[ANTHROPIC]}

    async def theirs():
        router = Router(
            num_retries=0,
            model_list=deployments(OPENAI, ANTHROPIC),
            provider_budget_config={p: {"budget_limit": v, "time_period": "1d"} for p, v in limits.items()},
        )
        limiter = next(cb for cb in litellm.callbacks if isinstance(cb, RouterBudgetLimiting))

        async def settle(served):
            for p, n in served.items():
                deadline = time.monotonic() + 10
                while (await limiter._get_current_provider_spend(p) or 0.0) < n * unit[p] * 0.999:
                    assert time.monotonic() < deadline, f"litellm's limiter never saw {p} spend"
                    await asyncio.sleep(0.005)

        return await _run_sequence(router, 8, settle)

    async def ours():
        plugin = ProviderBudgets(url=side.url)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI, ANTHROPIC))
        c = {"openai": nanos(unit["openai"]), "anthropic": nanos(unit["anthropic"])}

        async def settle(served):
            want = {p: served[p] * c[p] for p in c}
            await await_condition(lambda: side.spend_nanos() == want, f"sidecar spend {want}")

        out = await _run_sequence(router, 8, settle)
        await plugin.aclose()
        return out

    their_served, their_error = asyncio.run(theirs())
    litellm.logging_callback_manager._reset_all_callbacks()
    our_served, our_error = asyncio.run(ours())

    assert their_served == Counter({"openai": 3, "anthropic": 2})
    assert our_served == their_served
    assert type(their_error) is ValueError and isinstance(our_error, ValueError)
    for err in (their_error, our_error):
        lines = str(err).split(": ", 1)[1].splitlines()
        assert str(err).startswith(f"{CROSSED}: ")
        assert sorted(line.split(":")[0] for line in lines) == [
            "Exceeded budget for provider anthropic",
            "Exceeded budget for provider openai",
        ], str(err)


# ---- spend -----------------------------------------------------------------------------------


def test_sidecar_spend_equals_the_sum_of_litellms_response_cost_to_the_nano(sidecars):
    side = sidecars({"openai": "1000", "anthropic": "1000"})
    calls = 40

    # Deployments with their own per-token prices (mock usage is fixed: 10 in, 20 out), so
    # that costs vary and carry float noise, like 10 * 1.23e-07 + 20 * 4.56e-08.
    prices = [(1.23e-07, 4.56e-08), (3.3e-07, 1.1e-07), (7.89e-09, 2.5e-06), (1.7e-06, 3.01e-07)]
    model_list = [
        {
            "model_name": "m",
            "litellm_params": {
                "model": model,
                "mock_response": "hi",
                "input_cost_per_token": p_in * k,
                "output_cost_per_token": p_out * k,
            },
        }
        for model, k in ((OPENAI, 1), (ANTHROPIC, 3))
        for p_in, p_out in prices
    ]

    async def main():
        plugin = ProviderBudgets(url=side.url)
        recorder = CostRecorder()
        litellm.callbacks = [plugin, recorder]
        router = Router(num_retries=0, model_list=model_list)
        await asyncio.gather(*(call(router) for _ in range(calls)))
        await await_condition(lambda: len(recorder.seen) == calls, "litellm's success events")
        await await_condition(lambda: plugin.stats.posted == calls, "every spend post acknowledged")
        assert await plugin.flush(5)
        want: Dict[str, int] = {"openai": 0, "anthropic": 0}
        for p, cost in recorder.seen:
            want[p] += nanos(cost)
        assert all(want.values()), f"both providers must be used: {want}"
        assert len({cost for _, cost in recorder.seen}) > 5, "costs should vary"
        assert side.spend_nanos() == want
        assert plugin.stats.dropped == 0 and plugin.stats.rejected == 0
        await plugin.aclose()

    asyncio.run(main())


class DroppingProxy:
    """A loopback TCP relay in front of the sidecar that, for the first `drops` connections,
    forwards the request but cuts the connection when the answer comes back: the sidecar has
    counted the spend, the client saw a failure (a timeout after commit)."""

    def __init__(self, upstream_port: int, drops: int):
        self.upstream_port = upstream_port
        self.drops = drops
        self.requests: List[bytes] = []
        self.cut = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        cut = self.drops > 0
        if cut:
            self.drops -= 1

        async def to_server():
            while data := await reader.read(65536):
                self.requests.append(data)
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def to_client():
            while data := await up_r.read(65536):
                if cut:
                    self.cut += 1
                    writer.transport.abort()
                    up_w.close()
                    return
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


class IdleCloser:
    """A loopback TCP relay in front of the sidecar that closes each connection when a second
    request arrives on it, unanswered: a keep-alive connection the server closed just as the
    client reused it."""

    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.closed = 0
        self.server = None
        self.port = 0

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        seen = 0

        async def to_server():
            nonlocal seen
            while data := await reader.read(65536):
                seen += data.count(b"POST ")
                if seen >= 2:
                    self.closed += 1
                    writer.transport.abort()
                    up_w.close()
                    return
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def to_client():
            while data := await up_r.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)

    async def close(self):
        self.server.close()
        await self.server.wait_closed()


def test_a_keep_alive_connection_closed_under_the_request_is_not_an_outage(sidecars, caplog):
    side = sidecars({"openai": "10"})

    async def main():
        relay = await IdleCloser(side.port).start()
        # Every filter asks the sidecar (no cache): each finds its connection closed.
        plugin = ProviderBudgets(url=f"http://127.0.0.1:{relay.port}", fail_open=False, filter_cache_ttl=0)
        deps = deployments(OPENAI, ANTHROPIC)
        for _ in range(4):
            assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        await plugin.aclose()
        await relay.close()
        return relay

    with caplog.at_level(logging.INFO, logger=LOGGER):
        relay = asyncio.run(main())
    assert relay.closed >= 3, relay.closed
    assert not [r for r in caplog.records if r.name == LOGGER], [r.getMessage() for r in caplog.records]


def success_kwargs(provider: str, cost: float, call_id: str) -> dict:
    """The parts of litellm's success-event kwargs the plugin reads."""
    return {
        "litellm_call_id": call_id,
        "standard_logging_object": {"custom_llm_provider": provider, "response_cost": cost, "id": "chatcmpl-x"},
    }


def test_a_spend_post_retried_after_a_lost_answer_counts_once(sidecars):
    side = sidecars({"openai": "10"})
    cost = 0.1 + 0.2  # 0.30000000000000004

    async def main():
        proxy = await DroppingProxy(side.port, drops=1).start()
        plugin = ProviderBudgets(url=f"http://127.0.0.1:{proxy.port}", retry_backoff=0.01)
        task = plugin.post_spend_in_background(success_kwargs("openai", cost, "call-1"))
        assert task is not None
        assert await plugin.flush(10)
        await plugin.aclose()
        await proxy.close()
        return proxy

    proxy = asyncio.run(main())
    assert proxy.cut == 1, "the first answer must have been cut"
    bodies = [json.loads(r.split(b"\r\n\r\n", 1)[1]) for r in proxy.requests if b"/v1/spend" in r]
    # Spend posts go as batches (of one here): the spends they carry.
    bodies = [s for b in bodies for s in b.get("spends", [b])]
    assert len(bodies) == 2, proxy.requests
    assert (
        bodies[0]
        == bodies[1]
        == {"provider": "openai", "cost": "0.30000000000000004", "idempotency_key": "litellm:call-1"}
    )
    # Counted by the first attempt; the retry with the same key is not counted again.
    assert side.spend_nanos() == {"openai": 300_000_000}


def test_a_sidecar_with_a_token_counts_only_the_posts_that_carry_it(sidecars, monkeypatch):
    token = "plugin-t0ken"
    side = sidecars({"openai": "10"}, token=token)
    monkeypatch.delenv("PROVIDER_BUDGETS_AUTH_TOKEN", raising=False)

    async def post(plugin: ProviderBudgets, call: str) -> None:
        assert plugin.post_spend_in_background(success_kwargs("openai", 0.5, call)) is not None
        assert await plugin.flush(10)
        await plugin.aclose()

    without = ProviderBudgets(url=side.url, retry_backoff=0.01)
    asyncio.run(post(without, "no-token"))
    assert without.stats.rejected == 1 and without.stats.posted == 0, without.stats
    with_token = ProviderBudgets(url=side.url, token=token)
    assert token not in repr(with_token)
    asyncio.run(post(with_token, "token"))
    assert with_token.stats.posted == 1, with_token.stats
    monkeypatch.setenv("PROVIDER_BUDGETS_AUTH_TOKEN", token)
    from_env = ProviderBudgets(url=side.url)
    asyncio.run(post(from_env, "env"))
    assert from_env.stats.posted == 1, from_env.stats
    assert side.spend_nanos() == {"openai": 1_000_000_000}


def test_spend_posts_survive_an_outage_without_blocking_the_response(sidecars, call_cost):
    side = sidecars({"openai": "10"})
    c_o = nanos(call_cost[OPENAI])

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=True, retry_backoff=0.05, max_backoff=0.2, spend_attempts=200)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        await call(router)
        await await_condition(lambda: side.spend_nanos() == {"openai": c_o}, "first spend")
        side.stop()
        started = time.monotonic()
        for _ in range(3):
            await call(router)
        elapsed = time.monotonic() - started
        await await_condition(lambda: plugin.stats.retries >= 3, "posts being retried during the outage")
        assert plugin.stats.posted == 1
        # The three answers came while their spend posts were failing.
        assert elapsed < plugin.timeout, f"responses held up {elapsed:.3f}s by the outage"
        side.start()  # same port, same data dir
        assert await plugin.flush(20), "pending posts did not land after the sidecar came back"
        assert plugin.stats.posted == 4 and plugin.stats.dropped == 0
        assert side.spend_nanos() == {"openai": 4 * c_o}
        await plugin.aclose()

    asyncio.run(main())


def test_durable_spend_posts_survive_a_sidecar_crash(sidecars):
    side = sidecars({"openai": "10"})
    costs = [0.1 + 0.2, 1e-05, 0.0042]

    async def main():
        plugin = ProviderBudgets(url=side.url, durable=True)
        for i, cost in enumerate(costs):
            plugin.post_spend_in_background(success_kwargs("openai", cost, f"call-{i}"))
        assert await plugin.flush(10)
        assert (plugin.stats.posted, plugin.stats.rejected) == (len(costs), 0)
        await plugin.aclose()

    asyncio.run(main())
    side.proc.kill()  # SIGKILL: only what was fsynced survives
    side.proc.wait()
    side.proc = None
    side.start()
    assert side.spend_nanos() == {"openai": sum(nanos(c) for c in costs)}


# ---- sidecar unreachable ---------------------------------------------------------------------


def test_fail_open_true_lets_deployments_pass_with_one_warning_per_outage(sidecars, caplog):
    # A zero limit blocks openai: while the sidecar is up, nothing is left.
    side = sidecars({"openai": "0"})

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=True, spend_attempts=1)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))

        def warnings() -> int:
            return sum(1 for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING)

        with pytest.raises(ValueError, match=CROSSED):
            await call(router)
        for outage in (1, 2):
            side.stop()
            for _ in range(4):
                resp = await call(router)  # passes: fail open
                assert provider_of(resp) == "openai"
            assert await plugin.flush(10)
            assert warnings() == outage, [r.getMessage() for r in caplog.records]
            side.start()
            with pytest.raises(ValueError, match=CROSSED):  # filtering again
                await call(router)
        assert warnings() == 2
        assert any("answers again" in r.getMessage() for r in caplog.records if r.name == LOGGER)
        await plugin.aclose()

    with caplog.at_level(logging.INFO, logger=LOGGER):
        asyncio.run(main())


def test_fail_open_false_raises_litellms_no_deployments_error(sidecars):
    side = sidecars({"openai": "10"})

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False, spend_attempts=1)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI, ANTHROPIC))
        await call(router)
        await await_condition(lambda: plugin.stats.posted == 1, "the first call's spend")
        side.stop()
        for _ in range(2):
            with pytest.raises(ValueError) as info:
                await call(router)
            assert str(info.value).startswith(RouterErrors.no_deployments_available.value), info.value
            assert side.url in str(info.value)
        await plugin.flush(10)
        side.start()
        await call(router)  # back to normal
        await await_condition(lambda: plugin.stats.posted == 2, "the spend of both answered calls")
        await plugin.aclose()

    asyncio.run(main())


def test_an_answer_that_is_not_json_follows_fail_open(sidecars):
    """A server that answers garbage (here: a plain HTTP server on the port) is an outage too."""
    import http.server
    import threading

    class Garbage(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"<html>not the sidecar</html>")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Garbage)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:

        async def main():
            deps = deployments(OPENAI)
            opened = ProviderBudgets(url=url, fail_open=True)
            assert await opened.async_filter_deployments("m", deps, PROMPT) == deps
            closed = ProviderBudgets(url=url, fail_open=False)
            with pytest.raises(NoDeploymentsAvailable, match="malformed"):
                await closed.async_filter_deployments("m", deps, PROMPT)
            await opened.aclose()
            await closed.aclose()

        asyncio.run(main())
    finally:
        server.shutdown()


def test_a_hung_sidecar_costs_at_most_the_timeout(sidecars):
    """A port that accepts connections and never answers: the filter gives up after `timeout`."""
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:

        async def main():
            deps = deployments(OPENAI, ANTHROPIC)
            opened = ProviderBudgets(url=url, fail_open=True, timeout=0.3)
            closed = ProviderBudgets(url=url, fail_open=False, timeout=0.3)
            t0 = time.monotonic()
            assert await opened.async_filter_deployments("m", deps, PROMPT) == deps
            with pytest.raises(NoDeploymentsAvailable, match="TimeoutError|timeout"):
                await closed.async_filter_deployments("m", deps, PROMPT)
            elapsed = time.monotonic() - t0
            assert 0.55 <= elapsed < 2.0, elapsed
            await opened.aclose()
            await closed.aclose()

        asyncio.run(main())
    finally:
        listener.close()


def test_a_refused_spend_is_logged_once_and_not_retried(sidecars, caplog):
    """`at` older than the sidecar's retention: 422, a permanent refusal (no retry loop)."""
    side = sidecars({"openai": "10"})

    async def main():
        plugin = ProviderBudgets(url=side.url, retry_backoff=0.01)
        kwargs = success_kwargs("openai", 0.5, "call-old")
        kwargs["standard_logging_object"]["endTime"] = time.time() - 30 * 86400
        plugin.post_spend_in_background(kwargs)
        assert await plugin.flush(10)
        # Without a budget: acknowledged (`counted: false`), not an error.
        plugin.post_spend_in_background(success_kwargs("mistral", 0.5, "call-nobudget"))
        assert await plugin.flush(10)
        await plugin.aclose()
        return plugin

    with caplog.at_level(logging.INFO, logger=LOGGER):
        plugin = asyncio.run(main())
    assert (plugin.stats.rejected, plugin.stats.retries, plugin.stats.posted) == (1, 0, 1)
    errors = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "rejected spend 0.5 for provider openai (HTTP 422" in errors[0], errors
    assert side.spend_nanos() == {"openai": 0}


# ---- packaging -------------------------------------------------------------------------------


def test_proxy_config_name_resolves_to_an_instance(monkeypatch):
    """`litellm_settings: {callbacks: ["provider_budgets_litellm.proxy_handler_instance"]}`."""
    try:
        from litellm.proxy.types_utils.utils import get_instance_fn
    except ImportError as e:
        unavailable(f"litellm's proxy loader cannot be imported: {e}")
    monkeypatch.setenv("PROVIDER_BUDGETS_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("PROVIDER_BUDGETS_FAIL_OPEN", "false")
    monkeypatch.setattr(provider_budgets_litellm, "_proxy_handler_instance", None)
    instance = get_instance_fn("provider_budgets_litellm.proxy_handler_instance")
    assert isinstance(instance, ProviderBudgets) and isinstance(instance, CustomLogger)
    assert instance.url == "http://127.0.0.1:9" and instance.fail_open is False
    assert get_instance_fn("provider_budgets_litellm.proxy_handler_instance") is instance


PROXY_CONFIG = """
model_list:
  - model_name: m
    litellm_params: { model: openai/gpt-4o, mock_response: hi }
  - model_name: m
    litellm_params: { model: anthropic/claude-haiku-4-5, mock_response: hi }
litellm_settings:
  callbacks: ["provider_budgets_litellm.proxy_handler_instance"]
  drop_params: true
router_settings:
  routing_strategy: simple-shuffle
  provider_budget_config:
    openai: { budget_limit: 0, time_period: 1d }
    anthropic: { budget_limit: 100, time_period: 1d }
general_settings:
  master_key: sk-1234
"""


def test_the_sidecar_runs_on_the_litellm_proxy_config_as_it_is(sidecars, monkeypatch):
    """One file for both: the proxy's config (callback registered, budgets under router_settings)."""
    import yaml
    from litellm.proxy.types_utils.utils import get_instance_fn

    side = sidecars({}, config_text=PROXY_CONFIG)
    config = yaml.safe_load(PROXY_CONFIG)
    monkeypatch.setenv("PROVIDER_BUDGETS_URL", side.url)
    monkeypatch.setattr(provider_budgets_litellm, "_proxy_handler_instance", None)
    (name,) = config["litellm_settings"]["callbacks"]

    async def main():
        plugin = get_instance_fn(name)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=config["model_list"])  # budgets left to the sidecar
        for _ in range(4):
            assert provider_of(await call(router)) == "anthropic"  # openai's limit is 0
        assert sorted(side.spend_nanos()) == ["anthropic", "openai"]
        await plugin.aclose()

    asyncio.run(main())


def test_url_defaults(monkeypatch):
    monkeypatch.delenv("PROVIDER_BUDGETS_URL", raising=False)
    assert ProviderBudgets().url == "http://127.0.0.1:8787"
    monkeypatch.setenv("PROVIDER_BUDGETS_URL", "http://127.0.0.1:9999/")
    assert ProviderBudgets().url == "http://127.0.0.1:9999"
    assert ProviderBudgets(url="http://10.0.0.1:1").url == "http://10.0.0.1:1"


def test_costs_go_over_the_wire_as_exact_plain_decimals():
    assert cost_to_decimal_str(0.1 + 0.2) == "0.30000000000000004"
    assert cost_to_decimal_str(1e-05) == "0.00001"  # never "1e-05"
    assert cost_to_decimal_str(2.5e-07) == "0.00000025"
    assert cost_to_decimal_str(3) == "3"
    assert cost_to_decimal_str("0.0042") == "0.0042"
    for bad in (math.nan, math.inf, None, True, "abc", object()):
        assert cost_to_decimal_str(bad) is None, bad


def test_a_429_of_a_strict_budget_refused_by_the_nodes_grant_is_not_read_as_spent():
    answer = json.dumps(
        {
            "error": "No deployments available - crossed budget: ...",
            "exceeded": [
                {"scope": "provider", "name": "openai", "refused_by": "grant",
                 "spend_nanos": 1_000_000_000, "limit_nanos": 100_000_000_000,
                 "grant_nanos": 500_000_000},
                {"scope": "provider", "name": "anthropic", "refused_by": "limit",
                 "spend_nanos": 2_000_000_000, "limit_nanos": 2_000_000_000, "grant_nanos": None},
            ],
            "unknown": [],
        }
    ).encode()
    assert provider_budgets_litellm._exceeded_info(answer) == (
        "Exceeded this node's grant for provider openai: 1 > 0.5 "
        "(limit 100, not spent: Redis granted this node no more)\n"
        "Exceeded budget for provider anthropic: 2 >= 2\n"
    )


# ---- budget model v2: deployment ids and request tags -------------------------------------------


def _budgets_by_name(side) -> Dict[str, int]:
    status, body = side.request("GET", "/v1/budgets")
    assert status == 200, body
    return {f"{b['scope']}:{b['name']}": int(b["spend_nanos"]) for b in body["budgets"]}


def test_deployment_and_tag_budgets_through_the_router(sidecars, call_cost):
    """The plugin sends each deployment's `model_info.id` and the request's `metadata.tags`; the
    sidecar charges the provider, the deployment and each tag, exactly litellm's response_cost."""
    c_o = nanos(call_cost[OPENAI])
    side = sidecars(
        {},
        config_text=(
            "model_list:\n"
            f'  - model_name: m\n    litellm_params: {{model: {OPENAI}, max_budget: "{usd(2 * c_o)}", budget_duration: 1d}}\n'
            "    model_info: {id: oa}\n"
            "litellm_settings:\n  tag_budget_config:\n"
            "    team-b: {max_budget: 0.000000001, budget_duration: 1d}\n"
            "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n"
        ),
    )
    model_list = [
        {"model_name": "m", "litellm_params": {"model": OPENAI, "mock_response": "hi"}, "model_info": {"id": "oa"}},
        {"model_name": "m", "litellm_params": {"model": ANTHROPIC, "mock_response": "hi"}, "model_info": {"id": "an"}},
    ]

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=model_list)
        only_openai = Router(num_retries=0, model_list=model_list[:1])
        team_a = {"metadata": {"tags": ["team-a"]}}
        for i in range(2):
            await only_openai.acompletion(model="m", messages=PROMPT, **team_a)
            await await_condition(lambda: _budgets_by_name(side)["deployment:oa"] == (i + 1) * c_o, f"oa after {i}")
        assert _budgets_by_name(side)["provider:openai"] == 2 * c_o
        # The deployment's own budget is spent: only the anthropic deployment is offered.
        left = await plugin.async_filter_deployments("m", model_list, PROMPT, request_kwargs=team_a)
        assert [d["model_info"]["id"] for d in left] == ["an"]
        with pytest.raises(ValueError) as info:
            await only_openai.acompletion(model="m", messages=PROMPT, **team_a)
        assert "Exceeded budget for deployment oa" in str(info.value), str(info.value)
        # A tag budget: the first team-b call spends it, then team-b requests get nothing.
        resp = await router.acompletion(model="m", messages=PROMPT, metadata={"tags": ["team-b"]})
        assert resp._hidden_params["model_id"] == "an"
        await await_condition(lambda: _budgets_by_name(side)["tag:team-b"] > 0, "team-b spend")
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, metadata={"tags": ["team-b"]})
        assert "Exceeded budget for tag team-b" in str(info.value), str(info.value)
        # Other requests still route to the deployment with room.
        resp = await router.acompletion(model="m", messages=PROMPT, **team_a)
        assert resp._hidden_params["model_id"] == "an"
        await plugin.aclose()

    asyncio.run(main())


# ---- identities: key, user, team, org and customer budgets -------------------------------------


def _proxy_metadata(key: str, team: str, **more: str) -> Dict[str, Dict[str, str]]:
    """The request metadata litellm's proxy writes for a virtual key
    (``LiteLLMProxyRequestSetup.add_user_api_key_auth_to_request_metadata``)."""
    return {"metadata": {"user_api_key_hash": key, "user_api_key_team_id": team, **more}}


def _key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def test_team_and_key_budgets_through_the_router(sidecars, call_cost):
    """The plugin sends the identities litellm's proxy puts in the request metadata: a team's
    budget spent by one key blocks another key of the team; a key's budget blocks only that
    key; each of key, user, team, org and customer counts litellm's response_cost."""
    c_o = nanos(call_cost[OPENAI])
    key_a, key_b, key_c, key_d = (_key_hash(k) for k in ("sk-a", "sk-b", "sk-c", "sk-d"))
    side = sidecars(
        {},
        config_text=(
            "provider_budgets:\n  budgets:\n"
            f'    - {{team: research, limit: "{usd(2 * c_o)}", period: 1d}}\n'
            f'    - {{key: {key_c}, limit: "{usd(c_o)}", period: 1d}}\n'
            "    - {org: acme, limit: 100, period: 1mo}\n"
            "    - {user: alice, limit: 100, period: 1d}\n"
            "    - {customer: cust-1, limit: 100, period: 1d}\n"
        ),
    )

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        a = _proxy_metadata(
            key_a,
            "research",
            user_api_key_org_id="acme",
            user_api_key_user_id="alice",
            user_api_key_end_user_id="cust-1",
        )
        for i in range(2):
            await router.acompletion(model="m", messages=PROMPT, **a)
            await await_condition(
                lambda: _budgets_by_name(side)["team:research"] == (i + 1) * c_o, f"the team after call {i}"
            )
        # The team is spent: key b of the same team gets litellm's error, naming the team.
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(key_b, "research"))
        assert "Exceeded budget for team research: " in str(info.value), str(info.value)

        # Key c (another team) may spend one call: its second is refused, naming the key; key d
        # of the same team still passes.
        def physics(key: str) -> Dict[str, Dict[str, str]]:
            return _proxy_metadata(key, "physics", user_api_key_org_id="acme")

        await router.acompletion(model="m", messages=PROMPT, **physics(key_c))
        await await_condition(lambda: _budgets_by_name(side)[f"key:{key_c}"] == c_o, "key c's spend")
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, **physics(key_c))
        assert f"Exceeded budget for key {key_c}: " in str(info.value), str(info.value)
        await router.acompletion(model="m", messages=PROMPT, **physics(key_d))
        await await_condition(lambda: _budgets_by_name(side)["org:acme"] == 4 * c_o, "the org's spend")
        assert await plugin.flush(5)
        assert _budgets_by_name(side) == {
            "key:" + key_c: c_o,
            "user:alice": 2 * c_o,
            "team:research": 2 * c_o,
            "org:acme": 4 * c_o,
            "customer:cust-1": 2 * c_o,
        }
        await plugin.aclose()

    asyncio.run(main())


def test_a_key_template_gives_every_key_its_budget_through_the_router(sidecars, call_cost):
    """A template (`key: "*"`) gives each hashed key litellm's proxy names its own budget, made
    on its first call; past `max_series` a new key gets litellm's error saying why."""
    c_o = nanos(call_cost[OPENAI])
    key_a, key_b, key_c = (_key_hash(k) for k in ("sk-a", "sk-b", "sk-c"))
    side = sidecars(
        {},
        config_text=(
            "provider_budgets:\n  budgets:\n"
            f'    - {{key: "*", limit: "{usd(c_o)}", period: 1d, max_series: 2}}\n'
        ),
    )

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(key_a, "t"))
        await await_condition(lambda: _budgets_by_name(side).get(f"key:{key_a}") == c_o, "key a's spend")
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(key_a, "t"))
        assert f"Exceeded budget for key {key_a}: " in str(info.value), str(info.value)
        await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(key_b, "t"))
        await await_condition(lambda: _budgets_by_name(side).get(f"key:{key_b}") == c_o, "key b's spend")
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(key_c, "t"))
        assert "max_series" in str(info.value), str(info.value)
        assert await plugin.flush(5)
        budgets = _budgets_by_name(side)
        assert budgets[f"key:{key_a}"] == c_o and budgets[f"key:{key_b}"] == c_o, budgets
        assert f"key:{key_c}" not in budgets, budgets
        await plugin.aclose()

    asyncio.run(main())


def test_identity_of_a_request_and_of_a_success_event():
    """What the plugin reads: litellm's field names, non-empty strings only, ``metadata`` over
    ``litellm_metadata``; the success event's from the standard logging object."""
    from provider_budgets_litellm import _logged_identity, _request_identity

    md = {
        "user_api_key_hash": "h",
        "user_api_key_user_id": "u",
        "user_api_key_team_id": "t",
        "user_api_key_org_id": None,
        "user_api_key_end_user_id": "",
        "user_api_key_alias": "not an identity",
    }
    assert _request_identity({"metadata": md}) == {"key": "h", "user": "u", "team": "t"}
    assert _request_identity({"litellm_metadata": {"user_api_key_org_id": "o"}, "metadata": md}) == {
        "key": "h",
        "user": "u",
        "team": "t",
        "org": "o",
    }
    assert _request_identity(None) == {} and _request_identity({"metadata": "x"}) == {}
    assert _logged_identity({"standard_logging_object": {"metadata": {"user_api_key_end_user_id": "c"}}}) == {
        "customer": "c"
    }
    assert _logged_identity({"litellm_params": {"metadata": {"user_api_key_team_id": 7}}}) == {"team": "7"}
    assert _request_identity({"metadata": {"user_api_key_team_id": "x" * 257}}) == {}


def test_strict_reservations_carry_the_identity(sidecars, call_cost):
    """With ``strict=True`` the reservation holds the estimate in the team's budget too: once the
    team's spend leaves less than an estimate, the team's next call is refused naming the
    team, and another team's call passes."""
    probe = ProviderBudgets(url="http://127.0.0.1:9", strict=True)
    kwargs = {"max_tokens": 21}
    est = nanos(float(probe.estimate(deployments(OPENAI)[0], PROMPT, kwargs)))
    c_o = nanos(call_cost[OPENAI])
    limit = est + c_o - 1  # room for one estimate; after its commit, less than another
    side = sidecars({}, config_text=f'provider_budgets:\n  budgets:\n    - {{team: ops, limit: "{usd(limit)}", period: 1d}}\n')

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False, strict=True)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        ops = _proxy_metadata(_key_hash("sk-e"), "ops")
        await router.acompletion(model="m", messages=PROMPT, **ops, **kwargs)
        await await_condition(lambda: plugin.stats.posted == 1, "the commit acknowledged")
        assert _budgets_by_name(side) == {"team:ops": c_o}
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT, **ops, **kwargs)
        assert "Exceeded budget for team ops: " in str(info.value), str(info.value)
        await router.acompletion(model="m", messages=PROMPT, **_proxy_metadata(_key_hash("sk-f"), "dev"), **kwargs)
        await plugin.aclose()

    asyncio.run(main())


# ---- strict=True: reservations -----------------------------------------------------------------


def _reserved(side) -> Dict[str, Tuple[int, int]]:
    status, body = side.request("GET", "/v1/budgets")
    assert status == 200, body
    return {b["provider"]: (int(b["spend_nanos"]), int(b["reserved_nanos"])) for b in body["budgets"]}


def test_strict_concurrent_calls_never_cross_the_limit_and_commit_the_exact_cost(sidecars, call_cost):
    """Concurrent calls reserve before they go: the first deployment (openai) takes exactly as
    many calls as its limit holds estimates for, the rest go to anthropic; each commit counts
    litellm's response_cost to the nano and frees the estimate."""
    probe = ProviderBudgets(url="http://127.0.0.1:9", strict=True)
    openai_dep, anthropic_dep = deployments(OPENAI, ANTHROPIC)
    kwargs = {"max_tokens": 21}  # mock usage: 10 prompt tokens (8 counted) + 20 output
    est = nanos(float(probe.estimate(openai_dep, PROMPT, kwargs)))
    assert est >= nanos(call_cost[OPENAI]) > 0, (est, call_cost)
    limit = 2 * est + est // 2  # room for two estimates, not three
    side = sidecars({"openai": usd(limit), "anthropic": "1000"})
    calls = 12

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False, strict=True)
        recorder = CostRecorder()
        litellm.callbacks = [plugin, recorder]
        # Ordered routing is not needed: the sidecar admits the first candidate with room, and
        # the plugin hands the Router that one only.
        router = Router(num_retries=0, model_list=deployments(OPENAI, ANTHROPIC))
        resps = await asyncio.gather(
            *(router.acompletion(model="m", messages=PROMPT, **kwargs) for _ in range(calls))
        )
        served = Counter(provider_of(r) for r in resps)
        await await_condition(lambda: len(recorder.seen) == calls, "litellm's success events")
        await await_condition(lambda: plugin.stats.posted == calls, "every commit acknowledged")
        assert await plugin.flush(5)
        want: Dict[str, int] = {"openai": 0, "anthropic": 0}
        for p, cost in recorder.seen:
            want[p] += nanos(cost)
        got = _reserved(side)
        assert {p: v[0] for p, v in got.items()} == want, (got, want)
        assert all(v[1] == 0 for v in got.values()), f"estimates left held: {got}"
        assert got["openai"][0] <= limit
        assert served["openai"] >= 2, f"openai not filled: {served}"
        assert served["openai"] * est <= limit + est, served
        assert plugin.stats.dropped == 0 and plugin.stats.rejected == 0
        await plugin.aclose()

    asyncio.run(main())


def test_strict_a_failed_call_releases_and_a_spent_budget_raises_litellms_error(sidecars, call_cost):
    side = sidecars({"openai": usd(nanos(call_cost[OPENAI]) * 100)})
    failing = [{"model_name": "m", "litellm_params": {"model": OPENAI, "mock_response": Exception("boom")}}]

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False, strict=True)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=failing)
        with pytest.raises(Exception) as info:
            await router.acompletion(model="m", messages=PROMPT, max_tokens=5)
        assert "boom" in str(info.value)
        # The reservation was made (the sidecar held it) and released: nothing counted.
        await await_condition(lambda: plugin.stats.posted == 1, "the release acknowledged")
        assert _reserved(side)["openai"] == (0, 0)

        # A budget without room for the estimate: litellm's own error, before any call.
        big = Router(num_retries=0, model_list=deployments(OPENAI))
        with pytest.raises(ValueError) as info:
            await big.acompletion(model="m", messages=PROMPT, max_tokens=10_000_000)
        msg = str(info.value)
        assert msg.startswith(f"{CROSSED}: Exceeded budget for provider openai: "), msg
        assert _reserved(side)["openai"] == (0, 0)
        await plugin.aclose()

    asyncio.run(main())


def test_strict_without_a_sidecar_fails_open_and_still_records_the_spend(sidecars, call_cost):
    side = sidecars({"openai": "1000"})
    side.stop()

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=True, strict=True, timeout=0.5, retry_backoff=0.05)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        await call(router)  # the sidecar is down: the call passes, its spend post waits
        side.start()
        await await_condition(lambda: plugin.stats.posted == 1, "the spend post after the outage")
        assert _reserved(side)["openai"] == (nanos(call_cost[OPENAI]), 0)
        await plugin.aclose()

    asyncio.run(main())


# ---- usage priced by the sidecar ----------------------------------------------------------------

PRICED_CONFIG = """provider_budget_config:
  openai: { budget_limit: "100", time_period: 1d }
provider_budgets:
  pricing:
    overrides:
      my-model: { input_per_mtok: 1, output_per_mtok: 2 }
"""


class UnpricedByLitellm(CustomLogger):
    """Runs before the plugin (litellm awaits success callbacks in order) and makes the call's
    ``response_cost`` ``None``, as litellm reports a model it cannot price (seen with
    ``claude-3-5-sonnet``; litellm 1.110.2 with ``mock_response`` reports 0.0 instead)."""

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
        kwargs["standard_logging_object"]["response_cost"] = None


def test_a_call_litellm_cannot_price_is_priced_by_the_sidecar_from_its_usage(sidecars, caplog):
    side = sidecars({}, config_text=PRICED_CONFIG)
    # mock usage: 10 prompt, 20 completion tokens = 10 * $1 + 20 * $2 per million.
    one_call = 10 * 1_000 + 20 * 2_000

    async def main():
        plugin = ProviderBudgets(url=side.url)
        litellm.callbacks = [UnpricedByLitellm(), plugin]
        priced = Router(num_retries=0, model_list=deployments("openai/my-model"))
        unpriced = Router(num_retries=0, model_list=deployments("openai/no-such-model"))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            for router in (priced, priced, unpriced, unpriced):
                await call(router)
            await await_condition(lambda: plugin.stats.posted + plugin.stats.rejected == 4, "four posts answered")
            assert await plugin.flush(5)
        assert side.spend_nanos() == {"openai": 2 * one_call}
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1, warnings
        assert "neither litellm nor the sidecar can price model 'openai/no-such-model'" in warnings[0]
        assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
        await plugin.aclose()

    asyncio.run(main())


def test_strict_a_call_litellm_cannot_price_commits_its_usage(sidecars, caplog):
    side = sidecars({}, config_text=PRICED_CONFIG)
    one_call = 10 * 1_000 + 20 * 2_000

    async def main():
        plugin = ProviderBudgets(url=side.url, strict=True, default_estimate="0.01")
        litellm.callbacks = [UnpricedByLitellm(), plugin]
        router = Router(num_retries=0, model_list=deployments("openai/my-model"))
        await call(router)
        await call(router)
        # litellm's success events run in tasks of their own: each takes its reservation.
        await await_condition(lambda: not any(plugin._reservations.values()), "both success events")
        assert await plugin.flush(5)
        status, body = side.request("GET", "/v1/budgets")
        openai = next(b for b in body["budgets"] if b["provider"] == "openai")
        assert (int(openai["spend_nanos"]), int(openai["reserved_nanos"])) == (2 * one_call, 0), openai
        assert not [r for r in caplog.records if r.name == LOGGER and r.levelno >= logging.ERROR]
        await plugin.aclose()

    asyncio.run(main())


def test_a_model_the_sidecar_counts_by_its_unpriced_policy_is_logged_once(sidecars, caplog):
    config = 'provider_budget_config:\n  openai: { budget_limit: "100", time_period: 1d }\n'
    config += "provider_budgets:\n  pricing: { unpriced: default, default_per_mtok: 1000 }\n"
    side = sidecars({}, config_text=config)

    async def main():
        plugin = ProviderBudgets(url=side.url)
        litellm.callbacks = [UnpricedByLitellm(), plugin]
        router = Router(num_retries=0, model_list=deployments("openai/no-such-model"))
        with caplog.at_level(logging.WARNING, logger=LOGGER):
            await call(router)
            await call(router)
            await await_condition(lambda: plugin.stats.posted == 2, "two posts answered")
            assert await plugin.flush(5)
        # 30 tokens a call at $1000 per million.
        assert side.spend_nanos() == {"openai": 2 * 30_000_000}
        warnings = [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "pricing.unpriced policy as 0.03 USD (unpriced_default)" in warnings[0], warnings
        await plugin.aclose()

    asyncio.run(main())


# ---- short scripts ------------------------------------------------------------------------------

SHORT_SCRIPT = """
import asyncio, sys, litellm
from provider_budgets_litellm import ProviderBudgets
litellm.callbacks = [ProviderBudgets(url=sys.argv[1])]
async def main():
    r = await litellm.acompletion(model="openai/gpt-4o", mock_response="hi", messages=[{"role": "user", "content": "hello"}])
    print(r._hidden_params["response_cost"])
asyncio.run(main())
"""


def test_a_short_async_script_counts_its_spend_and_exits_cleanly(sidecars):
    """A script that ends right after its call (no flush, no aclose): litellm runs the success
    callback at exit, on an event loop of its own; the plugin posts inline there, so the spend
    is counted, and nothing is left open (no unclosed session, no destroyed task)."""
    side = sidecars({"openai": "100"})
    done = subprocess.run(
        [sys.executable, "-c", SHORT_SCRIPT, side.url],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
    )
    assert done.returncode == 0, done.stderr
    for noise in ("Unclosed", "Task was destroyed", "Traceback", "Error"):
        assert noise not in done.stderr, done.stderr
    cost = float(done.stdout.strip().splitlines()[-1])
    assert cost > 0
    assert _budgets_by_name(side)["provider:openai"] == nanos(cost), done.stderr


# ---- units: token and request budgets counted from the usage litellm reports ------------------


def _unit_rows(side) -> Dict[str, int]:
    status, body = side.request("GET", "/v1/budgets")
    assert status == 200, body
    return {f"{b['name']}:{b['unit']}": b["spend"] for b in body["budgets"] if b["unit"] != "usd"}


def test_token_and_request_budgets_count_the_usage_of_each_call(sidecars):
    """litellm's mock usage is 10 prompt and 20 completion tokens a call: the plugin posts it
    with the cost, so a 60-token budget is spent by two calls and refuses the third with
    litellm's error, while the request budget counts each call."""
    side = sidecars(
        {},
        config_text=(
            "provider_budget_config:\n  openai: {budget_limit: 100, time_period: 1d}\n"
            "provider_budgets:\n  budgets:\n"
            "    - {deployment: oa, unit: tokens, limit: 60, period: 1d}\n"
            "    - {deployment: oa, unit: output_tokens, limit: 1000, period: 1d}\n"
            "    - {deployment: oa, unit: requests, limit: 10, period: 1d}\n"
        ),
    )
    model_list = [{"model_name": "m", "litellm_params": {"model": OPENAI, "mock_response": "hi"}, "model_info": {"id": "oa"}}]

    async def main():
        plugin = ProviderBudgets(url=side.url, fail_open=False)
        litellm.callbacks = [plugin]
        router = Router(num_retries=0, model_list=model_list)
        for i in range(2):
            await router.acompletion(model="m", messages=PROMPT)
            await await_condition(lambda: _unit_rows(side)["oa:requests"] == i + 1, f"call {i} counted")
        assert _unit_rows(side) == {"oa:tokens": 60, "oa:output_tokens": 40, "oa:requests": 2}
        with pytest.raises(ValueError) as info:
            await router.acompletion(model="m", messages=PROMPT)
        assert "Exceeded budget for deployment oa: 60 >= 60 tokens" in str(info.value), str(info.value)
        await plugin.aclose()

    asyncio.run(main())


def test_strict_reservations_are_estimated_by_the_sidecar_and_fall_back_for_unpriced_models(sidecars):
    """With ``strict=True`` the plugin sends the messages and ``max_tokens``: the sidecar counts
    the prompt (8 tokens for PROMPT on gpt-4o, as litellm's token_counter counts it) and holds
    8 + 50 tokens in a token budget. A model the sidecar cannot price (``unpriced: deny``) is reserved
    with the plugin's own estimate instead of being let through unreserved."""
    side = sidecars(
        {},
        config_text=(
            "provider_budgets:\n  budgets:\n"
            "    - {provider: openai, limit: 100, period: 1d}\n"
            "    - {provider: openai, unit: tokens, limit: 1000000, period: 1d}\n"
        ),
    )

    def held() -> Dict[str, int]:
        status, body = side.request("GET", "/v1/budgets")
        assert status == 200, body
        return {b["unit"]: b["reserved"] for b in body["budgets"]}

    class Hold(CustomLogger):
        """Keeps the call's reservation open while the test looks at it."""

        def __init__(self) -> None:
            self.release = asyncio.Event()
            self.seen: List[Dict[str, int]] = []

        async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
            self.seen.append(held())

    async def main():
        hold = Hold()
        plugin = ProviderBudgets(url=side.url, fail_open=False, strict=True)
        litellm.callbacks = [hold, plugin]
        router = Router(num_retries=0, model_list=deployments(OPENAI))
        await router.acompletion(model="m", messages=PROMPT, max_tokens=50)
        await await_condition(lambda: len(hold.seen) == 1, "the success event")
        assert hold.seen[0]["tokens"] == litellm.token_counter(model=OPENAI, messages=PROMPT) + 50, hold.seen
        assert hold.seen[0]["usd"] > 0, hold.seen
        # An unpriced model: the sidecar answers 422, the plugin reserves its own estimate.
        unpriced = Router(num_retries=0, model_list=deployments("openai/no-such-model"))
        await unpriced.acompletion(model="m", messages=PROMPT, max_tokens=50)
        await await_condition(lambda: len(hold.seen) == 2, "the second success event")
        assert hold.seen[1]["tokens"] == 0, "the plugin's estimate is dollars only"
        await await_condition(lambda: plugin.stats.posted == 2, "both commits")
        await plugin.aclose()

    asyncio.run(main())
