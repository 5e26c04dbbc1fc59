"""Two gloo ranks on loopback: a process group and device mesh per rank, and a runner
that fails the test when a rank raises or hangs.

Ranks are not forked from the test process: a fork copies a parent that earlier tests have left
with OpenMP and other worker threads mid-flight, and a child that inherits a lock held by one of
them hangs (seen once in CI: a 2-rank save still running after 300 s, passing in 7 s on rerun).
They fork from a forkserver instead: a fresh single-threaded interpreter that imports torch once
and forks every rank of every test, so no rank inherits a thread and none pays a torch import."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
START = "forkserver"
mp.set_forkserver_preload(["torch", "torch.distributed", "torch.distributed.checkpoint"])
DEADLINE_S = 180.0  # generous: a loaded 2-core machine starts gloo ranks slowly


def init_ranks(rank: int, store: str):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # two ranks on two cores: one thread each
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=timedelta(seconds=60),
    )
    return init_device_mesh("cpu", (WORLD,))


def run_ranks(worker, *args: str) -> float:
    """Run ``worker(rank, *args)`` on WORLD processes; a rank's exception fails the test."""
    start = time.monotonic()
    ctx = mp.start_processes(worker, args=args, nprocs=WORLD, join=False, start_method=START)
    while not ctx.join(timeout=1):  # raises ProcessRaisedException with the rank's traceback
        if time.monotonic() - start > DEADLINE_S:
            for proc in ctx.processes:
                if proc.is_alive():
                    proc.kill()
            pytest.fail(f"{worker.__name__} ranks still running after {DEADLINE_S:.0f}s")
    return time.monotonic() - start
