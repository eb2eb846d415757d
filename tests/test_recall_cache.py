"""The fast recall path (persistence/vectors/recall/): real LanceDB in tmp dirs, the
real embedding model. It must answer exactly what the LanceDB path answers, keep the
privacy scope, and never recall what another process deleted after the delete committed.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest

from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import COLUMNS, LanceMemoryStore, in_scope

BOT = "bot"
ALICE, BOB = "tg:1", "tg:2"
DM_A, DM_B, GROUP = "c-alice", "c-bob", "c-group"
TOPICS = ["drinks green tea every morning", "is allergic to peanuts", "plays jazz piano",
          "lives in Lisbon", "is training for the Berlin marathon", "keeps bees on the roof",
          "collects vintage cameras", "speaks Japanese", "hates cilantro", "rides an e-bike"]
QUESTIONS = ["what does she drink in the morning?", "any food allergies?", "which instrument?",
             "where does he live?", "is anyone running a marathon?", "what about bees?",
             "cameras", "which languages?", "herbs he dislikes", "how does she commute?",
             "the door code", "Lisbon"]
# (users, chats) a reply asks with: the speaker plus general facts, per place
SCOPES: list[tuple[list[str], dict[str, Sequence[str] | None]]] = [
    ([ALICE, ""], {ALICE: (DM_A, ""), "": None}),
    ([BOB, ""], {BOB: (DM_B, ""), "": None}),
    ([ALICE, ""], {ALICE: (GROUP, ""), "": (GROUP, "")}),
    ([BOB], {BOB: None}),
]


def corpus() -> list[Fact]:
    places = [(ALICE, DM_A, "Alice"), (ALICE, GROUP, "Alice"), (ALICE, "", "Alice"),
              (BOB, DM_B, "Bob"), (BOB, GROUP, "Bob"), ("", "", "The team"), ("", GROUP, "Ops")]
    return [Fact(id="", text=f"{name} {topic} ({i})", bot=BOT, user=user, chat=chat)
            for i, ((user, chat, name), topic) in enumerate(itertools.product(places, TOPICS))]


@pytest.fixture
async def stores(tmp_path: Path, embedder: FastEmbedder
                 ) -> AsyncIterator[tuple[LanceMemoryStore, LanceMemoryStore]]:
    """(the cached store, a LanceDB-only store) on one directory, as two processes."""
    uri = str(tmp_path / "lancedb")
    async with (await LanceMemoryStore.open(uri, embedder) as fast,
                await LanceMemoryStore.open(uri, embedder, cache_mb=0) as plain):
        yield fast, plain


async def search(store: LanceMemoryStore, query: str, users: list[str],
                 chats: Mapping[str, Sequence[str] | None], limit: int = 5) -> list[Fact]:
    return await store.search(BOT, query, users=users, chats=chats, limit=limit, min_score=0.05)


async def assert_fast(store: LanceMemoryStore) -> None:
    """The fast path serves (after a catch-up the last search started, if one is running)."""
    table = await store._table(BOT)
    if await store.cache.current(BOT, table) is None:
        await store.cache.wait(BOT)
    assert await store.cache.current(BOT, table) is not None, "the fast path is not in use"


async def assert_same(fast: LanceMemoryStore, plain: LanceMemoryStore) -> None:
    """Every question in every scope: the same facts, in the same order, as LanceDB's path."""
    await assert_fast(fast)
    for question, (users, chats) in itertools.product(QUESTIONS, SCOPES):
        got = await search(fast, question, users, chats)
        want = await search(plain, question, users, chats)
        assert [f.id for f in got] == [f.id for f in want], (question, users, chats)
        assert [f.score for f in got] == pytest.approx([f.score for f in want], abs=1e-5)
        assert all(in_scope(f, users, chats) and f.superseded_by is None for f in got)


