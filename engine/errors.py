"""Boternity's error tree: one root, shallow branches.

Every SDK error is mapped to one of these at the edge where it happens
(``raise ... from exc``), so callers decide with an ``isinstance`` check::

    BoternityError
    ├── ConfigError                 malformed or inconsistent configuration
    ├── ProviderError               an LLM provider did not serve (has .provider)
    │   ├── RateLimited             429; .retry_after seconds if the peer said
    │   ├── Unavailable             5xx, refused or dropped connection, bad stream
    │   ├── ProviderTimeout         connect, first-token, idle or overall timeout
    │   ├── AuthFailed              401/403: a wrong or missing key (logged loudly)
    │   ├── ContextTooLong          the request does not fit this provider's window
    │   ├── InvalidRequest          the user's request is invalid: NOT failed over
    │   └── AllProvidersFailed      the whole chain failed; .failures says why
    │       └── NoProviderFits      ...because the request fits no provider's window
    │                               (also a ContextTooLong)
    ├── StorageError                relational, vector or file storage failed
    │   ├── TamperDetected          a stored row fails its integrity check
    │   ├── EmbeddingMismatch       a table was written with another model
    │   └── FileRejected            an attachment was refused (size, name, type)
    ├── PermissionDenied            a non-admin tried an admin command
    ├── AdminError                  an admin operation was asked something impossible
    └── StartupError                a port or peer needed at start is not available

Messages never contain secrets: a key is never formatted into an error.
What a peer said (a provider's error body) goes into ``ProviderError.detail``
only through ``scrub``; ``reason`` is our own short phrase, fit for anyone.
``KEY_SHAPES`` are the shapes of keys and tokens, which the log redacts too
(``adapters/ops/logs.py``); ``scrub`` also drops what only a peer's text
holds: internal URLs, AWS ARNs and account numbers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.types import Failure


# Keys and tokens by shape. A ``(?P<keep>...)`` prefix, where present, is kept.
KEY_SHAPES: tuple[str, ...] = (
    r"\b(?:sk|key|rk|pk)-[A-Za-z0-9_*-]{12,}",               # OpenAI-style keys, sk-proj-, sk-ant-
    r"\bxox[abposr]-[A-Za-z0-9-]{8,}",                       # Slack bot/user tokens
    r"\bxapp-[A-Za-z0-9-]{8,}",                              # Slack app-level tokens
    r"\b\d{6,12}:[A-Za-z0-9_-]{30,}",                        # Telegram bot tokens
    r"\b(?:AKIA|ASIA|AROA|AIDA|AGPA|ANPA|ANVA|AIPA)[0-9A-Z]{16}\b",  # AWS key / role ids
    r"\b(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",  # GitHub tokens
    r"\bglpat-[A-Za-z0-9_-]{16,}",                           # GitLab tokens
    r"\bAIza[0-9A-Za-z_-]{30,}",                             # Google API keys
    r"\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}",  # JWTs
    r"(?<=[Bb][Ee][Aa][Rr][Ee][Rr] )[A-Za-z0-9._~+/=-]{8,}",  # Authorization: Bearer ...
    r"(?<=://)[^/\s:@]*:[^/\s@]+(?=@)",                      # user:password@ in URLs
    # key=value / "key": "value" / Key: value, for names that say secret
    r"(?P<keep>(?i:\b[\w-]*(?:api[_-]?key|apikey|access[_-]?key|secret|token|password|passwd"
    r"|credentials?|signature)(?:[_-][\w-]*)?)(?<!_env)\b[\"']?\s*[:=]\s*[\"']?)"
    r"(?:[^\s\"',;&}]*[A-Za-z][^\s\"',;&}]*|\d{8,})",  # a count ("tokens: 4096") is no secret
)
# What only a peer's text may hold: internal addresses, ARNs, account numbers.
_PEER_SHAPES: tuple[str, ...] = (
    r"\b[a-z][a-z0-9+.-]*://(?:[^/\s\"'<>]*@)?(?:localhost|127\.\d+\.\d+\.\d+|10\.\d+\.\d+\.\d+"
    r"|192\.168\.\d+\.\d+|172\.(?:1[6-9]|2\d|3[01])\.\d+\.\d+|169\.254\.\d+\.\d+"
    r"|[\w.-]+\.(?:internal|local|lan|corp|intra|intranet|private|home\.arpa))\b[^\s\"'<>)]*",
    r"\barn:aws[\w-]*:[^\s\"'<>]+",                          # AWS ARNs (they hold the account)
    r"\b\d{12}\b",                                          # AWS account numbers
)
SCRUBBED = "[redacted]"
_SCRUB = re.compile("|".join(f"(?:{p})" for p in (*_PEER_SHAPES, *KEY_SHAPES)))
DETAIL_LIMIT = 300


def scrub(text: str, *, limit: int = DETAIL_LIMIT) -> str:
    """A peer's text (an error body) with keys, tokens, internal URLs, ARNs and
    account numbers replaced by ``[redacted]``, cut to ``limit`` characters."""
    cleaned = _SCRUB.sub(lambda m: (m.group("keep") or "") + SCRUBBED, text)
    return cleaned[:limit]


class BoternityError(Exception):
    """Root of every error Boternity raises on purpose."""


class ConfigError(BoternityError):
    """The configuration is malformed; the message names file, key and problem."""


class ProviderError(BoternityError):
    """A provider did not serve a request.

    ``reason`` is a short, human sentence fit for the footer ("rate limited"),
    never the peer's words; ``detail`` is what the peer said, scrubbed, for
    the log and admins only. Subclasses set ``failover``: whether the chain
    should try the next provider.
    """

    failover: bool = True
    kind: str = "error"

    def __init__(self, provider: str, reason: str, *, detail: str = "") -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason
        self.detail = scrub(detail)


class RateLimited(ProviderError):
    kind = "rate_limited"

    def __init__(self, provider: str, reason: str = "rate limited",
                 retry_after: float | None = None, *, detail: str = "") -> None:
        super().__init__(provider, reason, detail=detail)
        self.retry_after = retry_after


class Unavailable(ProviderError):
    kind = "unavailable"


class ProviderTimeout(ProviderError):
    kind = "timeout"


class AuthFailed(ProviderError):
    kind = "auth"


class ContextTooLong(ProviderError):
    kind = "context_too_long"


class InvalidRequest(ProviderError):
    """The request itself is wrong (bad parameters, content refused): no failover."""

    failover = False
    kind = "invalid_request"


class AllProvidersFailed(ProviderError):
    kind = "all_failed"
    failover = False

    def __init__(self, failures: Sequence[Failure]) -> None:
        detail = "; ".join(f"{f.provider}: {f.reason}" for f in failures) or "no provider"
        super().__init__("chain", f"every provider failed ({detail})")
        self.failures = tuple(failures)


class NoProviderFits(AllProvidersFailed, ContextTooLong):
    """No provider in the chain has a context window large enough for the request."""

    kind = "context_too_long"
    failover = False


class StorageError(BoternityError):
    """Relational, vector or file storage failed."""


class TamperDetected(StorageError):
    """A stored row does not match its integrity hash, or a chained row is missing."""


class EmbeddingMismatch(StorageError):
    """A vector table was written with another embedding model or dimension."""


class FileRejected(StorageError):
    """An attachment was refused; the message is safe to show to the user."""


class PermissionDenied(BoternityError):
    """The caller may not run this admin command."""


class AdminError(BoternityError):
    """An admin operation was asked something impossible (unknown bot, missing fact)."""


class StartupError(BoternityError):
    """Something needed to start is not available (a port in use, a platform
    unreachable); the message names it and what to do, in one line."""
