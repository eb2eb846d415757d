"""The fast recall path: an exact in-memory scan over one bot's memory table.

Measured (benchmarks/bench_memory.py): at 100k rows an exact numpy scan over
only the rows a speaker may see beats LanceDB's IvfPq index on time and has
recall 1.0 where IvfPq has ~0.9; a filtered flat scan in LanceDB is 20x slower.

``Snapshot`` holds one table version in memory: the current rows
(``superseded_by == ""``) grouped by (user, chat) into partitions, each a
contiguous float32 matrix, plus the other columns as Python values (a list
per column, by row number: a search returns a few rows, and reading them back
from Arrow cost ~0.2 ms a search, more than scoring 2,000 rows). A search
scores only the partitions its scope names, so the privacy filter is the
choice of partitions, not a mask over a shared matrix, and the caller checks
each row again.

``RecallCache`` (``persistence/vectors/recall/cache.py``) keeps snapshots
current and decides when a search may use one. ``Snapshot.text``
(``persistence/vectors/recall/text.py``) is the full-text index of the same
rows: every change below goes to both, and ``settle`` makes the text
changes visible (the cache calls it before it publishes a version).

Concurrency: partitions and columns only grow in place (a new row is
written past the length a running scan took) and a removed row is only
marked dead, so a scan in a worker thread never sees a half-applied change.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from persistence.vectors.recall.text import DEAD, TextIndex, term_of, tokens
from persistence.vectors.tables import fuse, pool_size

Key = tuple[str, str]  # (user, chat)


UNIQUE = ("id", "text")  # columns whose values (almost) never repeat
# Scoring fewer rows than this stays on the loop: the thread hop costs ~90 us of CPU,
# scoring 4k x 384 float32 rows on one BLAS thread ~0.1-0.2 ms.
THREAD_ROWS = 4_000


@dataclass
class Part:
    """The current rows of one (user, chat): vectors, Arrow row numbers, liveness."""

    matrix: np.ndarray
    rows: np.ndarray
    live: np.ndarray
    n: int = 0

    @classmethod
    def empty(cls, dim: int, cap: int = 8) -> Part:
        return cls(np.empty((cap, dim), np.float32), np.empty(cap, np.int64),
                   np.zeros(cap, bool))

    def append(self, vectors: np.ndarray, rows: np.ndarray) -> list[int]:
        need = self.n + len(rows)
        if need > len(self.rows):  # grow into new arrays: a running scan keeps the old ones
            cap = max(need, 2 * len(self.rows))
            matrix = np.empty((cap, self.matrix.shape[1]), np.float32)
            matrix[:self.n] = self.matrix[:self.n]
            live, meta = np.zeros(cap, bool), np.empty(cap, np.int64)
            live[:self.n], meta[:self.n] = self.live[:self.n], self.rows[:self.n]
            self.matrix, self.rows, self.live = matrix, meta, live
        start = self.n
        self.matrix[start:need], self.rows[start:need] = vectors, rows
        self.live[start:need] = True
        self.n = need  # last: a scan that read n before sees none of the new rows
        return list(range(start, need))


@dataclass
class Snapshot:
    """One version of a memory table, in memory. Build with ``Snapshot.of``."""

    version: int
    generation: bytes
    dim: int
    # every column but the vector: name -> its values, by row number
    columns: dict[str, list[Any]]
    parts: dict[Key, Part] = field(default_factory=dict)
    where: dict[str, tuple[Key, int]] = field(default_factory=dict)  # id -> (part, slot)
    chats: dict[str, set[str]] = field(default_factory=dict)  # user -> chats with parts
    text: TextIndex | None = None  # the text leg's index (None: searched in LanceDB)
    values_bytes: int = 0  # what the columns' values take (counted as they come)

    @classmethod
    def of(cls, data: pa.Table, version: int, generation: bytes, dim: int, *,
           text: bool = True) -> Snapshot:
        """CPU work (seconds at a million rows): call it in a worker thread."""
        columns: dict[str, list[Any]] = {name: [] for name in data.column_names
                                         if name != "vector"}
        snap = cls(version, generation, dim, columns, text=TextIndex() if text else None)
        snap.add(data)
        return snap

    @property
    def ids(self) -> list[str]:
        """The id of each row, by row number."""
        return self.columns["id"]

    @property
    def nbytes(self) -> int:
        parts = sum(p.matrix.nbytes + p.rows.nbytes for p in self.parts.values())
        lists = sum(sys.getsizeof(values) for values in self.columns.values())
        return parts + lists + self.values_bytes

    def add(self, data: pa.Table) -> None:
        """Append rows (all columns, vector included); superseded ones are kept as data only."""
        base = len(self.ids)
        new = {name: _values(data.column(name), unique=name in UNIQUE) for name in self.columns}
        for name, (values, size) in new.items():
            self.columns[name].extend(values)
            self.values_bytes += size
        column = data.column("vector").combine_chunks()
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), self.dim)
        current = pc.equal(data.column("superseded_by"), "").to_numpy(zero_copy_only=False)
        ids, users, chats = new["id"][0], new["user"][0], new["chat"][0]
        groups: dict[Key, list[int]] = {}
        for i in np.flatnonzero(current).tolist():
            groups.setdefault((users[i], chats[i]), []).append(i)
        for key, index in groups.items():
            slots = self._part(key).append(matrix[index], np.asarray(index) + base)
            for i, slot in zip(index, slots, strict=True):
                self.where[ids[i]] = (key, slot)
        if self.text is not None:  # superseded rows too: they count in LanceDB's statistics
            keys = [term_of(u, c) if now else DEAD
                    for u, c, now in zip(users, chats, current.tolist(), strict=True)]
            self.text.add(range(base, base + len(ids)), new["text"][0], users, keys)

    def trim(self) -> None:
        """Give back what growing by doubling left unused (after a load)."""
        for part in self.parts.values():
            cap = part.n + part.n // 8 + 8
            if len(part.rows) > cap:
                part.matrix, part.rows = part.matrix[:cap].copy(), part.rows[:cap].copy()
                part.live = part.live[:cap].copy()

    def _part(self, key: Key) -> Part:
        if key not in self.parts:
            self.parts[key] = Part.empty(self.dim)
            self.chats.setdefault(key[0], set()).add(key[1])
        return self.parts[key]

    def settle(self) -> None:
        """Make the changes so far visible to text searches (CPU: a worker thread)."""
        if self.text is not None:
            self.text.commit()

    def kill(self, ids: Sequence[str]) -> None:
        """No longer recalled (deleted or superseded)."""
        rows = []
        for fact_id in ids:
            place = self.where.pop(fact_id, None)
            if place is not None:
                part = self.parts[place[0]]
                part.live[place[1]] = False
                rows.append(int(part.rows[place[1]]))
        if self.text is not None:
            self.text.remove(rows)

    def kill_user(self, user: str) -> None:
        for chat in self.chats.pop(user, set()):
            part = self.parts.pop((user, chat))
            part.live[:] = False
        self.where = {i: p for i, p in self.where.items() if p[0][0] != user}
        if self.text is not None:
            self.text.remove_user(user)

    def move(self, fact_id: str, chat: str) -> None:
        """The row now belongs to ``chat`` (promote: "" = bot-wide)."""
        place = self.where.get(fact_id)
        if place is None or place[0][1] == chat:
            return
        (user, _), slot = place
        part = self.parts[place[0]]
        vector, row = part.matrix[slot:slot + 1].copy(), part.rows[slot:slot + 1].copy()
        self.kill([fact_id])
        [new] = self._part((user, chat)).append(vector, row)
        self.where[fact_id] = ((user, chat), new)
        number = int(row[0])
        self.columns["chat"][number] = chat
        if self.text is not None:  # kill removed its document: index it under the new key
            self.text.add([number], [self.columns["text"][number]], [user],
                          [term_of(user, chat)])

    def keys(self, users: Sequence[str], chats: Mapping[str, Sequence[str] | None] | None
             ) -> list[Key]:
        """The partitions ``scope_sql(users, chats)`` allows: the user, then the chat."""
        allowed = chats or {}
        keys = []
        for user in dict.fromkeys(users):
            have = self.chats.get(user, set())
            only = allowed.get(user)
            keys += [(user, c) for c in sorted(have if only is None else have & set(only))]
        return keys

    def scores(self, query: np.ndarray, keys: Sequence[Key]) -> tuple[np.ndarray, np.ndarray]:
        """(Arrow row numbers, cosines) of every live row in ``keys``, in partition order."""
        rows, scores = [], []
        for key in keys:
            part = self.parts.get(key)  # one lookup: the loop may drop it (delete_user) meanwhile
            if part is None:
                continue
            n = part.n  # first: arrays read after it hold at least n rows
            live = part.live[:n]
            rows.append(part.rows[:n][live])
            scores.append((part.matrix[:n] @ query)[live])
        if not rows:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        if len(rows) == 1:
            return rows[0], scores[0]
        return np.concatenate(rows), np.concatenate(scores)

    def cosine(self, fact_id: str, query: np.ndarray, keys: Sequence[Key]) -> tuple[int, float]:
        """(row number, cosine) of a live row in ``keys``; (-1, 0) when it is not one."""
        place = self.where.get(fact_id)
        if place is None or place[0] not in keys:
            return -1, 0.0
        part = self.parts[place[0]]
        if not part.live[place[1]]:
            return -1, 0.0
        return int(part.rows[place[1]]), float(part.matrix[place[1]] @ query)

    def rows(self, numbers: Sequence[int]) -> list[dict[str, Any]]:
        """Every column but the vector of each row, as a dict."""
        columns = self.columns.items()
        return [{name: values[n] for name, values in columns} for n in numbers]


def best(rows: np.ndarray, scores: np.ndarray, pool: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``pool`` best of (row numbers, cosines), best first (ties: in the given order)."""
    keep = np.arange(len(scores))
    if len(keep) > pool:
        keep = np.argpartition(-scores, pool - 1)[:pool]
    keep = keep[np.argsort(-scores[keep], kind="stable")]
    return rows[keep], scores[keep]


