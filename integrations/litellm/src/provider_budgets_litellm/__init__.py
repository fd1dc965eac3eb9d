"""litellm plugin for the provider-budgets sidecar (``provider-budgets serve``).

``ProviderBudgets`` is a litellm ``CustomLogger``:

* ``async_filter_deployments`` (run by litellm's Router as a routing filter before every pick)
  asks the sidecar's ``POST /v1/filter`` which deployments are within budget and returns those,
  in the Router's order. The answer is reused for ``filter_cache_ttl`` for the same
  candidates, tags and identity, and forgotten when a spend post lands that may have changed
  it (the sidecar answers a batch with ``"admitted": false`` when a filter of one of its
  spends' deployments would now refuse), so this process's own spend is seen at its next
  filter after the post lands. When none is left it raises the error litellm's own provider budget
  filter (``RouterBudgetLimiting``) raises: a ``ValueError`` whose message is
  ``"No deployments available - crossed budget: Exceeded budget for provider P: S >= L\\n..."``.
* ``async_log_success_event`` posts the call's ``standard_logging_object["response_cost"]`` to
  ``POST /v1/spend`` for the provider litellm resolved for the call, from a background task (the
  response is never held up), batched (``spend_linger``: the posts that queue up go as one
  ``POST /v1/spend/batch``), with an idempotency key derived from the litellm call id so that a
  retried post is counted once. The post carries ``at``, the call's end time, so that a post
  retried across a window boundary is charged to the window the call ended in.
* When litellm cannot price a call (``response_cost`` is ``None``), the post carries the call's
  token ``usage`` (from the response's ``usage``: prompt, completion, cached and reasoning
  tokens) instead of a cost, and the sidecar prices it with its catalog
  (``provider_budgets.pricing``); a commit does the same. A model neither can price is
  logged once per model (WARNING): under the sidecar's ``pricing.unpriced: deny`` it is not
  recorded (a reservation then expires and counts its estimate); under ``allow_zero`` or
  ``default`` the sidecar counts it as its policy says.

Decisions:

* Money goes over the wire as a plain decimal string (``"0.00022500000000000002"``), never as a
  JSON float and never in exponent form: ``Decimal(repr(cost))`` is the float's shortest
  round-trip decimal, which the sidecar parses exactly (half-up at the tenth decimal).
* The provider sent for each deployment is the one litellm itself resolves
  (``litellm.get_llm_provider``, as ``RouterBudgetLimiting`` does), so filtering and spend
  recording name the same budget as litellm's ``custom_llm_provider``.
* Sidecar unreachable (connection error, timeout, 5xx, malformed answer): with
  ``fail_open=True`` every deployment passes, with ``fail_open=False`` the filter raises litellm's
  "No deployments available" error. Either way exactly one WARNING is logged per outage (logger
  ``provider_budgets_litellm``) and one INFO line when the sidecar answers again.
* Spend posts that fail transiently (connection error, timeout, 408, 429, 5xx) are retried with
  the same idempotency key, with exponential backoff, at most ``spend_attempts`` times; a 4xx
  is permanent (logged as an error naming provider and cost, not retried). At most
  ``max_pending`` posts are in flight; beyond that a post is dropped with an error line (memory
  stays bounded during a long outage). ``await plugin.flush()`` waits for the pending posts.
* ``strict=True`` (reservations): the filter reserves instead of filtering. It posts
  the candidates to ``POST /v1/reserve`` with an estimate of the call's cost, and returns the one
  deployment the sidecar admitted (the first in the Router's order whose budgets all have room
  for the estimate, held until the call ends), so no two concurrent calls share the last dollar.
  The success event commits litellm's ``response_cost`` (``POST /v1/commit``, retried like a
  spend post: a commit is idempotent); the failure event releases it (``POST /v1/release``:
  litellm counts no cost for a failed call, so neither does the budget). A call that never ends
  (the process died) expires in the sidecar after ``reservation_timeout`` and counts its
  estimate.

  The estimate is the sidecar's (``sidecar_estimate=True``, the default): the request's
  messages and ``max_tokens`` are sent, and the sidecar prices each candidate on its own model
  by its catalog (token budgets hold the tokens). When the sidecar cannot price a model
  (``pricing.unpriced: deny``, 422) the plugin's own estimate is sent instead: litellm's own
  price of the prompt's tokens (``litellm.token_counter``) plus
  ``max_tokens`` (or ``max_completion_tokens``; else the model's ``max_output_tokens`` from
  litellm's cost map; else ``default_max_tokens``) output tokens (``litellm.cost_per_token``),
  the largest over the candidates (one estimate per reservation). A model litellm cannot price
  is estimated at ``default_estimate`` (default 0: the reservation then only checks that the
  budget is not spent). Each reservation is matched to its call by litellm's trace id and the
  deployment's ``model_info.id`` (a retry or fallback of the same request is a new
  reservation). When the sidecar is unusable and ``fail_open`` lets the call pass, the call is
  recorded afterwards with a spend post, as without ``strict``.
* Identities: the filter, the reservation and the spend post carry the request's
  ``identity`` for the sidecar's key, user, team, org and customer budgets, read from what
  litellm's proxy writes into every request's metadata (``user_api_key_hash`` → ``key``,
  ``user_api_key_user_id`` → ``user``, ``user_api_key_team_id`` → ``team``,
  ``user_api_key_org_id`` → ``org``, ``user_api_key_end_user_id`` → ``customer``; the spend
  post reads them from the standard logging object's ``metadata``, where litellm copies
  them). Absent or empty ones are left out; a name longer than the sidecar accepts (256
  bytes) is left out with one warning per field, rather than making the sidecar refuse the
  whole request.
* Only the async paths are hooked (``Router.acompletion`` & co, the litellm proxy), like
  litellm's own provider budget filter.
* HTTP goes through aiohttp (a dependency of litellm), not httpx: on the 2-core machine this was
  measured on, one loopback round trip to the sidecar costs ~90 µs with aiohttp and ~470 µs with
  httpx, on a litellm request of ~3.5 ms. One session per event loop, keep-alive, at most 64
  connections, proxy environment variables ignored (the sidecar is a local process).
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import json
import logging
import math
import os
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from typing import Any, Callable, Dict, List, Optional, Tuple, TypeVar

import aiohttp
import litellm
from litellm.integrations.custom_logger import CustomLogger

__all__ = [
    "DEFAULT_URL",
    "NoDeploymentsAvailable",
    "ProviderBudgets",
    "SpendStats",
    "cost_to_decimal_str",
]

__version__ = "0.1.0"

DEFAULT_URL = "http://127.0.0.1:8787"

# litellm's messages (litellm.types.router.RouterErrors), repeated here so that the plugin's
# errors read the same on litellm versions that moved or renamed the enum.
CROSSED_BUDGET = "No deployments available - crossed budget"
NO_DEPLOYMENTS = "No deployments available for selected model"

logger = logging.getLogger("provider_budgets_litellm")
T = TypeVar("T")

_JSON = {"content-type": "application/json"}

# The request's identities: (the sidecar's field, the metadata key litellm's proxy sets;
# `LiteLLMProxyRequestSetup.get_sanitized_user_information_from_key`, typed by litellm's
# `StandardLoggingUserAPIKeyMetadata`).
IDENTITY_FIELDS = (
    ("key", "user_api_key_hash"),
    ("user", "user_api_key_user_id"),
    ("team", "user_api_key_team_id"),
    ("org", "user_api_key_org_id"),
    ("customer", "user_api_key_end_user_id"),
)
# The longest identity name the sidecar accepts, in bytes.
MAX_IDENTITY_LEN = 256
# Fields whose overlong value was warned about (once per process).
_warned_identity: "set[str]" = set()


class NoDeploymentsAvailable(ValueError):
    """Raised by the filter when no deployment may be used.

    A ``ValueError``, like the error of litellm's own provider budget filter, with the same
    message, so code that catches litellm's error catches this one too.
    """


@dataclass
class SpendStats:
    """Counters of the spend posts of one ``ProviderBudgets`` (for tests and monitoring)."""

    posted: int = 0  # acknowledged by the sidecar (counted, or 200 without budget)
    retries: int = 0  # attempts after the first one
    rejected: int = 0  # permanent 4xx: not retried
    dropped: int = 0  # gave up after spend_attempts, or too many pending posts
    skipped: int = 0  # success events without a cost or provider (nothing to post)


def cost_to_decimal_str(cost: Any) -> Optional[str]:
    """``cost`` as a plain decimal string, exactly; ``None`` when it is not a finite number.

    A float is rendered by ``repr`` (its shortest round-trip decimal), then without exponent:
    ``1e-05`` → ``"0.00001"``. Integers, ``Decimal`` and numeric strings are kept exact.
    """
    if isinstance(cost, bool) or cost is None:
        return None
    try:
        if isinstance(cost, float):
            if not math.isfinite(cost):
                return None
            d = Decimal(repr(cost))
        elif isinstance(cost, (int, Decimal)):
            d = Decimal(cost)
        elif isinstance(cost, str):
            d = Decimal(cost.strip())
        else:
            return None
    except (InvalidOperation, ValueError):
        return None
    if not d.is_finite():
        return None
    if d == 0:
        return "0"
    return format(d, "f")


def _rfc3339(epoch: Any) -> Optional[str]:
    """litellm's ``endTime`` (Unix seconds, float) as RFC 3339 UTC, or ``None``."""
    if isinstance(epoch, bool) or not isinstance(epoch, (int, float)) or not math.isfinite(epoch):
        return None
    try:
        return datetime.fromtimestamp(epoch, timezone.utc).isoformat().replace("+00:00", "Z")
    except (OverflowError, OSError, ValueError):
        return None


