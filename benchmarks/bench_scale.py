"""Scale benchmarks for issue 7; appends a dated section to benchmarks/RESULTS.md.

Run from the repository root (generated data goes to benchmarks/data/scale/, removed at the end):

    .venv/bin/python benchmarks/bench_scale.py            # everything, ~10 minutes
    .venv/bin/python benchmarks/bench_scale.py --keep     # keep benchmarks/data/scale/ afterwards
    .venv/bin/python benchmarks/bench_scale.py --quick    # small sizes (run_all.py --quick)

Whole-process figures are the median of 3 runs under ``/usr/bin/time -v`` (wall time and peak
RSS, mapped file pages included); in-process figures the median of 5. The page cache is warm
for every contender alike (each reads the same file just before).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# ours only: other benchmarks keep their data beside it (under $CKPTMIGRATE_BENCH_DATA if set)
DATA = Path(os.environ.get("CKPTMIGRATE_BENCH_DATA") or ROOT / "data") / "scale"
RESULTS = ROOT / "RESULTS.md"
BIG_TENSORS = 300  # x 1M fp32 = 1.2 GB
#: ``--quick``: the big file, each shard, the small-file tree and the key chain this small
QUICK = {"big_tensors": 25, "per_shard": 8, "small_files": 100, "chain_keys": 10_000}


def bench_schema():  # the schema every run uses: 1.0.0 -> 2.0.0 renames blocks. -> layers.
    import ckptmigrate as cm

    schema = cm.Schema("bench", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
    return schema


# ---------------------------------------------------------------- one whole-process run each


def run_one(method: str, src: str, dst: str) -> None:
    if method == "stream":
        from ckptmigrate.engine.rewrite import upgrade_file

        assert upgrade_file(src, dst, bench_schema()).streamed
    elif method == "baseline":
        import torch

        obj = torch.load(src, mmap=True, weights_only=True)
        obj["state_dict"] = {
            "layers." + k[len("blocks.") :] if k.startswith("blocks.") else k: v
            for k, v in obj["state_dict"].items()
        }
        torch.save(obj, dst)
    else:
        raise SystemExit(f"unknown method {method}")


def timed_process(cmd: list[str]) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one process under /usr/bin/time -v."""
    wall, rss, _ = timed_run(cmd)
    return wall, rss


def timed_run(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS bytes, stdout) of one process under /usr/bin/time -v (``env``:
    its environment, default this one's)."""
    out = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env)
    if out.returncode:
        raise RuntimeError(f"{cmd} failed: {out.stderr[-2000:]}")
    wall = re.search(r"Elapsed \(wall clock\) time.*: (?:(\d+):)?(\d+):([\d.]+)", out.stderr)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr)
    assert wall and rss, out.stderr
    h, m, s = wall.groups()
    return int(h or 0) * 3600 + int(m) * 60 + float(s), int(rss.group(1)) * 1024, out.stdout


def ran_child(one: list[str] | None, run: Callable[..., None], data: Path) -> bool:
    """A benchmark's start: ``--one METHOD SRC DST`` runs that one child and says True; else
    checks for ``/usr/bin/time`` and makes the data folder."""
    if one:
        run(*one)
        return True
    if not Path("/usr/bin/time").exists():
        raise SystemExit("needs /usr/bin/time: apt-get install -y time")
    data.mkdir(parents=True, exist_ok=True)
    return False


# ---------------------------------------------------------------- data


def make_big(path: Path) -> None:
    import torch

    import ckptmigrate as cm

    gen = torch.Generator().manual_seed(0)
    sd = {f"blocks.{i}.weight": torch.randn(1024, 1024, generator=gen) for i in range(BIG_TENSORS)}
    cm.save(path, sd, schema="bench", version="1.0.0", hparams={"d": 1024})