def lookup(rows: np.ndarray, scores: np.ndarray, wanted: np.ndarray) -> tuple[np.ndarray,
                                                                            np.ndarray]:
    """(which of ``wanted`` are in ``rows``, their scores): ``rows`` are live rows, so
    each row number is there at most once."""
    if len(wanted) == 0 or len(rows) == 0:
        return np.zeros(len(wanted), bool), np.empty(0, scores.dtype)
    order = np.argsort(rows)
    at = np.minimum(np.searchsorted(rows, wanted, sorter=order), len(rows) - 1)
    found = rows[order[at]] == wanted
    return found, scores[order[at[found]]]


def _values(column: pa.ChunkedArray, *, unique: bool = False) -> tuple[list[Any], int]:
    """(``column`` as Python values, the bytes they take). Equal values share one
    object (user, chat and category repeat over thousands of rows) unless the
    column is ``unique`` (no value repeats: not worth looking for them)."""
    kind = column.type
    if pa.types.is_timestamp(kind) and kind.unit == "us" and kind.tz in (None, "UTC"):
        return _times(column)
    if unique:
        values = column.to_pylist()
        return values, sum(map(sys.getsizeof, values))
    encoded = column.combine_chunks().dictionary_encode()
    distinct = encoded.dictionary.to_pylist()
    size = sum(map(sys.getsizeof, distinct))
    indices = encoded.indices
    if indices.null_count:  # the index of the null value: one past the distinct ones
        distinct.append(None)
        indices = indices.fill_null(len(distinct) - 1)
    return list(map(distinct.__getitem__, indices.to_pylist())), size


