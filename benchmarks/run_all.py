"""Run every benchmark in this folder with one command; each appends its section to RESULTS.md.

Every ``bench_*.py`` beside this file is found and run in turn, in name order, as its own
process (a benchmark added later is picked up without touching this file). Before them, a
section heading the run goes into ``RESULTS.md``: when, the machine, Python and torch, the
file system the data lies on, the commit, and which scripts ran with which options; after
them, one line per script with its exit status and wall time. Each script measures its own
contenders interleaved and writes its ratios beside their baselines from the same run.

Generated files go under ``--data`` (default ``benchmarks/data/``, git-ignored), handed to the
scripts as ``CKPTMIGRATE_BENCH_DATA``; each keeps its files in a folder of its own there.

``--quick`` gives each script the small size it offers (``--gb 0.1``, ``--runs 2``, or its own
``--quick``, read from its ``--help``); a script that offers none is skipped and said so.

    python benchmarks/run_all.py --quick                 # everything, small: minutes
    python benchmarks/run_all.py --only speed --only diff  # bench_speed.py and bench_diff.py
    python benchmarks/run_all.py                         # everything at full size: an hour
    python benchmarks/run_all.py --list                  # what would run, with which options
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
DATA_ENV = "CKPTMIGRATE_BENCH_DATA"
#: The small run each size option gives with ``--quick``.
QUICK_OPTIONS = {"--quick": [], "--gb": ["0.1"], "--runs": ["2"]}


def discover() -> dict[str, Path]:
    """``{name: script}`` for every ``bench_NAME.py`` here, in name order."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(HERE.glob("bench_*.py"))}


def options_of(script: Path) -> set[str]:
    """The long options the script's ``--help`` lists."""
    shown = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", shown.stdout))


def quick_arguments(offered: set[str]) -> list[str] | None:
    """The arguments that make the script's run small, or None when it offers no way."""
    found = [option for option in QUICK_OPTIONS if option in offered]
    if "--quick" in found:
        found = ["--quick", *(o for o in found if o == "--runs")]
    if not found or found == ["--runs"]:  # fewer runs of a full-size benchmark is not quick
        return None
    return [part for option in found for part in (option, *QUICK_OPTIONS[option])]


def machine() -> str:
    """The CPU model, its cores and the memory."""
    cpu = platform.processor() or platform.machine()
    info = Path("/proc/cpuinfo")
    text = info.read_text() if info.exists() else ""
    names = [line for line in text.splitlines() if line.startswith("model name")]
    if names:
        cpu = names[0].split(":", 1)[1].strip()
    memory = ""
    if "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    return f"{cpu}, {os.cpu_count()} cores{memory}"


def file_system(folder: Path) -> str:
    """The file system holding ``folder``: its type and device, as ``df -T`` says."""
    rows = subprocess.run(["df", "-T", str(folder)], capture_output=True, text=True).stdout
    parts = rows.splitlines()[1].split() if len(rows.splitlines()) > 1 else []
    return f"{parts[1]} ({parts[0]}, mounted on {parts[-1]})" if len(parts) >= 7 else "unknown"


def torch_version() -> str:
    found = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.__version__)"],
        capture_output=True,
        text=True,
    )
    return found.stdout.strip() or "not installed"


def commit() -> str:
    found = subprocess.run(
        ["git", "-C", str(HERE), "log", "-1", "--format=%h %s"], capture_output=True, text=True
    )
    dirty = subprocess.run(
        ["git", "-C", str(HERE), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return found.stdout.strip()[:100] + (" (with uncommitted changes)" if dirty else "")


def append(text: str) -> None:
    with RESULTS.open("a") as f:
        f.write(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only bench_NAME.py (repeatable; NAME or bench_NAME or bench_NAME.py)",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, fewer runs")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get(DATA_ENV, HERE / "data")),
        help=f"folder for generated files (default benchmarks/data, or ${DATA_ENV})",
    )
    parser.add_argument("--list", action="store_true", help="say what would run, run nothing")
    args = parser.parse_args()

    scripts = discover()
    if args.only:
        wanted = [n.removesuffix(".py").removeprefix("bench_") for n in args.only]
        unknown = [n for n in wanted if n not in scripts]
        if unknown:
            parser.error(f"no benchmark named {', '.join(unknown)}; known: {', '.join(scripts)}")
        scripts = {n: scripts[n] for n in scripts if n in wanted}
    plan: list[tuple[str, Path, list[str] | None]] = []
    for name, script in scripts.items():
        extra: list[str] | None = []
        if args.quick:
            extra = quick_arguments(options_of(script))
        plan.append((name, script, extra))
    for name, script, extra in plan:
        shown = "skipped: no size option" if extra is None else shlex.join([script.name, *extra])
        print(f"{name}: {shown}")
    if args.list:
        return 0

    args.data.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, DATA_ENV: str(args.data.resolve())}
    load1, load5 = os.getloadavg()[:2]
    ran = ", ".join(
        f"`{shlex.join([s.name, *e])}`" if e is not None else f"{s.name} (skipped: no size option)"
        for _, s, e in plan
    )
    append(
        f"\n## {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC: "
        f"`benchmarks/run_all.py{' --quick' if args.quick else ''}`"
        f"{''.join(f' --only {n}' for n in args.only or [])}\n\n"
        f"Machine: {machine()}; Python {platform.python_version()}, torch {torch_version()}; "
        f"load average {load1:.1f} (1 min), {load5:.1f} (5 min) at the start. Data under "
        f"{args.data} on {file_system(args.data)}. Commit {commit()}. Scripts: {ran}. "
        "Each script's section follows, its contenders measured side by side in one run.\n"
    )
    summary = []
    failed = 0
    for _name, script, extra in plan:
        if extra is None:
            summary.append(f"- {script.name}: skipped (it has no size option for --quick)")
            continue
        print(f"\n=== {shlex.join([script.name, *extra])}", flush=True)
        start = time.perf_counter()
        done = subprocess.run([sys.executable, str(script), *extra], env=env, cwd=HERE.parent)
        took = time.perf_counter() - start
        failed += done.returncode != 0
        summary.append(f"- {script.name}: exit {done.returncode}, {took:.0f} s")
    append(
        f"\n### run_all.py: {len(summary)} scripts, {failed} failed\n\n" + "\n".join(summary) + "\n"
    )
    print("\n".join(summary))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
