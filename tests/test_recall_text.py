"""The recall snapshot's text leg (persistence/vectors/recall/text.py) against LanceDB
itself: the same tokens (stop words, stems, accents, long tokens, punctuation,
numbers, other scripts), the same BM25 scores, the same scope, after every change.
Real LanceDB in tmp dirs; the store tests use the real embedding model.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import AsyncIterator
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
from lancedb.index import FTS

from engine.types import Fact
from persistence.vectors.embeddings import FastEmbedder
from persistence.vectors.memory import LanceMemoryStore, scope_sql
from persistence.vectors.recall.scan import Snapshot
from persistence.vectors.recall.text import STOP_WORDS, TextIndex, tokens

# Words tantivy's own English list keeps or that look like stop words and are not.
NEAR_STOP = ("what about you would could ought also among us may might must shall one "
             "because before does any only very why yourselves themselves once").split()
TEXTS = [
    "The quick brown foxes were running; she runs daily and ran yesterday.",
    "Café crème in Zürich: naïve résumé, façade, Ærøskøbing, straße, ÉCOLE",
    "cafe creme zurich naive resume facade",
    "C++ and C# devs e-mail me at bob@example.com (urgent!) re: \"the plan\" +1 -2",
    "Version 2.0.1 costs $3.14 or 1,000 yen; call 555-0100 at 10:30pm, v2 beta3",
    "東京タワー に 行きました and Привет мир, Ελληνικά γράμματα, مرحبا بالعالم",
    "I love 🍕 pizza 🍕 and ☕ coffee 😀!",
    "a" * 39 + " " + "b" * 40 + " " + "c" * 41 + " " + "é" * 20 + " " + "ü" * 19 + " short",
    " ".join(STOP_WORDS[:60]) + " keeper",
    " ".join(STOP_WORDS[60:]) + " keeper " + " ".join(NEAR_STOP),
    "iPhone HTTP2 snake_case camelCase don't won't it's y'all",
    "being having doing does was is has its yours ourselves",
    "Jazz jazz JAZZ jazzy, jazzed; the jazzist plays jazz",
    "",
]
QUERIES = [
    "what about you", "the of and", "", "   ", "C++", '"the plan"', "re: plan +urgent -devs",
    "(running) AND [fox]", "field:value", "🍕", "pizza 🍕", "zurich cafe", "Zürich CAFÉ",
    "naïve", "résumé", "straße", "strasse", "aeroskobing", "ærøskøbing", "école",
    "a" * 39, "b" * 40, "c" * 41, "é" * 20, "ü" * 19, "東京タワー", "привет", "ΕΛΛΗΝΙΚΆ",
    "3.14", "1,000", "555", "10:30pm", "v2", "being", "does", "its", "yours", "ourselves",
    "jazz jazz", "jazz", "runner runs", "don", "it", "snake_case", "camelcase", "http2",
]


def words() -> list[str]:
    return sorted({w for t in TEXTS for w in re.split(r"\s+", t) if w} | set(NEAR_STOP)
                  | set(STOP_WORDS))


async def lance_fts(tmp_path: Path, texts: list[str], users: list[str]) -> lancedb.AsyncTable:
    db = await lancedb.connect_async(str(tmp_path / "fts"))
    table = await db.create_table("t", pa.table({
        "id": [str(i) for i in range(len(texts))], "text": texts, "user": users}))
    await table.create_index("text", config=FTS(with_position=False))  # as Maintainer does
    return table


async def lance_scores(table: lancedb.AsyncTable, query: str, where: str | None = None,
                       limit: int = 1000) -> dict[str, float]:
    search = table.query().nearest_to_text(query)
    if where is not None:
        search = search.where(where)
    data = await search.select(["id", "_score"]).limit(limit).to_arrow()
    return dict(zip(data.column("id").to_pylist(), data.column("_score").to_pylist(), strict=True))


def text_index(texts: list[str], users: list[str]) -> TextIndex:
    index = TextIndex()
    index.add(range(len(texts)), texts, users, [f'["{u}", ""]' for u in users])
    index.commit()
    return index


def ours(index: TextIndex, query: str, users: list[str], limit: int = 1000) -> dict[str, float]:
    rows, scores = index.search(tokens(query), [(u, "") for u in users], limit)
    return {str(r): float(s) for r, s in zip(rows.tolist(), scores.tolist(), strict=True)}


async def test_analyzer_and_scores_equal_lancedbs(tmp_path: Path) -> None:
    """Each word and each tricky query: the same rows and the same BM25 score. A token
    cut differently (a stop word, a stem, a fold, a length) changes a match or a
    document's length, so its score."""
    texts = TEXTS * 2 + [f"filler {w} words" for w in ("fox", "jazz", "café", "plan", "pizza")]
    users = ["u"] * len(texts)
    table = await lance_fts(tmp_path, texts, users)
    index = text_index(texts, users)
    checked = 0
    for query in QUERIES + words():
        if query.startswith('"') and query.endswith('"') and len(query) > 1:
            # LanceDB reads a quoted query as a phrase, which an index without positions
            # refuses (the reply's recall failed on such a message); ours: its words.
            with pytest.raises(ValueError, match="phrase"):
                await lance_scores(table, query)
            query = query.strip('"')
        want = await lance_scores(table, query)
        got = ours(index, query, ["u"])
        assert got.keys() == want.keys(), (query, tokens(query))
        assert got == pytest.approx(want, rel=1e-5), query
        checked += bool(want)
    assert checked > 100  # the corpus is not trivially empty of matches


