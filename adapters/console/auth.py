"""Who may use the admin API and the web console.

- The API (``/api/v1/...``) wants ``Authorization: Bearer <token>``; the
  token is compared in constant time (``hmac.compare_digest``) and never
  logged. A browser cannot attach that header cross-site, so Bearer calls
  need no CSRF token.
- The console logs in with the same token and then holds a session: a
  random id in a cookie (HttpOnly, SameSite=Strict, Secure when the request
  came over HTTPS, directly or through a proxy saying ``X-Forwarded-Proto:
  https``), kept in this process's memory for ``ttl_s``. Every change the
  console makes (a POST) must carry the session's CSRF token (form field
  ``csrf`` or header ``X-CSRF-Token``) and, when the browser sends one, an
  ``Origin`` equal to the page's own.
- Anything else gets 401 (API) or the login page (console), with no data.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiohttp import web
from pydantic import SecretStr

COOKIE = "boternity_session"
CSRF_FIELD = "csrf"
CSRF_HEADER = "X-CSRF-Token"


@dataclass
class Session:
    id: str
    csrf: str
    expires: float  # time.monotonic()


class Auth:
    """The admin token and the console's sessions (see module docstring)."""

    def __init__(self, token: SecretStr, *, ttl_s: float = 12 * 3600,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._token = token.get_secret_value().encode()
        self.ttl_s = ttl_s
        self._clock = clock
        self._sessions: dict[str, Session] = {}

    def token_ok(self, given: str) -> bool:
        return bool(given) and hmac.compare_digest(given.encode(), self._token)

    def bearer_ok(self, request: web.Request) -> bool:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and self.token_ok(given.strip())

    # --- sessions -----------------------------------------------------------
    def login(self, response: web.StreamResponse, request: web.Request) -> Session:
        now = self._clock()
        for key in [k for k, s in self._sessions.items() if s.expires <= now]:
            del self._sessions[key]  # drop expired ones on the way
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now + self.ttl_s)
        self._sessions[session.id] = session
        response.set_cookie(COOKIE, session.id, httponly=True, samesite="Strict",
                            secure=is_https(request), path="/", max_age=int(self.ttl_s))
        return session

    def logout(self, request: web.Request, response: web.StreamResponse) -> None:
        self._sessions.pop(request.cookies.get(COOKIE, ""), None)
        response.del_cookie(COOKIE, path="/")

    def session(self, request: web.Request) -> Session | None:
        found = self._sessions.get(request.cookies.get(COOKIE, ""))
        if found is None:
            return None
        if found.expires <= self._clock():
            del self._sessions[found.id]
            return None
        return found

    async def change_ok(self, request: web.Request, session: Session) -> bool:
        """A console POST: same origin (when told) and the session's CSRF token."""
        origin = request.headers.get("Origin")
        if origin is not None and origin != own_origin(request):
            return False
        given = request.headers.get(CSRF_HEADER, "")
        if not given and request.content_type in ("application/x-www-form-urlencoded",
                                                  "multipart/form-data"):
            given = str((await request.post()).get(CSRF_FIELD, ""))
        return bool(given) and hmac.compare_digest(given.encode(), session.csrf.encode())


def is_https(request: web.Request) -> bool:
    return request.secure or request.headers.get("X-Forwarded-Proto", "").lower() == "https"


def own_origin(request: web.Request) -> str:
    scheme = "https" if is_https(request) else "http"
    host = request.headers.get("X-Forwarded-Host") or request.host
    return f"{scheme}://{host}"
