"""DCP upgrades without loading DCP (issue 15 item 3).

Generates (once, under ``--dir``; never committed) a DCP checkpoint of >= 4 GiB in 8 rank
files with a no-dist single-process ``dcp.save`` (8 writer threads: one file each), then:

- ``--part rename``: times ``cm.upgrade_file`` of a rename+drop+hparam plan to a new folder
  and in place (a new ``.metadata`` over hard-linked rank files), each run in-process after
  the import, median of 3, and the bytes written beside the folder's bytes;
- ``--part ops``: a Merge of 2 tensors and a Cast of one (to a new folder), and the same
  plan to one ``.safetensors`` file (every tensor streamed), each run in a fresh process
  (its peak RSS, ``VmHWM``, against the goal of 2x the largest tensor touched + 300 MB),
  median of 3; the same plan written as a function step (its tensors read when it first uses
  them: :mod:`ckptmigrate.engine.ontouch`), to a folder and to a ``.safetensors`` file; a
  function step that only renames keys (it reads no tensor); and once, as the reference,
  the function step on the loaded folder (``cm.load`` of every tensor, then DCP's writer:
  the path function steps took before).

Appends a dated section to ``benchmarks/RESULTS.md``.

    python benchmarks/bench_dcp.py --dir /tmp/dcp-bench --part ops
"""

from __future__ import annotations

import argparse
import datetime
import json
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

TENSOR_BYTES = 8192 * 4096 * 4  # one generated tensor: 128 MiB
#: the largest tensor the ops plan touches: the merge's result, two tensors long
LARGEST_TOUCHED = 2 * TENSOR_BYTES

TENSORS, ROWS, COLS = 32, 8192, 4096  # 32 x 128 MiB fp32 = 4 GiB
RANK_FILES = 8


def generate(folder: Path) -> bool:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter

    if (folder / ".metadata").exists():
        return False
    state = {
        f"blocks.{i}.weight": torch.full((ROWS, COLS), float(i), dtype=torch.float32)
        for i in range(TENSORS)
    }
    state["blocks.0.rotary"] = torch.arange(16.0)
    writer = FileSystemWriter(folder, single_file_per_rank=True, thread_count=RANK_FILES)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": state}, storage_writer=writer)
    return True


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def ops_schema(mode: str = "ops") -> cm.Schema:
    """lm 1 -> 2: blocks.0 and blocks.1 merged along dim 0, blocks.2 cast to bf16; as ops
    (``ops``), or as the same function step (any other mode); ``rename-fn``: a function step
    that renames every key and touches no tensor."""
    schema = cm.Schema("lm", current="2.0.0")
    if mode == "ops":
        schema.add_migration(
            "1.0.0",
            "2.0.0",
            [
                cm.ops.Merge(["blocks.0.weight", "blocks.1.weight"], "merged.weight", dim=0),
                cm.ops.Cast("blocks.2.weight", dtype="bfloat16"),
            ],
        )
        return schema
    if mode == "rename-fn":

        @schema.migration("1.0.0", "2.0.0")
        def rename(ckpt: cm.Checkpoint) -> None:
            ckpt.state_dict = {
                k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()
            }

        return schema

    @schema.migration("1.0.0", "2.0.0")
    def merge_and_cast(ckpt: cm.Checkpoint) -> None:
        import torch

        sd = ckpt.state_dict
        sd["merged.weight"] = torch.cat([sd.pop("blocks.0.weight"), sd.pop("blocks.1.weight")])
        sd["blocks.2.weight"] = sd["blocks.2.weight"].to(torch.bfloat16)

    return schema


def child(mode: str, src: Path, dst: Path) -> None:
    """One upgrade in this fresh process; prints its wall time, peak RSS and bytes."""
    import torch.distributed.checkpoint  # noqa: F401 - the imports, before the baseline

    import ckptmigrate.engine.deferred  # noqa: F401
    import ckptmigrate.engine.ontouch  # noqa: F401
    import ckptmigrate.engine.rewrite  # noqa: F401

    before = peak_rss()
    t0 = time.perf_counter()
    if mode == "loaded":  # every tensor read, the step run, DCP's writer
        from ckptmigrate.formats.dcp import write_dcp

        write_dcp(dst, cm.load(src, schema=ops_schema(mode), from_version="1.0.0"))
        streamed = False
    else:
        streamed = cm.upgrade_file(src, dst, ops_schema(mode), from_version="1.0.0").streamed
    wall = time.perf_counter() - t0
    peak = peak_rss()
    written = sum(p.stat().st_size for p in dst.iterdir()) if dst.is_dir() else dst.stat().st_size
    linked = sum(p.stat().st_size for p in dst.glob("*.distcp") if p.stat().st_nlink > 1)
    print(
        json.dumps(
            {
                "wall": wall,
                "peak": peak,
                "before": before,
                "streamed": streamed,
                "written": written - linked,
            }
        )
    )


