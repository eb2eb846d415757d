"""The shared table's two guarantees: who may see a row, and that nobody edited it.

``TrustRule`` is the ONE place visibility lives: a reader bot sees
``public`` rows, ``trusted`` rows whose group is one of its groups, and its
own ``private`` rows; and only rows about the allowed users. ``sql()``
renders the predicate every query carries (values quoted); ``allows(row)``
checks each returned row again in Python, so an escaping mistake can never
widen what a reader sees.

In the recall snapshot (``persistence/vectors/recall/scan.py``, via
``snapshot_shape``) a shared row sits in the partition (user, visibility):
its level and the group (trusted) or author (private) that level looks at.
``TrustRule.partitions`` picks the partitions ``allows`` admits, so the
snapshot path and the SQL predicate answer the same rows.

The chain (functions here, so every rewrite of the table uses the same ones):
``row_hash`` is the write hash of a row: its content, its vector, its place
in the chain and the previous row's hash. The head (last seq and hash) lives
outside the table (``ChainHeadStore``, SQL in the app). ``anchor`` walks from
that head down: a row is trusted only when its own hash holds AND every link
from it up to the head holds, so a row whose hash an attacker recomputed, a
row appended past the head, and rows below a deleted one are not trusted;
deleting the newest rows or the table shows against the head. ``rechain``
recomputes every link (a reembed, a rewrite of user keys).

Deleting on purpose (``forget_user``) appends a tombstone: a chained row of
level ``tombstone`` (no reader's rule matches it) whose metadata records the
deleted rows' seq, id, hash and previous hash, when, by whom, no text. The
walk steps over a deleted row through the tombstone's record.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from engine.types import ChainHead, IntegrityReport
from persistence.vectors.tables import in_list, micros, quote, vector_digests

TOMBSTONE = "tombstone"  # trust level of a deletion record: invisible to every reader


@dataclass(frozen=True)
class TrustRule:
    """What one reader may see. ``users=None`` only for admin listings (any user)."""

    reader: str
    groups: frozenset[str]
    users: frozenset[str] | None

    @classmethod
    def of(cls, reader: str, groups: Sequence[str], users: Sequence[str] | None) -> TrustRule:
        return cls(reader, frozenset(g for g in groups if g),
                   None if users is None else frozenset(users))

    def sql(self) -> str:
        visible = ["trust_level = 'public'",
                   f"(trust_level = 'private' AND author_bot = {quote(self.reader)})"]
        if self.groups:
            visible.append(f"(trust_level = 'trusted' AND {in_list('trust_group', self.groups)})")
        predicate = "(" + " OR ".join(visible) + ")"
        if self.users is not None:
            predicate += f" AND {in_list('user', self.users)}"
        return predicate

    def allows(self, row: dict[str, Any]) -> bool:
        level = row["trust_level"]
        seen = (level == "public"
                or (level == "trusted" and row["trust_group"] in self.groups)
                or (level == "private" and row["author_bot"] == self.reader))
        return seen and (self.users is None or row["user"] in self.users)

    def partitions(self, chats: Mapping[str, set[str]]) -> list[tuple[str, str]]:
        """The snapshot's (user, visibility) partitions (``Snapshot.chats``) this rule
        admits, by ``allows`` on what each partition's key says."""
        users = sorted(chats if self.users is None else self.users)
        return [(user, key) for user in users for key in sorted(chats.get(user, ()))
                if self.allows({"user": user, **_visibility(key)})]


def visibility(level: str, group: str, author: str) -> str:
    """A shared row's partition key: its level and the field that level looks at
    (JSON: no value can make two keys alike)."""
    looked_at = group if level == "trusted" else author if level == "private" else ""
    return json.dumps([level, looked_at], ensure_ascii=False)


@functools.lru_cache(maxsize=4096)
def _visibility(key: str) -> dict[str, str]:
    level, looked_at = json.loads(key)
    return {"trust_level": level, "trust_group": looked_at, "author_bot": looked_at}


