"""Per-bot memory tables: real LanceDB in tmp dirs, the real embedding model."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import EmbeddingMismatch, StorageError
from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore, table_name

HOSTILE = ["x' OR '1'='1", "a'b", "'; DROP TABLE x; --", 'q"uote', "back\\slash'",
           "user IN ('alice')", "ünï cødé 🤖", ""]


class OtherModel:
    """The real model under another name: what a table written by another model looks like."""

    def __init__(self, inner: FastEmbedder, name: str = "other/model") -> None:
        self.inner, self.model_name, self.dimension = inner, name, inner.dimension

    async def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return await self.inner.embed(texts)

    async def embed_query(self, text: str) -> list[float]:
        return await self.inner.embed_query(text)


@pytest.fixture
async def store(tmp_path: Path, embedder: FastEmbedder) -> AsyncIterator[LanceMemoryStore]:
    async with await LanceMemoryStore.open(str(tmp_path / "lancedb"), embedder) as s:
        yield s


def fact(text: str, bot: str = "bot", user: str = "") -> Fact:
    return Fact(id="", text=text, bot=bot, user=user)


async def test_add_search_get_list_count(store: LanceMemoryStore) -> None:
    tea = await store.add(fact("Alice drinks green tea every morning", user="alice"))
    assert tea.id and tea.created_at is not None
    await store.add_many([fact("Bob is allergic to peanuts", user="bob"),
                          fact("The team standup is at 9:30", user="")])
    found = await store.search("bot", "what does alice like to drink?", users=["alice", ""])
    assert found[0].id == tea.id and found[0].score > 0.4
    assert all(f.user in ("alice", "") for f in found)
    assert await store.get("bot", tea.id) == tea
    assert await store.get("bot", "nope") is None
    assert await store.count("bot") == 3
    assert [f.user for f in await store.list_facts("bot", user="bob")] == ["bob"]
    assert await store.bots() == ["bot"]
    floor = await store.search("bot", "alice tea", users=["alice", ""], min_score=0.5)
    assert [f.id for f in floor] == [tea.id]


async def test_unknown_speaker_fails_closed(store: LanceMemoryStore) -> None:
    await store.add(fact("Carol's PIN is 1234", user="carol"))
    assert await store.search("bot", "Carol PIN", users=[]) == []
    assert await store.search("bot", "Carol PIN", users=[""]) == []
    assert await store.search("nobody", "Carol PIN", users=["carol"]) == []


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_ids_neither_break_nor_widen_the_filter(
    store: LanceMemoryStore, hostile: str
) -> None:
    bot = f"bot {hostile}"
    await store.add_many([fact("Alice's secret hobby is fencing", bot=bot, user="alice"),
                          fact("The hostile user likes fencing too", bot=bot, user=hostile)])
    found = await store.search(bot, "fencing hobby", users=[hostile], limit=10)
    assert [f.user for f in found] == [hostile]
    assert await store.count(bot) == 2
    assert await store.delete_user(bot, hostile) == 1
    assert [f.user for f in await store.list_facts(bot)] == ["alice"]


async def test_table_names_are_safe_and_distinct() -> None:
    assert table_name("a b") != table_name("a_b")
    assert all(c.isalnum() or c in "_-" for c in table_name("'; DROP --/../x"))
    with pytest.raises(StorageError):
        table_name("")


async def test_supersede_keeps_history_and_hides_the_old_fact(store: LanceMemoryStore) -> None:
    old = await store.add(fact("Dana lives in Lisbon", user="dana"))
    new = await store.add(fact("Dana moved to Berlin", user="dana"))
    await store.supersede("bot", old.id, new.id)
    found = await store.search("bot", "where does Dana live", users=["dana"])
    assert [f.id for f in found] == [new.id]
    history = await store.list_facts("bot", history=True)
    assert {f.id: f.superseded_by for f in history} == {old.id: new.id, new.id: None}
    assert await store.count("bot", history=False) == 1
    with pytest.raises(StorageError):
        await store.supersede("bot", "missing", new.id)


async def test_delete_iterate_and_drop(store: LanceMemoryStore) -> None:
    facts = await store.add_many([fact(f"fact number {i}", user="u") for i in range(5)])
    assert await store.delete("bot", facts[0].id) is True
    assert await store.delete("bot", facts[0].id) is False
    assert sorted([f.id async for f in store.iterate("bot")]) == sorted(f.id for f in facts[1:])
    await store.drop_bot("bot")
    assert await store.bots() == []
    assert await store.count("bot") == 0
    assert await store.search("bot", "fact", users=["u"]) == []


async def test_another_handle_sees_writes_at_once(tmp_path: Path, embedder: FastEmbedder) -> None:
    uri = str(tmp_path / "lancedb")
    async with await LanceMemoryStore.open(uri, embedder) as a, \
            await LanceMemoryStore.open(uri, embedder) as b:
        await a.add(fact("Erin plays the cello", user="erin"))
        assert [f.text for f in await b.search("bot", "cello", users=["erin"])] == [
            "Erin plays the cello"]
        await a.add(fact("Erin also plays piano", user="erin"))
        assert await b.count("bot") == 2


async def test_model_mismatch_is_refused_until_reembedded(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    uri = str(tmp_path / "lancedb")
    async with await LanceMemoryStore.open(uri, OtherModel(embedder)) as old:
        await old.add_many([fact(f"old fact {i}", user="u") for i in range(3)])
    async with await LanceMemoryStore.open(uri, embedder) as new:
        with pytest.raises(EmbeddingMismatch, match=r"other/model.*reembed"):
            await new.search("bot", "old fact", users=["u"])
        seen: list[tuple[int, int]] = []
        assert await new.reembed("bot", progress=lambda d, t: seen.append((d, t))) == 3
        assert seen[-1] == (3, 3)
        assert len(await new.search("bot", "old fact", users=["u"])) == 3


async def test_hybrid_and_ann_index_keep_filters(tmp_path: Path, embedder: FastEmbedder) -> None:
    """Past the threshold an ANN index is built; search still filters by user."""
    async with await LanceMemoryStore.open(str(tmp_path / "db"), embedder,
                                           ann_threshold=300) as store:
        topics = ["chess", "surfing", "baking", "jazz", "hiking", "origami"]
        await store.add_many([fact(f"Person {i} enjoys {topics[i % 6]} on day {i}",
                                   user=f"user{i % 7}") for i in range(320)])
        await store.add(fact("Zebulon keeps a pet axolotl named Quetzal", user="zeb"))
        await store.maintain("bot")
        table = await store._table("bot")
        indexed = {c for ix in await table.list_indices() for c in ix.columns}
        assert indexed == {"text", "vector", "id", "user", "superseded_by", "chat"}
        found = await store.search("bot", "Quetzal", users=["zeb", "user3"], limit=10)
        assert found[0].text.startswith("Zebulon")  # the rare keyword wins via full text
        assert {f.user for f in found} <= {"zeb", "user3"}
        for hostile_query in [*HOSTILE, 'title:x AND (y', '+-&&||!(){}[]^"~*?:\\/']:
            found = await store.search("bot", hostile_query, users=["user3"], limit=3)
            assert len(found) == 3 and {f.user for f in found} == {"user3"}

        async def vector_indexes() -> list[str]:
            return [ix.name for ix in await table.list_indices() if "vector" in ix.columns]

        assert await vector_indexes() == ["vector_idx_321"]
        # grown 4x: the index is retrained for the new size and the old one dropped
        await store.add_many([fact(f"Later person {i} enjoys {topics[i % 6]}", user="late")
                              for i in range(963)])
        await store.maintain("bot")
        assert await vector_indexes() == ["vector_idx_1284"]
        assert {f.user for f in await store.search("bot", "chess", users=["late"])} == {"late"}


@st.composite
def memories(draw: st.DrawFn) -> tuple[list[tuple[str, str]], list[str]]:
    users = st.sampled_from(["alice", "bob", "", *HOSTILE[:4]])
    rows = draw(st.lists(st.tuples(st.sampled_from(["tea", "chess", "jazz", "rain"]), users),
                         min_size=1, max_size=8))
    speakers = draw(st.lists(users, max_size=3, unique=True))
    return rows, speakers


PROPERTY_RUNS = 100


@settings(max_examples=PROPERTY_RUNS, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=memories())
def test_search_never_returns_another_users_fact(
    tmp_path_factory: pytest.TempPathFactory, embedder: FastEmbedder,
    case: tuple[list[tuple[str, str]], list[str]],
) -> None:
    rows, speakers = case

    async def scenario() -> None:
        uri = str(tmp_path_factory.mktemp("prop") / "db")
        async with await LanceMemoryStore.open(uri, embedder) as store:
            await store.add_many([fact(f"{u or 'someone'} likes {t}", user=u) for t, u in rows])
            for topic in ("tea", "chess jazz"):
                found = await store.search("bot", topic, users=speakers, limit=20)
                assert {f.user for f in found} <= set(speakers)
                expected = [u for _, u in rows if u in speakers]
                assert len(found) == len(expected)  # and nothing allowed is lost

    asyncio.run(scenario())


async def test_concurrent_writers_and_background_maintenance(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    async with await LanceMemoryStore.open(str(tmp_path / "db"), embedder,
                                           maintain_delay_s=0.01) as store:
        added = await asyncio.gather(*(store.add(fact(f"parallel fact {i}", user="u"))
                                       for i in range(20)))
        assert await store.count("bot") == 20 == len({f.id for f in added})
        await store._maintainers["bot"].wait()  # the debounced run after the writes
        table = await store._table("bot")
        assert "text" in {c for ix in await table.list_indices() for c in ix.columns}
        assert store._maintainers["bot"].fts
        found = await store.search("bot", "parallel fact 7", users=["u"], limit=1)
        assert found[0].text == "parallel fact 7"


async def test_a_broken_table_raises_storage_error(tmp_path: Path, embedder: FastEmbedder) -> None:
    """LanceDB's own exceptions never escape: the policy catches StorageError only."""
    import shutil

    async with await LanceMemoryStore.open(str(tmp_path / "db"), embedder) as store:
        await store.add(fact("soon gone", user="u"))
        shutil.rmtree(tmp_path / "db" / f"{table_name('bot')}.lance")
        with pytest.raises(StorageError, match="memory store"):
            await store.search("bot", "gone", users=["u"])
