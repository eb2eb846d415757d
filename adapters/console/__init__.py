"""The admin API (``/api/v1/``) and the web console (``/``), served by the ``[http]`` server.

``mount(app, sources, auth)`` adds both to an aiohttp application; the
composition root (``adapters/wiring/console.py``) builds ``Sources`` and
``Auth`` from settings and calls it through ``OpsServer.add_setup``.
"""

from __future__ import annotations

from aiohttp import web

from adapters.console.api import Api
from adapters.console.auth import Auth
from adapters.console.pages import Pages
from adapters.console.sources import Sources

__all__ = ["Auth", "Sources", "mount"]


def mount(app: web.Application, sources: Sources, auth: Auth) -> None:
    Api(sources, auth).routes(app)
    Pages(sources, auth).routes(app)
