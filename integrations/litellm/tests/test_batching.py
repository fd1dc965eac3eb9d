"""What makes the plugin cheap per request, and what it must not cost in correctness:

* spend posts that queue up go to the sidecar as one ``/v1/spend/batch`` and each counts once,
  also when the batch's answer is lost and the batch is posted again;
* a sidecar without batches (404) gets one post per spend, and nothing is lost;
* a ``/v1/filter`` answer is reused for ``filter_cache_ttl`` for the same candidates, tags
  and identity, is kept by a spend that leaves room, cleared by one after which the spent
  deployment is refused (a budget this process exhausted refuses at its next filter), and
  expires (a budget another process exhausted refuses after
  at most ``filter_cache_ttl``).
"""

import asyncio
import time

import pytest
from conftest import ANTHROPIC, OPENAI, PROMPT, deployments
from test_plugin import DroppingProxy, await_condition, success_kwargs

from provider_budgets_litellm import NoDeploymentsAvailable, ProviderBudgets


def posts(proxy: DroppingProxy, path: bytes) -> int:
    return sum(chunk.count(b"POST " + path + b" ") for chunk in proxy.requests)


def test_queued_spends_go_as_one_batch_and_each_counts_once_when_the_answer_is_lost(sidecars):
    side = sidecars({"openai": "1000"})
    costs = [0.001 * (i + 1) for i in range(120)]

    async def main():
        # The first connection's answer is cut: the sidecar counted the batch, the plugin
        # saw a failure and posts it again (same idempotency keys).
        proxy = await DroppingProxy(side.port, drops=1).start()
        plugin = ProviderBudgets(url=f"http://127.0.0.1:{proxy.port}", retry_backoff=0.01)
        for i, cost in enumerate(costs):
            assert plugin.post_spend_in_background(success_kwargs("openai", cost, f"call-{i}")) is not None
        assert await plugin.flush(20)
        await plugin.aclose()
        await proxy.close()
        return plugin, proxy

    plugin, proxy = asyncio.run(main())
    assert proxy.cut == 1
    assert posts(proxy, b"/v1/spend") == 0, "no spend went alone"
    assert 2 <= posts(proxy, b"/v1/spend/batch") <= 3, proxy.requests[:2]
    assert (plugin.stats.posted, plugin.stats.dropped, plugin.stats.rejected) == (len(costs), 0, 0)
    expected = sum(round(c * 1e9) for c in costs)
    assert side.spend_nanos() == {"openai": expected}


def test_a_sidecar_without_batches_gets_one_post_per_spend(sidecars):
    side = sidecars({"openai": "1000"})

    async def main():
        plugin = ProviderBudgets(url=side.url)
        plugin._batch_url = side.url + "/v1/no-such-route"  # as a release before batches answers: 404
        for i in range(5):
            plugin.post_spend_in_background(success_kwargs("openai", 0.5, f"old-{i}"))
        assert await plugin.flush(10)
        # From now on each spend goes alone, also when several queue up.
        for i in range(5, 8):
            plugin.post_spend_in_background(success_kwargs("openai", 0.5, f"old-{i}"))
        assert await plugin.flush(10)
        await plugin.aclose()
        return plugin

    plugin = asyncio.run(main())
    assert (plugin.stats.posted, plugin.stats.rejected, plugin.stats.dropped) == (8, 0, 0)
    assert plugin._batches is False
    assert side.spend_nanos() == {"openai": 4_000_000_000}


def test_a_cached_filter_answer_is_cleared_by_this_process_s_own_spend(sidecars):
    side = sidecars({"openai": "1", "anthropic": "10"})

    async def main():
        proxy = await DroppingProxy(side.port, drops=0).start()
        plugin = ProviderBudgets(url=f"http://127.0.0.1:{proxy.port}", filter_cache_ttl=30, spend_linger=0)
        deps = deployments(OPENAI, ANTHROPIC)
        for _ in range(5):
            assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        asked = posts(proxy, b"/v1/filter")
        # Other tags or identities are other answers.
        kwargs = {"metadata": {"tags": ["t"], "user_api_key_hash": "k1"}}
        assert await plugin.async_filter_deployments("m", deps, PROMPT, kwargs) == deps
        asked_with_identity = posts(proxy, b"/v1/filter")
        # A spend that leaves room in every budget it counts in keeps the cached answers.
        some = success_kwargs("anthropic", 0.1, "spend-some")
        some["standard_logging_object"]["model"] = ANTHROPIC  # a deployment spend: checkable
        plugin.post_spend_in_background(some)
        assert await plugin.flush(10)
        assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        assert posts(proxy, b"/v1/filter") == asked_with_identity
        # This process spends openai's whole budget: its next filter is not served from cache.
        plugin.post_spend_in_background(success_kwargs("openai", 1.0, "spend-all"))
        assert await plugin.flush(10)
        assert await plugin.async_filter_deployments("m", deps, PROMPT) == [deps[1]]
        await plugin.aclose()
        await proxy.close()
        return asked, asked_with_identity

    asked, asked_with_identity = asyncio.run(main())
    assert asked == 1, "five identical filters, one question to the sidecar"
    assert asked_with_identity == 2


