"""The reply pipeline: one message in, streamed deltas and one ``Reply`` out.

``Conversation.reply(message)``, in order:

1. commit the user's message (if storage fails, say so and stop: we never
   answer a message we could not keep), while loading the chat's history
   and, with a ``MemoryPolicy``, recalling facts (either failing is logged;
   the reply goes on without it);
2. build the prompt within the chain's context budget (``engine.prompt``);
3. stream it through the fallback chain, yielding each text delta;
4. store the assistant's answer with who served it;
5. build the final ``Reply`` (footer, usage, latency, recalled ids), hand it to
   ``memory.learn`` (which returns at once) and to every ``ReplyObserver``
   (usage accounting, metrics; their errors are logged), then yield it last.

Provider trouble never raises out of ``reply``: when every provider failed,
or the request was invalid, the user gets one clear sentence and
``Reply.error`` is set. Observers run before the final ``Reply`` is yielded
so that, once an adapter holds it, the accounting for it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from engine.errors import AllProvidersFailed, InvalidRequest, ProviderError, StorageError
from engine.footer import footer as render_footer
from engine.ports import ConversationStore, MemoryPolicy, ReplyObserver
from engine.prompt import Prompt, build_prompt, estimate_tokens, request_tokens
from engine.types import (
    Capabilities,
    Chunk,
    CompletionRequest,
    Fact,
    Failure,
    FooterMode,
    IncomingMessage,
    Reply,
    StoredMessage,
    Usage,
)

log = logging.getLogger(__name__)


class ChainRun(Protocol):
    """One streamed completion of a chain; the attributes are final once exhausted."""

    @property
    def served_by(self) -> str | None: ...
    @property
    def model(self) -> str | None: ...
    @property
    def failures(self) -> tuple[Failure, ...]: ...
    @property
    def usage(self) -> Usage | None: ...

    def __aiter__(self) -> AsyncIterator[Chunk]: ...


class Chain(Protocol):
    """What the pipeline needs of ``engine.providers.fallback.FallbackChain``."""

    @property
    def capabilities(self) -> Capabilities: ...

    def run(self, request: CompletionRequest) -> ChainRun: ...


@dataclass
class _Outcome:
    text: str = ""  # what the user sees
    generated: str = ""  # what a model wrote (may be a cut-off part)
    served_by: str | None = None
    model: str | None = None
    failures: tuple[Failure, ...] = ()
    usage: Usage | None = None
    error: str | None = None
    notices: list[str] = field(default_factory=list)


def _all_failed_text(failures: Sequence[Failure]) -> str:
    detail = "; ".join(f"{f.provider}: {f.reason}" for f in failures) or "no provider configured"
    return (
        "Sorry, I can't answer right now: every AI provider I use failed "
        f"({detail}). Your message is saved; please try again in a moment."
    )


class Conversation:
    """One bot's reply pipeline (satisfies ``engine.ports.Replier``)."""

    def __init__(
        self,
        *,
        bot: str,
        persona: str,
        chain: Chain,
        store: ConversationStore,
        memory: MemoryPolicy | None = None,
        footer: FooterMode = "on_failover",
        history_messages: int = 30,
        observers: Sequence[ReplyObserver] = (),
        temperature: float | None = None,
        provider_notes: Mapping[str, str] | None = None,
        observer_timeout_s: float = 10.0,
    ) -> None:
        self.bot = bot
        self.persona = persona
        self.chain = chain
        self.store = store
        self.memory = memory
        self.footer = footer
        self.history_messages = history_messages
        self.observers = observers  # not copied: the composition root may add more later
        self.temperature = temperature
        # shown under every reply a provider served, e.g. the demo model's warning
        self.provider_notes = dict(provider_notes or {})
        self.observer_timeout_s = observer_timeout_s

    async def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]:
        """Yield text deltas, then exactly one ``Reply`` (see the module docstring)."""
        started = time.monotonic()
        # Independent reads run while the message is being committed: the
        # LLM is still called only after the commit succeeded.
        stored, history, facts = await asyncio.gather(
            self._store_user(message), self._history(message), self._recall(message),
        )
        if isinstance(stored, StorageError):
            log.error("bot %s chat %s: could not store the user's message: %s",
                      self.bot, message.chat, stored)
            yield Reply(
                text="Sorry, I could not save your message, so I did not answer it. "
                     "Please try again in a moment.",
                served_by=None, error="storage", latency_s=time.monotonic() - started,
            )
            return
        # The message just stored is the new turn, not history (the read may
        # or may not have seen it).
        history = [r for r in history if r.id != stored][-self.history_messages:]
        caps = self.chain.capabilities
        prompt = build_prompt(
            persona=self.persona, message=message, history=history, facts=facts,
            context_window=caps.context_window, max_output_tokens=caps.max_output_tokens,
            vision=caps.vision, temperature=self.temperature,
        )
        if prompt.dropped_history:
            log.info("bot %s chat %s: %d older messages left out to fit the context",
                     self.bot, message.chat, prompt.dropped_history)

        outcome = _Outcome(notices=list(prompt.notices))
        # aclosing: if the adapter stops reading, the stream closes at once.
        async with contextlib.aclosing(self._stream(prompt, outcome)) as deltas:
            async for delta in deltas:
                yield delta

        await self._store_assistant(message, outcome)
        reply = self._finish(prompt, outcome, facts, started)
        if self.memory is not None and reply.error is None:
            try:
                self.memory.learn(message, reply)
            except Exception:
                log.exception("bot %s: memory.learn failed; the reply is unaffected", self.bot)
        await self._notify(message, reply)
        log.info(
            "bot %s chat %s: %s in %.2fs, %d+%d tokens%s%s", self.bot, message.chat,
            f"served by {reply.served_by}" if reply.served_by else f"no answer ({reply.error})",
            reply.latency_s, reply.usage.prompt_tokens, reply.usage.completion_tokens,
            " (estimated)" if reply.usage.estimated else "",
            f", {len(reply.failures)} provider(s) failed" if reply.failures else "",
        )
        yield reply

    async def _store_user(self, message: IncomingMessage) -> int | StorageError:
        try:
            return await self.store.add(
                bot=self.bot, chat=message.chat, role="user", content=message.text,
                user=message.user, platform=message.platform,
            )
        except StorageError as exc:
            return exc

    async def _history(self, message: IncomingMessage) -> list[StoredMessage]:
        """The last ``history_messages`` + 1 rows (one may be the new message)."""
        if self.history_messages <= 0:
            return []
        try:
            return await self.store.history(self.bot, message.chat,
                                            limit=self.history_messages + 1)
        except StorageError as exc:
            log.warning("bot %s chat %s: history unavailable, answering without it: %s",
                        self.bot, message.chat, exc)
            return []

    async def _recall(self, message: IncomingMessage) -> list[Fact]:
        if self.memory is None:
            return []
        try:
            return await self.memory.recall(message)
        except Exception:
            # A reply never fails because memory did.
            log.exception("bot %s: memory recall failed; answering without it", self.bot)
            return []

    async def _stream(self, prompt: Prompt, outcome: _Outcome) -> AsyncGenerator[str, None]:
        run = self.chain.run(prompt.request)
        parts: list[str] = []
        try:
            async for chunk in run:
                if chunk.text:
                    parts.append(chunk.text)
                    yield chunk.text
                if chunk.usage is not None:
                    outcome.usage = chunk.usage
        except InvalidRequest as exc:
            # Not failed over: another provider would refuse it too. Say why.
            log.info("bot %s: the provider refused the request: %s", self.bot, exc.reason)
            outcome.error = "invalid_request"
            outcome.failures = (*getattr(run, "failures", ()),
                                Failure(exc.provider, exc.kind, exc.reason))
            self._explain(outcome, parts, f"Sorry, I can't answer that: {exc.reason}.")
            return
        except ProviderError as exc:
            failures = (exc.failures if isinstance(exc, AllProvidersFailed)
                        else (Failure(exc.provider, exc.kind, exc.reason),))
            log.error("bot %s: every provider failed: %s", self.bot,
                      "; ".join(f"{f.provider}: {f.reason}" for f in failures))
            outcome.error = "all_failed"
            outcome.failures = failures
            self._explain(outcome, parts, _all_failed_text(failures))
            return
        finally:
            # Abandoned mid-stream (the adapter stopped reading, a task was
            # cancelled): close the chain now so its HTTP stream is released.
            close = getattr(run, "aclose", None)
            if close is not None:
                await close()
        outcome.generated = outcome.text = "".join(parts)
        outcome.served_by = run.served_by
        outcome.model = run.model
        outcome.failures = tuple(run.failures)
        outcome.usage = run.usage or outcome.usage
        if outcome.served_by and (note := self.provider_notes.get(outcome.served_by)):
            outcome.notices.append(note)

    @staticmethod
    def _explain(outcome: _Outcome, parts: list[str], explanation: str) -> None:
        """Keep what already streamed (the user saw it) and add why it stopped."""
        outcome.generated = "".join(parts)
        if outcome.generated:
            outcome.text = outcome.generated
            outcome.notices.insert(0, "the answer was cut off. " + explanation)
        else:
            outcome.text = explanation

    async def _store_assistant(self, message: IncomingMessage, outcome: _Outcome) -> None:
        # Only what a model wrote joins the history; an apology would only
        # teach the next prompt to apologize.
        if not outcome.generated.strip():
            return
        try:
            await self.store.add(
                bot=self.bot, chat=message.chat, role="assistant", content=outcome.generated,
                platform=message.platform, served_by=outcome.served_by,
            )
        except StorageError as exc:
            log.error("bot %s chat %s: could not store the reply (the user still got it): %s",
                      self.bot, message.chat, exc)

    def _finish(
        self, prompt: Prompt, outcome: _Outcome, facts: Sequence[Fact], started: float
    ) -> Reply:
        usage = outcome.usage
        if usage is None or (usage.prompt_tokens == 0 and usage.completion_tokens == 0):
            usage = Usage(
                prompt_tokens=request_tokens(prompt.request),
                completion_tokens=estimate_tokens(outcome.generated),
                estimated=True,
            )
        return Reply(
            text=outcome.text,
            served_by=outcome.served_by,
            model=outcome.model,
            failures=outcome.failures,
            usage=usage,
            latency_s=time.monotonic() - started,
            recalled_ids=tuple(f.id for f in facts),
            footer=render_footer(
                self.footer, served_by=outcome.served_by, model=outcome.model,
                failures=outcome.failures, notices=outcome.notices,
            ),
            error=outcome.error,
        )

    async def _notify(self, message: IncomingMessage, reply: Reply) -> None:
        for observer in self.observers:
            try:
                async with asyncio.timeout(self.observer_timeout_s):
                    await observer.on_reply(message, reply)
            except Exception:
                log.exception("bot %s: reply observer %r failed; the reply is unaffected",
                              self.bot, observer)
