"""Issue 15 item 5: the CLI at the speed of Python.

Measured side by side, contenders interleaved, medians of ``--runs`` (default 5):

- whole processes: bare ``python -c pass``, ``ckptmigrate diff A B`` (metadata only) and
  ``torch.load`` of both files (the comparison a user would write, ``bench_diff.TORCH_SCRIPT``);
- the imports on the diff path: ``-X importtime`` of the real ``ckptmigrate diff`` command,
  the top-level imports that a bare interpreter does not make, summed (median of the runs);
- decoding one file's ``data.pkl`` (``read_torch_metadata``, in process);
- ``cm.load(mmap=False)`` against ``torch.load(weights_only=True)`` on the same file, in process.

Bytecode is compiled first and written (``PYTHONDONTWRITEBYTECODE`` is dropped): a user's
install has its ``.pyc`` files.

    .venv/bin/python benchmarks/bench_speed.py           # appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_speed.py --gb 0.1  # a quick smaller run
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_diff import RESULTS, TORCH_SCRIPT, file_system, make_checkpoints  # noqa: E402

PYTHON = sys.executable
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
CLI = [PYTHON, "-m", "ckptmigrate"]


def wall(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=ENV, capture_output=True, check=False)
    return time.perf_counter() - start


def top_level_imports(cmd: list[str]) -> dict[str, int]:
    """``{module: cumulative microseconds}`` of the imports ``cmd`` makes at the top level."""
    err = subprocess.run([PYTHON, "-X", "importtime", *cmd], env=ENV, capture_output=True).stderr
    out = {}
    for line in err.decode().splitlines():
        match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\S.*)$", line)
        if match:  # no indent after the bar: imported by the command itself
            out[match.group(2)] = int(match.group(1))
    return out


def diff_path_imports(a: Path, b: Path, runs: int) -> tuple[float, list[tuple[str, float]]]:
    """The median over ``runs`` of the summed imports (ms), and the heaviest of the median run."""
    bare = set(top_level_imports(["-c", "pass"]))
    sums = []
    for _ in range(runs):
        found = top_level_imports(["-m", "ckptmigrate", "diff", str(a), str(b)])
        ours = {m: us for m, us in found.items() if m not in bare}
        ours.pop("ckptmigrate.__main__", None)  # runs the command: not an import
        sums.append((sum(ours.values()) / 1e3, ours))
    total, ours = sorted(sums, key=lambda s: s[0])[len(sums) // 2]
    heaviest = sorted(ours.items(), key=lambda item: -item[1])[:6]
    return total, [(m, us / 1e3) for m, us in heaviest]


def in_process(a: Path, runs: int) -> dict[str, float]:
    """Medians (ms) of one data.pkl decode, cm.load(mmap=False) and torch.load(weights_only)."""
    code = f"""
import json, statistics, sys, time, torch
import ckptmigrate as cm
from ckptmigrate.formats.torch import read_torch_metadata
path = {str(a)!r}
times = {{"decode": [], "cm_load": [], "torch_load": []}}
for _ in range({runs}):
    t = time.perf_counter(); read_torch_metadata(path); times["decode"].append(time.perf_counter() - t)
    t = time.perf_counter(); cm.load(path, mmap=False); times["cm_load"].append(time.perf_counter() - t)
    t = time.perf_counter(); torch.load(path, map_location="cpu", weights_only=True)
    times["torch_load"].append(time.perf_counter() - t)
print(json.dumps({{k: statistics.median(v) * 1e3 for k, v in times.items()}}))
"""
    out = subprocess.run([PYTHON, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.2)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    compileall.compile_dir(str(HERE.parent / "ckptmigrate"), quiet=1)
    big_a, big_b, _, _ = make_checkpoints(args.gb)
    size = big_a.stat().st_size / 1e9
    torch_cmd = [PYTHON, "-c", TORCH_SCRIPT, str(big_a), str(big_b)]
    contenders = {
        "bare `python -c pass`": [PYTHON, "-c", "pass"],
        "`ckptmigrate diff` A B": [*CLI, "diff", str(big_a), str(big_b)],
        "torch.load both + compare": torch_cmd,
    }
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(args.runs):  # interleaved: each round runs every contender once
        for name, cmd in contenders.items():
            times[name].append(wall(cmd))
    med = {name: statistics.median(v) for name, v in times.items()}
    imports_ms, heaviest = diff_path_imports(big_a, big_b, args.runs)
    inproc = in_process(big_a, args.runs)
    load1, load5 = os.getloadavg()[:2]
    diff_s, torch_s = med["`ckptmigrate diff` A B"], med["torch.load both + compare"]
    lines = [
        f"\n## {dt.datetime.now():%Y-%m-%d %H:%M}: CLI speed (issue 15 item 5), two {size:.2f} GB "
        "files",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; Python "
        f"{platform.python_version()}; load average {load1:.1f} (1 min), {load5:.1f} (5 min); "
        f"file system of {big_a.parent}: {file_system(big_a.parent)}; warm page cache; `.pyc` written. "
        f"Medians of {args.runs}, contenders interleaved.",
        "",
        "| contender | wall s |",
        "| --- | ---: |",
        *(f"| {name} | {med[name]:.3f} |" for name in contenders),
        "",
        f"- `diff` is **{torch_s / diff_s:.0f}x** faster than torch.load of both (goal >= 50x)",
        f"- imports on the diff path: **{imports_ms:.1f} ms** (goal <= 30 ms); heaviest: "
        + ", ".join(f"{m} {ms:.1f}" for m, ms in heaviest),
        f"- decoding one file's data.pkl (read_torch_metadata): **{inproc['decode']:.1f} ms** "
        "(goal <= 20 ms)",
        f"- cm.load(mmap=False) {inproc['cm_load']:.0f} ms vs torch.load(weights_only=True) "
        f"{inproc['torch_load']:.0f} ms: **{inproc['cm_load'] / inproc['torch_load']:.2f}x** "
        "(goal <= 1.1x)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    with RESULTS.open("a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
