"""Where the CLI writes: colour and progress bars on a terminal, plain text in a pipe.

A line is a sequence of parts, each a string or a ``(text, style)`` pair; on a terminal the
styled parts are coloured (rich styles such as ``"green"``), in a pipe or a log they print as
plain text. Text from files (key names, paths) is never parsed as rich markup.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

Part = str | tuple[str, str]
Line = Sequence[Part]

#: the style of each verdict word the commands print
VERDICT_STYLES = {
    "ok": "bold green",
    "current": "green",
    "up to date": "green",
    "fail": "bold red",
    "error": "red",
    "behind": "yellow",
    "breaking": "bold yellow",
    "downgrade": "magenta",
    "dry run": "dim",
    "note": "dim",
}


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console(stream: Any = None) -> Any:
    """A rich console on ``stream`` (default stdout) that does not guess highlights."""
    from rich.console import Console

    return Console(file=stream or sys.stdout, highlight=False)


def styled(text: str, kind: str) -> tuple[str, str]:
    """A part styled as the verdict ``kind`` (a key of :data:`VERDICT_STYLES`)."""
    return text, VERDICT_STYLES[kind]


class Output:
    """Writes lines to stdout: coloured on a terminal, plain when piped."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stdout
        self.coloured = is_terminal(self.stream)
        self._console = console(self.stream) if self.coloured else None

    def line(self, *parts: Part) -> None:
        if self._console is None:
            print("".join(p if isinstance(p, str) else p[0] for p in parts), file=self.stream)
            return
        from rich.text import Text

        self._console.print(Text.assemble(*parts), soft_wrap=True)


@contextlib.contextmanager
def progress_bar(description: str) -> Iterator[Callable[..., None] | None]:
    """A bar on stderr when it is a terminal (done/total, time left); ``None`` when piped.

    >>> with progress_bar("scanning") as progress:
    ...     scan(root, schemas, progress=progress)
    """
    if not is_terminal(sys.stderr):
        yield None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("left"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console(sys.stderr), transient=True) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int, *_: Any) -> None:
            bar.update(task, completed=done, total=total)

        yield update