def _env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{name}={raw!r}: expected true or false")


class _Unusable(Exception):
    """The sidecar did not give a usable answer (connection error, timeout, 5xx, garbage)."""


class ProviderBudgets(CustomLogger):
    """litellm callback enforcing the budgets of a provider-budgets sidecar.

    Args:
        url: the sidecar's base URL; default ``$PROVIDER_BUDGETS_URL``, then
            ``http://127.0.0.1:8787``.
        fail_open: when the sidecar is unreachable, let every deployment pass (``True``) or
            raise litellm's "No deployments available" error (``False``).
        timeout: seconds for one HTTP exchange with the sidecar (filter or spend post).
        spend_attempts: attempts per spend post (first try included) before it is dropped.
        retry_backoff: seconds before the first retry; doubled per retry up to ``max_backoff``.
        max_backoff: longest wait between two attempts.
        max_pending: most spend posts in flight at once.
        durable: ask the sidecar to fsync each spend before answering.
        strict: reserve before each call and commit (or release) after it, instead of
            filtering before and posting the spend after (see the module doc).
        sidecar_estimate: strict reservations send the request's messages and ``max_tokens``
            for the sidecar to estimate each candidate by its catalog (default); ``False``
            sends the plugin's own estimate (below), which is also the fallback when the
            sidecar cannot price the models.
        default_max_tokens: output tokens of the estimate when neither the request
            (``max_tokens``) nor litellm's cost map (``max_output_tokens``) says.
        default_estimate: estimate (USD) of a call litellm cannot price.
        filter_cache_ttl: seconds a ``/v1/filter`` answer is reused for the same candidates,
            tags and identity (0: ask the sidecar every time). Cleared when a spend post
            lands after which a filter of its deployment refuses, and not read while a post
            is on its way. Not used with ``strict`` nor with ``fail_open=False``.
        spend_linger: seconds a spend post waits for others to join its batch (0: post at
            once; posts that queue up meanwhile still go as one batch).
        token: the sidecar's bearer token (``serve --auth-token-file``); default
            ``$PROVIDER_BUDGETS_AUTH_TOKEN``; none: no ``Authorization`` header. Never shown
            by ``repr`` nor logged.
    """

    def __init__(
        self,
        url: Optional[str] = None,
        fail_open: bool = True,
        timeout: float = 2.0,
        *,
        spend_attempts: int = 8,
        retry_backoff: float = 0.1,
        max_backoff: float = 5.0,
        max_pending: int = 10_000,
        durable: bool = False,
        strict: bool = False,
        default_max_tokens: int = 4096,
        sidecar_estimate: bool = True,
        default_estimate: Any = 0,
        token: Optional[str] = None,
        filter_cache_ttl: float = 1.0,
        spend_linger: float = 0.25,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if timeout <= 0:
            raise ValueError(f"ProviderBudgets: timeout must be positive, got {timeout!r}")
        if spend_attempts < 1:
            raise ValueError(f"ProviderBudgets: spend_attempts must be >= 1, got {spend_attempts!r}")
        if not 0 <= filter_cache_ttl <= 60:
            raise ValueError(f"ProviderBudgets: filter_cache_ttl must be 0 to 60 seconds, got {filter_cache_ttl!r}")
        if not 0 <= spend_linger <= 5:
            raise ValueError(f"ProviderBudgets: spend_linger must be 0 to 5 seconds, got {spend_linger!r}")
        self.filter_cache_ttl = float(filter_cache_ttl)
        self.spend_linger = float(spend_linger)
        # The sidecar's recent /v1/filter answers: (deployments, tags, identity) -> (expires at
        # on the monotonic clock, indices allowed). Cleared when a post lands that may have
        # turned one into a refusal (a batch the sidecar answers "admitted": false, or any
        # other acknowledged post), so no answer outlives this process's own spend.
        self._filter_cache: Dict[Any, Tuple[float, List[int]]] = {}
        # Why not with fail_open=False: failing closed means every request is confirmed by
        # the sidecar, so an outage refuses at once rather than after filter_cache_ttl.
        self._caching = self.filter_cache_ttl > 0 and bool(fail_open)
        # Posts sent and not answered yet. While one is, the cache is not read: the sidecar
        # may already count a spend whose answer (and so whether it cleared the cache) is
        # still on its way, and a filter then must see what the sidecar sees.
        self._posting = 0
        base = url or os.environ.get("PROVIDER_BUDGETS_URL") or DEFAULT_URL
        self.url = base.rstrip("/")
        self.fail_open = bool(fail_open)
        self.timeout = float(timeout)
        self.spend_attempts = int(spend_attempts)
        self.retry_backoff = float(retry_backoff)
        self.max_backoff = float(max_backoff)
        self.max_pending = int(max_pending)
        self.durable = bool(durable)
        self.strict = bool(strict)
        self.default_max_tokens = int(default_max_tokens)
        self.sidecar_estimate = bool(sidecar_estimate)
        token = token or os.environ.get("PROVIDER_BUDGETS_AUTH_TOKEN") or None
        if token is not None and (not token.strip() or any(c.isspace() for c in token.strip())):
            raise ValueError("ProviderBudgets: token must be one word (no spaces)")
        self._headers = dict(_JSON)
        if token is not None:
            self._headers["authorization"] = f"Bearer {token.strip()}"
        estimate = cost_to_decimal_str(default_estimate)
        if estimate is None or estimate.startswith("-"):
            raise ValueError(f"ProviderBudgets: default_estimate must be a non-negative amount, got {default_estimate!r}")
        self.default_estimate = Decimal(estimate)
        # Open reservations per litellm trace id: [(deployment id, reservation id, opened at)].
        self._reservations: Dict[str, List[Tuple[Optional[str], str, float]]] = {}
        self._reserve_url = self.url + "/v1/reserve"
        self._commit_url = self.url + "/v1/commit"
        self._release_url = self.url + "/v1/release"
        self.stats = SpendStats()
        self._filter_url = self.url + "/v1/filter"
        self._spend_url = self.url + "/v1/spend"
        self._down = False
        # One session per event loop (an aiohttp session is bound to the loop it was made on).
        self._sessions: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, aiohttp.ClientSession]" = (
            weakref.WeakKeyDictionary()
        )
        self._pending: "set[asyncio.Task[None]]" = set()
        # Spend posts waiting for the batch sender of their event loop (see ``_enqueue``).
        self._queues: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Queue]" = weakref.WeakKeyDictionary()
        self._batch_url = self.url + "/v1/spend/batch"
        # False once the sidecar answered 404 to a batch (a release before batches): each
        # spend is then posted alone.
        self._batches = True
        self._queued_count = 0  # spends in every loop's queue
        self._providers: Dict[Tuple[str, Optional[str], Optional[str]], Optional[str]] = {}
        # Models neither litellm nor the sidecar could price, each logged once.
        self._unpriced: "set[str]" = set()
        # Set at interpreter exit (`_at_exit`); spend posts cancelled by a closing loop.
        self._exiting = False
        self._unsent: List[Dict[str, Any]] = []
        atexit.register(self._at_exit)

    def __repr__(self) -> str:
        return f"ProviderBudgets(url={self.url!r}, fail_open={self.fail_open!r}, timeout={self.timeout!r})"

    # ---- plumbing --------------------------------------------------------------------------

    async def _post(self, url: str, body: bytes) -> Tuple[int, bytes]:
        """One POST: (status, body). Transport failures raise ``_Unusable``."""
        loop = asyncio.get_running_loop()
        session = self._sessions.get(loop)
        if session is None or session.closed:
            session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                connector=aiohttp.TCPConnector(limit=64),
                trust_env=False,
            )
            self._sessions[loop] = session
        # A pooled keep-alive connection the sidecar closed (restart, idle close) fails at once
        # with ServerDisconnectedError: one immediate second try, on a fresh connection.
        for attempt in (1, 2):
            try:
                async with session.post(url, data=body, headers=self._headers) as resp:
                    return resp.status, await resp.read()
            except aiohttp.ServerDisconnectedError as e:
                if attempt == 2:
                    raise _Unusable(f"{type(e).__name__}: {e}".rstrip(": ")) from e
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as e:
                raise _Unusable(f"{type(e).__name__}: {e}".rstrip(": ")) from e
        raise AssertionError("unreachable")

    def _unreachable(self, what: str, err: object) -> None:
        if not self._down:
            self._down = True
            policy = "deployments pass unfiltered (fail_open)" if self.fail_open else "requests fail (fail_open=False)"
            logger.warning(
                "provider-budgets sidecar at %s unusable (%s: %s); %s until it answers again",
                self.url,
                what,
                err,
                policy,
            )

    def _reachable(self) -> None:
        if self._down:
            self._down = False
            logger.info("provider-budgets sidecar at %s answers again", self.url)

    def _provider_of(self, deployment: Dict[str, Any]) -> Tuple[str, Optional[str]]:
        params = deployment.get("litellm_params") or {}
        if not isinstance(params, dict):
            params = getattr(params, "model_dump", lambda: {})() or {}
        model = str(params.get("model") or deployment.get("model_name") or "")
        custom = params.get("custom_llm_provider")
        api_base = params.get("api_base")
        key = (model, custom, api_base)
        try:
            return model, self._providers[key]
        except KeyError:
            pass
        try:
            _, provider, _, _ = litellm.get_llm_provider(model=model, custom_llm_provider=custom, api_base=api_base)
        except Exception:  # litellm raises its own BadRequestError for unknown models
            provider = None  # the sidecar resolves the model name itself
        if len(self._providers) < 10_000:
            self._providers[key] = provider
        return model, provider

    # ---- routing filter --------------------------------------------------------------------

    async def async_filter_deployments(
        self,
        model: str,
        healthy_deployments: List[Dict[str, Any]],
        messages: Optional[List[Any]],
        request_kwargs: Optional[Dict[str, Any]] = None,
        parent_otel_span: Any = None,
    ) -> List[Dict[str, Any]]:
        if isinstance(healthy_deployments, dict):
            healthy_deployments = [healthy_deployments]
        if not healthy_deployments:
            return healthy_deployments
        if self.strict:
            return await self._reserve(healthy_deployments, messages, request_kwargs)
        request: Dict[str, Any] = {"deployments": self._wire(healthy_deployments)}
        tags, identity = _label(request, request_kwargs)
        key = self._filter_key(request, tags, identity) if self._caching else None
        if key is not None and not self._posting:
            hit = self._filter_cache.get(key)
            if hit is not None and hit[0] > time.monotonic():
                return [healthy_deployments[i] for i in hit[1]]

        def allowed(answer: bytes) -> List[int]:
            refs = [int(d["ref"]) for d in json.loads(answer)["deployments"]]
            if any(not 0 <= i < len(healthy_deployments) for i in refs):
                raise IndexError(f"ref out of range in {refs}")
            return refs

        chosen = await self._ask("filter", self._filter_url, request, None, allowed)
        if chosen is None:
            return healthy_deployments
        picked = [healthy_deployments[i] for i in chosen]
        if key is not None:
            if len(self._filter_cache) >= 10_000:
                self._filter_cache.clear()  # many identities: bounded, not an LRU
            self._filter_cache[key] = (time.monotonic() + self.filter_cache_ttl, chosen)
        return picked

    def _filter_key(self, request: Dict[str, Any], tags: List[str], identity: Dict[str, str]) -> Any:
        """What a filter answer depends on: the candidates in order, the tags and the
        identity."""
        return (
            tuple((d["model"], d.get("provider"), d.get("id")) for d in request["deployments"]),
            tuple(tags),
            tuple(sorted(identity.items())),
        )

    def _wire(self, healthy_deployments: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
        """The deployments as the sidecar reads them, each with its index as ``ref``."""
        wire = []
        for i, deployment in enumerate(healthy_deployments):
            name, provider = self._provider_of(deployment)
            item: Dict[str, Any] = {"model": name, "ref": str(i)}
            if provider:
                item["provider"] = provider
            model_id = _model_id(deployment)
            if model_id:
                item["id"] = model_id
            wire.append(item)
        return wire

    async def _ask(
        self,
        what: str,
        url: str,
        request: Dict[str, Any],
        request_kwargs: Optional[Dict[str, Any]],
        read: Callable[[bytes], T],
        fallback: Optional[Dict[str, Any]] = None,
    ) -> Optional[T]:
        """Posts ``request`` (plus the request's tags and identities) to ``/v1/{what}`` and
        returns ``read`` of the answer. A 429 raises ``NoDeploymentsAvailable`` (budget
        crossed); an unusable sidecar (no answer, another status, an answer ``read`` cannot
        read) gives ``None`` with ``fail_open`` (the caller lets every deployment through),
        else raises."""
        _label(request, request_kwargs)
        body = json.dumps(request, separators=(",", ":")).encode()
        try:
            status, answer = await self._post(url, body)
            if status == 422 and fallback is not None:
                # The sidecar cannot price the request's models (pricing.unpriced: deny):
                # the reservation is made with the plugin's own estimate instead.
                fallback.update({k: request[k] for k in ("tags", "identity") if k in request})
                body = json.dumps(fallback, separators=(",", ":")).encode()
                status, answer = await self._post(url, body)
            if status == 429:
                self._reachable()
                raise NoDeploymentsAvailable(f"{CROSSED_BUDGET}: {_exceeded_info(answer)}")
            if status != 200:
                raise _Unusable(f"HTTP {status}: {_clip(answer)}")
            try:
                result = read(answer)
            except (ValueError, KeyError, IndexError, TypeError) as e:
                raise _Unusable(f"malformed /v1/{what} answer ({e!r}): {_clip(answer)}") from e
        except _Unusable as e:
            self._unreachable(what, e)
            if self.fail_open:
                return None
            raise NoDeploymentsAvailable(
                f"{NO_DEPLOYMENTS}: provider-budgets sidecar at {self.url} unusable ({e}) and fail_open=False"
            ) from None
        self._reachable()
        return result

    # ---- strict: reservations ----------------------------------------------------------------

    def estimate(self, deployment: Dict[str, Any], messages: Any, request_kwargs: Optional[Dict[str, Any]]) -> Decimal:
        """The estimate of one call to ``deployment``: prompt tokens plus the most output tokens
        it may produce, priced by litellm's cost map (see the module doc)."""
        model, provider = self._provider_of(deployment)
        kw = request_kwargs or {}
        out_tokens = kw.get("max_tokens") or kw.get("max_completion_tokens")
        try:
            if not out_tokens:
                info = litellm.get_model_info(model=model, custom_llm_provider=provider)
                out_tokens = info.get("max_output_tokens") or info.get("max_tokens")
        except Exception:
            out_tokens = None
        out_tokens = int(out_tokens or self.default_max_tokens)
        try:
            in_tokens = litellm.token_counter(model=model, messages=messages or [])
            prompt, completion = litellm.cost_per_token(
                model=model,
                custom_llm_provider=provider,
                prompt_tokens=int(in_tokens),
                completion_tokens=out_tokens,
            )
            cost = cost_to_decimal_str(float(prompt) + float(completion))
        except Exception:
            cost = None
        return self.default_estimate if cost is None else Decimal(cost)

    async def _reserve(
        self,
        healthy_deployments: List[Dict[str, Any]],
        messages: Optional[List[Any]],
        request_kwargs: Optional[Dict[str, Any]],
    ) -> List[Dict[str, Any]]:
        estimate = Decimal(0)
        for deployment in healthy_deployments:
            estimate = max(estimate, self.estimate(deployment, messages, request_kwargs))
        wire = self._wire(healthy_deployments)
        own: Dict[str, Any] = {"deployments": wire, "estimate": format(estimate, "f")}
        request, fallback = own, None
        chat = _chat_for_estimate(messages)
        if self.sidecar_estimate and chat is not None:
            # The sidecar estimates each candidate on its own model (and holds tokens in token
            # budgets); the plugin's estimate is the fallback for models it cannot price.
            request = {"deployments": wire, "messages": chat}
            kw = request_kwargs or {}
            max_tokens = kw.get("max_tokens") or kw.get("max_completion_tokens")
            if isinstance(max_tokens, int) and not isinstance(max_tokens, bool) and max_tokens >= 0:
                request["max_tokens"] = max_tokens
            fallback = own

        def reserved(answer: bytes) -> Tuple[Dict[str, Any], str]:
            doc = json.loads(answer)
            return healthy_deployments[int(doc["deployment"]["ref"])], str(doc["reservation"])

        got = await self._ask("reserve", self._reserve_url, request, request_kwargs, reserved, fallback)
        if got is None:
            return healthy_deployments
        chosen, reservation = got
        self._remember(request_kwargs, _model_id(chosen), reservation)
        return [chosen]

    def _remember(self, request_kwargs: Optional[Dict[str, Any]], model_id: Optional[str], reservation: str) -> None:
        trace = (request_kwargs or {}).get("litellm_trace_id")
        metadata = (request_kwargs or {}).get("metadata")
        if isinstance(metadata, dict):
            # Fallback for calls without a trace id: litellm hands this dict to the events.
            metadata["provider_budgets_reservation"] = reservation
        if not trace:
            return
        now = time.monotonic()
        if len(self._reservations) >= self.max_pending:
            # Calls that never reported an end (their reservations expire in the sidecar).
            for key in [k for k, v in self._reservations.items() if now - v[-1][2] > 3600] or list(self._reservations)[:1]:
                self._reservations.pop(key, None)
        self._reservations.setdefault(str(trace), []).append((model_id, reservation, now))

    def _take_reservation(self, kwargs: Dict[str, Any]) -> Optional[str]:
        """The open reservation of the call an event reports, forgotten here."""
        slo = kwargs.get("standard_logging_object") or {}
        trace = kwargs.get("litellm_trace_id") or slo.get("trace_id")
        model_id = slo.get("model_id") or _model_id((kwargs.get("litellm_params") or {}))
        entries = self._reservations.get(str(trace)) if trace else None
        if entries:
            pick = next((i for i, e in enumerate(entries) if model_id and e[0] == model_id), 0)
            _, reservation, _ = entries.pop(pick)
            if not entries:
                self._reservations.pop(str(trace), None)
            return reservation
        metadata = (kwargs.get("litellm_params") or {}).get("metadata") or {}
        if isinstance(metadata, dict):
            return metadata.pop("provider_budgets_reservation", None)
        return None

    def _end_in_background(
        self, url: str, payload: Dict[str, Any], model: Optional[str] = None
    ) -> Optional["asyncio.Task[None]"]:
        if len(self._pending) >= self.max_pending:
            self.stats.dropped += 1
            logger.error(
                "provider-budgets: %d posts pending; dropping the end of reservation %s (it expires and counts its estimate)",
                len(self._pending),
                payload["reservation"],
            )
            return None
        return self._track(self._post_end(url, payload, model))

    def _track(self, coro: Any) -> "asyncio.Task[None]":
        """Run ``coro`` as a task kept in ``_pending`` until it is done (for ``flush``)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return task

    async def _post_retried(
        self,
        url: str,
        payload: Dict[str, Any],
        what: str,
        count: int = 1,
        body: Optional[bytes] = None,
        clears: bool = True,
    ) -> Tuple[Optional[int], Any]:
        """Post ``payload``, retried with backoff while the sidecar is unusable (the same answer
        comes back for a repeat, so a retry never counts twice). Counts the outcome in ``stats``
        (``count`` posts: a batch counts its spends) and returns ``(200, answer)`` when posted,
        ``(status, answer)`` when refused for good, or ``(None, last_error)`` after
        ``spend_attempts``; the caller logs the last two. ``body``: ``payload`` already
        encoded. ``clears``: a 200 clears the filter cache (a batch decides by its answer)."""
        if body is None:
            body = json.dumps(payload, separators=(",", ":")).encode()
        self._posting += 1
        try:
            return await self._post_attempts(url, body, what, count, clears)
        finally:
            self._posting -= 1

    async def _post_attempts(
        self, url: str, body: bytes, what: str, count: int, clears: bool
    ) -> Tuple[Optional[int], Any]:
        """The attempts of ``_post_retried``."""
        delay = self.retry_backoff
        last: object = None
        for attempt in range(1, self.spend_attempts + 1):
            if attempt > 1:
                self.stats.retries += 1
            try:
                status, answer = await self._post(url, body)
            except _Unusable as e:
                last = e
            else:
                if status == 200:
                    self._reachable()
                    self.stats.posted += count
                    if clears:
                        self._filter_cache.clear()  # the sidecar's spend changed
                    return status, answer
                if status in (408, 429) or status >= 500:
                    last = f"HTTP {status}: {_clip(answer)}"
                else:
                    self._reachable()
                    self.stats.rejected += count
                    return status, answer
            self._unreachable(what, last)
            if attempt < self.spend_attempts:
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.max_backoff)
        self.stats.dropped += count
        return None, last

    def _unpriced_once(self, model: str, how: str) -> None:
        """Logs once per model that litellm had no ``response_cost`` and the sidecar could
        not price the usage either (``how``: what happened to the call's cost)."""
        if model in self._unpriced or len(self._unpriced) >= 10_000:
            return
        self._unpriced.add(model)
        logger.warning(
            "provider-budgets: neither litellm nor the sidecar can price model %r: %s "
            "(give it a price in the sidecar's provider_budgets.pricing.overrides); logged once per model",
            model,
            how,
        )

    def _check_priced(self, model: str, status: Optional[int], answer: Any) -> bool:
        """After a post of usage: logs an unpriced model once. ``True`` when the answer was
        about pricing (nothing else to log)."""
        text = answer.get("error", "") if isinstance(answer, dict) else answer or b""
        if status == 422 and ("is unpriced" if isinstance(text, str) else b"is unpriced") in text:
            self._unpriced_once(model, f"not recorded ({_clip(answer)})")
            return True
        if status == 200:
            try:
                doc = answer if isinstance(answer, dict) else json.loads(answer)
            except (TypeError, ValueError):
                return False
            if isinstance(doc, dict) and doc.get("priced") is False and doc.get("price_source") != "given":
                how = f"counted by the sidecar's pricing.unpriced policy as {doc.get('cost')} USD"
                self._unpriced_once(model, f"{how} ({doc.get('price_source')})")
        return False

    async def _post_end(self, url: str, payload: Dict[str, Any], model: Optional[str] = None) -> None:
        """A commit or release, retried while the sidecar is unusable."""
        what = "commit" if ("cost" in payload or "usage" in payload) else "release"
        status, answer = await self._post_retried(url, payload, what)
        if "usage" in payload and self._check_priced(model or "?", status, answer):
            return  # an unpriced commit: the reservation stays open, expires, counts its estimate
        if status is None:
            logger.error(
                "provider-budgets: gave up the %s of reservation %s after %d attempts (%s); it expires and counts its estimate",
                what,
                payload["reservation"],
                self.spend_attempts,
                answer,
            )
        elif status != 200:
            # 404 (unknown: the sidecar restarted) or 409 (expired): the estimate was
            # counted instead; nothing a retry can change.
            logger.error(
                "provider-budgets sidecar refused the %s of reservation %s (HTTP %d: %s)",
                what,
                payload["reservation"],
                status,
                _clip(answer),
            )

    async def async_log_failure_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[override]
        if not self.strict:
            return
        reservation = self._take_reservation(kwargs)
        if reservation:
            self._end_in_background(self._release_url, {"reservation": reservation})

    # ---- spend -----------------------------------------------------------------------------

    async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):  # type: ignore[override]
        self._log_success(kwargs, response_obj)
        if self._exiting:
            # litellm's exit flush (its atexit handler, after a short script's event loop
            # ended) runs this on a loop of its own that ends with this call: finish the post
            # here and close that loop's HTTP session, or the spend is lost with the loop.
            await self.aclose(self.timeout * self.spend_attempts)

    def _at_exit(self) -> None:
        """At interpreter exit (registered after litellm's own handler, so it runs first):
        from now on success events post inline (see ``async_log_success_event``), and the
        posts a closing event loop cancelled are sent again, on a loop of their own."""
        self._exiting = True
        unsent, self._unsent = self._unsent, []
        if not unsent:
            return
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._post_unsent(unsent))
        finally:
            loop.close()

    async def _post_unsent(self, unsent: List[Dict[str, Any]]) -> None:
        for payload in unsent:
            await self._post_spend(payload)
        await self.aclose()

    def _log_success(self, kwargs: Dict[str, Any], response_obj: Any) -> None:
        if self.strict:
            reservation = self._take_reservation(kwargs)
            if reservation:
                slo = kwargs.get("standard_logging_object") or {}
                cost = cost_to_decimal_str(slo.get("response_cost"))
                usage = _usage_of(response_obj, slo) if slo.get("response_cost") is None else None
                if usage is not None:
                    # litellm could not price it: the sidecar prices the usage.
                    payload = {"reservation": reservation, "usage": usage}
                    self._end_in_background(self._commit_url, payload, str(slo.get("model") or "?"))
                    return
                if cost is None or cost.startswith("-"):
                    logger.error(
                        "provider-budgets: unusable response_cost %r: reservation %s left to expire (it counts its estimate)",
                        slo.get("response_cost"),
                        reservation,
                    )
                    return  # it expires and counts its estimate
                payload = {"reservation": reservation, "cost": cost}
                usage = _usage_of(response_obj, slo)
                if usage is not None:
                    # Token budgets count the call's tokens; USD budgets count the cost.
                    payload["usage"] = usage
                self._end_in_background(self._commit_url, payload)
                return
        self.post_spend_in_background(kwargs, response_obj)

    def post_spend_in_background(
        self, kwargs: Dict[str, Any], response_obj: Any = None
    ) -> Optional["asyncio.Task[None]"]:
        """Schedule the spend post of one litellm success event; ``None`` when there is nothing
        to post (no cost nor usage, zero cost, no provider) or too many posts are pending.
        Without litellm's ``response_cost``, the call's usage is posted for the sidecar to
        price (it needs the model: ``standard_logging_object["model"]``)."""
        slo = kwargs.get("standard_logging_object") or {}
        provider = slo.get("custom_llm_provider") or kwargs.get("custom_llm_provider")
        raw_cost = slo.get("response_cost")
        cost = cost_to_decimal_str(raw_cost)
        # Sent with every spend that has it: token budgets count it (and, without litellm's
        # cost, the sidecar prices it). A zero cost is posted too: request and token budgets
        # count the call.
        usage = _usage_of(response_obj, slo) if slo.get("model") else None
        if provider and usage is not None and raw_cost is None:
            cost = None
        elif not provider or cost is None:
            self.stats.skipped += 1
            if raw_cost not in (None, 0, 0.0) and cost is None:
                logger.error(
                    "provider-budgets: unusable response_cost %r for provider %r: not recorded", raw_cost, provider
                )
            return None
        if cost is not None and cost.startswith("-"):
            self.stats.rejected += 1
            logger.error("provider-budgets: negative response_cost %s for provider %s: not recorded", cost, provider)
            return None
        payload: Dict[str, Any] = {"cost": cost} if cost is not None else {}
        if usage is not None:
            payload["usage"] = usage
        model = slo.get("model")
        if model:
            # Every budget that applies: provider, model, deployment (model_info.id), tags and
            # identities.
            deployment: Dict[str, Any] = {"model": str(model), "provider": str(provider)}
            if slo.get("model_id"):
                deployment["id"] = str(slo["model_id"])
            payload["deployment"] = deployment
            tags = [str(t) for t in (slo.get("request_tags") or []) if isinstance(t, str) and t]
            if tags:
                payload["tags"] = tags
            identity = _logged_identity(kwargs)
            if identity:
                payload["identity"] = identity
        else:
            payload["provider"] = str(provider)
        call_id = kwargs.get("litellm_call_id") or slo.get("id")
        if call_id:
            payload["idempotency_key"] = f"litellm:{call_id}"
        at = _rfc3339(slo.get("endTime"))
        if at is not None:
            payload["at"] = at
        if self.durable:
            payload["durable"] = True
        queued = self._queued()
        if queued + len(self._pending) >= self.max_pending:
            self.stats.dropped += 1
            logger.error(
                "provider-budgets: %d spend posts pending; dropping cost %s for provider %s",
                queued + len(self._pending),
                cost if cost is not None else "(usage)",
                provider,
            )
            return None
        return self._enqueue(payload)

    # ---- spend batches -----------------------------------------------------------------------

    def _queued(self) -> int:
        return self._queued_count

    def _enqueue(self, payload: Dict[str, Any]) -> "asyncio.Task[None]":
        """Queue one spend post for this loop's sender, started when none runs. The sender
        waits ``spend_linger`` (not at interpreter exit, nor with 256 spends queued) and posts
        what has queued up as one ``/v1/spend/batch``: one HTTP exchange per batch instead of
        one per call. Returns the sender's task (awaiting it waits for this post too)."""
        loop = asyncio.get_running_loop()
        queue = self._queues.get(loop)
        if queue is None:
            queue = self._queues[loop] = _Queue()
        queue.items.append((payload, json.dumps(payload, separators=(",", ":")).encode()))
        self._queued_count += 1
        if queue.sender is None or queue.sender.done():
            queue.sender = self._track(self._send_queued(queue))
        return queue.sender

    async def _send_queued(self, queue: "_Queue") -> None:
        while queue.items:
            batch = []
            try:
                if self.spend_linger > 0 and not self._exiting and len(queue.items) < BATCH_SPENDS:
                    await asyncio.sleep(self.spend_linger)
                batch = _take_batch(queue.items)
                self._queued_count -= len(batch)
                if self._batches:
                    await self._post_batch(batch)
                else:
                    for payload, _ in batch:
                        await self._post_spend(payload)
            except asyncio.CancelledError:
                # The event loop is closing: what is left is sent at exit (see _post_spend).
                for payload, _ in [*batch, *queue.items]:
                    if "idempotency_key" in payload:
                        self._unsent.append(payload)
                self._queued_count -= len(queue.items)
                queue.items.clear()
                raise

    async def _post_batch(self, encoded: List[Tuple[Dict[str, Any], bytes]]) -> None:
        """Posts ``batch`` as one ``/v1/spend/batch``, retried like a single post; each
        spend's answer is then handled as ``_post_spend`` handles its own. Spends answered
        with a transient status (408, 429, 5xx) are posted again, alone."""
        batch = [payload for payload, _ in encoded]
        body = b'{"admission":true,"spends":[' + b",".join(e for _, e in encoded) + b"]}"
        status, answer = await self._post_retried(
            self._batch_url, {}, "spend", count=len(batch), body=body, clears=False
        )
        if status == 404:
            self.stats.rejected -= len(batch)
            self._batches = False  # a sidecar without batches: one post per spend from now on
            for payload in batch:
                await self._post_spend(payload)
            return
        if status != 200:
            for payload in batch:
                if status is None:
                    self._spend_failed(payload, status, answer)
                else:
                    self._spend_answered(payload, status, answer)
            return
        try:
            doc = json.loads(answer)
            results = doc["results"]
            assert isinstance(results, list) and len(results) == len(batch)
        except (ValueError, KeyError, TypeError, AssertionError):
            self._filter_cache.clear()
            self.stats.posted -= len(batch)
            for payload in batch:  # an answer we cannot read: each alone (keys make it safe)
                await self._post_spend(payload)
            return
        if doc.get("admitted") is not True:
            # A budget these spends counted in may refuse now: ask the sidecar again.
            self._filter_cache.clear()
        for payload, result in zip(batch, results):
            code = result.get("status") if isinstance(result, dict) else None
            if code == 200:
                self._spend_answered(payload, 200, result)
            elif code in (408, 429) or not isinstance(code, int) or code >= 500:
                self.stats.posted -= 1
                await self._post_spend(payload)
            else:
                self.stats.posted -= 1
                self.stats.rejected += 1
                self._spend_answered(payload, code, result)

    async def _post_spend(self, payload: Dict[str, Any]) -> None:
        try:
            status, answer = await self._post_retried(self._spend_url, payload, "spend")
        except asyncio.CancelledError:
            # The event loop is closing (a short script's `asyncio.run` returned): sent again
            # at exit. Only with an idempotency key, so that a post that did arrive is not
            # counted twice; without one it is reported lost.
            if "idempotency_key" in payload:
                self._unsent.append(payload)
            else:
                logger.error("provider-budgets: spend %s cancelled with its event loop: not recorded", payload.get("cost"))
            raise
        if status is None:
            self._spend_failed(payload, status, answer)
        else:
            self._spend_answered(payload, status, answer)

    def _spend_answered(self, payload: Dict[str, Any], status: int, answer: Any) -> None:
        """A spend's answer (``answer``: its body, as bytes or as the parsed document)."""
        if "usage" in payload:
            model = (payload.get("deployment") or {}).get("model") or "?"
            if self._check_priced(str(model), status, answer):
                return
        if status != 200:
            self._spend_failed(payload, status, answer)

    def _spend_failed(self, payload: Dict[str, Any], status: Optional[int], answer: Any) -> None:
        """Logs a spend given up (``status`` None) or refused for good."""
        what = payload.get("cost", "(usage)")
        if status is None:
            logger.error(
                "provider-budgets: gave up recording spend %s for provider %s after %d attempts (%s)",
                what,
                _target(payload),
                self.spend_attempts,
                answer,
            )
        elif status != 200:
            logger.error(
                "provider-budgets sidecar rejected spend %s for provider %s (HTTP %d: %s): not recorded",
                what,
                _target(payload),
                status,
                _clip(answer),
            )

    async def flush(self, timeout: Optional[float] = None) -> bool:
        """Wait for the spend posts pending on the running loop; ``False`` on timeout."""
        loop = asyncio.get_running_loop()
        pending = [t for t in self._pending if t.get_loop() is loop and not t.done()]
        if not pending:
            return True
        _, not_done = await asyncio.wait(pending, timeout=timeout)
        return not not_done

    async def aclose(self, timeout: Optional[float] = None) -> None:
        """Flush the pending spend posts, then close this loop's HTTP session."""
        await self.flush(timeout)
        session = self._sessions.pop(asyncio.get_running_loop(), None)
        if session is not None:
            await session.close()


