"""Argument types and the confirmation question shared by the CLI's commands.

Types raise ``argparse.ArgumentTypeError``: the parser reports a bad value
(``boternity: memory add: argument --importance: must be between 0 and 1``)
and exits 2 before anything starts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from engine.errors import AdminError


def fraction(text: str) -> float:
    """A number from 0 to 1 (``--importance``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1 (got {text})")
    return value


def at_least(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """A whole number in ``minimum..maximum`` (``--limit``, ``--offset``, ``--days``)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum or (maximum is not None and value > maximum):
            bounds = f"{minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
            raise argparse.ArgumentTypeError(f"must be {bounds} (got {text})")
        return value

    return parse


def json_object(text: str) -> dict[str, Any]:
    """A JSON object (``--metadata``)."""
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object ({...})")
    return value


def confirm(question: str) -> bool:
    """Ask on the terminal (blocking: call it in a thread); True for y/yes.

    Without a terminal there is nobody to ask: AdminError saying to pass --yes.
    """
    if not sys.stdin.isatty():
        raise AdminError("this deletes data: pass --yes to confirm (no terminal to ask on)")
    sys.stderr.write(question)
    sys.stderr.flush()
    return sys.stdin.readline().strip().lower() in ("y", "yes")