def peak_rss() -> int:
    """This process's peak resident set (``VmHWM``, bytes): unlike ``ru_maxrss``, which
    Linux carries over from the parent through fork and exec, it starts afresh at exec."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def run_child(mode: str, src: Path, dst: Path) -> dict:
    if dst.is_dir():
        shutil.rmtree(dst)
    elif dst.exists():
        dst.unlink()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(src), str(dst)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def ops_rows(base: Path, src: Path, runs: int) -> list[str]:
    contenders = [
        ("ops", "-o new DCP folder", base / "ops-v2", runs),
        ("ops", "-o model.safetensors", base / "ops-v2.safetensors", runs),
        ("function", "-o new DCP folder, as a function step", base / "fn-v2", runs),
        ("function", "-o model.safetensors, as a function step", base / "fn-v2.safetensors", runs),
        ("rename-fn", "-o new DCP folder, a function step renaming every key", base / "rn", runs),
        ("loaded", "as a function step on the loaded folder (reference)", base / "loaded-v2", 1),
    ]
    goal = 2 * LARGEST_TOUCHED + 300 * 10**6
    lines = [
        "| upgrade | streamed | wall s | peak RSS MiB | RSS after import MiB | bytes written "
        "| goal: peak RSS <= 2 x largest touched + 300 MB |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for mode, label, dst, count in contenders:
        found = [run_child(mode, src, dst) for _ in range(count)]
        wall = statistics.median(r["wall"] for r in found)
        peak = statistics.median(r["peak"] for r in found)
        before = statistics.median(r["before"] for r in found)
        verdict = "met" if peak <= goal else "missed"
        if mode != "ops":  # the goal is the ops' (a function step holds what it used and made)
            verdict = {
                "loaded": "(reference)",
                "rename-fn": "(reads no tensor)",
                "function": "(not an ops plan: the step holds the 3 tensors it used and the 2 it made)",
            }[mode]
        lines.append(
            f"| {label} | {found[0]['streamed']} | {wall:.2f} | {peak / 2**20:.0f} | "
            f"{before / 2**20:.0f} | {found[0]['written']:,} | "
            f"{verdict} ({goal / 2**20:.0f} MiB) |"
        )
        if dst.is_dir():
            shutil.rmtree(dst)
        elif dst.exists():
            dst.unlink()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser()
    data = os.environ.get("CKPTMIGRATE_BENCH_DATA")  # run_all.py --data
    default = Path(data) / "dcp" if data else Path("/tmp/ckptmigrate-dcp-bench")
    parser.add_argument("--dir", type=Path, default=default)
    parser.add_argument("--part", choices=("rename", "ops"), default="rename")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gb", type=float, default=4.0, help="GiB of the generated checkpoint")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SRC", "DST"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], Path(args.child[1]), Path(args.child[2]))
        return
    global ROWS, TENSOR_BYTES, LARGEST_TOUCHED
    ROWS = max(1, round(args.gb * 2**30 / (TENSORS * COLS * 4)))
    TENSOR_BYTES = ROWS * COLS * 4
    LARGEST_TOUCHED = 2 * TENSOR_BYTES
    base = args.dir
    base.mkdir(parents=True, exist_ok=True)
    src = base / ("step-100" if ROWS == 8192 else f"step-100-{ROWS}-rows")
    start = time.perf_counter()
    made = generate(src)
    generated = f"generated in {time.perf_counter() - start:.0f} s" if made else "generated before"
    total = folder_bytes(src)
    ranks = len(list(src.glob("*.distcp")))
    fs = subprocess.run(
        ["df", "-T", str(base)], capture_output=True, text=True
    ).stdout.splitlines()[-1]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    machine = (
        f"Machine: {os.cpu_count()} cores, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}; file system: `{' '.join(fs.split()[:2])}`. "
        f"Checkpoint: {total / 2**30:.2f} GiB in {ranks} rank files "
        f"({generated}, `dcp.save` no-dist, 8 writer threads)."
    )
    if args.part == "ops":
        lines = [
            f"\n## DCP tensor ops and DCP -> safetensors, streamed (issue 15 item 3): {now}\n",
            machine + " Plan: Merge of 2 tensors of 128 MiB (dim 0) and a Cast of one to "
            f"bf16; largest tensor touched 256 MiB. Each row: median of {args.runs} fresh "
            "processes (`cm.upgrade_file`; peak RSS is the process's `VmHWM`, torch and "
            "ckptmigrate imports included), the loaded reference once.\n",
            *ops_rows(base, src, args.runs),
        ]
        text = "\n".join(lines) + "\n"
        print(text)
        with open(Path(__file__).with_name("RESULTS.md"), "a", encoding="utf-8") as f:
            f.write(text)
        return
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
    lines = [
        f"\n## DCP rename without loading DCP (issue 15 item 3): {now}\n",
        machine + " Each row: "
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