class _Queue:
    """The spend posts of one event loop waiting for its sender task."""

    __slots__ = ("items", "sender")

    def __init__(self) -> None:
        # Each post with its JSON (encoded once, when queued).
        self.items: "collections.deque[Tuple[Dict[str, Any], bytes]]" = collections.deque()
        self.sender: Optional["asyncio.Task[None]"] = None


# A batch: at most this many spends, and this many bytes of JSON (the sidecar refuses bodies
# over 64 KiB with 413; the rest is room for the envelope).
BATCH_SPENDS = 256
BATCH_BYTES = 48 * 1024


def _take_batch(items: "collections.deque[Tuple[Dict[str, Any], bytes]]") -> List[Tuple[Dict[str, Any], bytes]]:
    """The next batch off the front of ``items`` (at least one spend)."""
    batch = [items.popleft()]
    size = len(batch[0][1])
    while items and len(batch) < BATCH_SPENDS:
        more = len(items[0][1]) + 1
        if size + more > BATCH_BYTES:
            break
        size += more
        batch.append(items.popleft())
    return batch


def _count(value: Any) -> Optional[int]:
    """A token count: a non-negative int (``None`` for anything else)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        return None
    return value


def _field(obj: Any, name: str) -> Any:
    """``obj.name`` or ``obj[name]`` (litellm's usage is an object; logged copies are dicts)."""
    if obj is None:
        return None
    if isinstance(obj, dict):
        return obj.get(name)
    return getattr(obj, name, None)


def _usage_of(response_obj: Any, slo: Dict[str, Any]) -> Optional[Dict[str, int]]:
    """The call's token usage in the sidecar's names, from the response's ``usage`` (else the
    standard logging object's ``prompt_tokens`` / ``completion_tokens``); ``None`` without
    a prompt or completion count. ``input_tokens`` counts the cached tokens (OpenAI's and
    litellm's ``prompt_tokens``); Anthropic's cache counts come from litellm's
    ``cache_read_input_tokens`` / ``cache_creation_input_tokens``, else
    ``prompt_tokens_details``."""
    u = _field(response_obj, "usage")
    source = u if u is not None else slo
    out: Dict[str, int] = {}
    for ours, theirs in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        n = _count(_field(source, theirs))
        if n is not None:
            out[ours] = n
    if not out:
        return None
    if u is None:
        return out
    prompt = _field(u, "prompt_tokens_details")
    completion = _field(u, "completion_tokens_details")
    parts = (
        ("cache_read_tokens", (_field(u, "cache_read_input_tokens"), _field(prompt, "cached_tokens"))),
        ("cache_creation_tokens", (_field(u, "cache_creation_input_tokens"), _field(prompt, "cache_creation_tokens"))),
        ("reasoning_tokens", (_field(completion, "reasoning_tokens"),)),
    )
    for ours, candidates in parts:
        n = next((c for c in map(_count, candidates) if c), None)
        if n:
            out[ours] = n
    return out


def _usd(entry: Dict[str, Any], field: str) -> Any:
    """An amount of a 429 entry: exact from its ``*_nanos`` field when present."""
    n = entry.get(f"{field}_nanos")
    if isinstance(n, int) and not isinstance(n, bool):
        d = (Decimal(n) / 10**9).normalize()
        return format(d, "f")
    return entry.get(field)


def _target(payload: Dict[str, Any]) -> str:
    """What a spend post charges, for log lines: the provider, or the deployment, tags and
    identities."""
    d = payload.get("deployment")
    if not isinstance(d, dict):
        return str(payload.get("provider"))
    tags = payload.get("tags")
    identity = payload.get("identity") or {}
    who = "".join(f", {k} {v}" for k, v in identity.items())
    return f"{d.get('provider')} ({d.get('model')}, id {d.get('id')}{', tags ' + ','.join(tags) if tags else ''}{who})"


def _model_id(deployment: Dict[str, Any]) -> Optional[str]:
    """A deployment's ``model_info.id`` (litellm's Router sets one on every deployment)."""
    info = deployment.get("model_info") or {}
    if not isinstance(info, dict):
        info = getattr(info, "model_dump", lambda: {})() or {}
    model_id = info.get("id")
    return str(model_id) if model_id not in (None, "") else None


def _label(request: Dict[str, Any], request_kwargs: Optional[Dict[str, Any]]) -> Tuple[List[str], Dict[str, str]]:
    """Sets the request's tags and identity (when it has any) into a sidecar ``request``;
    returns them."""
    tags = _request_tags(request_kwargs)
    if tags:
        request["tags"] = tags
    identity = _request_identity(request_kwargs)
    if identity:
        request["identity"] = identity
    return tags, identity


def _request_tags(request_kwargs: Optional[Dict[str, Any]]) -> List[str]:
    """The request's tags as litellm's own tag routing and tag budgets read them
    (``metadata.tags``, or ``litellm_metadata.tags`` for /v1/messages-shaped requests)."""
    if not request_kwargs:
        return []
    try:
        from litellm.router_strategy.tag_based_routing import get_tags_from_request_kwargs

        tags = get_tags_from_request_kwargs(request_kwargs)
    except Exception:  # an older litellm: read metadata.tags directly
        metadata = request_kwargs.get("metadata") or request_kwargs.get("litellm_metadata") or {}
        tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return [t for t in (tags or []) if isinstance(t, str) and t]


def _identity_from(metadata: Any) -> Dict[str, str]:
    """The identities in one litellm metadata dict (see ``IDENTITY_FIELDS``)."""
    if not isinstance(metadata, dict):
        return {}
    out: Dict[str, str] = {}
    for field, source in IDENTITY_FIELDS:
        value = metadata.get(source)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, int):
            value = str(value)
        if not isinstance(value, str) or not value:
            continue
        if len(value.encode("utf-8", "replace")) > MAX_IDENTITY_LEN:
            if source not in _warned_identity:
                _warned_identity.add(source)
                logger.warning(
                    "provider-budgets: metadata %s is longer than %d bytes: left out of the identity (its budgets do not apply)",
                    source,
                    MAX_IDENTITY_LEN,
                )
            continue
        out[field] = value
    return out


