"""DCP rename upgrade (issue 15 item 3): a new ``.metadata`` over hard-linked rank files.

Generates (once, under ``--dir``; never committed) a DCP checkpoint of >= 4 GiB in 8 rank
files with a no-dist single-process ``dcp.save`` (8 writer threads: one file each), then
times ``cm.upgrade_file`` of a rename+drop+hparam plan to a new folder and in place, each
run in-process after the import, median of 3, and the bytes written beside the folder's
bytes. Appends a dated section to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_dcp.py --dir /tmp/dcp-bench
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import ckptmigrate as cm

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from folder_schema import rename_drop_schema  # noqa: E402 - the tests' rename+drop+hparam

TENSORS, ROWS, COLS = 32, 8192, 4096  # 32 x 128 MiB fp32 = 4 GiB
RANK_FILES = 8


def generate(folder: Path) -> None:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    if (folder / ".metadata").exists():
        return
    state = {
        f"blocks.{i}.weight": torch.full((ROWS, COLS), float(i), dtype=torch.float32)
        for i in range(TENSORS)
    }
    state["blocks.0.rotary"] = torch.arange(16.0)
    writer = FileSystemWriter(folder, single_file_per_rank=True, thread_count=RANK_FILES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, storage_writer=writer)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", type=Path, default=Path("/tmp/ckptmigrate-dcp-bench"))
    args = parser.parse_args()
    base = args.dir
    base.mkdir(parents=True, exist_ok=True)
    src = base / "step-100"
    start = time.perf_counter()
    generate(src)
    generated = time.perf_counter() - start
    total = folder_bytes(src)
    ranks = len(list(src.glob("*.distcp")))
    rows = []
    for mode in ("-o new folder", "in place"):
        times, written = [], []
        for _ in range(3):
            work = base / "work"
            shutil.rmtree(work, ignore_errors=True)
            work.mkdir()
            old = work / "step-100"
            old.mkdir()
            for p in src.iterdir():
                os.link(p, old / p.name)  # a copy of the folder in no time
            dst = old if mode == "in place" else work / "v2"
            t0 = time.perf_counter()
            result = cm.upgrade_file(old, dst, rename_drop_schema(), from_version="1.0.0")
            times.append(time.perf_counter() - t0)
            written.append(result.bytes_through_python)
            assert result.streamed
        rows.append((mode, statistics.median(times), statistics.median(written)))
    fs = subprocess.run(
        ["df", "-T", str(base)], capture_output=True, text=True
    ).stdout.splitlines()[-1]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## DCP rename without loading DCP (issue 15 item 3): {now}\n",
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; file system: `{' '.join(fs.split()[:2])}`. "
        f"Checkpoint: {total / 2**30:.2f} GiB in {ranks} rank files "
        f"(generated in {generated:.0f} s, `dcp.save` no-dist, 8 writer threads). Each row: "
        "median of 3 in-process `cm.upgrade_file` calls (rename prefix, drop, set hparam).\n",
        "| upgrade | wall s | bytes written | % of folder | goal |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for mode, wall, wrote in rows:
        lines.append(
            f"| {mode} | {wall:.3f} | {wrote:.0f} | {100 * wrote / total:.4f}% | "
            "<= 0.5 s, < 1% |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
        f.write(text)


if __name__ == "__main__":
    main()
