"""After start-up, what start-up built leaves the cyclic GC's view (``gc.freeze``).

Contract: ``settle()`` moves every object tracked so far to the permanent
generation; ``build_app`` calls it once everything has started, just before
it hands the app out. Objects made later are collected as before.

Why: a started service holds a few hundred thousand long-lived objects
(modules, classes, SQLAlchemy's and the SDKs' caches, LanceDB's and the
recall cache's Python side: ~280k tracked objects in bench_throughput's
process). Each full collection walks all of them while the event loop
waits (measured there, during start-up and seeding: 125 ms median, 288 ms
the longest, on a busy 2-core machine); frozen, they are left out of every
collection.

Cost: cyclic garbage left at that moment is never freed (start-up's own,
once). No ``gc.collect()`` first: it would add one full pause to every start.
"""

from __future__ import annotations

import gc


def settle() -> None:
    gc.freeze()