def _request_identity(request_kwargs: Optional[Dict[str, Any]]) -> Dict[str, str]:
    """The request's identities from the metadata litellm's proxy filled (``metadata``, or
    ``litellm_metadata`` for the routes that use that name)."""
    if not request_kwargs:
        return {}
    identity = _identity_from(request_kwargs.get("litellm_metadata"))
    identity.update(_identity_from(request_kwargs.get("metadata")))
    return identity


def _logged_identity(kwargs: Dict[str, Any]) -> Dict[str, str]:
    """A success event's identities: the standard logging object's ``metadata`` (litellm
    copies the proxy's fields there), else the call's ``litellm_params.metadata``."""
    slo = kwargs.get("standard_logging_object") or {}
    identity = _identity_from(slo.get("metadata"))
    if identity:
        return identity
    params = kwargs.get("litellm_params") or {}
    return _identity_from(params.get("metadata") if isinstance(params, dict) else None)


def _chat_for_estimate(messages: Any) -> Optional[List[Dict[str, Any]]]:
    """The request's messages as the sidecar counts them (role, name, and text content or
    content parts); ``None`` when there are none to send."""
    if not isinstance(messages, list) or not messages:
        return None
    out: List[Dict[str, Any]] = []
    for m in messages:
        role = _field(m, "role")
        content = _field(m, "content")
        item: Dict[str, Any] = {"role": role if isinstance(role, str) else "user"}
        if isinstance(content, str):
            item["content"] = content
        elif isinstance(content, list):
            item["content"] = [
                {"type": "text", "text": p["text"]}
                if isinstance(p, dict) and isinstance(p.get("text"), str)
                else {"type": "other"}
                for p in content
            ]
        name = _field(m, "name")
        if isinstance(name, str):
            item["name"] = name
        out.append(item)
    return out