def _times(column: pa.ChunkedArray) -> tuple[list[Any], int]:
    """A timestamp[us] column, naive or UTC, as datetimes, as ``to_pylist`` makes
    them (its tzinfo too), ~5x faster: pyarrow converts a zoned one in ~12 us."""
    zone = pa.scalar(0, column.type).as_py().tzinfo  # the tzinfo pyarrow would give
    naive = column.cast(pa.int64()).to_numpy().astype("datetime64[us]").astype(object)
    values = list(naive) if zone is None else [moment.replace(tzinfo=zone) for moment in naive]
    return values, len(values) * sys.getsizeof(datetime.min)


async def scan_search(snap: Snapshot, table: Any, vector: Sequence[float], text: str, where: str,
                      keys: list[Key], limit: int, *, fts: bool,
                      min_score: float | None) -> list[dict[str, Any]]:
    """``hybrid_search`` over a snapshot: the exact vector leg and the text leg in
    memory (``snap.text``; without it, LanceDB with the same filter), one fusion.
    A text hit the snapshot does not hold live in ``keys`` is dropped."""
    query, pool = np.asarray(vector, np.float32), pool_size(limit)
    text_leg = None
    if fts and snap.text is None and text.strip():  # started first: LanceDB works meanwhile
        text_leg = asyncio.ensure_future(table.query().nearest_to_text(text).where(where)
                                         .select(["id", "_score"]).limit(pool).to_arrow())
    terms = tokens(text) if fts and snap.text is not None else []
    try:
        if sum(snap.parts[k].n for k in keys if k in snap.parts) > THREAD_ROWS:
            legs = await asyncio.to_thread(_legs, snap, query, terms, keys, pool)
        else:  # small arrays cost less than the thread hop
            legs = _legs(snap, query, terms, keys, pool)
        by_text = None if text_leg is None else await text_leg
    finally:
        if text_leg is not None and not text_leg.done():
            text_leg.cancel()
    known = snap.ids
    numbers = legs.rows.tolist()
    ids = [known[n] for n in numbers]
    cosine = dict(zip(ids, legs.cosines.tolist(), strict=True))
    row_of = dict(zip(ids, numbers, strict=True))
    bm25: dict[str, float] = {}
    if by_text is not None:  # LanceDB's text leg
        for fact_id, score in zip(by_text.column("id").to_pylist(),
                                  by_text.column("_score").to_pylist(), strict=True):
            if fact_id not in cosine:
                row, cos = snap.cosine(fact_id, query, keys)
                if row < 0:
                    continue
                row_of[fact_id], cosine[fact_id] = row, cos
            bm25[fact_id] = float(score)
    else:  # the snapshot's: every hit is live in ``keys``, its cosine already known
        numbers = legs.hits.tolist()
        hits = [known[n] for n in numbers]
        for fact_id, n, cos in zip(hits, numbers, legs.hit_cosines.tolist(), strict=True):
            if fact_id not in cosine:
                row_of[fact_id], cosine[fact_id] = n, cos
        bm25 = dict(zip(hits, legs.bm25.tolist(), strict=True))
    chosen = fuse(cosine, bm25, limit, min_score)
    return [row | {"score": cosine[i]}
            for i, row in zip(chosen, snap.rows([row_of[i] for i in chosen]), strict=True)]


@dataclass
class Legs:
    """What ``_legs`` found: the vector leg's best rows (row numbers, cosines, best
    first) and the text leg's hits live in the keys (row numbers, BM25, cosines)."""

    rows: np.ndarray
    cosines: np.ndarray
    hits: np.ndarray
    bm25: np.ndarray
    hit_cosines: np.ndarray


def _legs(snap: Snapshot, query: np.ndarray, terms: list[str], keys: list[Key],
          pool: int) -> Legs:
    """Both legs over the snapshot, from one scoring of the rows in ``keys``."""
    rows, scores = snap.scores(query, keys)
    top_rows, top_cosines = best(rows, scores, pool)
    if snap.text is None or not terms:
        return Legs(top_rows, top_cosines, np.empty(0, np.int64), np.empty(0, np.float32),
                    np.empty(0, np.float32))
    hits, bm25 = snap.text.search(terms, keys, pool)
    # A hit not live in ``keys`` (none should be: the index filters by key) is dropped.
    found, cosines = lookup(rows, scores, hits)
    return Legs(top_rows, top_cosines, hits[found], bm25[found], cosines)
