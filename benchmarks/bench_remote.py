"""Issue 17 item 1: ``ckptmigrate diff`` of two checkpoints in an S3 bucket, by range reads.

The 1.2 GB pair of ``bench_diff.py`` is uploaded to moto's S3 server (in this process, on
127.0.0.1), and three ways to get the diff are timed side by side, as whole processes
(``/usr/bin/time -v``: wall time and peak RSS), contenders interleaved, medians of ``--runs``:

- ``ckptmigrate diff s3://bench/a.pth s3://bench/b.pth`` (metadata by ranged GETs);
- ``ckptmigrate diff A B`` on the same files on the local disk;
- downloading both objects (boto3 ``download_file``) and diffing the copies (fewer runs:
  moto's server sends a few MB/s on a loaded 2-core machine, minutes for the pair).

The server counts every request it answers and the body bytes it sends, per object, for one
remote diff. Goal: <= 6 requests and <= 1 MB per file, and <= 3x the local diff.

    .venv/bin/python benchmarks/bench_remote.py            # appends to benchmarks/RESULTS.md
    .venv/bin/python benchmarks/bench_remote.py --gb 0.1   # a quick smaller run
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))  # the loopback servers the tests use

from bench_diff import DATA, RESULTS, file_system, machine, make_checkpoints, timed  # noqa: E402
from object_stores import range_server, s3_server  # noqa: E402

PYTHON = sys.executable
CLI = [PYTHON, "-m", "ckptmigrate"]
BUCKET = "bench"

DOWNLOAD_SCRIPT = """
import subprocess, sys, boto3
client = boto3.client("s3")
for key, dest in zip(sys.argv[1:3], sys.argv[3:5]):
    client.download_file("bench", key, dest)
sys.exit(subprocess.run([sys.executable, "-m", "ckptmigrate", "diff", *sys.argv[3:5]]).returncode)
"""


Runs = dict[str, list[tuple[float, float, int]]]


def median(runs: list[tuple[float, float, int]]) -> tuple[float, float, int]:
    """Median wall time and peak RSS of ``runs``, and the last run's exit code."""
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        runs[-1][2],
    )


def section(title: str, setting: str, runs: Runs) -> list[str]:
    """A RESULTS.md section's heading, setting and table: one row a contender, its medians
    and each run's wall time."""
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"\n## {today}: {title}\n",
        f"Machine: {machine()}; {setting}\n",
        "| command | wall s | peak RSS MiB | exit | runs (wall s) |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name, rs in runs.items():
        w, r, rc = median(rs)
        walls = ", ".join(f"{x[0]:.2f}" for x in rs)
        lines.append(f"| {name} | {w:.3f} | {r:.0f} | {rc} | {walls} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.2, help="size of each big checkpoint")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--download-runs",
        type=int,
        default=1,
        help="runs of the download-both contender (moto serves a few MB/s: minutes a run)",
    )
    parser.add_argument(
        "--store",
        choices=("s3", "http", "both"),
        default="both",
        help="moto's S3 (counts; moto reads a whole object per ranged GET) and/or a Range "
        "HTTP server (times)",
    )
    args = parser.parse_args()
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # a user's install has its .pyc files
    big_a, big_b, _, _ = make_checkpoints(args.gb)
    if args.store in ("s3", "both"):
        bench_s3(args, big_a, big_b)
    if args.store in ("http", "both"):
        bench_http(args, big_a, big_b)


def bench_http(args: argparse.Namespace, big_a: Path, big_b: Path) -> None:
    """The same diff against a Range HTTP server over the local files, which serves a range
    by reading that range (as S3 does), side by side with the local diff; and the time one
    64 KiB ranged GET of ``big_a`` takes from it and from moto."""
    import time

    size = big_a.stat().st_size / 1e9
    with range_server(big_a.parent) as web:
        urls = [f"{web.base}/{big_a.name}", f"{web.base}/{big_b.name}"]
        web.reset()
        timed([*CLI, "diff", *urls])
        per_file = {
            p.name: (len(web.to(f"/{p.name}")), sum(r.sent for r in web.to(f"/{p.name}")))
            for p in (big_a, big_b)
        }
        contenders = {
            "`ckptmigrate diff` http:// A B (range reads)": [*CLI, "diff", *urls],
            "`ckptmigrate diff` A B on the local disk": [*CLI, "diff", str(big_a), str(big_b)],
        }
        runs: Runs = {name: [] for name in contenders}
        for _ in range(args.runs):
            for name, cmd in contenders.items():
                runs[name].append(timed(cmd))
                print(name, runs[name][-1], flush=True)
        import urllib.request

        def one_range(url: str, **headers: str) -> float:
            start = time.perf_counter()
            request = urllib.request.Request(url, headers={"Range": "bytes=0-65535", **headers})
            with urllib.request.urlopen(request) as response:
                response.read()
            return time.perf_counter() - start

        http_get = statistics.median(one_range(urls[0]) for _ in range(3))
    with s3_server() as s3:
        s3.bucket(BUCKET)
        s3.upload(big_a, f"{BUCKET}/{big_a.name}")
        client = s3.client()

        def moto_range() -> float:
            start = time.perf_counter()
            client.get_object(Bucket=BUCKET, Key=big_a.name, Range="bytes=0-65535")["Body"].read()
            return time.perf_counter() - start

        moto_get = statistics.median(moto_range() for _ in range(3))

    remote, local = (median(runs[name]) for name in contenders)
    lines = section(
        f"remote diff over http:// (issue 17 item 1; loopback, no TLS), two {size:.2f} GB checkpoints",
        f"local files on {file_system(big_a)}; the server: `tests/object_stores.RangeServer` "
        "(http.server, a range read from disk) on 127.0.0.1 in the benchmark's process. Each "
        f"row: median of {args.runs} whole-process runs (`/usr/bin/time -v`), contenders "
        "interleaved.",
        runs,
    )
    lines.append("")
    for name, (n, sent) in per_file.items():
        lines.append(f"- {name}: {n} requests, {sent:,} body bytes sent")
    lines.append(f"- remote diff / local diff: **{remote[0] / local[0]:.2f}x** (goal <= 3x)")
    lines.append(
        f"- one 64 KiB ranged GET of {big_a.name}: {http_get * 1e3:.1f} ms from this server, "
        f"{moto_get * 1e3:.0f} ms from moto (moto reads the whole object for every range, so "
        "its diff times measure moto, not the client)"
    )
    text = "\n".join(lines) + "\n"
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


