"""The memory policy: what a bot recalls before a reply and learns after it.

``BotMemory`` implements ``engine.ports.MemoryPolicy`` for one bot.

Recall (``recall``, awaited before the reply):
  embed the message once (first person rewritten as the speaker's name, see
  ``personalize``), search the bot's own memories and the shared
  memories it may read (the shared store applies the trust predicate), keep
  those at or above ``min_score``, merge, and return the best ``top_k``.
  Scope (``engine/memory/scope.py``): facts about the speaker and general
  facts, each only where it may be recalled: what a person said in a DM stays
  theirs and stays in DMs, what was learned in a group stays in that group,
  bot-wide facts are an admin's. The store is asked for exactly that scope
  and the result is checked again here (fail closed: a store bug must not
  leak another user's facts). What was recalled, with scores, goes to the
  ``RecallLog`` for ``boternity memory why``. Own and shared tables are
  searched concurrently; if one fails the other's facts are still used, and
  if embedding fails recall returns []: a reply never fails because memory did.

Learning (``learn``, returns at once):
  a background job asks the bot's chain for durable facts as JSON (the local
  demo model is skipped unless ``extract_with_local``: its facts are
  unreliable), drops facts about third parties, then reconciles each fact
  against the nearest memories about the same user:

  - best similarity >= ``duplicate_score``: a duplicate, skipped;
  - nothing >= ``related_score``: new, added;
  - in between: the LLM judges (skip / update / add). Cosine similarity cannot
    tell a paraphrase from a contradiction: with all-MiniLM-L6-v2,
    "likes tea"/"enjoys drinking tea" scores 0.91 while "favorite color is
    blue"/"... green" scores 0.86 and "lives in Paris"/"... Berlin" 0.77.
    Thresholds settle the clear cases without a model call; the band in
    between needs a judgement. If the judge fails, the fact is added
    (nothing is lost; a duplicate is cheaper than a forgotten fact).
  - update: the new fact is added and the old one is marked
    ``superseded_by`` it (kept as history, no longer recalled).

User ids are namespaced by platform (``IncomingMessage.user`` is the user
key ``platform:id`` built by ``engine.memory.scope.user_key``): "123" on
Telegram and "123" on Discord are different people.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from engine.background import Background
from engine.errors import BoternityError, ProviderError
from engine.memory.extraction import (
    ExtractedFact,
    Judgement,
    extraction_request,
    judge_request,
    parse_facts,
    parse_judgement,
    speaker_label,
)
from engine.memory.scope import RecallScope, learned_place, recall_scope
from engine.ports import (
    Chain,
    Embedder,
    MemoryStore,
    Provider,
    RecallLog,
    ReplyObserver,
    SharedMemoryStore,
)
from engine.types import (
    CompletionRequest,
    Fact,
    IncomingMessage,
    RecalledFact,
    RecallRecord,
    Reply,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MemoryConfig:
    """Plain values for one bot's memory policy (from ``[bots.X.memory]``)."""

    bot: str
    enabled: bool = True
    top_k: int = 5
    min_score: float = 0.3
    extract: bool = True
    extract_with_local: bool = False
    trust_groups: tuple[str, ...] = ()
    # widen recall in groups to what was learned anywhere (trusted groups only)
    recall_across_chats: bool = False
    # provider names of kind "local": skipped for extraction and judging
    local_providers: frozenset[str] = frozenset()
    duplicate_score: float = 0.95
    related_score: float = 0.55
    min_importance: float = 0.2
    extract_min_words: int = 2
    judge_candidates: int = 3


@dataclass(frozen=True)
class LearnResult:
    """What one extraction did (returned by ``learn_now``, logged by ``learn``)."""

    added: tuple[Fact, ...] = ()
    superseded: tuple[str, ...] = ()  # ids of the old facts
    skipped: tuple[str, ...] = ()  # texts of duplicates
    dropped: str = ""  # why nothing was stored, when that happened


_FIRST_PERSON = (
    (re.compile(r"\b(?:I am|I'm)\b", re.IGNORECASE), "{name} is"),
    (re.compile(r"\bam I\b", re.IGNORECASE), "is {name}"),
    (re.compile(r"\b(?:my|mine)\b", re.IGNORECASE), "{name}'s"),
    (re.compile(r"\b(?:I|me|myself)\b"), "{name}"),
)


def _literal(text: str) -> Callable[[re.Match[str]], str]:
    return lambda _match: text


def personalize(text: str, name: str) -> str:
    """Rewrite first person as the speaker's name: "where do I live" -> "where do Alice live".

    Facts are stored in the third person naming the speaker (the extraction
    prompt asks for it), and MiniLM matches a question to them far better
    when they share the name: "am I allergic to anything?" scores 0.43
    against "Alice is allergic to peanuts", the rewrite 0.87.
    """
    for pattern, replacement in _FIRST_PERSON:
        # A function, not a template: a name is data, and "\\d" or "\\1" in a
        # display name would be read as a regex escape (and break recall).
        text = pattern.sub(_literal(replacement.replace("{name}", name)), text)
    return text


