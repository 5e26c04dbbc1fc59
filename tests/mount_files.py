"""Two schemas mounted in one file (a backbone at backbone., a head at head.), shared by the mount tests."""

from __future__ import annotations

from pathlib import Path

import torch

import ckptmigrate as cm

HEAD_V1 = {"w": torch.arange(6.0).reshape(2, 3)}


def two_mounts(path: Path) -> None:
    torch.manual_seed(0)
    sd = {"backbone.encoder.weight": torch.randn(3, 3), "head.w": HEAD_V1["w"]}
    cm.save(path, sd, schema="backbone", version="1.0.0", prefix="backbone.", hparams={"d": 3})
    cm.save(path, cm.load(path), schema="head", version="1.0.0", prefix="head.")


def backbone_and_head() -> tuple[cm.Schema, cm.Schema]:
    backbone = cm.Schema("backbone", current="2.0.0")
    backbone.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("encoder.", "enc.")])
    head = cm.Schema("head", current="1.1.0")
    head.add_migration("1.0.0", "1.1.0", [cm.ops.Transpose("w")])
    return backbone, head