def make_sharded(folder: Path, kind: str, shards: int = 4, per_shard: int = 128) -> None:
    """A 2 GB set (4 x 512 MB) of safetensors or torch.save ``.bin`` shards, stamped 1.0.0."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(1)
    ext, base = (".safetensors", "model") if kind == "safetensors" else (".bin", "pytorch_model")
    weight_map = {}
    for s in range(shards):
        name = f"{base}-{s + 1:05d}-of-{shards:05d}{ext}"
        part = {
            f"blocks.{s * per_shard + i}.weight": torch.randn(1024, 1024, generator=gen)
            for i in range(per_shard)
        }
        if kind == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(part, folder / name)
        weight_map.update((k, name) for k in part)
        del part
    stamp = {"schema": "bench", "version": "1.0.0"}
    index = {"metadata": {"ckptmigrate.stamp": stamp}, "weight_map": weight_map}
    (folder / f"{base}{ext}.index.json").write_text(json.dumps(index))


def make_small_files(folder: Path, n: int = 1000) -> None:
    import torch

    import ckptmigrate as cm

    folder.mkdir(parents=True, exist_ok=True)
    sd = {f"blocks.{i}.weight": torch.zeros(4, 4) for i in range(20)}
    for i in range(n):
        sub = folder / f"team{i % 10}"
        sub.mkdir(exist_ok=True)
        cm.save(sub / f"run{i}.pth", sd, schema="bench", version="1.0.0" if i % 2 else "2.0.0")


# ---------------------------------------------------------------- measurements


def bench_upgrade(big: Path, rounds: int = 3) -> dict:
    """Each contender once per round, interleaved; before each run its output is deleted and
    the disk flushed (``sync``), so no run pays for another's pending writes or freed file.

    ``cp`` and ``torch.save`` do not fsync; ours does (before its rename). ``cp`` + ``sync FILE``
    is the like-for-like copy: it waits for the same bytes to reach the disk.
    """
    size = big.stat().st_size
    py = sys.executable
    me = str(Path(__file__).resolve())
    out_of = {name: DATA / f"{name}.pth" for name in ("cp", "cp_sync", "baseline", "stream")}
    commands = {
        "cp": ["cp", "--reflink=never", str(big), str(out_of["cp"])],
        "cp_sync": [
            "sh",
            "-c",
            f"cp --reflink=never '{big}' '{out_of['cp_sync']}' && sync '{out_of['cp_sync']}'",
        ],
        "baseline": [py, me, "--one", "baseline", str(big), str(out_of["baseline"])],
        "stream": [py, me, "--one", "stream", str(big), str(out_of["stream"])],
    }
    runs: dict[str, list[tuple[float, int]]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, cmd in commands.items():
            out_of[name].unlink(missing_ok=True)
            subprocess.run(["sync"], check=True)
            runs[name].append(timed_process(cmd))
    for path in out_of.values():
        path.unlink(missing_ok=True)
    result: dict = {"file_bytes": size, "rounds": rounds}
    for name, got in runs.items():
        walls = [w for w, _ in got]
        result[name] = {
            "wall_s": statistics.median(walls),
            "rss_bytes": int(statistics.median(r for _, r in got)),
            "runs": walls,
        }
    return result


def bench_load(big: Path) -> dict:
    import torch

    import ckptmigrate as cm

    schema = bench_schema()

    def median(fn) -> float:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return statistics.median(times)

    base = median(lambda: torch.load(big, mmap=True, weights_only=True))
    ours = median(lambda: cm.load(big, schema=schema, mmap=True))
    ours_plain = median(lambda: cm.load(big, schema=schema))
    return {"torch_load_mmap_s": base, "cm_load_mmap_s": ours, "cm_load_default_s": ours_plain}


def bench_sharded(folder: Path, kind: str) -> dict:
    import ckptmigrate as cm
    from ckptmigrate.engine.rewrite import upgrade_file
    from ckptmigrate.io.files import read_checkpoint

    other = folder.with_name(folder.name + "-v2")
    t = time.perf_counter()
    result = upgrade_file(folder, other, bench_schema())
    upgrade_s = time.perf_counter() - t
    t = time.perf_counter()
    d = cm.diff(folder, other)
    diff_s = time.perf_counter() - t
    t = time.perf_counter()
    read_checkpoint(folder, mmap=True)
    lazy_s = time.perf_counter() - t
    t = time.perf_counter()
    full_diff(folder, other, kind)
    load_s = time.perf_counter() - t
    total = sum(p.stat().st_size for p in folder.iterdir())
    shutil.rmtree(other, ignore_errors=True)
    return {
        "kind": kind,
        "set_bytes": total,
        "diff_s": diff_s,
        "mapped_read_s": lazy_s,
        "full_load_s": load_s,
        "upgrade_s": upgrade_s,
        "upgrade_streamed": result.streamed,
        "diff_renamed": len(getattr(d, "renamed", []) or []),
    }


def full_diff(a: Path, b: Path, kind: str) -> list[str]:
    """What a user would write without ckptmigrate: load every shard of both sets, compare.

    ``safetensors.torch.load_file`` maps the shards (it reads no tensor data until used);
    ``torch.load`` of a ``.bin`` shard reads all of it.
    """
    import torch
    from safetensors.torch import load_file

    def load_set(folder: Path) -> dict:
        out = {}
        for shard in sorted(folder.glob(f"*{'.safetensors' if kind == 'safetensors' else '.bin'}")):
            out.update(load_file(str(shard)) if kind == "safetensors" else torch.load(shard))
        return out

    x, y = load_set(a), load_set(b)
    return [
        k
        for k in x.keys() | y.keys()
        if k not in x or k not in y or (x[k].shape, x[k].dtype) != (y[k].shape, y[k].dtype)
    ]


def bench_scan(folder: Path, rounds: int = 3) -> dict:
    """Median of ``rounds`` interleaved rounds of each way to read the tree."""
    from ckptmigrate.inspection.scan import scan

    ways = {
        "workers_1": {"workers": 1},
        "threads_8": {"workers": 8},
        "processes": {"processes": True},
    }
    times: dict[str, list[float]] = {label: [] for label in ways}
    for _ in range(rounds):
        for label, options in ways.items():
            t = time.perf_counter()
            rows = scan(folder, [bench_schema()], **options)
            times[label].append(time.perf_counter() - t)
    out: dict = {f"{label}_s": statistics.median(ts) for label, ts in times.items()}
    out["files"] = len(rows)
    out["behind"] = sum(1 for r in rows if r.behind)
    out["cpus"] = os.cpu_count()
    return out


def bench_chain(n_keys: int = 100_000, n_steps: int = 20) -> dict:
    import torch

    import ckptmigrate as cm
    from ckptmigrate.engine.streaming import upgrade_stubs
    from ckptmigrate.values.tensorinfo import TensorInfo, TensorStub

    def chain(general: bool) -> cm.Schema:
        # prefix renames, every other one written as a regex; ``general``: regexes with a group
        # in the middle, which do not compose and run step by step
        schema = cm.Schema("chain", current=str(n_steps + 1))
        for i in range(1, n_steps + 1):
            if general:
                op = cm.ops.RenameKeys(rf"layer{i - 1}\.block(\d+)\.(.*)", rf"layer{i}.block\1.\2")
            elif i % 2:
                op = cm.ops.RenameKeys(rf"layer{i - 1}\.(.*)", rf"layer{i}.\1")
            else:
                op = cm.ops.RenamePrefix(f"layer{i - 1}.", f"layer{i}.")
            schema.add_migration(str(i), str(i + 1), [op])
        return schema

    names = [f"layer0.block{j // 10}.p{j % 10}" for j in range(n_keys)]
    modules = {
        "": {"version": 1},
        **{f"layer0.block{b}": {"version": 1} for b in range(n_keys // 10)},
    }

    def checkpoint(value_of) -> cm.Checkpoint:
        sd = {k: value_of() for k in names}
        return cm.Checkpoint(sd, schema="chain", version="1", module_metadata=dict(modules))

    def timed(fn) -> tuple[float, object]:
        t = time.perf_counter()
        out = fn()
        return time.perf_counter() - t, out

    schema = chain(general=False)
    plan_s, plan = timed(lambda: schema.plan("1"))
    stub = TensorStub(TensorInfo((1,), "float32", 4))
    stubs = checkpoint(lambda: stub)
    apply_s, new = timed(lambda: upgrade_stubs(stubs, schema))
    assert new is not None and next(iter(new.state_dict)).startswith(f"layer{n_steps}.")
    with_tensors = checkpoint(lambda: torch.zeros(1))
    tensors_s, _ = timed(lambda: cm.upgrade(with_tensors, schema))
    general = chain(general=True)
    general_s, new = timed(lambda: cm.upgrade(stubs, general))
    assert next(iter(new.state_dict)).startswith(f"layer{n_steps}.")
    return {
        "keys": n_keys,
        "steps": len(plan),
        "plan_s": plan_s,
        "apply_stubs_s": apply_s,
        "apply_tensors_s": tensors_s,
        "apply_general_regex_s": general_s,
    }


# ---------------------------------------------------------------- report


def machine() -> str:
    def sh(cmd: str) -> str:
        try:
            return subprocess.run(cmd, shell=True, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "?"

    model = sh("lscpu | grep 'Model name' | sed 's/.*: *//'")
    return (
        f"nproc {os.cpu_count()}, CPU {model}, Python {platform.python_version()}\n\n"
        f"```\n{sh('free -g')}\n```"
    )


def sharded_lines(sh: dict) -> list[str]:
    baseline = (
        "`safetensors.torch.load_file` per shard, which maps them"
        if sh["kind"] == "safetensors"
        else "`torch.load` per shard, which reads them whole"
    )
    return [
        f"### Sharded set, {sh['set_bytes'] / 1e9:.2f} GB (4 {sh['kind']} shards)",
        "",
        f"- `cm.diff(set, upgraded set)` (metadata only): {sh['diff_s'] * 1e3:.0f} ms",
        f"- load both sets and compare ({baseline}): {sh['full_load_s'] * 1e3:.0f} ms, "
        f"**{sh['full_load_s'] / sh['diff_s']:.1f}x** the diff",
        f"- `read_checkpoint(set, mmap=True)`: {sh['mapped_read_s'] * 1e3:.0f} ms",
        f"- streamed upgrade of the set to a new folder: {sh['upgrade_s']:.2f} s "
        f"(streamed: {sh['upgrade_streamed']})",
        "",
    ]


def report(r: dict) -> str:
    import torch

    u = r["upgrade"]
    size = u["file_bytes"]
    gb = size / 1e9

    def row(label: str, d: dict) -> str:
        return (
            f"| {label} | {d['wall_s']:.2f} | {d['rss_bytes'] / 2**20:.0f} MiB "
            f"({100 * d['rss_bytes'] / size:.1f}% of file) | "
            + ", ".join(f"{w:.2f}" for w in d["runs"])
            + " |"
        )

    s, b, c, cs = u["stream"], u["baseline"], u["cp"], u["cp_sync"]
    ld, shs, sc, ch = r["load"], r["sharded"], r["scan"], r["chain"]
    lines = [
        f"## Scale (issue 7): {dt.datetime.now().strftime('%Y-%m-%d %H:%M')}",
        "",
        f"Machine: {machine()}",
        "",
        f"torch {torch.__version__}. Command: `.venv/bin/python benchmarks/bench_scale.py`.",
        "",
        f"### Upgrade of a {gb:.2f} GB fp32 file (rename-only, {BIG_TENSORS} tensors)",
        "",
        f"Median of {u['rounds']} whole-process runs (`/usr/bin/time -v`), contenders "
        "interleaved, output deleted and `sync` before each run, warm page cache for the source. "
        "Ours fsyncs the new file before its rename; `cp` and `torch.save` do not wait for the "
        "disk, `cp` + `sync FILE` does.",
        "",
        "| method | wall s | peak RSS | runs |",
        "| --- | --- | --- | --- |",
        row("`cm.upgrade_file` (streamed)", s),
        row("`torch.load(mmap=True)` + rename + `torch.save`", b),
        row("`cp --reflink=never`", c),
        row("`cp --reflink=never` + `sync FILE`", cs),
        "",
        f"- upgrade / load+rename+save: **{s['wall_s'] / b['wall_s']:.2f}x** (goal <= 1.0x)",
        f"- upgrade / cp: **{s['wall_s'] / c['wall_s']:.2f}x** (stretch goal <= 1.3x); "
        f"upgrade / (cp + sync): **{s['wall_s'] / cs['wall_s']:.2f}x**",
        f"- upgrade peak RSS: **{100 * s['rss_bytes'] / size:.1f}%** of the file (goal <= 25%)",
        "",
        "### cm.load with a rename-only upgrade vs torch.load(mmap=True), median of 5 in-process",
        "",
        f"- torch.load(mmap=True): {ld['torch_load_mmap_s'] * 1e3:.0f} ms",
        f"- cm.load(mmap=True, schema=...): {ld['cm_load_mmap_s'] * 1e3:.0f} ms "
        f"(**{100 * (ld['cm_load_mmap_s'] / ld['torch_load_mmap_s'] - 1):+.1f}%**, goal <= +5%)",
        f"- cm.load(schema=...) without mmap: {ld['cm_load_default_s'] * 1e3:.0f} ms",
        "",
        *(line for sh in shs for line in sharded_lines(sh)),
        f"### Scan of {sc['files']} small files ({sc['behind']} behind), median of 3 rounds",
        "",
        f"- 1 worker: {sc['workers_1_s']:.2f} s; 8 threads: {sc['threads_8_s']:.2f} s; "
        f"{sc['cpus']} worker processes (the CLI's default for 64 files or more): "
        f"{sc['processes_s']:.2f} s (**{sc['workers_1_s'] / sc['processes_s']:.1f}x** one worker)",
        "",
        f"### Chain: {ch['steps']} rename steps over {ch['keys']} keys (stubs)",
        "",
        f"- plan: {ch['plan_s'] * 1e3:.1f} ms; apply: {ch['apply_stubs_s']:.2f} s "
        "(goal: plan + apply < 1 s). Prefix renames (half of them written as regexes) compose "
        "into one pass over the keys.",
        f"- the same chain on real tensors (`cm.upgrade`, 100k one-element tensors): "
        f"{ch['apply_tensors_s']:.2f} s",
        f"- the same renames written as general regexes (a group mid-key: no composition, step "
        f"by step): {ch['apply_general_regex_s']:.2f} s",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--one", nargs=3, metavar=("METHOD", "SRC", "DST"))
    parser.add_argument("--keep", action="store_true", help="keep benchmarks/data/scale/")
    parser.add_argument("--quick", action="store_true", help="small sizes: " + str(QUICK))
    args = parser.parse_args()
    if ran_child(args.one, run_one, DATA):
        return
    global BIG_TENSORS
    sizes = {"per_shard": 128, "small_files": 1000, "chain_keys": 100_000}
    if args.quick:
        BIG_TENSORS = QUICK["big_tensors"]
        sizes = QUICK
    results: dict = {}
    try:
        big = DATA / "big.pth"
        make_big(big)
        results["upgrade"] = bench_upgrade(big)
        results["load"] = bench_load(big)
        big.unlink()
        results["sharded"] = []
        for kind in ("safetensors", "bin"):
            folder = DATA / f"sharded-{kind}"
            make_sharded(folder, kind, per_shard=sizes["per_shard"])
            results["sharded"].append(bench_sharded(folder, kind))
            shutil.rmtree(folder)
        make_small_files(DATA / "small", n=sizes["small_files"])
        results["scan"] = bench_scan(DATA / "small")
        results["chain"] = bench_chain(n_keys=sizes["chain_keys"])
    finally:
        if not args.keep:
            shutil.rmtree(DATA, ignore_errors=True)
    text = report(results)
    if args.quick:
        text = text.replace("\n", f"\n\n_--quick: small sizes {QUICK}_\n", 1)
    print(text)
    print(json.dumps(results, indent=2))
    with RESULTS.open("a") as f:
        f.write(("\n" if RESULTS.exists() and RESULTS.stat().st_size else "") + text)


if __name__ == "__main__":
    main()