def bench_s3(args: argparse.Namespace, big_a: Path, big_b: Path) -> None:
    """The diff over moto's S3 against the local diff and downloading both."""
    size = big_a.stat().st_size / 1e9
    with s3_server() as s3, tempfile.TemporaryDirectory(dir=DATA) as tmp:
        s3.bucket(BUCKET)
        keys = {"a": f"{big_a.name}", "b": f"{big_b.name}"}
        s3.upload(big_a, f"{BUCKET}/{keys['a']}")
        s3.upload(big_b, f"{BUCKET}/{keys['b']}")
        urls = [f"s3://{BUCKET}/{keys['a']}", f"s3://{BUCKET}/{keys['b']}"]

        s3.reset()
        counted = timed([*CLI, "diff", *urls])
        per_file = {
            key: (len(s3.to(f"/{BUCKET}/{key}")), sum(r.sent for r in s3.to(f"/{BUCKET}/{key}")))
            for key in keys.values()
        }
        other = [r for r in s3.requests if not any(k in r.path for k in keys.values())]

        copies = [str(Path(tmp) / "a.pth"), str(Path(tmp) / "b.pth")]
        contenders = {
            "`ckptmigrate diff` s3:// A B (range reads)": [*CLI, "diff", *urls],
            "`ckptmigrate diff` A B on the local disk": [*CLI, "diff", str(big_a), str(big_b)],
            "download both (boto3) + local `ckptmigrate diff`": [
                PYTHON,
                "-c",
                DOWNLOAD_SCRIPT,
                keys["a"],
                keys["b"],
                *copies,
            ],
        }
        runs: Runs = {name: [] for name in contenders}
        download_name = list(contenders)[2]
        for i in range(max(args.runs, args.download_runs)):  # interleaved: a load spike
            for name, cmd in contenders.items():  # hits every contender alike
                if i >= (args.download_runs if name == download_name else args.runs):
                    continue
                runs[name].append(timed(cmd))
                print(name, runs[name][-1], flush=True)
                for copy in copies:
                    Path(copy).unlink(missing_ok=True)

    remote, local, download = (median(runs[name]) for name in contenders)
    lines = section(
        f"remote diff (issue 17 item 1), two {size:.2f} GB checkpoints in S3",
        f"local files on {file_system(big_a)}; S3: moto's server on 127.0.0.1 in the "
        f"benchmark's process. Each row: median of {args.runs} whole-process runs "
        "(`/usr/bin/time -v`), contenders interleaved; the download row: "
        f"{args.download_runs} run(s).",
        runs,
    )
    lines.append("")
    lines.append("Requests the server answered for one remote diff (counted by the server):\n")
    lines.append("| object | size | requests | body bytes sent |")
    lines.append("| --- | ---: | ---: | ---: |")
    for key, (n, sent) in per_file.items():
        obj = big_a if key == keys["a"] else big_b
        lines.append(f"| {key} | {obj.stat().st_size / 1e9:.2f} GB | {n} | {sent:,} |")
    if other:
        lines.append(
            f"| (other: bucket listings) | | {len(other)} | {sum(r.sent for r in other):,} |"
        )
    worst_n = max(n for n, _ in per_file.values())
    worst_b = max(b for _, b in per_file.values())
    lines.append("")
    lines.append(
        f"- per file: at most {worst_n} requests (goal <= 6), {worst_b / 1e6:.3f} MB "
        f"(goal <= 1 MB); remote diff / local diff: **{remote[0] / local[0]:.2f}x** "
        f"(goal <= 3x); download both + diff / remote diff: {download[0] / remote[0]:.0f}x"
    )
    lines.append(
        f"- the remote diff's exit: {counted[2]} (1: drift found, as locally); moto served the "
        f"downloads at {2 * size * 1e3 / max(download[0], 1e-9):.0f} MB/s"
    )
    text = "\n".join(lines) + "\n"
    with RESULTS.open("a") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
