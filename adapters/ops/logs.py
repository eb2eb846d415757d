"""Structured logs: text or JSON lines, with who-it-is-about, and never a secret.

``configure_logging(level=..., json_format=..., secrets=...)`` installs one
handler on the root logger (called once by the CLI; calling again replaces
it). Every line, from our code or a library's, gets:

- the fields bound with ``engine.log_context.bind`` (bot, platform, chat,
  provider): ``[bot=helper platform=telegram chat=42]`` in text, keys in JSON;
- redaction of the FINAL line (message, arguments and traceback alike):
  every configured secret value, plus the shapes of keys we know
  (``engine.errors.KEY_SHAPES``: OpenAI ``sk-``, Slack ``xox*-``/``xapp-``,
  Telegram bot tokens, AWS key ids, GitHub/GitLab/Google tokens, JWTs,
  ``Bearer`` headers, passwords in URLs, the value of ``api_key=``,
  ``"token": ...``, ``password: ...``) become ``***``. Redacting the
  formatted line, not the record, is the point: a library that formats a
  token into a URL or an exception text is caught too.

Named ``logs`` rather than ``logging`` so it never shadows the stdlib module.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import IO, Any

from engine import log_context
from engine.errors import KEY_SHAPES

MASK = "***"
_MIN_SECRET_LEN = 6  # shorter values would mask ordinary words


class Redactor:
    """Replaces secret values and known key shapes with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        literal = sorted({s for s in secrets if s and len(s) >= _MIN_SECRET_LEN},
                         key=len, reverse=True)
        parts = [re.escape(s) for s in literal] + list(KEY_SHAPES)
        self._pattern = re.compile("|".join(f"(?:{p})" for p in parts))

    def __call__(self, text: str) -> str:
        # A ``keep`` group (the "api_key=" of "api_key=VALUE") stays readable.
        return self._pattern.sub(lambda m: (m.group("keep") or "") + MASK, text)


class _ContextFormatter(logging.Formatter):
    def __init__(self, redact: Redactor, *, json_format: bool) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s%(context)s: %(message)s")
        self._redact = redact
        self._json = json_format

    def format(self, record: logging.LogRecord) -> str:
        fields = log_context.current()
        if self._json:
            line = self._json_line(record, fields)
        else:
            record.context = (
                " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]" if fields else ""
            )
            line = super().format(record)
        return self._redact(line)

    def _json_line(self, record: logging.LogRecord, fields: dict[str, str]) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in log_context.FIELDS:
            entry[name] = fields.get(name)
        entry.update({k: v for k, v in fields.items() if k not in entry})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


_installed: logging.Handler | None = None


def configure_logging(
    *,
    level: str = "INFO",
    json_format: bool = False,
    secrets: Iterable[str] = (),
    stream: IO[str] | None = None,
) -> logging.Handler:
    """Install the one root handler (replacing a previous one of ours)."""
    global _installed
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_ContextFormatter(Redactor(secrets), json_format=json_format))
    root.addHandler(handler)
    root.setLevel(level)
    _installed = handler
    return handler
