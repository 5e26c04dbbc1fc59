"""What the byte-copy tests share: the function-step rename they upgrade with, and writing a
source in the format its suffix names."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

import ckptmigrate as cm


def rename_schema() -> cm.Schema:
    """net 1 -> 2: a function step renaming ``.attn.`` to ``.self_attn.`` in every key."""
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def rename(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict = {
            k.replace(".attn.", ".self_attn."): v for k, v in ckpt.state_dict.items()
        }

    return schema


def write_source(path: Path, sd: dict[str, torch.Tensor]) -> None:
    """``sd`` saved at ``path``: safetensors for ``.safetensors``, else ``torch.save``."""
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)
