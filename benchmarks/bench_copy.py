"""Issue 15 items 1 and 2: a plan writes only what it changed; copied records are cloned where
the file system can. Appends a dated section to benchmarks/RESULTS.md.

The file: 1.2 GB of fp32 in 168 tensors (24 layers x q, k, v, o, up, gate, down), stamped
``bench`` 1.0.0, as a torch zip (``cm.save``) or a safetensors file. Contenders, each a whole
process under ``/usr/bin/time -v`` (wall time, peak RSS), interleaved, medians of ``--runs``
(default 3), output deleted and ``sync`` before each run, warm page cache for the source:

- ``fn-rename``: ``cm.upgrade_file`` with a function step
  ``{k.replace(".attn.", ".self_attn."): v ...}`` (runs on the mapped tensors);
- ``load-save``: ``torch.load(mmap=True)`` + the same rename + ``torch.save`` (safetensors:
  ``safe_open`` + ``save_file``);
- ``load-save+sync``: the same, then ``os.fsync`` of the new file (ours fsyncs before its
  rename; ``torch.save`` and ``save_file`` do not);
- ``fn-rename-before`` (with ``--before DIR``): ``fn-rename`` run on the ckptmigrate package
  in ``DIR`` (an earlier commit's tree), for a before/after in the same run;
- ``merge``: ``cm.upgrade_file`` with ``Merge`` of 2 of the 168 tensors;
- ``op-rename``: ``cm.upgrade_file`` with ``RenameKeys`` (metadata-only: streamed);
- ``cp + sync``: ``cp --reflink=never`` + ``sync FILE``.

Each child also says how long its work took after ``import torch`` (``work=``, the "after
import torch" column and ratios; the streamed ones, ``merge`` and ``op-rename``, never import
torch: theirs is all they do after the interpreter starts).

With ``--xfs`` (root, ``mkfs.xfs``) the same file is also placed on a fresh XFS (reflink=1)
loop mount (an image file beside the data) and the contenders run there, with the file
system's used space before and after each (``statvfs`` after ``sync``).

    .venv/bin/python benchmarks/bench_copy.py                 # ext4 (or whatever holds data/)
    .venv/bin/python benchmarks/bench_copy.py --xfs --format safetensors --runs 3
    .venv/bin/python benchmarks/bench_copy.py --gb 0.1 --no-write  # a quick look, no RESULTS
    .venv/bin/python benchmarks/bench_copy.py --contenders merge,cp+sync --data /tmp/bench
    .venv/bin/python benchmarks/bench_copy.py --format safetensors --before /tmp/old-tree \
        --contenders fn-rename,fn-rename-before,load-save,load-save+sync,cp+sync
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

from bench_scale import ran_child, timed_run  # noqa: E402

# gitignored (benchmarks/data/), or under $CKPTMIGRATE_BENCH_DATA (run_all.py --data)
DATA = Path(os.environ.get("CKPTMIGRATE_BENCH_DATA") or ROOT / "data") / "copy"
RESULTS = ROOT / "RESULTS.md"
LAYERS = 24
PARTS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up", "mlp.gate", "mlp.down")
MERGED = ["layers.0.attn.q.weight", "layers.0.attn.k.weight"]


def schema(kind: str):
    import ckptmigrate as cm

    s = cm.Schema("bench", current="2.0.0")
    if kind == "fn-rename":

        @s.migration("1.0.0", "2.0.0")
        def rename(ckpt: cm.Checkpoint) -> None:
            ckpt.state_dict = {
                k.replace(".attn.", ".self_attn."): v for k, v in ckpt.state_dict.items()
            }

    elif kind == "merge":
        s.add_migration("1.0.0", "2.0.0", [cm.ops.Merge(MERGED, "layers.0.attn.qk.weight")])
    elif kind == "op-rename":
        s.add_migration(
            "1.0.0", "2.0.0", [cm.ops.RenameKeys(r"(.*)\.attn\.(.*)", r"\1.self_attn.\2")]
        )
    else:
        raise SystemExit(f"unknown schema {kind}")
    return s


# ---------------------------------------------------------------- one whole-process run each


#: the contenders that run on tensors (the others, streamed, never import torch)
WITH_TORCH = ("fn-rename", "fn-rename-before", "load-save", "load-save+sync")


def run_one(method: str, src: str, dst: str) -> None:
    """One contender's work, and how long it took after ``import torch`` (which each one
    running on tensors pays first, and which swings most on a loaded machine):
    ``work=SECONDSs``."""
    import time

    if method in WITH_TORCH:
        import torch  # noqa: F401

    start = time.perf_counter()
    said = work(method, src, dst)
    print(f"{said} work={time.perf_counter() - start:.2f}s".strip())


def work(method: str, src: str, dst: str) -> str:
    if method == "load-save+sync":
        work("load-save", src, dst)
        fd = os.open(dst, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        return ""
    if method == "fn-rename-before":
        method = "fn-rename"  # the package comes from --before's tree (PYTHONPATH)
    if method == "load-save":
        if src.endswith(".safetensors"):
            from safetensors import safe_open
            from safetensors.torch import save_file

            with safe_open(src, "pt") as f:
                meta = f.metadata()
                sd = {k.replace(".attn.", ".self_attn."): f.get_tensor(k) for k in f.keys()}
            save_file(sd, dst, metadata=meta)
        else:
            import torch

            obj = torch.load(src, mmap=True, weights_only=True)
            obj["state_dict"] = {
                k.replace(".attn.", ".self_attn."): v for k, v in obj["state_dict"].items()
            }
            torch.save(obj, dst)
        return ""
    from ckptmigrate.engine.rewrite import upgrade_file

    result = upgrade_file(src, dst, schema(method))
    return f"copied={result.bytes_copied} through_python={result.bytes_through_python}"


# ---------------------------------------------------------------- data


def make_file(path: Path, gigabytes: float) -> None:
    import torch

    import ckptmigrate as cm

    rows = max(1, round(gigabytes * 1e9 / (LAYERS * len(PARTS) * 1000 * 4)))
    gen = torch.Generator().manual_seed(0)
    sd = {
        f"layers.{i}.{part}.weight": torch.randn(rows, 1000, generator=gen)
        for i in range(LAYERS)
        for part in PARTS
    }
    cm.save(path, sd, schema="bench", version="1.0.0")  # a torch zip or safetensors by suffix


def used_bytes(path: Path) -> int:
    subprocess.run(["sync"], check=True)
    st = os.statvfs(path)
    return (st.f_blocks - st.f_bfree) * st.f_frsize


def file_system(path: Path) -> str:
    out = subprocess.run(
        ["findmnt", "-n", "-o", "SOURCE,FSTYPE,OPTIONS", "-T", str(path)],
        capture_output=True,
        text=True,
    ).stdout.split()
    if not out:
        return "?"
    opts = [o for o in out[2].split(",") if o in ("rw", "relatime", "loop")] if len(out) > 2 else []
    return " ".join([out[0], out[1], *opts])


class XfsMount:
    """A fresh XFS (reflink=1) file system on a sparse image file, loop-mounted."""

    def __init__(self, where: Path, size: int) -> None:
        self.image, self.mount = where / "xfs.img", where / "xfs"

        self.mount.mkdir(parents=True, exist_ok=True)
        with open(self.image, "wb") as f:
            f.truncate(size)
        subprocess.run(["mkfs.xfs", "-q", "-f", "-m", "reflink=1", str(self.image)], check=True)
        subprocess.run(["mount", "-o", "loop", str(self.image), str(self.mount)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", str(self.mount)], check=False)
        self.image.unlink(missing_ok=True)
        try:
            self.mount.rmdir()
        except OSError:
            pass  # still mounted (busy): left for the next run's -f


# ---------------------------------------------------------------- measurements


def bench(
    src: Path, runs: int, contenders: list[str], space: bool, before: Path | None = None
) -> dict:
    py, me = sys.executable, str(Path(__file__).resolve())
    env_of = {name: None for name in contenders}
    if "fn-rename-before" in contenders:
        if before is None:
            raise SystemExit("fn-rename-before needs --before DIR (a tree with ckptmigrate/)")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(before), env.get("PYTHONPATH", "")])
        env_of["fn-rename-before"] = env
    out_of = {name: src.with_name(f"out-{name}{src.suffix}") for name in contenders}
    commands = {
        name: (
            ["sh", "-c", f"cp --reflink=never '{src}' '{out_of[name]}' && sync '{out_of[name]}'"]
            if name == "cp+sync"
            else [py, me, "--one", name, str(src), str(out_of[name])]
        )
        for name in contenders
    }
    got: dict[str, list[tuple[float, int, int]]] = {name: [] for name in contenders}
    said: dict[str, str] = {}
    works: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(runs):
        for name, cmd in commands.items():
            out_of[name].unlink(missing_ok=True)
            before = used_bytes(src.parent) if space else 0
            wall, rss, stdout = timed_run(cmd, env_of.get(name))
            grown = used_bytes(src.parent) - before if space else 0
            got[name].append((wall, rss, grown))
            said[name] = stdout.strip()
            found = re.search(r"work=([\d.]+)s", stdout)
            if found:
                works[name].append(float(found.group(1)))
            out_of[name].unlink(missing_ok=True)
    result: dict = {"file_bytes": src.stat().st_size, "runs": runs}
    for name, rows in got.items():
        result[name] = {
            "wall_s": statistics.median(w for w, _, _ in rows),
            "rss_bytes": int(statistics.median(r for _, r, _ in rows)),
            "grown_bytes": int(statistics.median(g for _, _, g in rows)),
            "walls": [w for w, _, _ in rows],
            "said": said[name],
            "work_s": statistics.median(works[name]) if works[name] else None,
        }
    return result


# ---------------------------------------------------------------- report


def report(r: dict, label: str, fs: str, fmt: str, space: bool) -> str:
    import torch

    size = r["file_bytes"]
    per_tensor = size / (LAYERS * len(PARTS))
    lines = [
        f"### {label}: {fs}, {fmt}, {size / 1e9:.2f} GB, {LAYERS * len(PARTS)} tensors",
        "",
        "| contender | wall s | after import torch s | peak RSS | % of file | "
        + ("FS used space grown | " if space else "")
        + "runs | says (last run) |",
        "| --- | ---: | ---: | ---: | ---: | " + ("---: | " if space else "") + "--- | --- |",
    ]
    for name in r:
        if not isinstance(r[name], dict):
            continue
        d = r[name]
        lines.append(
            f"| {name} | {d['wall_s']:.2f} | "
            + ("-" if d["work_s"] is None else f"{d['work_s']:.2f}")
            + f" | {d['rss_bytes'] / 2**20:.0f} MiB | "
            f"{100 * d['rss_bytes'] / size:.1f}% | "
            + (
                f"{d['grown_bytes'] / 2**20:.1f} MiB ({100 * d['grown_bytes'] / size:.2f}%) | "
                if space
                else ""
            )
            + ", ".join(f"{w:.2f}" for w in d["walls"])
            + f" | {d['said']} |"
        )
    lines.append("")

    def ratio(a: str, b: str) -> str:
        if a not in r or b not in r:
            return "n/a"
        whole = f"{r[a]['wall_s'] / r[b]['wall_s']:.2f}x"
        if r[a]["work_s"] and r[b]["work_s"]:
            return whole + f"; after import torch {r[a]['work_s'] / r[b]['work_s']:.2f}x"
        return whole

    if "fn-rename" in r and "load-save" in r:
        lines.append(
            f"- fn-rename / load-save: **{ratio('fn-rename', 'load-save')}** (goal <= 1.0x); "
            f"peak RSS **{100 * r['fn-rename']['rss_bytes'] / size:.1f}%** of the file "
            "(goal <= 25%)"
        )
    if "fn-rename" in r and "load-save+sync" in r:
        lines.append(
            "- fn-rename / (load-save + fsync): "
            f"**{ratio('fn-rename', 'load-save+sync')}** (goal <= 1.0x; both durable)"
        )
    if "fn-rename-before" in r:
        for base in ("load-save", "load-save+sync"):
            if base in r:
                lines.append(
                    f"- before (--before tree): fn-rename-before / {base}: "
                    f"**{ratio('fn-rename-before', base)}**"
                )
    if "merge" in r and "cp+sync" in r:
        allowed = 0.25 * size + 2 * per_tensor
        lines.append(
            f"- merge / (cp + sync): **{ratio('merge', 'cp+sync')}** (goal <= 1.0x); peak RSS "
            f"{r['merge']['rss_bytes'] / 2**20:.0f} MiB against the goal's "
            f"{allowed / 2**20:.0f} MiB (25% of the file + the 2 merged tensors)"
        )
    if "op-rename" in r and "cp+sync" in r:
        goal = "<= 0.05x" if space else "<= 1.0x"
        lines.append(f"- op-rename / (cp + sync): **{ratio('op-rename', 'cp+sync')}** ({goal})")
    if space:
        for name in ("op-rename", "fn-rename", "merge"):
            if name in r:
                lines.append(
                    f"- {name}: used space grew {100 * r[name]['grown_bytes'] / size:.2f}% of "
                    "the file (goal < 1% for a rename)"
                )
    lines.append("")
    del torch
    return "\n".join(lines)


def header(args: argparse.Namespace) -> str:
    import torch

    load = os.getloadavg()
    model = subprocess.run(
        "lscpu | sed -n 's/^Model name: *//p'", shell=True, capture_output=True, text=True
    ).stdout.strip()
    return "\n".join(
        [
            f"## {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M')} UTC: "
            "write only what changed (issue 15 items 1, 2)",
            "",
            f"Machine: {platform.machine()} {model}, {os.cpu_count()} cores, Python "
            f"{platform.python_version()}, torch {torch.__version__}; load average "
            f"{load[0]:.1f} (1 min) at the start. Command: `python benchmarks/bench_copy.py "
            + " ".join(sys.argv[1:])
            + f"`. Medians of {args.runs} whole-process runs (`/usr/bin/time -v`), contenders "
            "interleaved, output deleted and `sync` before each, warm page cache for the "
            "source. Ours fsyncs its output before the rename; `torch.save` and `save_file` do "
            "not (`load-save+sync` adds an `os.fsync` of the new file).",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SRC", "DST"))
    parser.add_argument("--gb", type=float, default=1.2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--format", choices=("pth", "safetensors"), default="pth")
    parser.add_argument("--xfs", action="store_true", help="also on an XFS reflink loop mount")
    parser.add_argument("--no-ext", action="store_true", help="only the XFS run")
    parser.add_argument("--no-write", action="store_true", help="print, leave RESULTS.md")
    parser.add_argument(
        "--contenders",
        default="fn-rename,load-save,merge,op-rename,cp+sync",
        help="comma-separated, of the default list",
    )
    parser.add_argument("--data", type=Path, default=DATA, help="where the file is made")
    parser.add_argument(
        "--before", type=Path, help="fn-rename-before: the tree (with ckptmigrate/) to run"
    )
    args = parser.parse_args()
    if ran_child(args.one, run_one, args.data):
        return
    src = args.data / f"big.{args.format}"
    xfs = None
    sections = [header(args)]
    try:
        make_file(src, args.gb)
        everyone = [c for c in args.contenders.split(",") if c]
        if not args.no_ext:
            got = bench(src, args.runs, everyone, space=False, before=args.before)
            sections.append(report(got, "Local disk", file_system(src), args.format, False))
        if args.xfs:
            xfs = XfsMount(args.data, 3 * src.stat().st_size + (1 << 30))
            on_xfs = xfs.mount / src.name
            shutil.copyfile(src, on_xfs)
            on_xfs_order = ["op-rename", "fn-rename", "merge", "cp+sync"]
            got = bench(on_xfs, args.runs, [c for c in on_xfs_order if c in everyone], True)
            sections.append(
                report(
                    got,
                    "XFS reflink=1 loop mount",
                    "xfs (loop, on the disk " "above)",
                    args.format,
                    True,
                )
            )
    finally:
        if xfs is not None:
            xfs.close()
        src.unlink(missing_ok=True)
    text = "\n".join(sections)
    print(text)
    if not args.no_write:
        with RESULTS.open("a") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
