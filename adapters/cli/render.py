"""What the admin commands print with: rich consoles, tables and a progress bar.

rich is imported by the first of these calls, not with the command modules:
every command's parser is built at start (``build_parser``), and ``chat``
or ``providers`` print no table.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def out() -> Console:
    from rich.console import Console

    # Built per call (tests swap sys.stdout). Piped output gets a wide page so
    # ids are never folded: `... | grep` must find them whole.
    return Console(file=sys.stdout, width=None if sys.stdout.isatty() else 200)


def err() -> Console:
    from rich.console import Console

    return Console(file=sys.stderr, soft_wrap=True)


def table(**options: Any) -> Table:
    from rich.table import Table

    return Table(**options)


@contextmanager
def progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A bar on stderr; the context value is ``advance(done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=err(), transient=False,
    ) as bar:
        task = bar.add_task(label, total=None)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance
