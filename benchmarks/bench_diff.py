"""Benchmark ``ckptmigrate diff`` against loading both files with torch.load (and ckptkit).

Every side runs as a whole process, timed from outside with ``/usr/bin/time -v`` (wall time
and peak RSS), median of 3 runs, all in one run of this script so the ratios are comparable.

    .venv/bin/python benchmarks/bench_diff.py            # appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_diff.py --gb 0.1   # a quick smaller run
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
#: Generated files: ``$CKPTMIGRATE_BENCH_DATA`` (set by run_all.py --data), else data/ here.
DATA = Path(os.environ.get("CKPTMIGRATE_BENCH_DATA") or HERE / "data")
RESULTS = HERE / "RESULTS.md"
PYTHON = sys.executable
RUNS = 3

TORCH_SCRIPT = """
import sys, torch
a = torch.load(sys.argv[1], map_location="cpu", weights_only=True)["state_dict"]
b = torch.load(sys.argv[2], map_location="cpu", weights_only=True)["state_dict"]
added = [k for k in b if k not in a]
removed = [k for k in a if k not in b]
changed = [k for k in a if k in b and (a[k].shape != b[k].shape or a[k].dtype != b[k].dtype)]
print(len(added), len(removed), len(changed))
"""


def make_checkpoints(gigabytes: float) -> tuple[Path, Path, Path, Path]:
    """Two ~``gigabytes`` GB checkpoints (renamed layers, one reshaped) and two small ones."""
    import torch

    import ckptmigrate as cm

    DATA.mkdir(parents=True, exist_ok=True)
    big_a, big_b = DATA / f"big_a_{gigabytes}.pth", DATA / f"big_b_{gigabytes}.pth"
    small_a, small_b = DATA / "small_a.pth", DATA / "small_b.pth"
    width = 2048
    per_layer = 4 * width * width * 4  # four float32 width x width matrices
    layers = max(1, round(gigabytes * 1e9 / per_layer))
    if not (big_a.exists() and big_b.exists()):
        sd = {}
        for i in range(layers):
            for name in ("q", "k", "v", "o"):
                sd[f"blocks.{i}.attn.{name}.weight"] = torch.randn(width, width)
            sd[f"blocks.{i}.ln.weight"] = torch.ones(width)
        cm.save(big_a, sd, schema="bench", version="1.0.0", hparams={"layers": layers})
        renamed = {k.replace("blocks.", "layers."): v for k, v in sd.items()}
        renamed["layers.0.ln.weight"] = torch.ones(width + 1)
        cm.save(big_b, renamed, schema="bench", version="2.0.0", hparams={"layers": layers})
        del sd, renamed
    small = {f"blocks.{i}.w": torch.randn(8, 8) for i in range(4)}
    cm.save(small_a, small, schema="bench", version="1.0.0")
    cm.save(
        small_b,
        {k.replace("blocks", "layers"): v for k, v in small.items()},
        schema="bench",
        version="2.0.0",
    )
    return big_a, big_b, small_a, small_b


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """(wall seconds, peak RSS MiB, exit code) of one process, measured by /usr/bin/time -v."""
    with tempfile.NamedTemporaryFile("r", suffix=".time") as report:
        proc = subprocess.run(
            ["/usr/bin/time", "-v", "-o", report.name, *cmd],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        text = Path(report.name).read_text()
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):(\d+(?:\.\d+)?)", text)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if wall is None or rss is None:
        raise RuntimeError(f"cannot parse /usr/bin/time output for {cmd}: {text}{proc.stderr}")
    hours, minutes, seconds = wall.groups()
    total = int(hours or 0) * 3600 + int(minutes) * 60 + float(seconds)
    return total, int(rss.group(1)) / 1024, proc.returncode


def median_of(cmd: list[str]) -> tuple[float, float, int]:
    runs = [timed(cmd) for _ in range(RUNS)]
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        runs[-1][2],
    )


def file_system(path: Path) -> str:
    """The type of the file system holding ``path`` (``ext4``, ``xfs``), as ``df -T`` says."""
    out = subprocess.run(["df", "-T", str(path)], capture_output=True, text=True).stdout
    rows = out.strip().splitlines()
    return rows[-1].split()[1] if len(rows) > 1 else "?"


def machine() -> str:
    def out(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout
        except OSError:
            return ""

    cpu = re.search(r"Model name:\s*(.+)", out(["lscpu"]))
    mem = re.search(r"Mem:\s+(\S+)", out(["free", "-h"]))
    import torch

    return (
        f"{cpu.group(1).strip() if cpu else platform.processor()}, {out(['nproc']).strip()} "
        f"cores, {mem.group(1) if mem else '?'} RAM; Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.2, help="size of each big checkpoint")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        sys.exit("needs /usr/bin/time: apt-get install -y time")
    big_a, big_b, small_a, small_b = make_checkpoints(args.gb)
    size = big_a.stat().st_size / 1e9
    cli = [PYTHON, "-m", "ckptmigrate"]
    rows = []

    ours = median_of([*cli, "diff", str(big_a), str(big_b)])
    torch_side = median_of([PYTHON, "-c", TORCH_SCRIPT, str(big_a), str(big_b)])
    rows.append(("`ckptmigrate diff` big A B", ours))
    rows.append(("torch.load both + compare keys/shapes", torch_side))
    ckptkit = shutil.which("ckptkit", path=str(Path(PYTHON).parent)) or shutil.which("ckptkit")
    kit = median_of([ckptkit, "diff", str(big_a), str(big_b)]) if ckptkit else None
    if kit:
        rows.append(("`ckptkit diff` big A B", kit))
    rows.append(("bare `python -c pass`", median_of([PYTHON, "-c", "pass"])))
    rows.append(("cold `ckptmigrate --help`", median_of([*cli, "--help"])))
    rows.append(
        ("`ckptmigrate diff` small A B", median_of([*cli, "diff", str(small_a), str(small_b)]))
    )

    today = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        f"\n## {today}: diff, two {size:.2f} GB checkpoints ({os.path.basename(big_a)})\n",
        f"Machine: {machine()}. Each row: median of {RUNS} whole-process runs "
        "(`/usr/bin/time -v`, wall time and peak RSS).\n",
        "| command | wall s | peak RSS MiB | exit |",
        "| --- | ---: | ---: | ---: |",
    ]
    lines += [f"| {name} | {w:.3f} | {r:.0f} | {rc} |" for name, (w, r, rc) in rows]
    lines.append("")
    lines.append(
        f"- speed-up over torch.load: **{torch_side[0] / ours[0]:.0f}x** "
        f"(goal >= 50x); peak RSS {ours[1]:.0f} MiB vs {torch_side[1]:.0f} MiB (goal <= 150)"
    )
    if kit:
        lines.append(
            f"- speed-up over `ckptkit diff` {kit[0] / ours[0]:.0f}x; its peak RSS {kit[1]:.0f} MiB"
        )
    else:
        lines.append("- ckptkit: not installed, not compared")
    text = "\n".join(lines) + "\n"
    if not RESULTS.exists():
        RESULTS.write_text("# Benchmark results\n\nWritten by `benchmarks/bench_diff.py`.\n")
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