async def test_stop_words_are_lancedbs(tmp_path: Path) -> None:
    """A word LanceDB drops finds nothing in either; one it keeps finds its row in both."""
    candidates = sorted(set(STOP_WORDS) | set(NEAR_STOP))
    texts = [f"zqx {w}" for w in candidates]
    table = await lance_fts(tmp_path, texts, ["u"] * len(texts))
    for i, word in enumerate(candidates):
        dropped = str(i) not in await lance_scores(table, word)
        assert (not tokens(word)) == dropped, word


async def test_scores_use_the_whole_table_under_a_filter(tmp_path: Path) -> None:
    """LanceDB's filtered query scores with the statistics of every row: so does ours."""
    texts = [f"{fruit} {extra}" for fruit, extra in itertools.product(
        ["apple", "pear", "plum apple", "fig"], ["pie", "tart jam", "", "juice apple"])]
    users = [f"u{i % 3}" for i in range(len(texts))]
    table = await lance_fts(tmp_path, texts, users)
    index = text_index(texts, users)
    for query, scope in itertools.product(["apple", "apple pie", "jam fig"],
                                          (["u0"], ["u1", "u2"])):
        where = "user IN (" + ", ".join(f"'{u}'" for u in scope) + ")"
        assert ours(index, query, scope) == pytest.approx(
            await lance_scores(table, query, where), rel=1e-5)


# -- through the store: scope and changes --------------------------------------------

BOT = "bot"
ALICE, BOB = "tg:1", "tg:2"


@pytest.fixture
async def store(tmp_path: Path, embedder: FastEmbedder) -> AsyncIterator[LanceMemoryStore]:
    async with await LanceMemoryStore.open(str(tmp_path / "db"), embedder) as opened:
        yield opened


async def other_process(tmp_path: Path, embedder: FastEmbedder) -> LanceMemoryStore:
    """Another handle on the same directory, without a cache (as another process)."""
    return await LanceMemoryStore.open(str(tmp_path / "db"), embedder, cache_mb=0)


async def snapshot(store: LanceMemoryStore) -> Snapshot:
    table = await store._table(BOT)
    snap = await store.cache.current(BOT, table)
    if snap is None:
        await store.cache.wait(BOT)
        snap = await store.cache.current(BOT, table)
    assert snap is not None and snap.text is not None
    return snap


async def seed(store: LanceMemoryStore) -> list[Fact]:
    facts = await store.add_many([
        Fact(id="", text="Alice plays the xylophone in a band", bot=BOT, user=ALICE, chat="dm-a"),
        Fact(id="", text="Alice keeps a quokka named Pip", bot=BOT, user=ALICE, chat=""),
        Fact(id="", text="Bob plays chess on Sundays", bot=BOT, user=BOB, chat="dm-b"),
        Fact(id="", text="Bob bakes sourdough bread", bot=BOT, user=BOB, chat="group"),
        Fact(id="", text="The team meets on Mondays", bot=BOT, user="", chat=""),
    ])
    await store.maintain(BOT)  # the full-text index: searches go hybrid
    assert await store.warm(BOT)
    return facts


