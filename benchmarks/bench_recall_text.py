"""The in-memory text leg against LanceDB's full-text query, on LoCoMo.

    python benchmarks/bench_recall_text.py CONVERSATION.json [...] [--limit 20]

Every ``session_N_observation`` fact of the given LoCoMo files (see
benchmarks/locomo.py) is one row (user = its speaker) of a LanceDB table with
the full-text index the product creates (``FTS(with_position=False)``) and of
the snapshot's text index (persistence/vectors/recall/text.py). Each
question is then asked of both, top ``--limit``, over every row and filtered
to one speaker (LanceDB: a ``where``; ours: that speaker's partition).

Printed per scope: the mean top-k overlap, the share of queries with the
same set of rows, the share whose ranked score lists are equal (a different
set with equal score lists only differs in which of the rows tied at the
cut is kept), the largest relative score difference of a row both return,
and CPU per query of each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import lancedb
import pyarrow as pa
from lancedb.index import FTS

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from persistence.vectors.recall.text import TextIndex, term_of, tokens
from persistence.vectors.tables import quote


def observations(files: list[Path]) -> tuple[list[str], list[str], list[str]]:
    """(fact texts, their speakers, the questions) of the LoCoMo files."""
    texts, users, questions = [], [], []
    for path in files:
        data = json.loads(path.read_text())
        for key, value in data.items():
            if key.endswith("_observation"):
                for speaker, facts in value.items():
                    texts += [fact[0] for fact in facts]
                    users += [speaker] * len(facts)
        questions += [qa["question"] for qa in data.get("qa", [])]
    return texts, users, questions


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--limit", type=int, default=20)
    args = parser.parse_args()
    texts, users, questions = observations(args.files)
    with tempfile.TemporaryDirectory() as tmp:
        db = await lancedb.connect_async(tmp)
        table = await db.create_table("facts", pa.table({
            "id": [str(i) for i in range(len(texts))], "text": texts, "user": users}))
        await table.create_index("text", config=FTS(with_position=False))
        index = TextIndex()
        index.add(range(len(texts)), texts, users, [term_of(u, "") for u in users])
        index.commit()
        speaker = sorted(set(users))[0]
        print(f"{len(texts)} facts, {len(questions)} questions, top {args.limit}")
        print(f"{'scope':<10} {'queries':>7} {'overlap':>8} {'same set':>8} "
              f"{'same scores':>11} {'max rel diff':>12} {'LanceDB cpu ms':>14} "
              f"{'ours cpu ms':>11}")
        for scope, where, keys in (
                ("all", None, [(u, "") for u in sorted(set(users))]),
                ("1 speaker", f"user = {quote(speaker)}", [(speaker, "")])):
            n = same_set = same_scores = 0
            overlap = worst = lance_cpu = our_cpu = 0.0
            for question in questions:
                start = time.process_time()
                query = table.query().nearest_to_text(question)
                data = await (query.where(where) if where else query).select(
                    ["id", "_score"]).limit(args.limit).to_arrow()
                lance_cpu += time.process_time() - start
                want = dict(zip(map(int, data.column("id").to_pylist()),
                                data.column("_score").to_pylist(), strict=True))
                start = time.process_time()
                rows, scores = index.search(tokens(question), keys, args.limit)
                our_cpu += time.process_time() - start
                got = dict(zip(rows.tolist(), scores.tolist(), strict=True))
                if not want and not got:
                    continue
                n += 1
                overlap += len(want.keys() & got.keys()) / max(len(want), len(got))
                same_set += want.keys() == got.keys()
                ranked = sorted(want.values()), sorted(got.values())
                same_scores += len(ranked[0]) == len(ranked[1]) and all(
                    abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*ranked, strict=True))
                worst = max([worst, *(abs(want[r] - got[r]) / abs(want[r])
                                      for r in want.keys() & got.keys())])
            print(f"{scope:<10} {n:>7} {overlap / n:>8.3f} {same_set / n:>8.3f} "
                  f"{same_scores / n:>11.3f} {worst:>12.1e} "
                  f"{lance_cpu * 1000 / len(questions):>14.2f} "
                  f"{our_cpu * 1000 / len(questions):>11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