async def test_same_answers_as_lancedb_hybrid_and_vector(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, plain = stores
    await fast.add_many(corpus())
    await fast.maintain(BOT)  # the full-text index: the hybrid path on both
    assert await fast.warm(BOT)
    await plain.maintain(BOT)
    await assert_same(fast, plain)
    fast._hybrid = plain._hybrid = False
    await assert_same(fast, plain)


async def test_never_outside_the_scope(stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, _ = stores
    await fast.add_many(corpus())
    assert await fast.warm(BOT)
    for question in QUESTIONS:
        found = await search(fast, question, [ALICE, ""], {ALICE: (DM_A,), "": ("",)}, limit=50)
        assert found and {(f.user, f.chat) for f in found} <= {(ALICE, DM_A), ("", "")}
        assert not await search(fast, question, ["tg:3"], {"tg:3": None})
        bob_only = await search(fast, question, [BOB], {BOB: (DM_B,)}, limit=50)
        assert {(f.user, f.chat) for f in bob_only} == {(BOB, DM_B)}
    await assert_fast(fast)


async def test_own_writes_keep_the_snapshot_exact(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, plain = stores
    facts = await fast.add_many(corpus())
    assert await fast.warm(BOT)
    loads = fast.cache.reloads
    tea = next(f for f in facts if f.user == ALICE and f.chat == DM_A and "tea" in f.text)
    new = await fast.add(Fact(id="", text="Alice now drinks black coffee every morning",
                              bot=BOT, user=ALICE, chat=DM_A))
    await fast.supersede(BOT, tea.id, new.id)
    group_fact = next(f for f in facts if f.user == ALICE and f.chat == GROUP)
    assert await fast.promote(BOT, group_fact.id)
    assert await fast.delete(BOT, facts[3].id)
    assert await fast.delete_ids(BOT, [facts[4].id, facts[5].id]) == 2
    assert await fast.delete_user(BOT, BOB) == len(TOPICS) * 2
    table = await fast._table(BOT)
    snap = await fast.cache.current(BOT, table)
    assert table is not None and snap is not None  # applied in place, at once
    # its rows, column for column, are the table's current rows (the promoted chat too)
    mine = {row["id"]: row for row in snap.rows(range(len(snap.ids))) if row["id"] in snap.where}
    rows = await table.query().where("superseded_by = ''").select(COLUMNS).to_list()
    assert mine == {row["id"]: row for row in rows}
    assert fast.cache.reloads == loads
    await assert_same(fast, plain)
    found = await search(fast, "what does alice drink in the morning", [ALICE, ""],
                         {ALICE: (DM_A, ""), "": None}, limit=50)
    ids = [f.id for f in found]
    assert new.id in ids and tea.id not in ids and group_fact.id in ids
    assert facts[3].id not in ids and not any(f.user == BOB for f in found)
    await fast.maintain(BOT)  # index maintenance: new versions, the same rows
    await assert_same(fast, plain)
    assert fast.cache.reloads == loads  # caught up by the difference: none


async def test_writes_by_another_process_are_caught_up(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, other = stores
    facts = await fast.add_many(corpus())
    assert await fast.warm(BOT)
    loads = fast.cache.reloads
    added = await other.add_many([Fact(id="", text="Alice drinks oolong tea at night",
                                       bot=BOT, user=ALICE, chat=DM_A)])
    moved = next(f for f in facts if f.user == ALICE and f.chat == GROUP)
    assert await other.promote(BOT, moved.id)
    await other.supersede(BOT, facts[0].id, added[0].id)
    await other.maintain(BOT)
    await fast.maintain(BOT)  # (finds the full-text index: both rank hybrid)
    await assert_same(fast, other)  # the first search used LanceDB and started the catch-up
    assert fast.cache.reloads == loads
    found = await search(fast, "tea", [ALICE, ""], {ALICE: (DM_A, ""), "": None}, limit=50)
    assert added[0].id in [f.id for f in found] and moved.id in [f.id for f in found]
    assert facts[0].id not in [f.id for f in found]


async def test_a_delete_by_another_process_is_never_recalled(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, other = stores
    facts = await fast.add_many(corpus())
    assert await fast.warm(BOT)
    alice_scope = ([ALICE, ""], {ALICE: (DM_A, ""), "": None})
    target = next(f for f in facts if f.user == ALICE and f.chat == DM_A and "tea" in f.text)
    assert target.id in [f.id for f in await search(fast, "green tea", *alice_scope)]
    assert await other.delete(BOT, target.id)  # `boternity memory forget` elsewhere
    # At once, no waiting for the reload: the version differs, LanceDB answers.
    assert target.id not in [f.id for f in await search(fast, "green tea", *alice_scope,
                                                          limit=50)]
    assert await other.delete_user(BOT, ALICE) > 0  # `boternity user forget`
    assert not [f for f in await search(fast, "Alice", *alice_scope, limit=50)
                if f.user == ALICE]
    other_fact = next(f for f in facts if f.user == "" and f.chat == "")
    await other.supersede(BOT, other_fact.id, "someone-else")
    assert other_fact.id not in [f.id for f in await search(fast, other_fact.text,
                                                            *alice_scope, limit=50)]
    await fast.cache.wait(BOT)  # the background reload caught up: fast again, still right
    await assert_same(fast, other)


class GatedTable:
    """A memory table whose version reads are counted and, while ``gate`` is
    clear, held after they read; the rest is the table's."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self.reads = 0
        self.read = asyncio.Event()  # a version was read
        self.gate = asyncio.Event()
        self.gate.set()

    async def version(self) -> int:
        self.reads += 1
        version: int = await self.table.version()
        self.read.set()
        await self.gate.wait()
        return version

    def __getattr__(self, name: str) -> Any:
        return getattr(self.table, name)


async def test_searches_asking_together_share_one_read_of_the_table_state(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, _ = stores
    await fast.add_many(corpus())
    assert await fast.warm(BOT)
    table = GatedTable(await fast._table(BOT))
    snaps = await asyncio.gather(*(fast.cache.current(BOT, table) for _ in range(5)))
    assert table.reads == 1 and snaps[0] is not None and all(s is snaps[0] for s in snaps)


async def test_a_search_never_joins_a_read_that_started_before_it_asked(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    """The read a search shares started after it asked: a delete committed before
    the search began is always seen, even while an older read is in flight."""
    fast, other = stores
    facts = await fast.add_many(corpus())
    assert await fast.warm(BOT)
    table = GatedTable(await fast._table(BOT))
    table.gate.clear()
    first = asyncio.create_task(fast.cache.current(BOT, table))
    await table.read.wait()  # its read has the version from before the delete, and waits
    assert await other.delete(BOT, facts[0].id)  # `boternity memory forget` elsewhere
    second = asyncio.create_task(fast.cache.current(BOT, table))
    await asyncio.sleep(0.05)
    table.gate.set()
    assert await first is not None  # asked before the delete: the snapshot was right then
    assert await second is None  # asked after it: the snapshot is stale, LanceDB answers


async def test_a_table_dropped_and_rebuilt_elsewhere_is_not_served_stale(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, other = stores
    await fast.add_many(corpus()[:3])
    assert await fast.warm(BOT)
    old = await search(fast, "tea", [ALICE, ""], {ALICE: None})
    assert old
    await other.drop_bot(BOT)
    # A new table restarts its versions: as many writes as before reach the same number.
    await other.add_many([Fact(id="", text="Alice drinks only water", bot=BOT, user=ALICE)])
    await other.add_many([Fact(id="", text="Alice likes tea", bot=BOT, user="bob-x")])
    found = await search(fast, "tea", [ALICE, ""], {ALICE: None})
    assert {f.id for f in found}.isdisjoint(f.id for f in old)


async def test_over_the_budget_uses_lancedb(tmp_path: Path, embedder: FastEmbedder) -> None:
    uri = str(tmp_path / "db")
    async with await LanceMemoryStore.open(uri, embedder, cache_mb=0) as off:
        await off.add_many(corpus())
        assert not await off.warm(BOT)
        assert await search(off, "tea", *SCOPES[0])
    need_mb = len(corpus()) * 4 * embedder.dimension / 2**20
    async with (await LanceMemoryStore.open(uri, embedder, cache_mb=need_mb / 2) as small,
                await LanceMemoryStore.open(uri, embedder, cache_mb=0) as plain):
        assert not await small.warm(BOT)  # over the budget: LanceDB answers, the same
        for question, (users, chats) in itertools.product(QUESTIONS[:3], SCOPES):
            assert ([f.id for f in await search(small, question, users, chats)]
                    == [f.id for f in await search(plain, question, users, chats)])


async def test_a_snapshot_grown_past_the_budget_goes_back_to_lancedb(
        stores: tuple[LanceMemoryStore, LanceMemoryStore]) -> None:
    fast, plain = stores
    await fast.add_many(corpus())
    assert await fast.warm(BOT)
    table = await fast._table(BOT)
    snap = await fast.cache.current(BOT, table)
    assert snap is not None
    fast.cache.budget = snap.nbytes + 1_000  # what it holds now, and 1 KB more
    await fast.add_many([Fact(id="", text=f"Alice read book number {i} this year", bot=BOT,
                              user=ALICE, chat=DM_A) for i in range(10)])
    assert await fast.cache.current(BOT, table) is None
    await fast.cache.wait(BOT)  # a reload finds it too big: still LanceDB, still right
    assert await fast.cache.current(BOT, table) is None
    for question, (users, chats) in itertools.product(["which books?", "tea"], SCOPES):
        assert ([f.id for f in await search(fast, question, users, chats)]
                == [f.id for f in await search(plain, question, users, chats)])
