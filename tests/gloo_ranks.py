"""Two gloo ranks on loopback, forked (spawned off Linux): a process group and device mesh
per rank, and a runner that fails the test when a rank raises or hangs."""

from __future__ import annotations

import sys
import time
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
#: fork is quick (the children inherit the imported torch); spawn re-imports torch per rank
START = "fork" if sys.platform.startswith("linux") else "spawn"
DEADLINE_S = 300.0  # generous: a loaded 2-core machine starts gloo ranks slowly


def init_ranks(rank: int, store: str):
    from torch.distributed.device_mesh import init_device_mesh

    torch.set_num_threads(1)  # a forked child must not touch the parent's OpenMP pool
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
