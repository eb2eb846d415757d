"""The fallback chain: an ordered list of providers that is itself a provider.

    breakers = Breakers(fail_max=3, reset_timeout_s=30)      # one per process
    breakers.configure("primary", fail_max=5)                # or per provider, here
    chain = FallbackChain([primary, backup], breakers, skip=over_budget,
                          fail_max={"primary": 5}, reset_timeout_s={"primary": 60})

    run = chain.run(request)            # a ChainRun
    async for chunk in run:             # text chunks, then one Chunk(usage=...)
        ...
    run.served_by, run.model            # who finished the answer
    run.failures                        # tuple[Failure]: who failed or was skipped, why
    run.usage                           # the server's report, else an estimate
    chain.status()                      # list[ProviderStatus] for `boternity providers`

Rules:
- Providers are tried in order. One pybreaker ``CircuitBreaker`` per provider
  NAME lives in ``Breakers``, shared by every chain, so a dead provider is dead
  for every bot. An open breaker is skipped without sending a request; after
  ``reset_timeout_s`` the next call is the half-open probe (success closes it).
- Failover on every ``ProviderError`` whose ``failover`` is true: rate limits,
  5xx, connection errors, timeouts, auth errors (logged at ERROR), context too
  long. ``InvalidRequest`` is re-raised at once (the request is wrong, another
  provider would refuse it too). Every failover is logged as a warning.
- A 429 with Retry-After cools the provider down (skipped, no request) until then.
- A request that does not fit a provider's context window (estimate: ~4
  characters per token plus room for the answer) skips that provider. If no
  provider could take it, ``engine.errors.NoProviderFits`` (both an
  ``AllProvidersFailed`` and a ``ContextTooLong``; re-exported here).
- ``skip(provider, request) -> str | None`` (sync or async; given to the chain
  and/or to ``run``) returns a reason to skip a provider: over budget, etc.
- Mid-stream failure: deltas already yielded stay yielded. The next provider
  gets the conversation plus the partial answer as an assistant message and
  an instruction to continue exactly where it stopped, so the user sees one
  seamless answer.
- An answer that loops (``engine.providers.repetition``: the same sentence
  again and again) is stopped: the provider's stream is closed, the run ends
  as served by it, ``run.looped`` is set and ``run.text`` keeps only the
  loop's first turn (the deltas already yielded stay yielded).
- Every provider failed or was skipped: iterating raises ``AllProvidersFailed``
  whose ``.failures`` holds every reason (also on ``run.failures``).

``Failure.reason`` is footer-ready ("rate limited", "timed out before first
token", "connection dropped mid-answer", "server error 500", ...).

Breaker bookkeeping: ``InvalidRequest`` and ``ContextTooLong`` never count
against a provider; a stream the consumer abandons (cancelled, closed early)
counts as a success, since the provider was answering. ``Breakers(storage=...)``
can share breaker state between processes (pybreaker storages); the per-name
``ProviderRecord`` (last error, Retry-After cooldown) stays per process.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from engine.errors import (
    AllProvidersFailed,
    AuthFailed,
    ContextTooLong,
    InvalidRequest,
    NoProviderFits,
    ProviderError,
    RateLimited,
    Unavailable,
)
from engine.log_context import bind
from engine.ports import Provider
from engine.providers.repetition import RepetitionGuard
from engine.types import Capabilities, Chunk, CompletionRequest, Failure, Message, Usage

if TYPE_CHECKING:
    # Imported with the first breaker (``Breakers.get``): pybreaker imports
    # redis (and tornado, when installed) at import, 0.1-0.2 s that commands
    # creating no breaker (``boternity providers`` without Redis, ``memory``)
    # never pay. The composition root imports it in a worker thread.
    import pybreaker

log = logging.getLogger(__name__)

__all__ = ["Breakers", "ChainRun", "FallbackChain", "NoProviderFits", "ProviderStatus",
           "SkipRule", "estimate_request_tokens", "estimate_tokens", "fit_reason"]

SkipRule = Callable[[Provider, CompletionRequest], "str | Awaitable[str | None] | None"]
StorageFactory = Callable[[str], "pybreaker.CircuitBreakerStorage"]

CONTINUE_INSTRUCTION = (
    "Your previous answer (the assistant message above) was cut off. Continue it "
    "exactly where it stopped, starting with the very next character. Do not repeat "
    "anything already written, do not summarize it, and add no preamble."
)
CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD_TOKENS = 4  # role markers etc. per message
MAX_COOLDOWN_S = 300.0  # never trust a Retry-After for longer than this


def estimate_tokens(text: str) -> int:
    """A cheap, provider-neutral token estimate (about 4 characters per token)."""
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def estimate_request_tokens(request: CompletionRequest) -> int:
    return sum(estimate_tokens(m.content) + MESSAGE_OVERHEAD_TOKENS for m in request.messages)


def fit_reason(provider: Provider, request: CompletionRequest) -> str | None:
    """Why ``request`` cannot fit ``provider``'s window, or None when it fits."""
    caps = provider.capabilities
    # Room for an answer: the cap sent (never above the provider's own), or a
    # short one when the request leaves it to the provider.
    answer = (min(request.max_tokens, caps.max_output_tokens) if request.max_tokens
              else min(caps.max_output_tokens, 256))
    needed = estimate_request_tokens(request) + answer
    if needed > caps.context_window:
        return f"request too long (~{needed} tokens > {caps.context_window} window)"
    return None


