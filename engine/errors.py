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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.types import Failure


class BoternityError(Exception):
    """Root of every error Boternity raises on purpose."""


class ConfigError(BoternityError):
    """The configuration is malformed; the message names file, key and problem."""


class ProviderError(BoternityError):
    """A provider did not serve a request.

    ``reason`` is a short, human sentence fit for the footer ("rate limited").
    Subclasses set ``failover``: whether the chain should try the next provider.
    """

    failover: bool = True
    kind: str = "error"

    def __init__(self, provider: str, reason: str) -> None:
        super().__init__(f"{provider}: {reason}")
        self.provider = provider
        self.reason = reason


class RateLimited(ProviderError):
    kind = "rate_limited"

    def __init__(self, provider: str, reason: str = "rate limited",
                 retry_after: float | None = None) -> None:
        super().__init__(provider, reason)
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
