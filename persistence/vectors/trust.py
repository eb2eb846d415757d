"""The shared table's two guarantees: who may see a row, and that nobody edited it.

``TrustRule`` is the ONE place visibility lives: a reader bot sees
``public`` rows, ``trusted`` rows whose group is one of its groups, and its
own ``private`` rows; and only rows about the allowed users. ``sql()``
renders the predicate every query carries (values quoted); ``allows(row)``
checks each returned row again in Python, so an escaping mistake can never
widen what a reader sees.

``row_hash`` is the write hash of a row (content, place in the chain and
the previous row's hash); ``split_rows`` drops rows that fail it;
``walk_chain`` checks every hash and every link, by sequence number.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.types import IntegrityReport
from persistence.vectors.tables import in_list, micros, quote


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


def row_hash(row: dict[str, Any]) -> str:
    """SHA-256 over a row's content, its place in the chain and the previous hash."""
    content = [
        row["seq"], row["id"], row["text"], row["user"], row["category"],
        repr(float(row["importance"])), micros(row["created_at"]), row["trust_level"],
        row["trust_group"], row["author_bot"], row["author_name"], row["metadata"],
        row["prev_hash"],
    ]
    canonical = json.dumps(content, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


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


def walk_chain(rows: list[dict[str, Any]], head_seq: int) -> IntegrityReport:
    """Check every row's hash and that each links to the one before (by ``seq``).

    ``head_seq``: the last sequence number this process wrote or read at start;
    rows deleted from the end show up only against it.
    """
    rows = sorted(rows, key=lambda r: r["seq"])
    tampered: list[str] = []
    missing: list[str] = []
    prev_seq, prev_hash, prev_id = 0, "", ""
    for row in rows:
        if row_hash(row) != row["write_hash"]:
            tampered.append(row["id"])
        if row["seq"] != prev_seq + 1 or row["prev_hash"] != prev_hash:
            gap = row["seq"] - prev_seq - 1
            where = f"after {prev_id}" if prev_id else "at the start"
            missing.append(f"{max(gap, 1)} row(s) {where}, before {row['id']}")
        prev_seq, prev_hash, prev_id = row["seq"], row["write_hash"], row["id"]
    if head_seq > prev_seq:
        missing.append(f"{head_seq - prev_seq} row(s) at the head, after "
                       f"{prev_id or 'the start'}")
    return IntegrityReport(checked=len(rows), tampered=tuple(tampered), missing=tuple(missing))
