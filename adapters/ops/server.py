"""The operations endpoint of one worker: ``/healthz``, ``/readyz``, ``/metrics``.

``OpsServer(metrics, checks, host=..., port=...)`` is an async context
manager running a small aiohttp server (port 0 picks a free port; read
``.port``):

- ``/healthz``: 200 while the process serves HTTP at all (liveness);
- ``/readyz``: runs every readiness check concurrently, each bounded by
  ``check_timeout_s``; 200 when all pass, else 503. The JSON body names each
  check and ``ok`` or the exception TYPE only (never its text: it could hold
  a URL with a password);
- ``/metrics``: the Prometheus text format from ``Metrics.render``.

A check is ``async () -> bool`` (database ``SELECT 1``, LanceDB table list,
Redis ping, platform connected). Bind it to 127.0.0.1 unless a scraper on
another host needs it: it is unauthenticated.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from adapters.ops.metrics import Metrics
from engine.errors import StartupError

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]


class OpsServer:
    """Health, readiness and metrics over HTTP (see module docstring)."""

    def __init__(
        self,
        metrics: Metrics,
        checks: Mapping[str, Check] | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 9108,
        check_timeout_s: float = 3.0,
    ) -> None:
        self.metrics = metrics
        self.checks: dict[str, Check] = dict(checks or {})
        self.host = host
        self.port = port
        self.check_timeout_s = check_timeout_s
        self._runner: web.AppRunner | None = None
        self._setups: list[Callable[[web.Application], None]] = []

    def add_setup(self, setup: Callable[[web.Application], None]) -> None:
        """More routes on the same server (the admin console); call before entering."""
        self._setups.append(setup)

    def add_check(self, name: str, check: Check) -> None:
        self.checks[name] = check

    async def readiness(self) -> dict[str, str]:
        """Run every check; ``{name: "ok" | "failed" | "timeout" | ErrorType}``."""

        async def one(check: Check) -> str:
            try:
                async with asyncio.timeout(self.check_timeout_s):
                    return "ok" if await check() else "failed"
            except TimeoutError:
                return "timeout"
            except Exception as exc:
                return type(exc).__name__

        names = list(self.checks)
        results = await asyncio.gather(*(one(self.checks[n]) for n in names))
        return dict(zip(names, results, strict=True))

    async def _healthz(self, _request: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    async def _readyz(self, _request: web.Request) -> web.Response:
        results = await self.readiness()
        ready = all(value == "ok" for value in results.values())
        if not ready:
            log.warning("not ready: %s", {k: v for k, v in results.items() if v != "ok"})
        return web.json_response(
            {"ready": ready, "checks": results}, status=200 if ready else 503
        )

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = self.metrics.render()
        response = web.Response(body=body)
        # prometheus' content type carries a version parameter aiohttp's
        # content_type argument would reject: set the header as is.
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        for setup in self._setups:
            setup(app)
        return app

    async def __aenter__(self) -> OpsServer:
        runner = web.AppRunner(self.app(), access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except OSError as exc:  # the port is taken, or the host is not ours
            await runner.cleanup()
            raise StartupError(
                f"[http] port {self.port} on {self.host} cannot be opened (in use?): "
                f"{exc.strerror or type(exc).__name__}; choose another [http] port or stop "
                "the process using it") from exc
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        server = site._server
        if server is not None and self.port == 0:
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = int(sockets[0].getsockname()[1])
        log.info("ops endpoint on http://%s:%d (/healthz /readyz /metrics%s)", self.host,
                 self.port, " /api/v1 and the console at /" if self._setups else "")
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
