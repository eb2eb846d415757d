"""Composition root, scale-out part: Redis-shared state, metrics, ops endpoint.

Called once by ``build_app`` (``await scaleout.start(stack, app)``)
right after the ``App`` exists and before any provider or breaker is made.
Like the rest of ``adapters/wiring/`` it may import ``persistence``: it is
the same composition root, split so each file stays small.

- With ``[storage] redis_url`` set: breakers share their state
  (``SharedBreakers``), platforms get ``app.budget`` (shared per-chat
  pacing), ``app.dedupe`` (shared event claims) and ``app.inflight``
  (replies in flight: a worker killed mid-reply has its messages taken over,
  and ``app.messages`` commits a taken-over user message only once),
  the shared-memory writers take a Redis lock, and a Redis ping joins the
  readiness checks. Without it, every field stays None and platforms use
  their in-process defaults: one worker, nothing else to run; the
  shared-memory writers of processes on this machine take a file lock.
- Always: a database readiness check. When serving (``serve=True``,
  ``boternity run``): ``app.metrics`` (a ``ReplyMetrics`` observer is
  registered; breaker states are read at scrape time).
- With ``[http] enabled = true``: the ops server (``/healthz``, ``/readyz``,
  ``/metrics``) on ``[http] host``/``port``; its checks are
  ``app.ready_checks``, a dict platforms add their connection checks to.
  One-shot commands (``serve=False``) never start it: a second process
  beside the running service must not take (or fail on) its port.

Redis, aiohttp and prometheus are imported only when configured: commands
and configurations without them start faster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from adapters.wiring.app import App, imported
from adapters.wiring.settings import Settings
from engine.errors import StorageError
from engine.providers.fallback import Breakers

if TYPE_CHECKING:
    from adapters.ops.server import Check
    from persistence.redis.breakers import SharedBreakers

    # Types only: importing it loads lancedb and pyarrow (seconds), which
    # commands without memory (`providers`, `usage`) never need.
    from persistence.vectors.memory import LanceMemoryStore

# LanceDB's object-store client reads only the process environment; these may
# sit in .env, which Settings.env holds: hand them over explicitly.
_S3_FROM_ENV = (
    ("aws_access_key_id", "AWS_ACCESS_KEY_ID"),
    ("aws_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
    ("aws_session_token", "AWS_SESSION_TOKEN"),
    ("aws_region", "AWS_REGION"),
    ("aws_endpoint", "AWS_ENDPOINT_URL"),
)


def memory_storage_options(settings: Settings) -> dict[str, str] | None:
    """LanceDB storage options: ``[storage] memory_storage_options`` plus, for
    an ``s3://`` memory_uri, the standard AWS variables from the environment
    or .env for any option not set there. None when there are none."""
    storage = settings.storage
    options = dict(storage.memory_storage_options)
    if storage.resolved_memory_uri().startswith("s3://"):
        for option, variable in _S3_FROM_ENV:
            if option not in options and settings.env.get(variable):
                options[option] = settings.env[variable]
    return options or None


LockFactory = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


def writer_lock(app: App, name: str) -> LockFactory:
    """A cross-worker lock factory: Redis when configured, else a file lock under
    ``data_dir`` (several processes on one machine: `boternity run` and a CLI
    command, or two CLI commands, must not fork the shared memory's chain)."""
    redis = app.redis
    if redis is not None:
        return lambda: redis.lock(name)
    data_dir = app.settings.storage.data_dir
    data_dir.mkdir(parents=True, exist_ok=True)
    path = str(data_dir / f"{name}.lock")

    def file_lock() -> contextlib.AbstractAsyncContextManager[Any]:
        # Imported at the first lock (memory opening, in a worker thread, imports
        # it first: adapters/wiring/memory.py), not by every command at start.
        from filelock import AsyncFileLock

        return AsyncFileLock(path)

    return file_lock


def lancedb_check(store: LanceMemoryStore) -> Check:
    async def check() -> bool:
        await store.bots()  # lists the tables: the store answers
        return True

    return check


async def start(stack: AsyncExitStack, app: App, *, serve: bool = True) -> None:
    """Start the scale-out and ops pieces the settings ask for (see module docstring)."""
    settings = app.settings
    storage = settings.storage
    app.ready_checks["database"] = app.database.ping

    if storage.redis_url:
        await imported("redis.asyncio")  # imports take time: off the loop, then from there
        from redis.exceptions import RedisError

        try:
            await _start_redis(stack, app, storage.redis_url)
        except (RedisError, OSError) as exc:
            raise _unreachable(storage.redis_url, exc) from exc

    if not serve:
        return  # a one-shot command beside the service must not take (or fail on) its port
    await imported("adapters.ops.metrics")  # prometheus_client
    from adapters.ops.metrics import Metrics, ReplyMetrics

    metrics = app.metrics = Metrics()
    app.observers.append(ReplyMetrics(metrics))
    metrics.watch_breakers(lambda: {name: app.breakers.state(name) for name in app.providers})
    ops = None
    if settings.http.enabled:
        await imported("adapters.ops.server")  # aiohttp
        from adapters.ops.server import OpsServer

        ops = OpsServer(metrics, host=settings.http.host, port=settings.http.port)
    await imported("adapters.wiring.console")  # aiohttp, jinja2: only when serving
    from adapters.wiring.console import start_console

    start_console(app, ops)  # the admin API and console, when a token is set
    if ops is not None:
        ops.checks = app.ready_checks  # the same dict: checks added later count too
        await stack.enter_async_context(ops)
        app.ops = ops


def _unreachable(url: str, exc: BaseException) -> StorageError:
    from sqlalchemy import make_url  # parses the URL to hide its password

    safe = make_url(url).render_as_string(hide_password=True) if "://" in url \
        else "(unparsable url)"
    return StorageError(f"redis {safe}: cannot connect ({type(exc).__name__}); "
                        "check [storage] redis_url")


async def shared_breakers(stack: AsyncExitStack, settings: Settings) -> tuple[SharedBreakers,
                                                                             Breakers]:
    """Breakers whose state every worker shares through Redis (``[storage] redis_url``).

    Started alone by ``boternity providers``; ``start`` starts them with the
    rest of the Redis-shared state.
    """
    url = settings.storage.redis_url
    assert url is not None
    await imported("persistence.redis.breakers")  # redis, pybreaker: off the loop
    from redis.exceptions import RedisError

    from persistence.redis.breakers import SharedBreakers

    try:
        shared = await stack.enter_async_context(
            SharedBreakers(url, namespace=settings.storage.redis_namespace))
    except (RedisError, OSError) as exc:
        raise _unreachable(url, exc) from exc
    return shared, Breakers(fail_max=settings.chain.fail_max,
                            reset_timeout_s=settings.chain.reset_timeout_s,
                            storage=shared.storage)


async def _start_redis(stack: AsyncExitStack, app: App, url: str) -> None:
    await imported("persistence.redis.state")
    from persistence.redis.inflight import OnceStore, RedisInflight
    from persistence.redis.state import RedisState

    settings, storage = app.settings, app.settings.storage
    namespace = storage.redis_namespace
    shared, breakers = await shared_breakers(stack, settings)
    app.extras["shared_breakers"] = shared
    app.breakers = breakers  # replaces the in-process breakers before any breaker exists
    redis = await stack.enter_async_context(
        RedisState(url, namespace=namespace, lease_s=storage.redis_lease_s))
    app.redis = redis
    app.budget = redis.budget
    app.dedupe = redis.claims
    inflight = await stack.enter_async_context(
        RedisInflight(url, namespace=namespace, lease_s=storage.redis_lease_s))
    app.inflight = inflight
    app.messages = OnceStore(app.messages, inflight)
    app.ready_checks["redis"] = redis.ping