@dataclass
class ProviderRecord:
    """What the chain remembers about one provider, across bots."""

    last_error: str | None = None
    last_error_at: datetime | None = None
    last_served_at: datetime | None = None
    cooldown_until: float = 0.0  # time.monotonic(); set by a 429 with Retry-After


@dataclass(frozen=True)
class ProviderStatus:
    name: str
    model: str
    state: str  # "closed" | "open" | "half-open" | "cooling down"
    last_error: str | None
    last_served_at: datetime | None
    label: str = ""


class Breakers:
    """One circuit breaker (and one ``ProviderRecord``) per provider name.

    ``storage(name)`` may return a shared ``pybreaker.CircuitBreakerStorage``
    (e.g. ``CircuitRedisStorage``) so several processes share breaker state;
    default is in-memory.
    """

    def __init__(
        self, *, fail_max: int = 3, reset_timeout_s: float = 30.0,
        storage: StorageFactory | None = None,
    ) -> None:
        self.fail_max = fail_max
        self.reset_timeout_s = reset_timeout_s
        self._storage = storage
        self._breakers: dict[str, pybreaker.CircuitBreaker] = {}
        self._records: dict[str, ProviderRecord] = {}

    def configure(
        self, name: str, *, fail_max: int | None = None, reset_timeout_s: float | None = None
    ) -> pybreaker.CircuitBreaker:
        """Create (or retune) the breaker of ``name``; None keeps the default."""
        breaker = self.get(name)
        breaker.fail_max = fail_max or self.fail_max
        breaker.reset_timeout = reset_timeout_s or self.reset_timeout_s
        return breaker

    def get(self, name: str) -> pybreaker.CircuitBreaker:
        breaker = self._breakers.get(name)
        if breaker is None:
            import pybreaker

            breaker = pybreaker.CircuitBreaker(
                fail_max=self.fail_max,
                reset_timeout=self.reset_timeout_s,
                # Not the provider's fault, or no verdict at all: never count these.
                exclude=[InvalidRequest, ContextTooLong, GeneratorExit, asyncio.CancelledError],
                state_storage=self._storage(name) if self._storage else None,
                name=name,
                throw_new_error_on_trip=False,  # keep the real error for the footer
            )
            self._breakers[name] = breaker
        return breaker

    def record(self, name: str) -> ProviderRecord:
        return self._records.setdefault(name, ProviderRecord())

    def state(self, name: str) -> str:
        if self.record(name).cooldown_until > time.monotonic():
            return "cooling down"
        if name not in self._breakers and self._storage is None:
            return "closed"  # no breaker yet, so no call went through it: as a new one starts
        return str(self.get(name).current_state)


