"""Issue 17 item 3: ``ckptmigrate scan s3://bucket/prefix --catalog DB`` of 1,000 small
checkpoint objects, sequential (``--jobs 1``) against concurrent reads (``--jobs 16``/``32``),
and the rescan with nothing changed.

1,000 objects of a few KB each in four formats (torch zips from ``cm.save`` at two versions,
with metrics; safetensors; plain ``torch.save`` state_dicts; Lightning-style dicts) are
uploaded to moto's S3 server (``tests/object_stores.S3Server``, in this process on
127.0.0.1), which then waits ``--latency-ms`` before answering each request: a store across a
network, where a scan is bounded by request latency unless it overlaps its reads. Each scan is
a whole ``python -m ckptmigrate`` process (import and start-up included) into a new SQLite
catalog; the rescan goes into the catalog a first scan filled. The server counts the requests
of each run by kind (LIST: ListObjectsV2; GET: an object's bytes; HEAD).

Goals: the concurrent scan's speedup over the sequential one (request latency overlapped); a
rescan with nothing changed makes no GET, only the listing.

    .venv/bin/python benchmarks/bench_catalog_remote.py          # appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_catalog_remote.py --objects 200 --runs 1   # a quick look
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the loopback servers the tests use

from bench_diff import RESULTS, file_system, machine  # noqa: E402
from object_stores import s3_server  # noqa: E402

CLI = [sys.executable, "-m", "ckptmigrate"]
BUCKET = "bench"
PREFIX = "fleet"
MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("toy", current="3.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
schema.add_migration("2.0.0", "3.0.0", [cm.ops.SetHparam("width", 4)])
"""


def make_fleet(root: Path, count: int) -> dict[str, int]:
    """``count`` small checkpoints under ``root`` (a few KB each, in runs of 50), and how
    many of each format."""
    import torch

    import ckptmigrate as cm

    gen = torch.Generator().manual_seed(0)
    formats = {"torch zip (cm.save)": 0, "safetensors": 0, "torch.save": 0, "lightning": 0}
    for i in range(count):
        folder = root / f"run{i // 50:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        prefix = "blocks" if i % 2 else "layers"
        sd = {f"{prefix}.{j}.weight": torch.randn(8, 8, generator=gen) for j in range(4)}
        kind = i % 10
        if kind < 4:
            version = "1.0.0" if i % 2 else "3.0.0"
            meta = {"val_loss": float(torch.rand(1, generator=gen)), "step": i}
            cm.save(folder / f"ckpt{i:04d}.pth", sd, schema="toy", version=version, meta=meta)
            formats["torch zip (cm.save)"] += 1
        elif kind < 7:
            cm.save(folder / f"ckpt{i:04d}.safetensors", sd, schema="toy", version="3.0.0")
            formats["safetensors"] += 1
        elif kind < 9:
            torch.save(sd, folder / f"ckpt{i:04d}.pt")
            formats["torch.save"] += 1
        else:
            lightning = {"state_dict": sd, "epoch": i, "hyper_parameters": {"lr": 1e-3}}
            torch.save(lightning, folder / f"ckpt{i:04d}.ckpt")
            formats["lightning"] += 1
    return formats


def upload(s3, root: Path) -> None:
    """Every file under ``root`` to ``s3://bench/fleet/``, 16 at a time (no latency yet)."""
    from concurrent.futures import ThreadPoolExecutor

    client = s3.client()
    files = sorted(p for p in root.rglob("*") if p.is_file())

    def put(p: Path) -> None:
        client.upload_file(str(p), BUCKET, f"{PREFIX}/{p.relative_to(root)}")

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, files))


def moto_get_seconds(s3, root: Path, count: int = 100) -> float:
    """What one ranged GET of a small object costs without added latency (boto3, one after
    another): moto's own time for it, on the cores the scan shares."""
    client = s3.client()
    keys = sorted(f"{PREFIX}/{p.relative_to(root)}" for p in root.rglob("*") if p.is_file())
    keys = keys[:count]
    start = time.perf_counter()
    for key in keys:
        client.get_object(Bucket=BUCKET, Key=key, Range="bytes=0-65535")["Body"].read()
    return (time.perf_counter() - start) / len(keys)


