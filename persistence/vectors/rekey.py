"""Upgrading stored memories in place, at memory start-up (LanceDB has no migrations).

``upgrade_memory`` runs before the stores open, is idempotent (each step
touches only rows that still need it) and logs one line saying what it did.

1. User keys: rows stored under the twice-prefixed ``telegram:telegram:7``
   (the policy prefixed the adapters' key again) become ``telegram:7``
   (``engine.memory.scope.normalize_key``). Per-bot tables are updated in
   place. The shared table is a hash chain over the user column: it is
   re-chained (every hash from the first rewritten row on is recomputed) only
   if it verified before, and the rewrite is recorded in the table's schema
   metadata (``boternity.rechained``: when, why, how many rows, the head it
   replaced). A chain that does not verify is left alone, with an error
   naming ``boternity shared verify``: re-chaining would launder tampering.
2. Scope: per-bot tables get the ``chat`` column (where a learned fact may
   be recalled). Rows written before it start as ``UNSCOPED``; ``place``
   (the composition root answers from the SQL history) says where each was
   learned: that chat (a DM's general fact becomes that person's), "" when no
   conversation was going on (an admin's ``memory add`` or import), or a chat
   recalled nowhere when it cannot be told (safe: a person's own facts are
   then recalled in their DMs only, a general fact nowhere until promoted).
   Until placed, an ``UNSCOPED`` row is recalled in no group (fail closed).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import pyarrow as pa

from engine.errors import StorageError
from engine.memory.scope import normalize_key
from engine.ports import ChainHeadStore
from persistence.vectors.chain import Chain, LocalHeads
from persistence.vectors.memory import PREFIX
from persistence.vectors.shared import COLUMNS, TABLE
from persistence.vectors.tables import (
    in_list,
    now,
    owner_of,
    quote,
    storage_errors,
    table_names,
)

log = logging.getLogger(__name__)

UNSCOPED = "?unscoped"  # a row written before facts had a chat (placed by ``place``)
RECHAINED_KEY = b"boternity.rechained"
UPDATE_BATCH = 500  # ids per UPDATE ... WHERE id IN (...)

Place = Callable[[str, str, datetime], Awaitable[tuple[str, str]]]
"""``place(bot, user, created_at)`` -> (user, chat) a pre-scope fact is stored under."""


@storage_errors
async def upgrade_memory(db: Any, place: Place,
                         heads: ChainHeadStore | None = None) -> dict[str, int]:
    """Run every step on every table of ``db``; returns counts (also logged)."""
    done: dict[str, int] = defaultdict(int)
    for name in await table_names(db):
        if name.startswith(PREFIX):
            table = await db.open_table(name)
            rekeyed, placed = await _upgrade_bot(table, owner_of(await table.schema()), place)
            done["rekeyed"] += rekeyed
            done["placed"] += placed
        elif name == TABLE:
            done["shared_rekeyed"] += await _rekey_shared(db, heads)
    if any(done.values()):
        log.info("memory upgrade: %d keys rewritten in bot tables, %d in the shared table "
                 "(re-chained); %d learned facts placed in the chat they came from",
                 done["rekeyed"], done["shared_rekeyed"], done["placed"])
    return dict(done)


async def _update_ids(table: Any, ids: list[str], values: dict[str, str]) -> None:
    for start in range(0, len(ids), UPDATE_BATCH):
        await table.update(updates=values, where=in_list("id", ids[start:start + UPDATE_BATCH]))


async def _upgrade_bot(table: Any, bot: str, place: Place) -> tuple[int, int]:
    if "chat" not in (await table.schema()).names:
        try:
            await table.add_columns({"chat": quote(UNSCOPED)})
        except Exception:
            # Another worker starting at the same time may have added it first.
            if "chat" not in (await table.schema()).names:
                raise
    rekeyed = 0
    users = (await table.query().select(["user"]).to_arrow()).column("user").unique()
    for old in users.to_pylist():
        new = normalize_key(old)
        if new != old:
            rekeyed += await table.count_rows(f"user = {quote(old)}")
            await table.update(updates={"user": new}, where=f"user = {quote(old)}")
    rows = await (table.query().where(f"chat = {quote(UNSCOPED)}")
                  .select(["id", "user", "created_at"]).to_list())
    groups: dict[tuple[str, str], list[str]] = defaultdict(list)
    for row in rows:
        groups[await place(bot, row["user"], row["created_at"])].append(row["id"])
    for (user, chat), ids in groups.items():
        await _update_ids(table, ids, {"user": user, "chat": chat})
    return rekeyed, len(rows)


async def _rekey_shared(db: Any, heads: ChainHeadStore | None) -> int:
    """Rewrite twice-prefixed user keys in the shared table and re-chain it.

    Through the chain's own rewrite path (``persistence.vectors.chain``): the
    chain must verify first (a rewrite would launder an edit), the new head is
    announced, the table overwritten in one version, then the head recorded.
    """
    table = await db.open_table(TABLE)
    # Only the keys to find out whether there is work: the vectors are read
    # once, after the chain settled, for the rewrite itself.
    users = (await table.query().select(["user"]).to_arrow()).column("user").to_pylist()
    stale = sum(1 for user in users if normalize_key(user) != user)
    if not stale:
        return 0
    chain = Chain(TABLE, lambda: table, heads or LocalHeads(), COLUMNS)
    try:
        await chain.settle()  # tables with the legacy hash are re-hashed here first
        await chain.check_intact()
    except StorageError:
        log.error("shared memory: %d rows are stored under twice-prefixed user keys, but "
                  "the hash chain does not verify, so they were left as they are; run "
                  "`boternity shared verify`", stale)
        return 0
    data: pa.Table = await table.query().to_arrow()  # settle may have re-hashed it
    data = data.select([c for c in data.column_names if not c.startswith("_")])
    head_before = chain.head.hash if chain.head is not None else ""
    index = data.schema.get_field_index("user")
    data = data.set_column(index, data.schema.field(index),
                           pa.array([normalize_key(u) for u in data.column("user").to_pylist()],
                                    type=data.schema.field(index).type))
    new = await chain.rehash(data)
    record = json.dumps({"at": now().isoformat(), "why": "0007_keys: user keys platform:id",
                         "rows_rekeyed": stale, "head_before": head_before})
    new = new.replace_schema_metadata({**(new.schema.metadata or {}),
                                       RECHAINED_KEY: record.encode()})
    await db.create_table(TABLE, new, mode="overwrite")
    await chain.commit()
    return stale
