"""Issue 17 item 2: ``ckptmigrate upgrade s3://... -o s3://...`` of a rename, against the
download, upgrade and upload it replaces.

A checkpoint of ``--mb`` MiB (16 MiB tensors) is uploaded to moto's S3 server (in this
process, on 127.0.0.1), and two ways to get its renamed upgrade into the bucket run side by
side, as whole processes, contenders interleaved, medians of ``--runs``:

- ``ckptmigrate upgrade s3://bench/a.pth -o s3://bench/b.pth`` (unchanged records copied by
  the server: ``UploadPartCopy``);
- boto3 ``download_file``, ``ckptmigrate upgrade`` on the local copy, boto3 ``upload_file``.

The server counts the requests it answers and the bytes it sends and receives for each.
Goal: the bytes through the client are at most one part's top-up (5 MiB) plus metadata,
whatever the file's size.

    .venv/bin/python benchmarks/bench_remote_upgrade.py            # appends to RESULTS.md
    .venv/bin/python benchmarks/bench_remote_upgrade.py --mb 32    # a quick smaller run
"""

from __future__ import annotations

import argparse
import datetime as dt
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

PYTHON = sys.executable
BUCKET = "bench"
MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
"""
ROUND_TRIP = """
import subprocess, sys, boto3
client = boto3.client("s3")
src, local, out, migrations = sys.argv[1:5]
client.download_file("bench", "a.pth", src)
done = subprocess.run([sys.executable, "-m", "ckptmigrate", "upgrade", src, "-o", out,
                       "--migrations", migrations], capture_output=True)
client.upload_file(out, "bench", "c.pth")
sys.exit(done.returncode)
"""


def _traffic(server) -> tuple[int, int, int]:
    """Requests, bytes sent to the client, bytes received from it."""
    return (
        len(server.requests),
        sum(r.sent for r in server.requests),
        sum(r.received for r in server.requests),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=96, help="size of the checkpoint in MiB")
    parser.add_argument("--runs", type=int, default=1)
    args = parser.parse_args()
    import torch

    import ckptmigrate as cm

    with tempfile.TemporaryDirectory(prefix="rupgrade-bench-") as tmp:
        root = Path(tmp)
        (root / "migrations").mkdir()
        (root / "migrations" / "net.py").write_text(MIGRATIONS)
        tensors = {f"blocks.{i}.weight": torch.randn(4 << 20) for i in range(max(1, args.mb // 16))}
        cm.save(root / "a.pth", tensors, schema="net", version="1.0.0")
        size = (root / "a.pth").stat().st_size
        rows: dict[str, list[float]] = {"server-side": [], "round trip": []}
        traffic: dict[str, tuple[int, int, int]] = {}
        with s3_server() as s3:
            s3.bucket(BUCKET)
            s3.upload(root / "a.pth", f"{BUCKET}/a.pth")
            for _ in range(args.runs):
                for name, cmd in (
                    (
                        "server-side",
                        [
                            PYTHON,
                            "-m",
                            "ckptmigrate",
                            "upgrade",
                            f"s3://{BUCKET}/a.pth",
                            "-o",
                            f"s3://{BUCKET}/b.pth",
                            "--migrations",
                            str(root / "migrations"),
                        ],
                    ),
                    (
                        "round trip",
                        [
                            PYTHON,
                            "-c",
                            ROUND_TRIP,
                            str(root / "dl.pth"),
                            "",
                            str(root / "up.pth"),
                            str(root / "migrations"),
                        ],
                    ),
                ):
                    s3.reset()
                    start = time.perf_counter()
                    done = subprocess.run(cmd, capture_output=True, text=True)
                    rows[name].append(time.perf_counter() - start)
                    if done.returncode:
                        sys.exit(f"{name} failed: {done.stderr[-2000:]}")
                    traffic[name] = _traffic(s3)
    when = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    fs_kind = file_system(Path(tmp.rsplit("/", 1)[0]))
    fast, slow = (statistics.median(rows[k]) for k in ("server-side", "round trip"))
    lines = [
        f"\n## {when}: upgrade s3:// -o s3:// of a rename (issue 17 item 2), {size / 2**20:.0f} "
        "MiB checkpoint",
        "",
        f"Machine: {machine()}; temporary files on {fs_kind}; S3: moto's server on 127.0.0.1 "
        f"in the benchmark's process. Median of {args.runs} whole-process run(s), contenders "
        "interleaved.",
        "",
        "| way | wall s | requests | bytes to the client | bytes from the client |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (
        ("server-side", "`ckptmigrate upgrade s3://a -o s3://b` (UploadPartCopy)"),
        ("round trip", "download + local `ckptmigrate upgrade` + upload (boto3)"),
    ):
        n, sent, got = traffic[name]
        lines.append(
            f"| {label} | {statistics.median(rows[name]):.2f} | {n} | {sent:,} | {got:,} |"
        )
    lines += ["", f"- round trip / server-side: **{slow / fast:.1f}x** wall time", ""]
    text = "\n".join(lines)
    print(text)
    with open(RESULTS, "a") as f:
        f.write(text)


if __name__ == "__main__":
    main()