class BotMemory:
    """One bot's ``MemoryPolicy``; see the module docstring for the contract."""

    def __init__(
        self,
        config: MemoryConfig,
        *,
        store: MemoryStore,
        embedder: Embedder,
        jobs: Background,
        shared: SharedMemoryStore | None = None,
        chain: Chain | None = None,
        recall_log: RecallLog | None = None,
        usage: ReplyObserver | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.config = config
        self._store = store
        self._embedder = embedder
        self._jobs = jobs
        self._shared = shared
        self._chain = chain
        self._recall_log = recall_log
        # Extraction and judging spend tokens too: told like a reply, so they
        # are recorded and count against the daily budgets.
        self._usage = usage
        self._clock = clock
        # Recall-log writes in flight: never awaited by the reply (``flush`` waits).
        self._log_writes: set[asyncio.Task[None]] = set()
        # One reconciliation at a time per bot: two jobs adding the same fact
        # concurrently would both see "new" and store it twice.
        self._reconcile_lock = asyncio.Lock()

    # --- recall ---

    async def recall(self, message: IncomingMessage) -> list[Fact]:
        config = self.config
        if not config.enabled or config.top_k == 0 or not message.text.strip():
            return []
        scope = recall_scope(message, across_chats=config.recall_across_chats)
        users = scope.users
        query = personalize(message.text, speaker_label(message))
        try:
            vector = await self._embedder.embed_query(query)
        except BoternityError as exc:
            log.warning("bot %s: recall failed, replying without memory: %s", config.bot, exc)
            return []
        searches = [self._store.search(
            config.bot, query, users=users, limit=config.top_k,
            min_score=config.min_score, vector=vector, chats=scope.chats,
        )]
        if self._shared is not None:
            searches.append(self._shared.search(
                config.bot, config.trust_groups, query, users=users,
                limit=config.top_k, min_score=config.min_score, vector=vector,
            ))
        # Own and shared tables are searched at once; one failing keeps the other.
        found: list[Fact] = []
        for source, result in zip(("own", "shared"), await asyncio.gather(
                *searches, return_exceptions=True), strict=False):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                # Whatever broke (a StorageError, or a vector store error we did
                # not foresee), the reply goes on with what the other search found.
                log.warning("bot %s: %s memory search failed, recalled without it: %r",
                            config.bot, source, result)
            else:
                found += result
        facts = self._select(found, scope)
        if self._recall_log is not None:
            # Off the reply's path: the model is not kept waiting for a write
            # that only ``memory why`` reads.
            task = asyncio.create_task(self._log_recall(message, facts))
            self._log_writes.add(task)
            task.add_done_callback(self._log_writes.discard)
        return facts

    async def flush(self) -> None:
        """Wait for the recall-log writes started so far (tests, shutdown)."""
        if self._log_writes:
            await asyncio.gather(*self._log_writes, return_exceptions=True)

    def _select(self, found: Sequence[Fact], scope: RecallScope) -> list[Fact]:
        seen: set[str] = set()
        chosen: list[Fact] = []
        # Own facts first at equal score, so a published copy does not shadow the original.
        for fact in sorted(found, key=lambda f: (-f.score, f.trust_level is not None)):
            if not scope.allows(fact):
                log.error("bot %s: store returned fact %s outside the recall scope; dropped",
                          self.config.bot, fact.id)
                continue
            if fact.superseded_by or fact.score < self.config.min_score:
                continue
            text = " ".join(fact.text.lower().split())
            if text in seen:
                continue
            seen.add(text)
            chosen.append(fact)
        return chosen[: self.config.top_k]

    async def _log_recall(self, message: IncomingMessage, facts: list[Fact]) -> None:
        if self._recall_log is None:
            return
        record = RecallRecord(
            bot=self.config.bot, chat=message.chat, message_id=message.message_id,
            query=message.text[:500], created_at=self._clock(),
            facts=tuple(
                RecalledFact(
                    id=f.id, score=round(f.score, 4), text=f.text,
                    source="shared" if f.trust_level is not None else "own",
                    user=f.user, author_bot=f.author_bot,
                )
                for f in facts
            ),
        )
        try:
            await self._recall_log.record(record)
        except BoternityError as exc:
            log.warning("bot %s: could not record recall for 'why': %s", self.config.bot, exc)

    # --- learning ---

    def learn(self, message: IncomingMessage, reply: Reply) -> None:
        """Schedule extraction from this exchange; returns at once."""
        config = self.config
        if not (config.enabled and config.extract) or self._chain is None:
            return
        if reply.error or reply.served_by is None:
            return
        if len(message.text.split()) < config.extract_min_words:
            return  # "ok", "thanks!": no fact to find, not worth a model call
        if all(self._skip_local(p, None) for p in self._chain.providers):
            return  # only the local demo model in the chain: nobody to ask

        async def job() -> None:
            result = await self.learn_now(message, reply)
            if result.dropped:
                log.info("bot %s: extraction stored nothing: %s", config.bot, result.dropped)
            else:
                log.info("bot %s: learned %d, superseded %d, skipped %d duplicates",
                         config.bot, len(result.added), len(result.superseded),
                         len(result.skipped))

        self._jobs.submit(f"learn {config.bot}/{message.chat}/{message.message_id}", job)

    async def learn_now(self, message: IncomingMessage, reply: Reply) -> LearnResult:
        """Extract and reconcile facts now (what the background job runs)."""
        assert self._chain is not None
        try:
            answer, served_by = await self._complete(
                extraction_request(message, reply.text), message)
        except ProviderError as exc:
            return LearnResult(dropped=f"extraction failed: {exc.reason}")
        if served_by in self.config.local_providers and not self.config.extract_with_local:
            return LearnResult(dropped=f"extracted by local model '{served_by}' (not trusted)")
        extracted = parse_facts(answer)
        if extracted is None:
            log.warning("bot %s: extraction answer is not valid JSON facts: %.200r",
                        self.config.bot, answer)
            return LearnResult(dropped="invalid JSON from the model")
        facts = [self._to_fact(item, message) for item in extracted]
        kept = [fact for fact in facts if fact is not None]
        if not kept:
            return LearnResult(dropped="no durable facts")
        async with self._reconcile_lock:
            return await self._reconcile_all(kept, message)

    def _to_fact(self, item: ExtractedFact, message: IncomingMessage) -> Fact | None:
        if item.about == "other" or item.importance < self.config.min_importance:
            return None
        place = learned_place(message, about_speaker=item.about == "speaker")
        if place is None:
            return None  # anonymous speaker: nobody to attribute it to
        user, chat = place
        return Fact(
            id="", text=item.text, bot=self.config.bot, user=user, chat=chat,
            category=item.category, importance=item.importance,
        )

    async def _reconcile_all(self, facts: list[Fact], message: IncomingMessage) -> LearnResult:
        added: list[Fact] = []
        superseded: list[str] = []
        skipped: list[str] = []
        for fact in facts:
            try:
                outcome, stored, old = await self.reconcile(fact, message)
            except BoternityError as exc:
                log.warning("bot %s: could not store fact: %s", self.config.bot, exc)
                continue
            if outcome == "skip":
                skipped.append(fact.text)
                continue
            if stored is not None:
                added.append(stored)
            if old is not None:
                superseded.append(old)
        return LearnResult(tuple(added), tuple(superseded), tuple(skipped))

    async def reconcile(
        self, fact: Fact, message: IncomingMessage | None = None
    ) -> tuple[str, Fact | None, str | None]:
        """Add, update or skip one fact: (outcome, stored fact, superseded id)."""
        config = self.config
        [vector] = await self._embedder.embed([fact.text])
        # Compared only with facts of the same person and place: a fact learned
        # here must not be skipped as a "duplicate" of one that is not recalled here.
        similar = await self._store.search(
            config.bot, fact.text, users=[fact.user], limit=config.judge_candidates,
            min_score=config.related_score, vector=vector, chats={fact.user: (fact.chat,)},
        )
        similar = [f for f in similar if f.user == fact.user and f.chat == fact.chat
                   and f.score >= config.related_score]
        if similar and similar[0].score >= config.duplicate_score:
            return "skip", None, None
        target: Fact | None = None
        if similar:
            judgement = await self._judge(fact.text, similar, message)
            if judgement is not None and judgement.action == "skip":
                return "skip", None, None
            if judgement is not None and judgement.action == "update":
                assert judgement.target is not None
                target = similar[judgement.target]
        stored = await self._store.add(fact)
        if target is None:
            return "add", stored, None
        await self._store.supersede(config.bot, target.id, stored.id)
        return "update", stored, target.id

    async def _judge(
        self, text: str, similar: list[Fact], message: IncomingMessage | None
    ) -> Judgement | None:
        try:
            answer, served_by = await self._complete(
                judge_request(text, similar, bot=self.config.bot), message)
        except ProviderError as exc:
            log.warning("bot %s: judge failed (%s); adding the fact", self.config.bot, exc.reason)
            return None
        if served_by in self.config.local_providers and not self.config.extract_with_local:
            return None  # the demo model's verdicts are as unreliable as its facts
        judgement = parse_judgement(answer, len(similar))
        if judgement is None:
            log.warning("bot %s: judge answer unusable (%.200r); adding the fact",
                        self.config.bot, answer)
        return judgement

    def _skip_local(self, provider: Provider, request: CompletionRequest | None) -> str | None:
        # Not even asked: its output would be dropped, and it costs seconds of CPU.
        if provider.name in self.config.local_providers and not self.config.extract_with_local:
            return "the local demo model does not write memories"
        return None

    async def _complete(
        self, request: CompletionRequest, message: IncomingMessage | None
    ) -> tuple[str, str | None]:
        assert self._chain is not None
        run = self._chain.run(request, skip=self._skip_local)
        parts = [chunk.text async for chunk in run]
        if self._usage is not None and message is not None and run.served_by is not None:
            spent = Reply(text="", served_by=run.served_by, model=run.model, usage=run.usage)
            try:
                await self._usage.on_reply(message, spent)
            except Exception:
                log.exception("bot %s: could not record extraction usage", self.config.bot)
        return "".join(parts), run.served_by
