"""The kill-point harness of the crash tests: record the crash points one run passes, pick
``EVENT:N`` kill specs among them, and run the action in a forked child killed at one.

``CKPTMIGRATE_CRASH_AT=EVENT:N`` makes ckptmigrate SIGKILL itself at the Nth EVENT
(``formats/atomic.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from ckptmigrate.formats import atomic


def events_of(action: Callable[[], object], monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Run ``action`` once, recording every crash point it passes, in order."""
    seen: list[str] = []
    with monkeypatch.context() as m:
        m.setenv(atomic.CRASH_ENV, "record-only")  # wraps writes; kills nothing
        m.setattr(atomic, "crash_point", seen.append)
        action()
    return seen


def spec_where(
    action: Callable[[], object], monkeypatch: pytest.MonkeyPatch, holds: Callable[[], bool]
) -> str:
    """The kill spec (``EVENT:N``) of the first crash point of ``action`` at which ``holds()``
    is true (the state a kill there leaves)."""
    seen: list[str] = []
    found: list[str] = []

    def point(event: str) -> None:
        seen.append(event)
        if not found and holds():
            found.append(f"{event}:{seen.count(event)}")

    with monkeypatch.context() as m:
        m.setenv(atomic.CRASH_ENV, "record-only")
        m.setattr(atomic, "crash_point", point)
        action()
    assert found, f"no crash point of {len(seen)} reaches the state"
    return found[0]


def spread(events: list[str], count: int) -> list[str]:
    """``count`` kill specs (``EVENT:N``) spread evenly over the events (all, if fewer)."""
    if count >= len(events):
        picks = list(range(len(events)))
    else:
        picks = sorted({round(i * (len(events) - 1) / (count - 1)) for i in range(count)})
    return [f"{events[i]}:{events[: i + 1].count(events[i])}" for i in picks]


def spread_keeping_steps(events: list[str], count: int) -> list[str]:
    """``count`` kill specs (``EVENT:N``): every fsync and rename, then ``write()`` calls
    spread evenly over the rest (a swap's few moments are never skipped)."""
    steps = [i for i, e in enumerate(events) if e != "write"]
    writes = [i for i, e in enumerate(events) if e == "write"]
    room = max(0, count - len(steps))
    if room >= len(writes):
        picks = sorted(steps + writes)
    else:
        spread = {writes[round(j * (len(writes) - 1) / max(1, room - 1))] for j in range(room)}
        picks = sorted(set(steps) | spread)
    return [f"{events[i]}:{events[: i + 1].count(events[i])}" for i in picks]


def copied_afresh(originals: Path, target: Path) -> Callable[[], None]:
    """The ``reset`` of :func:`killed_runs` for a folder rewritten in place: ``target`` made
    again as a copy of ``originals`` (its parent made once)."""
    import shutil

    target.parent.mkdir(parents=True, exist_ok=True)

    def reset() -> None:
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(originals, target)

    return reset


def killed_runs(
    action: Callable[[], object],
    monkeypatch: pytest.MonkeyPatch,
    reset: Callable[[], object],
    count: int = 12,
) -> Iterator[str]:
    """Kill ``action`` at ``count`` crash points of one recorded run (every fsync and rename
    among them: :func:`spread_keeping_steps`), ``reset()`` before the recording and each
    kill; yields each spec once its child died of SIGKILL, for the caller to inspect."""
    reset()
    events = events_of(action, monkeypatch)
    for spec in spread_keeping_steps(events, count):
        reset()
        status = killed_child(spec, action, quiet=True)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, spec
        yield spec


def killed_child(spec: str, action: Callable[[], object], *, quiet: bool = False) -> int:
    """Fork; the child runs ``action`` with the crash hook armed (its output dropped when
    ``quiet``). Returns its wait status."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 3
        try:
            os.environ[atomic.CRASH_ENV] = spec
            with contextlib.ExitStack() as stack:
                if quiet:
                    devnull = stack.enter_context(open(os.devnull, "w"))
                    stack.enter_context(contextlib.redirect_stdout(devnull))
                    stack.enter_context(contextlib.redirect_stderr(devnull))
                action()
            code = 0
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child for {spec} hung")
        time.sleep(0.002)


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@contextlib.contextmanager
def live_child() -> Iterator[int]:
    """The pid of a ``sleep`` child that runs for the block (then killed and reaped)."""
    proc = subprocess.Popen(["sleep", "60"])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


#: Writers that had our pid but are not this process: a previous boot's, another container's
#: (same boot, a process started at another time), another host's.
NOT_US = {
    "another start": {"start": 1},
    "another boot": {"boot": "00000000-0000-0000-0000-000000000000"},
    "another host": {"host": "another-host"},
}


def our_pid_but(changes: dict[str, object]) -> atomic.WriterIdentity:
    """This process's writer identity with ``changes`` (see :data:`NOT_US`)."""
    return dataclasses.replace(atomic.this_writer(), **changes)  # type: ignore[arg-type]
