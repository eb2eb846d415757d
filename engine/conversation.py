"""The reply pipeline: one message in, streamed deltas and one ``Reply`` out.

``Conversation.reply(message)``, in order:

1. commit the user's message (if storage fails, say so and stop: we never
   answer a message we could not keep) with the extracted text of its
   documents, so follow-ups see them until they are trimmed like any old
   message, while loading the chat's history (from the last ``/reset`` on)
   and, with a ``MemoryPolicy``, recalling facts (either failing is logged;
   the reply goes on without it);
2. build the prompt within the chain's context budget (``engine.prompt``);
3. stream it through the fallback chain, yielding each text delta;
4. build the final ``Reply`` (footer, usage, latency, recalled ids) and hand
   it to ``memory.learn`` (which returns at once);
5. store the assistant's answer with who served it (an answer that looped is
   stopped by the chain and stored as its first turn, with a notice) while
   every ``ReplyObserver`` (usage accounting, metrics; their errors are
   logged) sees the reply, so the answer and the usage row share one group
   commit; then yield the reply last.

Provider trouble never raises out of ``reply``: when every provider failed,
or the request was invalid, the user gets one clear sentence and
``Reply.error`` is set. Observers run before the final ``Reply`` is yielded
so that, once an adapter holds it, the accounting for it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field

from engine.errors import AllProvidersFailed, InvalidRequest, ProviderError, StorageError
from engine.footer import footer as render_footer
from engine.ports import Chain, ConversationStore, MemoryPolicy, Provider, ReplyObserver
from engine.prompt import Prompt, build_prompt, estimate_tokens, request_tokens, stored_content
from engine.types import (
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

LOOP_NOTICE = "the answer was stopped: it kept repeating itself"
# A system row with this content starts the chat afresh (``/reset``): history
# before it is never sent again (it stays stored until retention or /forget).
RESET_MARKER = "[conversation reset]"
RESET_DONE = "Conversation reset: I no longer see the earlier messages of this chat."


async def reset_chat(store: ConversationStore, *, bot: str, chat: str, platform: str) -> str:
    """Start a chat afresh (``/reset`` on any platform, the terminal's included)."""
    await store.add(bot=bot, chat=chat, role="system", content=RESET_MARKER, platform=platform)
    return RESET_DONE


@dataclass
class _Outcome:
    prompt: Prompt  # the prompt actually sent (refitted if the first did not fit)
    text: str = ""  # what the user sees
    generated: str = ""  # what a model wrote (may be a cut-off part)
    served_by: str | None = None
    model: str | None = None
    failures: tuple[Failure, ...] = ()
    usage: Usage | None = None
    error: str | None = None
    notices: list[str] = field(default_factory=list)


def _only(names: frozenset[str]) -> Callable[[Provider, CompletionRequest], str | None]:
    """A chain skip rule that lets only ``names`` through."""
    def skip(provider: Provider, request: CompletionRequest) -> str | None:
        return None if provider.name in names else "not retried"
    return skip


def _mine(failures: Sequence[Failure], names: frozenset[str] | None) -> tuple[Failure, ...]:
    """Failures of the providers a run was allowed to ask (drops "not retried")."""
    return tuple(f for f in failures if names is None or f.provider in names)


# What users read when no provider served: fixed sentences that name no provider
# and quote no error (a provider's error may hold keys, accounts, internal
# hosts). The details go to the log and to admins (``/provider status``).
REFUSED_TEXT = ("Sorry, I can't answer that: the AI service refused this request. "
                "Rephrasing it may help.")
ALL_FAILED_TEXT = ("Sorry, I can't answer right now: the AI service is not available. "
                   "Your message is saved; please try again in a moment.")
TOO_LONG_TEXT = ("Sorry, I can't answer that: the message is too long for the AI models "
                 "I use. Please send a shorter one.")


def _all_failed_text(failures: Sequence[Failure]) -> str:
    if failures and all(f.kind == "context_too_long" for f in failures):
        return TOO_LONG_TEXT
    if failures and all(f.kind == "skipped" for f in failures):
        # Our own skip rules said why (a daily budget): say it, naming no provider.
        why = "; ".join(dict.fromkeys(f.reason for f in failures))
        return f"Sorry, I can't answer right now: {why}. Your message is saved."
    return ALL_FAILED_TEXT


def _valid_text(message: IncomingMessage) -> IncomingMessage:
    """The message with lone surrogates (broken UTF-16 from a platform's JSON) as
    U+FFFD: neither the database nor a provider's HTTP body can encode them."""
    def valid(text: str) -> str:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

    text, name = valid(message.text), valid(message.user_name)
    if (text, name) == (message.text, message.user_name):
        return message
    log.warning("bot %s chat %s: replaced broken characters (lone surrogates) in a message",
                message.bot, message.chat)
    return dataclasses.replace(message, text=text, user_name=name)


def _described(failures: Sequence[Failure]) -> str:
    """For the log: each provider, why, and what it said (already scrubbed)."""
    return "; ".join(f"{f.provider}: {f.reason}" + (f" ({f.detail})" if f.detail else "")
                     for f in failures) or "no provider configured"


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
        max_output_tokens: int | None = None,
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
        # The bot's output cap; each provider also sends at most its own.
        self.max_output_tokens = max_output_tokens

    async def reply(self, message: IncomingMessage) -> AsyncIterator[str | Reply]:
        """Yield text deltas, then exactly one ``Reply`` (see the module docstring)."""
        started = time.monotonic()
        message = _valid_text(message)
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

        def fit(window: int, max_output: int) -> Prompt:
            prompt = build_prompt(
                persona=self.persona, message=message, history=history, facts=facts,
                context_window=window, max_tokens=self.max_output_tokens,
                max_output_tokens=min(max_output, self.max_output_tokens or max_output),
                vision=caps.vision, temperature=self.temperature,
            )
            if prompt.dropped_history:
                log.info("bot %s chat %s: %d older messages left out to fit %d tokens",
                         self.bot, message.chat, prompt.dropped_history, window)
            return prompt

        outcome = _Outcome(prompt=fit(caps.context_window, caps.max_output_tokens))
        # aclosing: if the adapter stops reading, the stream closes at once.
        async with contextlib.aclosing(self._stream(outcome, fit)) as deltas:
            async for delta in deltas:
                yield delta

        reply = self._finish(outcome, facts, started)
        # Learning is queued before observers hear of the reply: one that
        # waits for the background work then finds it queued.
        if self.memory is not None and reply.error is None:
            try:
                self.memory.learn(message, reply)
            except Exception:
                log.exception("bot %s: memory.learn failed; the reply is unaffected", self.bot)
        # Queued together, the answer and the usage row share one group commit.
        await asyncio.gather(self._store_assistant(message, outcome), self._notify(message, reply))
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
                bot=self.bot, chat=message.chat, role="user", content=stored_content(message),
                user=message.user, platform=message.platform, user_name=message.user_name,
            )
        except StorageError as exc:
            return exc

    async def _history(self, message: IncomingMessage) -> list[StoredMessage]:
        """The last ``history_messages`` + 1 rows (one may be the new message)."""
        if self.history_messages <= 0:
            return []
        try:
            rows = await self.store.history(self.bot, message.chat,
                                            limit=self.history_messages + 1,
                                            platform=message.platform)
        except StorageError as exc:
            log.warning("bot %s chat %s: history unavailable, answering without it: %s",
                        self.bot, message.chat, exc)
            return []
        resets = [i for i, r in enumerate(rows) if r.role == "system" and r.content == RESET_MARKER]
        return rows[resets[-1] + 1:] if resets else rows

    async def _recall(self, message: IncomingMessage) -> list[Fact]:
        if self.memory is None:
            return []
        try:
            return await self.memory.recall(message)
        except Exception:
            # A reply never fails because memory did.
            log.exception("bot %s: memory recall failed; answering without it", self.bot)
            return []

    async def _stream(
        self, outcome: _Outcome, fit: Callable[[int, int], Prompt]
    ) -> AsyncGenerator[str, None]:
        """Stream the answer into ``outcome``; at most one retry, with a smaller prompt.

        The prompt is first fitted to the chain's widest window, and the chain
        skips providers too small for it. If that left nobody, and nothing
        streamed yet, the prompt is refitted (older history dropped) to the
        smallest of those skipped windows and only they are asked: a small
        last-resort model still answers a long conversation.
        """
        parts: list[str] = []
        earlier: tuple[Failure, ...] = ()
        retry_only: frozenset[str] | None = None
        while True:
            request = outcome.prompt.request
            run = (self.chain.run(request) if retry_only is None else
                   self.chain.run(request, skip=_only(retry_only)))
            try:
                async for chunk in run:
                    if chunk.text:
                        parts.append(chunk.text)
                        yield chunk.text
                    if chunk.usage is not None:
                        outcome.usage = chunk.usage
                break
            except InvalidRequest as exc:
                # Not failed over: another provider would refuse it too. Say why.
                refused = Failure(exc.provider, exc.kind, exc.reason, exc.detail)
                log.warning("bot %s: the provider refused the request: %s", self.bot,
                            _described((refused,)))
                outcome.error = "invalid_request"
                mine = _mine(run.failures, retry_only)
                outcome.failures = (*earlier, *mine, *(() if refused in mine else (refused,)))
                self._explain(outcome, parts, REFUSED_TEXT)
                return
            except ProviderError as exc:
                failures = (exc.failures if isinstance(exc, AllProvidersFailed)
                            else (Failure(exc.provider, exc.kind, exc.reason, exc.detail),))
                failures = (*earlier, *_mine(failures, retry_only))
                if not parts and retry_only is None:
                    smaller = self._refit(failures, fit, outcome.prompt)
                    if smaller is not None:
                        retry_only, outcome.prompt = smaller
                        earlier = tuple(f for f in failures if f.provider not in retry_only)
                        continue
                log.error("bot %s: every provider failed: %s", self.bot, _described(failures))
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
        # A loop was stopped: keep its first turn only, never the repetition.
        outcome.generated = outcome.text = run.text if run.looped else "".join(parts)
        if run.looped:
            outcome.notices.append(LOOP_NOTICE)
        outcome.served_by = run.served_by
        outcome.model = run.model
        outcome.failures = (*earlier, *_mine(run.failures, retry_only))
        outcome.usage = run.usage or outcome.usage
        if outcome.served_by and (note := self.provider_notes.get(outcome.served_by)):
            outcome.notices.append(note)

    def _refit(
        self, failures: Sequence[Failure], fit: Callable[[int, int], Prompt], prompt: Prompt
    ) -> tuple[frozenset[str], Prompt] | None:
        """(providers to ask, a prompt that fits them) after context skips, or None."""
        names = frozenset(f.provider for f in failures if f.kind == "context_too_long")
        small = [p.capabilities for p in self.chain.providers if p.name in names]
        if not small:
            return None
        smaller = fit(min(c.context_window for c in small),
                      min(c.max_output_tokens for c in small))
        if request_tokens(smaller.request) >= request_tokens(prompt.request):
            return None  # nothing left to drop: it cannot fit
        log.info("bot %s: prompt too long for %s; retrying with a shorter one",
                 self.bot, ", ".join(sorted(names)))
        return names, smaller

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

    def _finish(self, outcome: _Outcome, facts: Sequence[Fact], started: float) -> Reply:
        prompt = outcome.prompt
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
                failures=outcome.failures, notices=(*outcome.notices, *prompt.notices),
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