def snapshot_shape(data: pa.Table) -> pa.Table:
    """Shared rows (with the vector) as ``Snapshot.add`` takes them: ``chat`` = the
    visibility key, ``superseded_by`` = the level for tombstones (never recalled), ""
    otherwise, and ``vector_sha`` (the hash check's digest, computed once here)."""
    columns = [data.column(c).to_pylist() for c in ("trust_level", "trust_group", "author_bot")]
    keys = [visibility(*row) for row in zip(*columns, strict=True)]
    gone = pc.if_else(pc.equal(data.column("trust_level"), TOMBSTONE), TOMBSTONE, "")
    return (data.append_column("chat", pa.array(keys, pa.string()))
            .append_column("superseded_by", gone.cast(pa.string()))
            .append_column("vector_sha", pa.array(vector_digests(data.column("vector")),
                                                  pa.string())))


def _content(row: dict[str, Any]) -> list[Any]:
    return [
        row["seq"], row["id"], row["text"], row["user"], row["category"],
        repr(float(row["importance"])), micros(row["created_at"]), row["trust_level"],
        row["trust_group"], row["author_bot"], row["author_name"], row["metadata"],
    ]


def _sha(content: list[Any]) -> str:
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def vector_digest(vector: Any) -> str:
    """SHA-256 of a vector as little-endian float32 (what the table stores)."""
    return hashlib.sha256(np.asarray(vector, dtype="<f4").tobytes()).hexdigest()


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 over a row's content, its vector, its place in the chain and the previous hash.

    The vector is covered: an edited vector would make a fact the top answer
    to an unrelated question. ``row["vector_sha"]`` (``rows_of``) saves
    turning the vector into Python floats.
    """
    digest = row.get("vector_sha") or vector_digest(row["vector"])
    return _sha(["v2", *_content(row), digest, row["prev_hash"]])


def legacy_row_hash(row: dict[str, Any]) -> str:
    """The hash rows had before the vector was covered (migrated on first open)."""
    return _sha([*_content(row), row["prev_hash"]])


def rows_of(data: pa.Table) -> list[dict[str, Any]]:
    """Rows of a table read with its vector column: each with ``vector_sha``, no vector."""
    digests = vector_digests(data.column("vector")) if "vector" in data.column_names else None
    rows: list[dict[str, Any]] = data.drop_columns(
        [c for c in ("vector",) if c in data.column_names]).to_pylist()
    if digests is not None:
        for row, digest in zip(rows, digests, strict=True):
            row["vector_sha"] = digest
    return rows


def deleted_entries(row: dict[str, Any]) -> list[dict[str, Any]]:
    """What a tombstone row records: ``[{"seq", "id", "hash", "prev"}, ...]``."""
    if row["trust_level"] != TOMBSTONE:
        return []
    entries: list[dict[str, Any]] = json.loads(row["metadata"]).get("deleted", [])
    return entries


def tombstone_metadata(deleted: list[dict[str, Any]], actor: str, reason: str) -> str:
    """The metadata of a tombstone: which rows (seq, id, hash, prev), by whom, why; no text."""
    return json.dumps({"deleted": [{k: r[k] for k in ("seq", "id", "hash", "prev")}
                                   for r in deleted],
                       "by": actor, "reason": reason}, ensure_ascii=False,
                      separators=(",", ":"))


def split_rows(rows: list[dict[str, Any]],
               rule: TrustRule) -> tuple[list[dict[str, Any]], list[str]]:
    """(rows that pass their hash and the rule, ids of rows that fail their hash)."""
    good, bad = [], []
    for row in rows:
        if row_hash(row) != row["write_hash"]:
            bad.append(row["id"])
        elif rule.allows(row):
            good.append(row)
    return good, bad


@dataclass
class Anchoring:
    """What a walk from the head found: ``trusted`` seq -> hash, and the report."""

    trusted: dict[int, str] = field(default_factory=dict)
    tampered: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    checked: int = 0
    bottom: str = ""  # the expected hash below the lowest seq walked (incremental walks)

    def report(self) -> IntegrityReport:
        return IntegrityReport(checked=self.checked, tampered=tuple(self.tampered),
                               missing=tuple(self.missing))


def anchor(rows: list[dict[str, Any]], head: ChainHead | None, *, below: int = 0) -> Anchoring:
    """Walk the chain from ``head`` down to ``below + 1`` (rows need ``vector_sha``).

    A row is trusted when its own hash holds and its hash is the one the
    trusted row above it (or the head) links to. Once a link fails, nothing
    below it is trusted (an attacker who recomputes a row's hash can also
    recompute the rows above it, but never the head). Tombstones carry the
    links of deleted rows.
    """
    found = Anchoring(checked=len(rows))
    by_seq: dict[int, dict[str, Any]] = {}
    for each in sorted(rows, key=lambda r: r["seq"]):
        if head is not None and (each["seq"], each["write_hash"]) == (head.pending_seq,
                                                                        head.pending_hash):
            continue  # a write landing right now: trusted once the head records it
        if each["seq"] in by_seq or (head is not None and each["seq"] > head.seq):
            found.tampered.append(each["id"])  # a second row for one place, or past the head
        else:
            by_seq[each["seq"]] = each
    if head is None:
        if rows:
            found.missing.append(f"no chain head recorded for {len(rows)} row(s): "
                                 "none can be verified")
        return found
    entries: dict[int, dict[str, Any]] = {}
    expected, linked = head.hash, True
    gap: list[int] = []  # seqs missing in the current run

    def close_gap(lower: dict[str, Any] | None) -> None:
        if gap:
            upper = by_seq.get(gap[0] + 1)
            where = "at the head" if gap[0] == head.seq else f"before {upper['id']}" \
                if upper else f"before seq {gap[0] + 1}"
            after = f"after {lower['id']}" if lower else "at the start"
            found.missing.append(f"{len(gap)} row(s) missing {after}, {where}")
            gap.clear()

    unlinked = 0
    for seq in range(head.seq, below, -1):
        row = by_seq.get(seq)
        if row is None:
            entry = entries.get(seq)
            if linked and entry is not None and entry["hash"] == expected:
                expected = entry["prev"]
                continue
            gap.append(seq)
            linked = False
            continue
        close_gap(row)
        own = row_hash(row) == row["write_hash"]
        if own and linked and row["write_hash"] == expected:
            found.trusted[seq] = row["write_hash"]
            expected = row["prev_hash"]
            entries.update((e["seq"], e) for e in deleted_entries(row) if "seq" in e)
            continue
        if not own or linked:  # edited, or its hash recomputed (the link above fails)
            found.tampered.append(row["id"])
        else:
            unlinked += 1
        linked = False
    close_gap(None)
    if unlinked:
        found.missing.append(f"{unlinked} older row(s) below a break in the chain "
                             "cannot be verified")
    found.bottom = expected if linked else ""
    return found


def legacy_intact(rows: list[dict[str, Any]]) -> bool:
    """Whether rows written before the vector was hashed still form their old chain."""
    prev = ""
    for seq, row in enumerate(sorted(rows, key=lambda r: r["seq"]), start=1):
        if row["seq"] != seq or row["prev_hash"] != prev or \
                legacy_row_hash(row) != row["write_hash"]:
            return False
        prev = row["write_hash"]
    return True


def rechain(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (with ``vector`` or ``vector_sha``) renumbered 1..n in seq order, each hashed
    and linked to the one before. Callers anchor first: rechaining launders any edit."""
    chained: list[dict[str, Any]] = []
    prev = ""
    for seq, row in enumerate(sorted(rows, key=lambda r: r["seq"]), start=1):
        row = {**row, "seq": seq, "prev_hash": prev}
        if row["trust_level"] == TOMBSTONE:  # no gaps any more: keep what was deleted, no links
            meta = json.loads(row["metadata"])
            meta["deleted"] = [{"id": e["id"]} for e in meta.get("deleted", [])]
            row["metadata"] = json.dumps(meta, ensure_ascii=False, separators=(",", ":"))
        row["write_hash"] = prev = row_hash(row)
        chained.append(row)
    return chained