def scan(s3, db: Path, migrations: Path, jobs: int) -> tuple[float, dict[str, int], str]:
    """One ``scan --catalog`` process: (wall seconds, the server's requests by kind, what it
    said of the catalog)."""
    s3.reset()
    cmd = [*CLI, "scan", f"s3://{BUCKET}/{PREFIX}", "--catalog", str(db), "--jobs", str(jobs)]
    start = time.perf_counter()
    proc = subprocess.run(
        [*cmd, "--migrations", str(migrations)], capture_output=True, text=True, env=os.environ
    )
    wall = time.perf_counter() - start
    said = re.search(r"catalog .*: (.*)", proc.stderr)
    if proc.returncode != 0 or said is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    return wall, s3.by_kind(), said.group(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=1000)
    parser.add_argument("--latency-ms", type=float, default=20.0, help="the server's wait")
    parser.add_argument("--runs", type=int, default=3, help="runs of each concurrent scan")
    parser.add_argument("--sequential-runs", type=int, default=1, help="runs of --jobs 1")
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has its .pyc files
    tmp = Path(tempfile.mkdtemp(prefix="rcatalog-bench-", dir="/tmp"))
    try:
        root = tmp / "fleet"
        migrations = tmp / "migrations"
        migrations.mkdir()
        (migrations / "toy.py").write_text(MIGRATIONS)
        formats = make_fleet(root, args.objects)
        sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
        with s3_server() as s3:
            s3.bucket(BUCKET)
            upload(s3, root)
            per_get = moto_get_seconds(s3, root)
            s3.latency = args.latency_ms / 1000
            results: dict[int, list[tuple[float, dict[str, int], str]]] = {}
            for jobs in args.jobs:
                runs = args.sequential_runs if jobs == 1 else args.runs
                for n in range(runs):
                    db = tmp / f"jobs{jobs}-{n}.sqlite"
                    results.setdefault(jobs, []).append(scan(s3, db, migrations, jobs))
                    print(f"--jobs {jobs}: {results[jobs][-1]}", flush=True)
            rescans = []
            filled = tmp / f"jobs{args.jobs[-1]}-0.sqlite"
            for _ in range(args.runs):
                rescans.append(scan(s3, filled, migrations, args.jobs[-1]))
                print(f"rescan: {rescans[-1]}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    fs = file_system(Path(tempfile.gettempdir()))
    record(args, formats, sizes, results, rescans, fs, per_get)


def record(args, formats, sizes, results, rescans, fs: str, per_get: float) -> None:
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    base = statistics.median(r[0] for r in results[min(results)])
    kinds = ", ".join(f"{n} {name}" for name, n in formats.items())
    lines = [
        f"\n## {today}: catalog scan of {args.objects} objects in S3 (issue 17 item 3)\n",
        f"Machine: {machine()}; catalog (SQLite) and temp files on {fs}. moto's S3 server on "
        f"127.0.0.1 in the benchmark's process, **{args.latency_ms:g} ms added before each "
        f"answer**; objects: {kinds}; {min(sizes):,}-{max(sizes):,} bytes each. Each row: "
        "whole `python -m ckptmigrate scan s3://bench/fleet --catalog new.sqlite --jobs N` "
        "processes (start-up included), median wall and each run; requests counted by the "
        "server (LIST = ListObjectsV2 pages, GET = ranged reads of objects). Load average "
        f"at the end: {os.getloadavg()[0]:.1f} (other work on the same cores).\n",
        "| scan | wall s (median) | runs (wall s) | requests | said | speedup vs --jobs "
        f"{min(results)} |",
        "| --- | ---: | --- | --- | --- | ---: |",
    ]

    def row(name: str, runs: list[tuple[float, dict[str, int], str]]) -> str:
        wall = statistics.median(r[0] for r in runs)
        walls = ", ".join(f"{r[0]:.2f}" for r in runs)
        counts = ", ".join(f"{n} {k}" for k, n in sorted(runs[-1][1].items()))
        return f"| {name} | {wall:.2f} | {walls} | {counts} | {runs[-1][2]} | {base / wall:.1f}x |"

    for jobs, runs in results.items():
        lines.append(row(f"first scan, `--jobs {jobs}`", runs))
    lines.append(row(f"rescan, nothing changed, `--jobs {args.jobs[-1]}`", rescans))
    seq = args.latency_ms / 1000 * args.objects
    lines.append(
        f"\nThe latency alone of {args.objects} GETs one after another is {seq:.0f} s; the "
        "rescan makes the listing only (no GET, no HEAD). Without added latency one ranged "
        f"GET from moto takes {per_get * 1e3:.1f} ms (boto3, one after another): moto's "
        "own work, on the cores the scan shares, is what bounds the concurrent scans here."
    )
    text = "\n".join(lines) + "\n"
    if not args.no_record:
        with RESULTS.open("a") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    main()
