"""Composition root, people part: the file store, forgetting a person, retention.

``files(app)`` is the one ``FileStore`` of a process (platforms store
attachments in it; erasure frees its bytes). ``people(app)`` is the
``PeopleAdmin`` behind ``/forget me`` and ``boternity user ...``;
``retention(app)`` the ``Retention`` behind ``boternity purge`` and
``boternity bot delete``; ``background_runners(app)`` the purge loop that
``boternity run`` starts when a bot sets ``history_days`` or ``memory_days``
(each purge logged and counted in ``boternity_purged``).

Forgetting a person reaches the shared memory through ``forget_user`` (a
tombstoned deletion: the hash chain still verifies).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from adapters.wiring.app import App, Runner
from engine.admin.people import PeopleAdmin
from engine.admin.retention import Retention, Rule, has_rules
from engine.ports import FileStore
from persistence.sql.erasure import SqlErasure
from persistence.sql.files import SqlFileStore

log = logging.getLogger(__name__)


def _shared(app: App, key: str, make: Callable[[], Any]) -> Any:
    if key not in app.extras:
        app.extras[key] = make()
    return app.extras[key]


def _file_store(app: App) -> SqlFileStore:
    storage = app.settings.storage
    store: SqlFileStore = _shared(app, "files", lambda: SqlFileStore(
        app.database, storage.data_dir, max_file_bytes=storage.max_file_bytes,
        max_bot_bytes=storage.max_bot_bytes))
    return store


def files(app: App) -> FileStore:
    return _file_store(app)


def _erasure(app: App) -> SqlErasure:
    found: SqlErasure = _shared(app, "erasure",
                                lambda: SqlErasure(app.database, _file_store(app)))
    return found


def people(app: App) -> PeopleAdmin:
    """The one person-data service (chat commands, CLI, admin API)."""
    def make() -> PeopleAdmin:
        admin = getattr(app, "memory_admin", None)  # a partial App (tests) may lack it
        shared = admin.shared if admin is not None else None
        return PeopleAdmin(
            bots=list(app.settings.bots), records=_erasure(app),
            memory=admin.store if admin is not None else None, shared=shared,
            shared_facts=(lambda bot, user: admin.shared_list(bot, user=user, limit=10_000))
            if admin is not None and admin.shared is not None else None)

    found: PeopleAdmin = _shared(app, "people", make)
    return found


def retention(app: App) -> Retention:
    def make() -> Retention:
        admin = getattr(app, "memory_admin", None)  # a partial App (tests) may lack it
        return Retention(
            rules={n: Rule(b.history_days, b.memory_days) for n, b in app.settings.bots.items()},
            records=_erasure(app),
            memory=admin.store if admin is not None else None,
            recall_log=admin.recall_log if admin is not None else None,
            shared=admin.shared if admin is not None else None,
        )

    found: Retention = _shared(app, "retention", make)
    return found


def background_runners(app: App) -> list[tuple[str, Runner]]:
    """The retention purge loop, when any bot keeps something for a limited time."""
    keeper = retention(app)
    if not has_rules(keeper.rules):
        return []

    def purged(done: dict[str, dict[str, int]]) -> None:
        for bot, counts in done.items():
            log.info("retention: bot %s purged %s", bot,
                     ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())))
        if app.metrics is not None:
            app.metrics.count_purged(done)

    async def run() -> None:
        await keeper.run(on_purged=purged)

    return [("retention", run)]
