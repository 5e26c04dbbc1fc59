"""PEFT LoRA adapter folders written as PEFT writes them (``adapter_config.json`` beside
``adapter_model.safetensors``, keys under ``base_model.model.``), and the change an adapter
makes to its base's weights, computed here from the file alone (as PEFT's ``merge_and_unload``
does), so that tests compare functions without trusting the code under test."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

PREFIX = "base_model.model."


def lora_config(**overrides: Any) -> dict[str, Any]:
    """A LoRA ``adapter_config.json`` as PEFT 0.21 writes it (the fields that matter here)."""
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": 2,
        "lora_alpha": 4,
        "target_modules": ["q", "k", "v"],
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
        "lora_bias": False,
        "modules_to_save": None,
        "bias": "none",
    }
    config.update(overrides)
    return config


def factors(out: int, inp: int, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Random ``lora_A`` (rank x in) and ``lora_B`` (out x rank): trained, B not zero."""
    g = torch.Generator().manual_seed(seed)
    return {
        "lora_A.weight": torch.randn(rank, inp, generator=g),
        "lora_B.weight": torch.randn(out, rank, generator=g),
    }


def write_lora(folder: Path, modules: dict[str, dict[str, torch.Tensor]], **config: Any) -> Path:
    """An adapter folder: ``modules`` maps a base module name to its factors by suffix."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{PREFIX}{module}.{suffix}": t.contiguous()
        for module, parts in modules.items()
        for suffix, t in parts.items()
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps(lora_config(**config)))
    (folder / "README.md").write_text("# a PEFT model card\n")
    return folder


def read_lora(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    return (
        load_file(str(folder / "adapter_model.safetensors")),
        json.loads((folder / "adapter_config.json").read_text()),
    )


def _pattern(pattern: dict[str, Any], module: str, default: Any) -> Any:
    for key, value in pattern.items():
        if module == key or module.endswith("." + key):
            return value
    return default


def deltas(folder: Path) -> dict[str, torch.Tensor]:
    """Each adapted weight's change, ``s * B @ A`` (transposed for an embedding), by the base
    key it changes (``attn.q.weight``)."""
    tensors, config = read_lora(folder)
    out = {}
    for key, a in tensors.items():
        for a_suffix, b_suffix, transposed in (
            (".lora_A.weight", ".lora_B.weight", False),
            (".lora_embedding_A", ".lora_embedding_B", True),
        ):
            if not key.endswith(a_suffix):
                continue
            module = key[len(PREFIX) : -len(a_suffix)]
            b = tensors[PREFIX + module + b_suffix]
            rank = _pattern(config["rank_pattern"], module, config["r"])
            assert a.shape[0] == rank == b.shape[1], (module, a.shape, b.shape, rank)
            alpha = _pattern(config["alpha_pattern"], module, config["lora_alpha"])
            scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
            delta = scale * (b.flatten(1) @ a.flatten(1))
            if transposed or config.get("fan_in_fan_out"):  # stored (in, out), as Conv1D
                out[module + ".weight"] = delta.T
            else:
                out[module + ".weight"] = delta.reshape(b.shape[0], *a.shape[1:])
    return out


def merged(base: dict[str, torch.Tensor], folder: Path) -> dict[str, torch.Tensor]:
    """``base`` with the adapter in ``folder`` merged into its weights."""
    out = dict(base)
    for key, delta in deltas(folder).items():
        assert key in base, f"the adapter changes {key!r}, which the base does not have"
        out[key] = base[key] + delta
    return out
