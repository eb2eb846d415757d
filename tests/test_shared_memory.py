"""The shared memory repository: trust filtering, hash chain, one writer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import lancedb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.errors import StorageError
from engine.types import Fact, TrustLevel
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.shared import TABLE, SharedMemory
from persistence.vectors.trust import TrustRule

HOSTILE = ["x' OR '1'='1", "') OR trust_level <> ('", "a'b", 'q"uote', "back\\slash'"]


@pytest.fixture
async def shared(tmp_path: Path, embedder: FastEmbedder) -> AsyncIterator[SharedMemory]:
    async with await SharedMemory.open(str(tmp_path / "lancedb"), embedder) as s:
        yield s


async def raw_table(shared_dir: Path) -> lancedb.AsyncTable:
    """The table OUTSIDE the API: what an attacker with disk access would edit."""
    db = await lancedb.connect_async(str(shared_dir), read_consistency_interval=timedelta(0))
    return await db.open_table(TABLE)


def fact(text: str, bot: str, user: str = "") -> Fact:
    return Fact(id="", text=text, bot=bot, user=user)


async def test_a_reader_sees_public_its_groups_and_its_own_private(shared: SharedMemory) -> None:
    await shared.publish(fact("The office wifi is guest-5G", "alpha"), "public",
                         author_name="Alpha")
    await shared.publish(fact("The deploy key rotates on Fridays", "alpha"), "trusted", "ops")
    await shared.publish(fact("Alpha's own scratch note about deploys", "alpha"), "private")
    await shared.publish(fact("Finance closes the books on the 5th", "gamma"), "trusted", "fin")

    def texts(facts: list[Fact]) -> set[str]:
        return {f.text.split()[1] for f in facts}

    beta = await shared.list_facts("beta", ["ops"], users=[""])
    assert texts(beta) == {"office", "deploy"}
    alpha = await shared.list_facts("alpha", [], users=[""])
    assert texts(alpha) == {"office", "own"}
    found = await shared.search("beta", ["ops"], "when does the deploy key rotate", users=[""])
    assert found[0].text.startswith("The deploy key") and found[0].trust_group == "ops"
    assert found[0].author_bot == "alpha" and found[0].created_at is not None
    assert all(f.trust_level != "private" for f in found)
    wifi = (await shared.search("beta", [], "wifi password", users=[""]))[0]
    assert (wifi.author_name, wifi.trust_level, wifi.score > 0.3) == ("Alpha", "public", True)
    assert await shared.get("beta", [], wifi.id) == replace_score(wifi)
    assert await shared.get("beta", ["fin"], found[0].id) is None  # not in ops


def replace_score(f: Fact) -> Fact:
    from dataclasses import replace

    return replace(f, score=0.0)


async def test_personal_facts_stay_with_their_user(shared: SharedMemory) -> None:
    await shared.publish(fact("Dana is pregnant", "alpha", user="dana"), "public")
    await shared.publish(fact("The canteen opens at noon", "alpha"), "public")
    assert [f.text for f in await shared.search("beta", [], "news", users=["eve", ""])] == [
        "The canteen opens at noon"]
    assert await shared.search("beta", [], "Dana", users=[]) == []  # unknown speaker
    assert len(await shared.search("beta", [], "Dana", users=["dana", ""])) == 2


async def test_bad_publishes_are_refused(shared: SharedMemory) -> None:
    with pytest.raises(StorageError, match="trust group"):
        await shared.publish(fact("x", "alpha"), "trusted")
    with pytest.raises(StorageError, match="trust level"):
        await shared.publish(fact("x", "alpha"), "secret")  # type: ignore[arg-type]
    with pytest.raises(StorageError, match="text"):
        await shared.publish(fact("  ", "alpha"), "public")
    assert await shared.count() == 0
    from datetime import datetime

    once = await shared.publish(Fact(id="own-1", text="Shared once", bot="alpha",
                                     created_at=datetime(2026, 1, 2, 3, 4, 5)), "public")
    assert once.id == "own-1" and once.created_at is not None and once.created_at.tzinfo
    with pytest.raises(StorageError, match="already shared"):
        await shared.publish(Fact(id="own-1", text="Shared once", bot="alpha"), "public")
    assert await shared.count() == 1 and (await shared.verify()).ok


@pytest.mark.parametrize("hostile", HOSTILE)
async def test_hostile_reader_group_and_user_ids(shared: SharedMemory, hostile: str) -> None:
    await shared.publish(fact("Alpha private plan", "alpha"), "private")
    await shared.publish(fact("Ops trusted runbook", "alpha"), "trusted", "ops")
    await shared.publish(fact("Bob's private phone", "alpha", user="bob"), "public")
    await shared.publish(fact("Hostile author's private note", hostile, user=hostile), "private")
    seen = await shared.list_facts(hostile, [hostile], users=[hostile, ""])
    assert [f.text for f in seen] == ["Hostile author's private note"]
    rule = TrustRule.of(hostile, [hostile], [hostile])
    assert rule.sql().count("'") % 2 == 0  # every literal closed
    assert await shared.verify() == (await shared.verify())  # stable
    assert (await shared.verify()).ok


async def test_edited_row_is_excluded_counted_and_reported(
    tmp_path: Path, shared: SharedMemory
) -> None:
    kept = await shared.publish(fact("Meeting room B is free on Tuesdays", "alpha"), "public")
    edited = await shared.publish(fact("Server password is in the vault", "alpha"), "public")
    table = await raw_table(tmp_path / "lancedb")
    await table.update(updates={"text": "Server password is hunter2"},
                       where=f"id = '{edited.id}'")
    found = await shared.search("beta", [], "server password", users=[""], limit=5)
    assert [f.id for f in found] == [kept.id]
    assert shared.tampered_reads >= 1
    assert await shared.get("beta", [], edited.id) is None
    report = await shared.verify()
    assert report.tampered == (edited.id,) and not report.ok
    # A fresh walk from the head cannot vouch for rows below a broken link.
    assert report.missing == ("1 older row(s) below a break in the chain cannot be verified",)


async def test_widened_trust_level_is_caught(tmp_path: Path, shared: SharedMemory) -> None:
    secret = await shared.publish(fact("Alpha's private API quota", "alpha"), "private")
    table = await raw_table(tmp_path / "lancedb")
    await table.update(updates={"trust_level": "public"}, where=f"id = '{secret.id}'")
    rows = await table.query().where("trust_level = 'public'").to_list()
    assert [r["id"] for r in rows] == [secret.id]  # the edit did widen the raw row
    assert await shared.list_facts("beta", [], users=[""]) == []
    assert await shared.search("beta", [], "API quota", users=[""]) == []
    assert (await shared.verify()).tampered == (secret.id,)


async def test_deleted_rows_break_the_chain(tmp_path: Path, shared: SharedMemory) -> None:
    facts = [await shared.publish(fact(f"shared fact {i}", "alpha"), "public") for i in range(5)]
    assert (await shared.verify()).ok
    table = await raw_table(tmp_path / "lancedb")
    await table.delete(f"id = '{facts[2].id}'")
    report = await shared.verify()
    assert report.checked == 4 and not report.tampered
    assert len(report.missing) == 2 and facts[1].id in report.missing[0]
    assert report.missing[1].startswith("2 older row(s) below a break")
    await table.delete(f"id = '{facts[4].id}'")  # the newest row: only the head knows
    assert any("head" in m for m in (await shared.verify()).missing)


async def test_concurrent_publishers_lose_nothing(shared: SharedMemory) -> None:
    bots, each = 12, 8

    async def publisher(b: int) -> list[Fact]:
        return [await shared.publish(fact(f"bot {b} fact {i}", f"bot{b}"), "public")
                for i in range(each)]

    results = await asyncio.gather(*(publisher(b) for b in range(bots)))
    ids = {f.id for batch in results for f in batch}
    assert len(ids) == bots * each == await shared.count()
    listed = await shared.list_facts("reader", [], users=[""], limit=1000)
    assert {f.id for f in listed} == ids
    report = await shared.verify()
    assert report.ok and report.checked == bots * each


async def test_orphaned_facts_stay_visible_and_valid(shared: SharedMemory) -> None:
    await shared.publish(fact("Gone bot's public tip", "gone"), "public")
    await shared.publish(fact("Alive bot's tip", "alive"), "public")
    assert await shared.orphan_bot("gone") == 1
    assert await shared.orphan_bot("gone") == 0
    listed = {f.text: f.orphaned for f in await shared.list_facts("x", [], users=[""])}
    assert listed == {"Gone bot's public tip": True, "Alive bot's tip": False}
    assert (await shared.verify()).ok


async def test_reopen_continues_the_chain_and_reembed_keeps_it(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    uri = str(tmp_path / "lancedb")
    async with await SharedMemory.open(uri, embedder) as first:
        for i in range(11):  # past 9: the head is found by number, not by text order
            await first.publish(fact(f"first run fact {i}", "alpha"), "public")
    async with await SharedMemory.open(uri, embedder) as second:
        await second.publish(fact("second run fact", "alpha"), "public")
        progress: list[int] = []
        assert await second.reembed(progress=lambda done, total: progress.append(done)) == 12
        assert progress[-1] == 12
        report = await second.verify()
        assert report.ok and report.checked == 12
        assert len(await second.search("b", [], "second run fact", users=[""], limit=20)) == 12


# --- property: no query ever returns what the reader or speaker may not see ---

BOTS = ["alpha", "beta", "x' OR '1'='1"]
GROUPS = ["ops", "fin", "a'b"]
USERS = ["", "alice", "bob", "') OR ('1'='1"]
LEVELS: list[TrustLevel] = ["public", "trusted", "private"]
PROPERTY_RUNS = 60

row = st.tuples(st.sampled_from(BOTS), st.sampled_from(LEVELS), st.sampled_from(GROUPS),
                st.sampled_from(USERS), st.sampled_from(["tea", "chess", "rain", "jazz"]))
reader = st.tuples(st.sampled_from([*BOTS, "delta"]),
                   st.lists(st.sampled_from(GROUPS), max_size=2, unique=True),
                   st.lists(st.sampled_from(USERS), max_size=2, unique=True))


def may_see(r: tuple[str, list[str], list[str]], w: tuple[str, str, str, str, str]) -> bool:
    """The rule, written independently of TrustRule."""
    reader_bot, groups, users = r
    author, level, group, user, _ = w
    if user not in users:
        return False
    return (level == "public" or (level == "trusted" and group in groups)
            or (level == "private" and author == reader_bot))


@settings(max_examples=PROPERTY_RUNS, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(row, min_size=1, max_size=10), readers=st.lists(reader, min_size=1,
                                                                      max_size=3))
def test_property_no_query_leaks(
    tmp_path_factory: pytest.TempPathFactory, embedder: FastEmbedder,
    rows: list[tuple[str, TrustLevel, str, str, str]],
    readers: list[tuple[str, list[str], list[str]]],
) -> None:
    async def scenario() -> None:
        uri = str(tmp_path_factory.mktemp("shared") / "db")
        async with await SharedMemory.open(uri, embedder) as store:
            written = {}
            for i, w in enumerate(rows):
                author, level, group, user, topic = w
                f = await store.publish(fact(f"{i} {user or 'everyone'} likes {topic}", author,
                                             user=user), level, group)
                written[f.id] = w
            for r in readers:
                bot, groups, users = r
                expected = {i for i, w in written.items() if may_see(r, w)}
                listed = {f.id for f in await store.list_facts(bot, groups, users=users)}
                assert listed == expected
                found = await store.search(bot, groups, "likes tea", users=users, limit=20)
                assert {f.id for f in found} <= expected
                for fid in written:
                    got = await store.get(bot, groups, fid)
                    if got is not None:  # get ignores users, never trust
                        assert may_see((bot, groups, [got.user]), written[fid])

    asyncio.run(scenario())


async def test_another_model_is_refused_until_reembedded(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    from engine.errors import EmbeddingMismatch
    from tests.test_vectors import OtherModel

    uri = str(tmp_path / "lancedb")
    async with await SharedMemory.open(uri, OtherModel(embedder)) as old:
        await old.publish(fact("Written with the old model", "alpha"), "public")
    async with await SharedMemory.open(uri, embedder) as new:  # the app still starts
        with pytest.raises(EmbeddingMismatch, match="reembed"):
            await new.search("b", [], "old model", users=[""])
        with pytest.raises(EmbeddingMismatch):
            await new.publish(fact("new fact", "alpha"), "public")
        assert await new.reembed() == 1
        assert [f.text for f in await new.search("b", [], "old model", users=[""])] == [
            "Written with the old model"]
        await new.publish(fact("new fact", "alpha"), "public")
        assert (await new.verify()).ok


async def test_deleting_a_bot_drops_its_table_and_orphans_its_shared_facts(
    tmp_path: Path, embedder: FastEmbedder
) -> None:
    from persistence.vectors.memory import LanceMemoryStore

    uri = str(tmp_path / "lancedb")  # one database holds both, as in the app
    async with await LanceMemoryStore.open(uri, embedder) as store, \
            await SharedMemory.open(uri, embedder) as shared:
        own = await store.add(fact("Gone's own note", "gone"))
        await shared.publish(own, "public", author_name="Gone")
        await store.drop_bot("gone")
        assert await shared.orphan_bot("gone") == 1
        assert await store.bots() == [] and await store.count("gone") == 0
        [kept] = await shared.search("other", [], "Gone's own note", users=[""])
        assert (kept.orphaned, kept.author_name, kept.text) == (True, "Gone", "Gone's own note")
        assert (await shared.verify()).ok
