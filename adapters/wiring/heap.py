"""After start-up, what start-up built leaves the cyclic GC's view (``gc.freeze``).

Contract: ``settle()`` moves every object tracked so far to the permanent
generation; ``build_app`` calls it once everything has started, just before
it hands the app out. Objects made later are collected as before.

Why: a started service holds a few hundred thousand long-lived objects
(modules, classes, SQLAlchemy's and the SDKs' caches, LanceDB's and the
recall cache's Python side). Each full collection walks all of them while
the event loop waits; frozen, they are left out of every collection (see
docs/benchmarks.md for the pause measured with and without).

Cost: cyclic garbage left at that moment is never freed (start-up's own,
once). No ``gc.collect()`` first: it would add one full pause to every start.
"""

from __future__ import annotations

import gc


def settle() -> None:
    gc.freeze()