class ChainRun:
    """One answer in progress: iterate it for chunks; read the results afterwards."""

    def __init__(self) -> None:
        self.served_by: str | None = None
        self.model: str | None = None
        self.failures: tuple[Failure, ...] = ()
        self.usage: Usage = Usage(estimated=True)
        self.text = ""  # every delta yielded so far, across providers (a loop cut back)
        self.guard = RepetitionGuard()
        self._gen: AsyncIterator[Chunk] | None = None

    def __aiter__(self) -> ChainRun:
        return self

    def __anext__(self) -> Awaitable[Chunk]:
        # The chain's own awaitable, not a coroutine wrapping it: one frame less per chunk.
        assert self._gen is not None
        return self._gen.__anext__()

    @property
    def looped(self) -> bool:
        """True when the answer was stopped because it repeated itself."""
        return self.guard.looped

    async def aclose(self) -> None:
        if self._gen is not None and hasattr(self._gen, "aclose"):
            await self._gen.aclose()


class FallbackChain:
    """Ordered providers behind one ``Provider`` face; see the module docstring."""

    def __init__(
        self, providers: Sequence[Provider], breakers: Breakers, *,
        skip: SkipRule | None = None, name: str = "chain",
        fail_max: Mapping[str, int] | None = None,
        reset_timeout_s: Mapping[str, float] | None = None,
    ) -> None:
        if not providers:
            raise ValueError("a fallback chain needs at least one provider")
        self.providers = tuple(providers)
        self.breakers = breakers
        # Per-provider breaker settings (by name); the breaker stays shared.
        for provider in self.providers:
            fails = (fail_max or {}).get(provider.name)
            reset = (reset_timeout_s or {}).get(provider.name)
            if fails is not None or reset is not None:
                breakers.configure(provider.name, fail_max=fails, reset_timeout_s=reset)
        self.name = name
        self.model = self.providers[0].model
        self._skip = skip
        # The widest window any member offers: the engine trims history to this,
        # and the chain routes a long request past the providers it cannot fit.
        self.capabilities = Capabilities(
            streaming=True,
            vision=any(p.capabilities.vision for p in self.providers),
            tools=any(p.capabilities.tools for p in self.providers),
            context_window=max(p.capabilities.context_window for p in self.providers),
            max_output_tokens=max(p.capabilities.max_output_tokens for p in self.providers),
        )

    def run(self, request: CompletionRequest, *, skip: SkipRule | None = None) -> ChainRun:
        run = ChainRun()
        run._gen = self._drive(request, run, skip)
        return run

    async def stream(self, request: CompletionRequest) -> AsyncIterator[Chunk]:
        async for chunk in self.run(request):
            yield chunk

    def status(self) -> list[ProviderStatus]:
        out = []
        for p in self.providers:
            record = self.breakers.record(p.name)
            out.append(ProviderStatus(
                p.name, p.model, self.breakers.state(p.name), record.last_error,
                record.last_served_at, str(getattr(p, "label", "")),
            ))
        return out

    async def _skip_reason(
        self, provider: Provider, request: CompletionRequest, extra: SkipRule | None
    ) -> tuple[str, str] | None:
        """(kind, reason) to skip ``provider`` without a request, or None."""
        record = self.breakers.record(provider.name)
        wait = record.cooldown_until - time.monotonic()
        if wait > 0:
            return "rate_limited", f"rate limited (retry in {wait:.0f}s)"
        too_long = fit_reason(provider, request)
        if too_long:
            return "context_too_long", too_long
        for rule in (self._skip, extra):
            if rule is None:
                continue
            verdict = rule(provider, request)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            if verdict:
                return "skipped", str(verdict)
        return None

    async def _drive(
        self, request: CompletionRequest, run: ChainRun, extra_skip: SkipRule | None
    ) -> AsyncIterator[Chunk]:
        import pybreaker  # loaded with the breakers (see the TYPE_CHECKING import)

        failures: list[Failure] = []
        for index, provider in enumerate(self.providers):
            attempt = _continuation(request, run.text) if run.text else request
            skipped = await self._skip_reason(provider, attempt, extra_skip)
            if skipped:
                failures.append(Failure(provider.name, *skipped))
                run.failures = tuple(failures)
                self._warn(index, f"skipped: {skipped[1]}")
                continue
            usage: Usage | None = None
            own_text = ""
            try:
                with bind(provider=provider.name), self.breakers.get(provider.name).calling():
                    stream = provider.stream(attempt)
                    try:
                        async for chunk in stream:
                            if chunk.usage is not None:
                                usage = chunk.usage
                            if chunk.text:
                                own_text += chunk.text
                                run.text += chunk.text
                                # Text only, always: the usage goes out once, at the end.
                                yield chunk if chunk.usage is None else Chunk(text=chunk.text)
                                if run.guard.feed(chunk.text):
                                    run.text = run.guard.text
                                    log.warning("chain %s: provider %s repeats itself; answer "
                                                "stopped", self.name, provider.name)
                                    break
                    finally:
                        # A loop stops the stream early: release its connection now.
                        close = getattr(stream, "aclose", None)
                        if close is not None:
                            await close()
            except pybreaker.CircuitBreakerError:
                reason = "skipped (circuit open after repeated failures)"
                failures.append(Failure(provider.name, "circuit_open", reason))
                self._warn(index, reason)
            except InvalidRequest as exc:
                failures.append(Failure(provider.name, exc.kind, exc.reason, exc.detail))
                run.failures = tuple(failures)
                raise
            except ProviderError as exc:
                failures.append(Failure(provider.name, exc.kind, exc.reason, exc.detail))
                self._note_failure(provider, exc, index)
            except Exception as exc:  # a provider broke its contract: still fail over
                log.exception("chain %s: provider %s raised %s", self.name, provider.name,
                              type(exc).__name__)
                error = Unavailable(provider.name, f"unexpected error ({type(exc).__name__})")
                failures.append(Failure(provider.name, error.kind, error.reason))
                self._note_failure(provider, error, index)
            else:
                run.served_by, run.model = provider.name, provider.model
                run.usage = usage or Usage(
                    estimate_request_tokens(attempt), estimate_tokens(own_text), estimated=True
                )
                run.failures = tuple(failures)
                self.breakers.record(provider.name).last_served_at = datetime.now(UTC)
                yield Chunk(usage=run.usage)
                return
            run.failures = tuple(failures)
        if failures and all(f.kind == "context_too_long" for f in failures):
            raise NoProviderFits(failures)
        raise AllProvidersFailed(failures)

    def _note_failure(self, provider: Provider, exc: ProviderError, index: int) -> None:
        record = self.breakers.record(provider.name)
        record.last_error = f"{exc.reason}: {exc.detail}" if exc.detail else exc.reason
        record.last_error_at = datetime.now(UTC)
        if isinstance(exc, RateLimited) and exc.retry_after:
            record.cooldown_until = time.monotonic() + min(exc.retry_after, MAX_COOLDOWN_S)
        if isinstance(exc, AuthFailed):
            log.error("provider %s: AUTHENTICATION FAILED: check the key its api_key_env "
                      "names (the key is not logged)", provider.name)
        self._warn(index, f"failed ({exc.reason})")

    def _warn(self, index: int, what: str) -> None:
        """Every failover, a skip included, is one warning line (never with a key)."""
        following = self.providers[index + 1].name if index + 1 < len(self.providers) else None
        log.warning("chain %s: provider %s %s%s", self.name, self.providers[index].name,
                    what, f"; failing over to {following}" if following else "; none left")


def _continuation(request: CompletionRequest, partial: str) -> CompletionRequest:
    """The request for the next provider after a mid-stream failure."""
    messages = (*request.messages, Message("assistant", partial),
                Message("user", CONTINUE_INSTRUCTION))
    return replace(request, messages=messages)
