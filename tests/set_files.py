"""A small sharded set (safetensors or .bin shards and an index), shared by the set tests."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
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


def save_big_endian(sd: dict[str, torch.Tensor], path: Path) -> None:
    """A torch.save zip of float32 tensors as a big-endian machine writes it: ``byteorder``
    says ``big`` and each storage's bytes are big-endian (torch.load swaps them on load)."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    with zipfile.ZipFile(buf) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/byteorder"):
                data = b"big"
            elif "/data/" in info.filename and not info.filename.endswith("serialization_id"):
                data = np.frombuffer(data, "<f4").astype(">f4").tobytes()
            zout.writestr(info.filename, data)


def make_bin_shards(
    folder: Path, shards: list[dict[str, torch.Tensor]], big_endian: tuple[int, ...] = ()
) -> list[str]:
    """A .bin set of ``shards`` (torch.save each; those numbered in ``big_endian``, from 1,
    as a big-endian machine writes them) and its index; returns the shard names."""
    folder.mkdir()
    names, weight_map = [], {}
    for i, shard in enumerate(shards, 1):
        name = f"pytorch_model-{i:05d}-of-{len(shards):05d}.bin"
        (save_big_endian if i in big_endian else torch.save)(shard, folder / name)
        weight_map.update((k, name) for k in shard)
        names.append(name)
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return names
