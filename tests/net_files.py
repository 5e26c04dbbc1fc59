"""Builders shared by the streaming and rewrite tests: the net schema, its state_dict, and
a guard that torch.load/torch.save are not called."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch

import ckptmigrate as cm


def net_schema() -> cm.Schema:
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.RenamePrefix("blocks.", "layers."),
            cm.ops.DropKeys(r".*\.unused"),
            cm.ops.SetHparam("eps", 1e-5, overwrite=False),
        ],
    )
    return schema


def net_state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {
        "blocks.0.weight": torch.randn(8, 4),
        "blocks.0.bias": torch.randn(8),
        "blocks.0.unused": torch.randn(1000),
        "head.weight": torch.randn(3, 8).half(),
        "head.t": torch.randn(4, 6).t(),  # a non-contiguous view keeps its strides
    }
    sd["tied.weight"] = sd["blocks.0.weight"]
    return sd


@contextlib.contextmanager
def torch_io_forbidden() -> Iterator[None]:
    """Inside, torch.load / torch.save raise: a streamed upgrade must not need them."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load/torch.save was called on the streaming path")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "load", refuse)
        mp.setattr(torch, "save", refuse)
        yield
