"""Composition root, console part: the admin API and web console on the ``[http]`` server.

``start_console(app, ops)`` is called by ``scaleout.start`` when ``[http]``
is enabled. With the token ``[admin] token_env`` names set, it registers a
``ReplyLog`` observer and mounts ``adapters.console`` on the ops server;
without it the API and console stay off and one log line says so. The
sources read the ``App`` at request time: providers, memory and usage start
after the HTTP server.
"""

from __future__ import annotations

import logging
import os
import socket

from adapters.console import Auth, Sources, mount
from adapters.console.sources import Files
from adapters.ops.server import OpsServer
from adapters.wiring.app import App
from engine.admin.conversations import ConversationAdmin
from engine.admin.live import Connections, ProviderBoard, ReplyLog
from engine.types import Reply
from engine.usage import Price
from persistence.sql.conversations import SqlConversationStore

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Which process answered: host and pid (per-process numbers say so)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def start_console(app: App, ops: OpsServer | None) -> Sources | None:
    settings = app.settings
    token_env = settings.admin.token_env
    token = settings.secret(token_env, key="admin.token_env")
    if ops is None:
        # info, not a warning: `boternity chat` shows warnings in the terminal
        log.info("admin API and web console are off: [http] enabled = false")
        return None
    if token is None:
        log.warning("admin API and web console are off: the environment variable %s "
                    "([admin] token_env) is not set", token_env)
        return None
    prices = {n: Price(p.price_input_per_mtok, p.price_output_per_mtok)
              for n, p in settings.providers.items()}

    def cost(provider: str, reply: Reply) -> float:
        return prices.get(provider, Price()).cost(reply.usage)

    replies = ReplyLog(cost=cost)
    app.observers.append(replies)  # the conversations share this list
    shared = app.extras.get("shared_breakers")
    sources = Sources(
        worker=worker_name(),
        board=ProviderBoard(lambda: app.breakers, app.providers,
                            {n: p.kind for n, p in settings.providers.items()}, replies),
        replies=replies,
        connections=Connections(app.ready_checks),
        chains={name: tuple(bot.chain) for name, bot in settings.bots.items()},
        conversations=ConversationAdmin(SqlConversationStore(app.database), set(settings.bots)),
        files=lambda: _files(app),
        memory=lambda: app.memory_admin,
        usage=lambda: app.usage.store if app.usage is not None else None,
        shared_state=shared.read if shared is not None else None,
    )
    auth = Auth(token, ttl_s=settings.admin.session_ttl_s)
    ops.add_setup(lambda web_app: mount(web_app, sources, auth))
    app.extras["console"] = sources
    return sources


def _files(app: App) -> Files:
    # The same store the platforms use (built once, kept on app.extras).
    from adapters.wiring.people import files

    store = files(app)
    assert hasattr(store, "get")  # SqlFileStore: get + path for downloads
    return store  # type: ignore[return-value]