def text_hits(snap: Snapshot, query: str, users: list[str],
              chats: dict[str, list[str] | None] | None = None) -> set[str]:
    rows, _ = snap.text.search(tokens(query), snap.keys(users, chats), 100)  # type: ignore[union-attr]
    return {snap.ids[row] for row in rows.tolist()}


async def test_text_leg_never_finds_another_persons_fact(store: LanceMemoryStore) -> None:
    """A keyword only Alice's facts hold: never a text hit for Bob, nor for Alice in a
    chat her fact does not belong to, nor through the store's answers."""
    facts = await seed(store)
    snap = await snapshot(store)
    xylophone, quokka = facts[0].id, facts[1].id
    assert text_hits(snap, "xylophone", [ALICE]) == {xylophone}
    assert text_hits(snap, "xylophone quokka", [BOB, ""]) == set()
    assert text_hits(snap, "xylophone", [ALICE], {ALICE: ["dm-other", ""]}) == set()
    assert text_hits(snap, "xylophone quokka", [ALICE], {ALICE: [""]}) == {quokka}
    for users, chats in (([BOB, ""], None), ([BOB], {BOB: ["dm-b", "group"]})):
        got = await store.search(BOT, "xylophone quokka", users=users, chats=chats, limit=10)
        assert {f.user for f in got} <= set(users) and xylophone not in {f.id for f in got}


@pytest.mark.parametrize("query", ['"xylophone', '"xylophone band"', "xylophone: band",
                                   "+band -chess", "(quokka OR pip)", "C++", "🍕🍕",
                                   "what about you", "", "AND OR NOT", "user = 'x' OR 1=1",
                                   "\\ * ? ~2 ^3"])
async def test_user_text_never_breaks_the_query(store: LanceMemoryStore, query: str) -> None:
    """No query syntax: the query is its analyzed tokens, whatever the person typed."""
    await seed(store)
    snap = await snapshot(store)
    table = await store._table(BOT)
    where = f"{scope_sql([ALICE, ''], None)} AND superseded_by = ''"
    words = query.strip('"') if query[:1] == query[-1:] == '"' else query  # LanceDB: a phrase
    want = set(await lance_scores(table, words, where)) if query.strip() else set()
    assert text_hits(snap, query, [ALICE, ""]) == want
    await store.search(BOT, query, users=[ALICE, ""], limit=5)  # no error either


async def test_the_text_index_follows_every_change(store: LanceMemoryStore, tmp_path: Path,
                                                   embedder: FastEmbedder) -> None:
    """Own writes (add, supersede, promote, delete, delete a person) and another
    handle's writes (caught up by their difference): the text hits stay LanceDB's."""
    facts = await seed(store)
    table = await store._table(BOT)
    scopes: list[tuple[list[str], dict[str, list[str] | None] | None]] = [
        ([ALICE, ""], None), ([BOB, ""], None), ([ALICE], {ALICE: ["dm-a"]}),
        ([BOB], {BOB: ["group"]})]
    queries = ["xylophone band", "plays", "bread sourdough", "quokka", "mondays team", "banjo"]

    async def check(step: str) -> None:
        snap = await snapshot(store)
        for query, (users, chats) in itertools.product(queries, scopes):
            where = f"{scope_sql(users, chats)} AND superseded_by = ''"
            want = set(await lance_scores(table, query, where))
            assert text_hits(snap, query, users, chats) == want, (step, query, users, chats)

    await check("seeded")
    [banjo] = await store.add_many([Fact(id="", text="Alice now plays the banjo in a band",
                                         bot=BOT, user=ALICE, chat="dm-a")])
    await check("add")
    await store.supersede(BOT, facts[0].id, banjo.id)
    await check("supersede")
    await store.promote(BOT, banjo.id)
    await check("promote")
    await store.delete(BOT, facts[3].id)
    await check("delete")
    async with await other_process(tmp_path, embedder) as other:
        await other.add(Fact(id="", text="Bob plays the banjo badly", bot=BOT, user=BOB,
                             chat="dm-b"))
        await other.delete(BOT, facts[4].id)
    await check("caught up")
    await store.delete_user(BOT, ALICE)
    await check("delete a person")
