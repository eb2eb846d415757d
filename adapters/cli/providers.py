"""``boternity providers``: the live state of the running service's providers.

Where the truth is, in order:
1. ``[http]`` enabled and the admin token set: ask the running service's
   admin API (``GET /api/v1/providers``) and print what it says, naming the
   worker that answered;
2. else, with ``[storage] redis_url``: the breaker states every worker
   shares in Redis, read and awaited before printing;
3. else: this process's own fresh breakers, and a line saying so plainly
   (a separate process cannot see the service's in-memory breakers).
When the API is configured but does not answer (the service is not
running), the command says so and falls back to 2 or 3.

It starts only what it shows: no database, no memory, no provider SDK
(``adapters.wiring.providers.provider_view``); aiohttp only to ask the API,
Redis only when configured.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from adapters.wiring.app import imported

if TYPE_CHECKING:
    from adapters.wiring.settings import Settings

API_TIMEOUT_S = 5.0


async def ask_service(settings: Settings) -> tuple[str, list[dict[str, Any]]] | str:
    """(worker, rows) from the running service, or why it could not be asked."""
    aiohttp = await imported("aiohttp")  # only when asking; 0.3-0.5 s: not on the loop

    token = settings.secret(settings.admin.token_env, key="admin.token_env")
    host = settings.http.host
    host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host  # noqa: S104 (a wildcard bind)
    url = f"http://{host}:{settings.http.port}/api/v1/providers"
    assert token is not None
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S)) \
                as http, http.get(url, headers={
                    "Authorization": f"Bearer {token.get_secret_value()}"}) as response:
            if response.status == 401:
                return f"the service at {url} refused the admin token"
            if response.status != 200:
                return f"the service at {url} answered HTTP {response.status}"
            body = await response.json()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"no service answered at {url} ({type(exc).__name__})"
    return str(body.get("worker", "?")), list(body.get("providers", []))


def _print(rows: list[dict[str, Any]]) -> None:
    width = max((len(r["name"]) for r in rows), default=8)
    for r in rows:
        line = (f"{r['name']:<{width}}  {r.get('kind', ''):<19} {r.get('model', ''):<28} "
                f"breaker: {r['state']}")
        if r.get("label"):
            line += f"  ({r['label']})"
        if r.get("last_error"):
            line += f"  (last error: {r['last_error']})"
        print(line)


async def cmd_providers(args: argparse.Namespace, settings: Settings) -> int:
    from adapters.wiring.providers import provider_view

    token = settings.secret(settings.admin.token_env, key="admin.token_env")
    if settings.http.enabled and token is not None:
        answer = await ask_service(settings)
        if not isinstance(answer, str):
            worker, rows = answer
            print(f"live state of the running service (worker {worker}):")
            _print(rows)
            return 0
        print(f"{answer}; showing ", end="")
    async with provider_view(settings) as view:
        if view.shared:
            print("the breaker states shared in Redis (last errors are per worker):")
        else:
            print("THIS process only (not the running service: enable [http] and set the "
                  f"admin token {settings.admin.token_env}, or share state with Redis):")
        rows = []
        for name, p in settings.providers.items():
            provider = view.providers.get(name)
            record = view.breakers.record(name) if provider is not None else None
            rows.append({
                "name": name, "kind": p.kind,
                "model": provider.model if provider is not None else (p.model or "-"),
                "state": view.breakers.state(name) if provider is not None
                else "not in any chain",
                "last_error": record.last_error if record is not None else None,
                "label": getattr(provider, "label", "") if provider is not None else ""})
    if not rows:
        print("no providers configured")
    _print(rows)
    return 0