def test_a_budget_exhausted_by_another_process_refuses_once_the_cache_expires(sidecars):
    side = sidecars({"openai": "1"})
    ttl = 0.3

    async def main():
        plugin = ProviderBudgets(url=side.url, filter_cache_ttl=ttl)
        deps = deployments(OPENAI)
        assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        cached_at = time.monotonic()
        # Another worker spends it all, through the sidecar directly.
        status, body = side.request("POST", "/v1/spend", {"provider": "openai", "cost": "1"})
        assert status == 200 and body["counted"], body
        # Within the TTL this process may still pass (the documented staleness bound) ...
        if time.monotonic() - cached_at < ttl:
            assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        # ... and refuses once it has expired.
        await await_condition(lambda: time.monotonic() - cached_at > ttl, "the cache's expiry")
        with pytest.raises(NoDeploymentsAvailable):
            await plugin.async_filter_deployments("m", deps, PROMPT)
        await plugin.aclose()

    asyncio.run(main())


class HoldingProxy(DroppingProxy):
    """A relay that holds the sidecar's answers to spend batches until `release` is set."""

    def __init__(self, upstream_port: int):
        super().__init__(upstream_port, drops=0)
        self.release = asyncio.Event()

    async def _handle(self, reader, writer):
        up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        held = False

        async def to_server():
            nonlocal held
            while data := await reader.read(65536):
                self.requests.append(data)
                held = held or b"/v1/spend/batch" in data
                up_w.write(data)
                await up_w.drain()
            up_w.close()

        async def to_client():
            while data := await up_r.read(65536):
                if held:
                    await self.release.wait()
                writer.write(data)
                await writer.drain()
            writer.close()

        await asyncio.gather(to_server(), to_client(), return_exceptions=True)


def test_a_filter_during_a_spend_post_asks_the_sidecar_and_fail_closed_never_caches(sidecars):
    side = sidecars({"openai": "1"})

    async def main():
        proxy = await HoldingProxy(side.port).start()
        url = f"http://127.0.0.1:{proxy.port}"
        plugin = ProviderBudgets(url=url, filter_cache_ttl=30, spend_linger=0)
        deps = deployments(OPENAI)
        assert await plugin.async_filter_deployments("m", deps, PROMPT) == deps
        # The sidecar counted the spend, its answer is held: a filter now asks, and is refused.
        plugin.post_spend_in_background(success_kwargs("openai", 1.0, "in-flight"))
        await await_condition(lambda: side.spend_nanos() == {"openai": 1_000_000_000}, "the sidecar counting it")
        assert plugin._posting == 1
        with pytest.raises(NoDeploymentsAvailable):
            await plugin.async_filter_deployments("m", deps, PROMPT)
        proxy.release.set()
        assert await plugin.flush(10)
        await plugin.aclose()
        closed = ProviderBudgets(url=url, filter_cache_ttl=30, fail_open=False)
        for _ in range(3):
            with pytest.raises(NoDeploymentsAvailable):
                await closed.async_filter_deployments("m", deps, PROMPT)
        await closed.aclose()
        await proxy.close()
        return proxy

    proxy = asyncio.run(main())
    assert posts(proxy, b"/v1/filter") == 5


def test_bad_cache_and_linger_settings_are_refused():
    for kwargs in ({"filter_cache_ttl": -1}, {"filter_cache_ttl": 61}, {"spend_linger": -0.1}, {"spend_linger": 6}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            ProviderBudgets(url="http://127.0.0.1:9", **kwargs)
