"""``ckptmigrate`` and a project's ``pytest`` run as real processes, and how to read them."""

from __future__ import annotations

import os
import pty
import resource
import select
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path


def run(
    cwd: Path | None,
    *args: str,
    timeout: float | None = None,
    address_space: int | None = None,
    **env: str,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ckptmigrate ARGS`` in ``cwd`` (away from the repo's pyproject), with
    ``env`` over the environment; ``address_space``: its RLIMIT_AS in bytes (a reader that
    tries to read gigabytes fails there instead of taking the machine's memory)."""

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (address_space, address_space))

    return subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=timeout,
        preexec_fn=None if address_space is None else limit,
    )


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The one ``ckptmigrate: error:`` line of a run that exited 2, without a traceback."""
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("ckptmigrate: error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def run_on_terminal(cwd: Path, *args: str) -> tuple[int, str]:
    """Run ``python -m ckptmigrate ARGS`` with stdout and stderr on a pseudo-terminal."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    env.update(TERM="xterm-256color", COLUMNS="160")
    proc = subprocess.Popen(
        [sys.executable, "-m", "ckptmigrate", *args],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        cwd=cwd,
        env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        ready, _, _ = select.select([master], [], [], 0.1)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    proc.wait(timeout=120)
    os.close(master)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


# -v for per-test lines; no cache folder in the project; hypothesis' plugin only costs start-up
QUIET_RUN = ["-v", "-p", "no:cacheprovider", "-p", "no:hypothesispytest"]


def run_pytest(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m pytest ARGS`` in a project, with this package's plugin loaded."""
    plugin_args: list[str] = []
    if not any(ep.value == "ckptmigrate.pytest_plugin" for ep in entry_points(group="pytest11")):
        plugin_args = ["-p", "ckptmigrate.pytest_plugin"]  # not installed: load it by name
    command = [sys.executable, "-m", "pytest", *QUIET_RUN, *plugin_args, *args]
    return subprocess.run(command, capture_output=True, text=True, cwd=cwd)


def summary(done: subprocess.CompletedProcess[str]) -> str:
    """pytest's last ``=`` line (``2 passed in …``), or all it said when there is none."""
    lines = [line for line in done.stdout.splitlines() if line.startswith("=")]
    return lines[-1] if lines else done.stdout + done.stderr
