"""A small sharded set (safetensors or .bin shards and an index), shared by the set tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def set_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "embed.weight": torch.randn(16, 8),
        "blocks.0.weight": torch.randn(8, 8),
        "blocks.0.rotary": torch.randn(4),
        "blocks.1.weight": torch.randn(8, 8).half(),
        "head.weight": torch.randn(4, 8),
    }


def make_set(folder: Path, kind: str) -> dict[str, torch.Tensor]:
    folder.mkdir()
    tensors = set_tensors()
    keys = list(tensors)
    parts = [keys[:2], keys[2:]]
    ext, base = (".safetensors", "model") if kind == "safetensors" else (".bin", "pytorch_model")
    weight_map = {}
    for i, part in enumerate(parts, 1):
        name = f"{base}-{i:05d}-of-00002{ext}"
        shard = {k: tensors[k] for k in part}
        if kind == "safetensors":
            save_file(shard, str(folder / name), metadata={"format": "pt"})
        else:
            torch.save(shard, folder / name)
        weight_map.update((k, name) for k in part)
    index = {"metadata": {"total_size": 1234}, "weight_map": weight_map}
    (folder / f"{base}{ext}.index.json").write_text(json.dumps(index))
    return tensors
