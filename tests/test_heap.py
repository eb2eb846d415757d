"""After start-up, what start-up built is out of the cyclic GC's passes (``gc.freeze``).

Structural: the objects ``build_app`` made are in the permanent generation
(no generation's list holds them) and what the app makes afterwards is not.
"""

from __future__ import annotations

import gc
from pathlib import Path

from adapters.wiring.build import build_app
from adapters.wiring.settings import Settings


def _collected(obj: object) -> bool:
    """Whether a collection may visit ``obj`` (it is in generation 0, 1 or 2)."""
    return any(o is obj for o in gc.get_objects())


async def test_build_app_freezes_what_it_started(tmp_path: Path) -> None:
    gc.unfreeze()  # whatever an earlier test froze: only this start counts
    assert gc.get_freeze_count() == 0
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path)}})
    try:
        async with build_app(settings, serve=False) as app:
            assert gc.get_freeze_count() > 0
            assert gc.is_tracked(app) and not _collected(app)
            later: dict[str, object] = {"made": [app]}  # after start-up: collected as before
            assert _collected(later)
    finally:
        gc.unfreeze()
