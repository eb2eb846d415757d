"""The fast recall path: an exact in-memory scan over one bot's memory table.

Measured (benchmarks/bench_memory.py): at 100k rows an exact numpy scan over
only the rows a speaker may see beats LanceDB's IvfPq index on time and has
recall 1.0 where IvfPq has ~0.9; a filtered flat scan in LanceDB is 20x slower.

``Snapshot`` holds one table version in memory: the current rows
(``superseded_by == ""``) grouped by (user, chat) into partitions, each a
contiguous float32 matrix, plus the other columns as Arrow (read back only
for the few rows a search returns). A search scores only the partitions its
scope names, so the privacy filter is the choice of partitions, not a mask
over a shared matrix, and the caller checks each row again.

``RecallCache`` (``persistence/vectors/recall/cache.py``) keeps snapshots
current and decides when a search may use one. ``Snapshot.text``
(``persistence/vectors/recall/text.py``) is the full-text index of the same
rows: every change below goes to both, and ``settle`` makes the text
changes visible (the cache calls it before it publishes a version).

Concurrency: partitions only grow in place (a new row is written past the
length a running scan took) and a removed row is only marked dead, so a scan
in a worker thread never sees a half-applied change.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from persistence.vectors.recall.text import DEAD, TextIndex, term_of, tokens
from persistence.vectors.tables import fuse, pool_size

Key = tuple[str, str]  # (user, chat)


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
    meta: pa.Table  # every column but the vector, in row-number order
    parts: dict[Key, Part] = field(default_factory=dict)
    where: dict[str, tuple[Key, int]] = field(default_factory=dict)  # id -> (part, slot)
    chats: dict[str, set[str]] = field(default_factory=dict)  # user -> chats with parts
    text: TextIndex | None = None  # the text leg's index (None: searched in LanceDB)
    # ``meta``'s id column as a list: every search maps its row numbers to ids,
    # and pyarrow's take + to_pylist costs ~60 us a call (2 us from a list).
    ids: list[str] = field(default_factory=list)
    ids_bytes: int = 0  # what those strings take (kept as they come: nbytes is asked often)

    @classmethod
    def of(cls, data: pa.Table, version: int, generation: bytes, dim: int, *,
           text: bool = True) -> Snapshot:
        """CPU work (seconds at a million rows): call it in a worker thread."""
        snap = cls(version, generation, dim, data.drop_columns(["vector"]).slice(0, 0),
                   text=TextIndex() if text else None)
        snap.add(data)
        return snap

    @property
    def nbytes(self) -> int:
        parts = sum(p.matrix.nbytes + p.rows.nbytes for p in self.parts.values())
        return int(self.meta.nbytes) + parts + sys.getsizeof(self.ids) + self.ids_bytes

    def add(self, data: pa.Table) -> None:
        """Append rows (all columns, vector included); superseded ones are kept as data only."""
        base = self.meta.num_rows
        meta = data.select(self.meta.column_names)
        self.meta = pa.concat_tables([self.meta, meta]) if base else meta
        column = data.column("vector").combine_chunks()
        matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(len(column), self.dim)
        current = pc.equal(data.column("superseded_by"), "").to_numpy(zero_copy_only=False)
        ids, users = data.column("id").to_pylist(), data.column("user").to_pylist()
        self.ids.extend(ids)
        self.ids_bytes += sum(map(sys.getsizeof, ids))
        chats = data.column("chat").to_pylist()
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
            self.text.add(range(base, base + len(ids)), data.column("text").to_pylist(),
                          users, keys)
        if len(self.meta.columns[0].chunks) > 64:  # many small appends: one chunk again
            self.meta = self.meta.combine_chunks()

    def trim(self) -> None:
        """Give back what growing by doubling left unused (after a load)."""
        for part in self.parts.values():
            cap = part.n + part.n // 8 + 8
            if len(part.rows) > cap:
                part.matrix, part.rows = part.matrix[:cap].copy(), part.rows[:cap].copy()
                part.live = part.live[:cap].copy()
        self.meta = self.meta.combine_chunks()

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
        self.meta = _set_chat(self.meta, int(row[0]), chat)
        if self.text is not None:  # kill removed its document: index it under the new key
            text = self.meta.column("text")[int(row[0])].as_py()
            self.text.add([int(row[0])], [text], [user], [term_of(user, chat)])

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

    def top(self, query: np.ndarray, keys: Sequence[Key], pool: int
            ) -> tuple[np.ndarray, np.ndarray]:
        """(Arrow row numbers, cosines) of the best ``pool`` live rows in ``keys``, best first."""
        # One lookup per key: the loop may drop a part (delete_user) while this runs.
        found = [self.parts.get(k) for k in keys]
        parts = [(p, p.n) for p in found if p is not None]
        if not parts:
            return np.empty(0, np.int64), np.empty(0, np.float32)
        scores = np.concatenate([np.where(p.live[:n], p.matrix[:n] @ query, -np.inf)
                                 for p, n in parts])
        rows = np.concatenate([p.rows[:n] for p, n in parts])
        keep = np.flatnonzero(scores > -np.inf)
        if len(keep) > pool:
            keep = keep[np.argpartition(-scores[keep], pool - 1)[:pool]]
        keep = keep[np.argsort(-scores[keep], kind="stable")]
        return rows[keep], scores[keep]

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
        return self.meta.take(pa.array(numbers, pa.int64())).to_pylist()  # type: ignore[no-any-return]


def _set_chat(meta: pa.Table, row: int, chat: str) -> pa.Table:
    index = meta.column_names.index("chat")
    chats = meta.column(index).to_pylist()
    chats[row] = chat
    # The field as it was (not null): a new one would not concatenate with later rows.
    return meta.set_column(index, meta.schema.field(index), pa.array(chats, pa.string()))


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
            (numbers, scores), (rows, bm25s) = await asyncio.to_thread(
                _legs, snap, query, terms, keys, pool)
        else:  # small arrays cost less than the thread hop
            (numbers, scores), (rows, bm25s) = _legs(snap, query, terms, keys, pool)
        by_text = None if text_leg is None else await text_leg
    finally:
        if text_leg is not None and not text_leg.done():
            text_leg.cancel()
    known = snap.ids
    ids = [known[n] for n in numbers.tolist()]
    cosine = dict(zip(ids, scores.tolist(), strict=True))
    row_of = dict(zip(ids, numbers.tolist(), strict=True))
    if by_text is not None:  # LanceDB's text leg
        hits = zip(by_text.column("id").to_pylist(), by_text.column("_score").to_pylist(),
                   strict=True)
    else:  # the snapshot's
        hits = zip([known[n] for n in rows.tolist()], bm25s.tolist(), strict=True)
    bm25: dict[str, float] = {}
    for fact_id, score in hits:
        if fact_id not in cosine:
            row_of[fact_id], cosine[fact_id] = snap.cosine(fact_id, query, keys)
            if row_of[fact_id] < 0:
                del row_of[fact_id], cosine[fact_id]
                continue
        bm25[fact_id] = float(score)
    best = fuse(cosine, bm25, limit, min_score)
    return [row | {"score": cosine[i]} for i, row in zip(best, snap.rows([row_of[i] for i in best]),
                                                        strict=True)]


def _legs(snap: Snapshot, query: np.ndarray, terms: list[str], keys: list[Key], pool: int
          ) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Both legs over the snapshot: (row numbers, cosines), (row numbers, BM25 scores)."""
    by_text = (snap.text.search(terms, keys, pool) if snap.text is not None and terms
               else (np.empty(0, np.int64), np.empty(0, np.float32)))
    return snap.top(query, keys, pool), by_text
