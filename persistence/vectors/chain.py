"""The shared table's hash chain at run time: its head outside the table, announced
writes, and which rows a reader may trust.

``Chain`` is used by ``SharedMemory`` only, under its writer (and the
cross-process writer lock):

- ``settle()`` reads the head from the ``ChainHeadStore`` (SQL in the app)
  and finishes what a crashed writer left: a write announced as ``pending``
  is promoted if the table holds it, else dropped. A table without a head
  is either from before the head existed (its rows verify with the old hash:
  re-hashed with their vectors and the head recorded) or was moved to a new
  database (its chain verifies with the current hash: the head is adopted,
  with a warning); otherwise writes are refused until an operator looks.
- ``append(row)``: announce (pending), write, record the head. A crash in
  between is settled by the next writer; the head never points past the table
  without a pending mark.
- ``linked(rows)``: rows whose hash is one a walk from the head trusted
  (``trust.anchor``), walked lazily and incrementally, cached per process.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pyarrow as pa
from lancedb.query import ColumnOrdering

from engine.errors import StorageError
from engine.ports import ChainHeadStore
from engine.types import ChainHead, IntegrityReport
from persistence.vectors.tables import vector_digests
from persistence.vectors.trust import (
    anchor,
    legacy_intact,
    rechain,
    row_hash,
    rows_of,
)

log = logging.getLogger(__name__)


class LocalHeads:
    """A head kept in this process only: for tools and tests that open the table alone.

    The app always passes the SQL store; with this one a fresh process cannot
    see rows deleted from the end or a dropped table.
    """

    def __init__(self) -> None:
        self._heads: dict[str, ChainHead] = {}

    async def get(self, name: str) -> ChainHead | None:
        return self._heads.get(name)

    async def put(self, name: str, head: ChainHead) -> None:
        self._heads[name] = head


def chained_table(data: pa.Table) -> tuple[pa.Table, ChainHead]:
    """``data`` (with vectors) renumbered and re-hashed (``trust.rechain``), and its head."""
    data = data.sort_by("seq")
    rows = data.drop_columns(["vector"]).to_pylist()
    for row, digest in zip(rows, vector_digests(data.column("vector")), strict=True):
        row["vector_sha"] = digest
    chained = rechain(rows)
    for column in ("seq", "metadata", "prev_hash", "write_hash"):
        index = data.schema.get_field_index(column)
        data = data.set_column(index, data.schema.field(index),
                               pa.array([r[column] for r in chained],
                                        type=data.schema.field(index).type))
    head = ChainHead(chained[-1]["seq"], chained[-1]["write_hash"]) if chained else \
        ChainHead(0, "")
    return data, head


class Chain:
    """One chained table's head, writes and trust (see the module docstring)."""

    def __init__(self, name: str, table: Callable[[], Any], heads: ChainHeadStore,
                 columns: list[str]) -> None:
        self.name = name
        self._table = table
        self._heads = heads
        self._columns = [*columns, "vector"]
        self.head: ChainHead | None = None  # as settled by this writer
        self._rehashed: ChainHead | None = None  # announced by rehash(), until commit()
        self._trusted: dict[int, str] = {}
        self._trusted_at: ChainHead | None = None  # the head the cache was walked from
        self._trust_lock = asyncio.Lock()

    async def _last(self) -> tuple[int, str] | None:
        last = await (self._table().query().select(["seq", "write_hash"])
                      .order_by([ColumnOrdering(column_name="seq", ascending=False)])
                      .limit(1).to_list())
        return (last[0]["seq"], last[0]["write_hash"]) if last else None

    async def _read_all(self) -> pa.Table:
        return await self._table().query().select(self._columns).to_arrow()

    # -- writers (under the writer lock) ---------------------------------

    async def settle(self) -> ChainHead:
        """The head to write after; raises ``StorageError`` when there is none to trust."""
        head = await self._heads.get(self.name)
        last = await self._last()
        if head is None:
            head = ChainHead(0, "") if last is None else await self._adopt()
        elif head.pending_seq:
            promoted = last == (head.pending_seq, head.pending_hash)
            head = ChainHead(head.pending_seq, head.pending_hash) if promoted else \
                ChainHead(head.seq, head.hash)
            await self._heads.put(self.name, head)
        self.head = head
        if head.seq == 0 and self._trusted_at is None:
            self._trusted_at = head  # an empty chain: nothing to walk, the cache is current
        return head

    async def _adopt(self) -> ChainHead:
        data = await self._read_all()
        rows = await asyncio.to_thread(rows_of, data)
        if await asyncio.to_thread(legacy_intact, rows):
            self.head = ChainHead(0, "")
            await self._table().add(await self.rehash(data), mode="overwrite")
            await self.commit()
            assert self.head is not None
            log.info("shared memory: %d row(s) re-hashed with their vectors; chain head "
                     "recorded", self.head.seq)
            return self.head
        top = max(rows, key=lambda r: r["seq"])
        candidate = ChainHead(top["seq"], top["write_hash"])
        found = await asyncio.to_thread(anchor, rows, candidate)
        if found.report().ok:
            await self._heads.put(self.name, candidate)
            log.warning("shared memory: no chain head was recorded (a new database?); "
                        "adopted the table's last row (seq %d)", candidate.seq)
            return candidate
        raise StorageError("shared memory: no chain head is recorded and the table does not "
                           "verify; run `boternity shared verify`")

    async def append(self, row: dict[str, Any], vector: list[float], schema: pa.Schema
                     ) -> dict[str, Any]:
        """Chain ``row`` after the settled head and write it (announced first)."""
        head = await self.settle()
        trusted_before = self._trusted_at == head
        row = {**row, "seq": head.seq + 1, "prev_hash": head.hash, "vector": vector}
        row["write_hash"] = row_hash(row)
        new = ChainHead(row["seq"], row["write_hash"])
        await self._heads.put(self.name, replace(head, pending_seq=new.seq,
                                                 pending_hash=new.hash))
        await self._table().add(pa.Table.from_pylist([row], schema=schema))
        await self._heads.put(self.name, new)
        self.head = new
        if trusted_before:  # the cache stays current: no walk for our own write
            self._trusted[new.seq] = new.hash
            self._trusted_at = new
        return row

    # Rewriting the whole table (reembed; a migration of user keys), under the writer:
    #   await chain.settle(); await chain.check_intact()
    #   new = await chain.rehash(changed_table_with_vectors)   # announced (pending)
    #   ... overwrite the table with ``new`` (one new version) ...
    #   await chain.commit()

    async def check_intact(self) -> None:
        """Refuse to re-hash a chain that does not verify: it would launder the edits."""
        if not (await self.verify()).ok:
            raise StorageError("shared memory fails verification; rewriting it would hide "
                               "that: run `boternity shared verify`")

    async def rehash(self, table: pa.Table) -> pa.Table:
        """``table`` (every column, vectors included) re-chained; its new head announced."""
        assert self.head is not None, "settle() first"
        chained, head = await asyncio.to_thread(chained_table, table)
        await self._heads.put(self.name, replace(self.head, pending_seq=head.seq,
                                                 pending_hash=head.hash))
        self._rehashed = head
        return chained

    async def commit(self) -> None:
        """After the rewritten table landed: its head; every cached trust is void."""
        head = self._rehashed
        assert head is not None, "rehash() first"
        await self._heads.put(self.name, head)
        self.head, self._rehashed = head, None
        self._trusted, self._trusted_at = {}, None

    # -- readers -----------------------------------------------------------

    async def _snapshot(self, below: int = 0) -> tuple[ChainHead | None, pa.Table]:
        """The head and the rows above ``below``, read while no write landed in between
        (a write that lands during the read would look like a row past the head)."""
        head = await self._heads.get(self.name)
        for _ in range(5):
            query = self._table().query().select(self._columns)
            data = await (query.where(f"seq > {below}") if below else query).to_arrow()
            again = await self._heads.get(self.name)
            if again == head:
                break
            head = again
        return head, data

    async def verify(self) -> IntegrityReport:
        """A full walk from the head as the store holds it now."""
        head, data = await self._snapshot()
        return await asyncio.to_thread(lambda: anchor(rows_of(data), head).report())

    async def linked(self, rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]],
                                                               list[str]]:
        """(rows linked to the head, ids of the others). Rows need ``write_hash`` and ``seq``."""
        if any(self._trusted.get(r["seq"]) != r["write_hash"] for r in rows):
            await self._refresh()
        good, bad = [], []
        for row in rows:
            if self._trusted.get(row["seq"]) == row["write_hash"]:
                good.append(row)
            else:
                bad.append(row["id"])
        return good, bad

    async def _refresh(self) -> None:
        async with self._trust_lock:
            current = await self._heads.get(self.name)
            if current is not None and current.pending_seq:  # not landed yet: trust what had
                current = ChainHead(current.seq, current.hash)
            if current == self._trusted_at:
                return  # nothing new: what is not trusted stays so
            old = self._trusted_at
            below = old.seq if (old is not None and current is not None
                                and current.seq > old.seq
                                and self._trusted.get(old.seq) == old.hash) else 0
            head, data = await self._snapshot(below)
            found = await asyncio.to_thread(lambda: anchor(rows_of(data), head, below=below))
            if below and found.bottom != self._trusted[below]:
                below = 0  # the chain under the cache was rewritten: walk it all
                head, data = await self._snapshot()
                found = await asyncio.to_thread(lambda: anchor(rows_of(data), head))
            self._trusted = ({**self._trusted, **found.trusted} if below else found.trusted)
            self._trusted_at = None if head is None else ChainHead(head.seq, head.hash)
