"""Where the CLI writes: colour and progress bars on a terminal, plain text in a pipe.

A line is a sequence of parts, each a string or a ``(text, style)`` pair; on a terminal the
styled parts are coloured (rich styles such as ``"green"``), in a pipe or a log they print as
plain text. Text from files (key names, paths) is never parsed as rich markup.

Every command writes through :func:`printable_output`: a string from a file (an hparam, a key,
a stamp field) reaches the terminal with its control characters and lone surrogates escaped
as ``repr`` writes them, so ``"\\x1b[2J"`` cannot clear the screen and ``"\\ud800"`` cannot
crash the write.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
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


#: What a terminal acts on instead of showing (C0 controls but newline and tab, DEL, C1
#: controls) and what no encoding writes (lone surrogates).
_UNPRINTABLE = re.compile("[\\x00-\\x08\\x0b-\\x1f\\x7f-\\x9f\\ud800-\\udfff]")


def printable(text: str) -> str:
    """``text`` with control characters and lone surrogates escaped as ``repr`` escapes them.

    >>> printable("a\\x1b[2Jb\\r\\x07\\ud800 \\t")
    'a\\\\x1b[2Jb\\\\r\\\\x07\\\\ud800 \\t'
    """
    return _UNPRINTABLE.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    return match.group().encode("unicode_escape").decode("ascii")


class PrintableStream:
    """A text stream that writes through :func:`printable`; everything else is ``raw``'s."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw

    def write(self, text: str) -> int:
        text = printable(text)
        try:
            return int(self.raw.write(text))
        except UnicodeEncodeError:  # a stream in ASCII or Latin-1: say the rest in escapes
            encoding = getattr(self.raw, "encoding", None) or "ascii"
            return int(self.raw.write(text.encode(encoding, "backslashreplace").decode(encoding)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.raw, name)


@contextlib.contextmanager
def printable_output() -> Iterator[None]:
    """``sys.stdout`` and ``sys.stderr`` as :class:`PrintableStream` for the block: the one
    place every command's lines go through (``print``, :class:`Output`, rich consoles)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(sys.stdout), PrintableStream(sys.stderr)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


def console(stream: Any = None) -> Any:
    """A rich console on ``stream`` (default stdout) that does not guess highlights.

    On a :class:`PrintableStream` it writes to the stream beneath and escapes the text of
    what it renders instead, so its own colour codes pass.
    """
    from rich.console import Console

    stream = stream or sys.stdout
    if not isinstance(stream, PrintableStream):
        return Console(file=stream, highlight=False)
    made = Console(file=stream.raw, highlight=False)
    made.push_render_hook(_PrintableHook())
    return made


class _PrintableHook:
    """A rich render hook: every renderable printed is shown through :func:`printable`."""

    def process_renderables(self, renderables: list[Any]) -> list[Any]:
        return [_PrintableRenderable(r) for r in renderables]


class _PrintableRenderable:
    def __init__(self, renderable: Any) -> None:
        self.renderable = renderable

    def __rich_console__(self, console: Any, options: Any) -> Iterable[Any]:
        from rich.segment import Segment

        for segment in console.render(self.renderable, options):
            if segment.control:  # cursor moves of a progress bar: rich's own
                yield segment
            else:
                yield Segment(printable(segment.text), segment.style)

    def __rich_measure__(self, console: Any, options: Any) -> Any:
        from rich.measure import Measurement

        return Measurement.get(console, options, self.renderable)


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