def _clip(answer: Any, n: int = 200) -> str:
    """The start of an answer's body (bytes, or a batch item's parsed document)."""
    if isinstance(answer, dict):
        return json.dumps(answer, separators=(",", ":"))[:n]
    return answer[:n].decode("utf-8", "replace")


def _exceeded_line(e: Dict[str, Any]) -> str:
    """One refusing budget of a 429, in litellm's words; a strict budget refused by the
    sidecar node's grant (``"refused_by": "grant"``) is not spent, and says so."""
    budget = f"{e.get('scope') or 'provider'} {e.get('name') or e.get('provider')}"
    # A budget of tokens, requests or slots says its unit (as the sidecar's message does).
    unit = e.get("unit") or "usd"
    of = "" if unit == "usd" else " concurrent requests" if unit == "concurrent" else f" {unit}"
    if e.get("refused_by") == "grant":
        return (
            f"Exceeded this node's grant for {budget}: {_usd(e, 'spend')} > {_usd(e, 'grant')}{of} "
            f"(limit {_usd(e, 'limit')}, not spent: Redis granted this node no more)\n"
        )
    return f"Exceeded budget for {budget}: {_usd(e, 'spend')} >= {_usd(e, 'limit')}{of}\n"


def _exceeded_info(answer: bytes) -> str:
    """The budgets a 429 lists, in litellm's words: one line per exceeded budget
    (``Exceeded budget for provider openai: 10.5 >= 10``), each ending with a newline."""
    try:
        data = json.loads(answer)
    except ValueError:
        return _clip(answer, 500)
    if not isinstance(data, dict) or not isinstance(data.get("exceeded"), list):
        return json.dumps(data)[:500]
    lines = [_exceeded_line(e) for e in data["exceeded"] if isinstance(e, dict)]
    for model in data.get("unknown") or ():
        lines.append(f"Unknown provider for deployment {json.dumps(model)} (unknown_provider: deny)\n")
    refused = data.get("template_refused")
    if isinstance(refused, str):
        # A budget template refused a new key, user, … (its max_series is reached).
        lines.append(f"Refused by a template: {refused}\n")
    return "".join(lines)


def __getattr__(name: str) -> Any:
    """``provider_budgets_litellm.proxy_handler_instance``: the instance a litellm proxy config
    names under ``litellm_settings.callbacks``, created on first access from the environment
    (``PROVIDER_BUDGETS_URL``, ``PROVIDER_BUDGETS_FAIL_OPEN``, ``PROVIDER_BUDGETS_TIMEOUT``)."""
    if name == "proxy_handler_instance":
        global _proxy_handler_instance
        if _proxy_handler_instance is None:
            timeout = os.environ.get("PROVIDER_BUDGETS_TIMEOUT")
            _proxy_handler_instance = ProviderBudgets(
                fail_open=_env_bool("PROVIDER_BUDGETS_FAIL_OPEN", True),
                timeout=float(timeout) if timeout else 2.0,
            )
        return _proxy_handler_instance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_proxy_handler_instance: Optional[ProviderBudgets] = None
