"""The real client: PEFT loads the upgraded adapter onto the upgraded base, and the model's
outputs are the old adapter's on the old base (fp32, rtol 1e-5). PEFT writes the adapter
(``get_peft_model`` then ``save_pretrained``); nothing is downloaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import ckptmigrate as cm

peft = pytest.importorskip("peft")


class Old(nn.Module):
    """Version 1.0.0: separate q, k, v (grouped-query: k and v are narrower), ``emb``, ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.blocks = nn.ModuleList([nn.Module()])
        attn = self.blocks[0].attn = nn.Module()
        attn.q, attn.k, attn.v = nn.Linear(6, 4), nn.Linear(6, 2), nn.Linear(6, 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, attn = self.emb(x), self.blocks[0].attn
        return self.head(torch.cat([attn.q(h), attn.k(h), attn.v(h)], dim=-1))


class New(nn.Module):
    """Version 2.0.0: one fused ``qkv``, ``embed``, ``layers``, ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 6)
        self.layers = nn.ModuleList([nn.Module()])
        self.layers[0].attn = nn.Module()
        self.layers[0].attn.qkv = nn.Linear(6, 8)
        self.classifier = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.layers[0].attn.qkv(self.embed(x)))


def schema() -> cm.Schema:
    s = cm.Schema("tiny", current="2.0.0")
    s.add_migration("1.0.0", "2.0.0", [
        cm.ops.RenamePrefix("emb.", "embed."),
        cm.ops.RenamePrefix("blocks.", "layers."),
        cm.ops.RenamePrefix("head.", "classifier."),
        cm.ops.Merge(["{p}.q.{k}", "{p}.k.{k}", "{p}.v.{k}"], "{p}.qkv.{k}", 0, sizes=[4, 2, 2]),
    ])  # fmt: skip
    return s


def old_base() -> Old:
    torch.manual_seed(0)
    return Old().eval()


def trained_adapter(folder: Path) -> torch.Tensor:
    """PEFT's adapter on q, v and the embedding (v at another rank and scale, head saved whole), its
    weights moved off their initial values; returns its outputs on :data:`X`."""
    config = peft.LoraConfig(
        r=2, lora_alpha=4, target_modules=["q", "v", "emb"], rank_pattern={"v": 3},
        alpha_pattern={"v": 2}, modules_to_save=["head"],
    )  # fmt: skip
    model = peft.get_peft_model(old_base(), config).eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                p.normal_()
    model.save_pretrained(folder)
    with torch.no_grad():
        return model(X)


X = torch.tensor([[1, 2, 3, 9]])


def loaded(base: nn.Module, folder: Path) -> tuple[torch.Tensor, list[str]]:
    """``base`` with PEFT's own loader of ``folder``: its outputs on :data:`X`, and the
    warnings it gave (missing or unexpected adapter keys among them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(base, folder).eval()
    with torch.no_grad():
        return model(X), [str(w.message) for w in caught]


def test_peft_loads_the_upgraded_adapter_onto_the_upgraded_base(tmp_path: Path) -> None:
    before = trained_adapter(tmp_path / "v1")
    base = cm.upgrade(cm.Checkpoint(old_base().state_dict(), schema="tiny", version="1.0.0"),
                      schema())  # fmt: skip
    new = New().eval()
    new.load_state_dict(base.state_dict)  # strict

    cm.upgrade_adapter(tmp_path / "v1", schema(), from_version="1.0.0", out=tmp_path / "v2")
    after, said = loaded(new, tmp_path / "v2")

    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert not [w for w in said if "missing" in w.lower() or "unexpected" in w.lower()], said
    config = json.loads((tmp_path / "v2" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["embed", "qkv"]
    assert config["modules_to_save"] == ["classifier"]


def test_the_adapter_downgraded_again_loads_onto_the_old_base(tmp_path: Path) -> None:
    before = trained_adapter(tmp_path / "v1")
    cm.upgrade_adapter(tmp_path / "v1", schema(), from_version="1.0.0", out=tmp_path / "v2")
    cm.upgrade_adapter(tmp_path / "v2", schema(), to="1.0.0", out=tmp_path / "back")
    again, said = loaded(old_base(), tmp_path / "back")
    torch.testing.assert_close(again, before, rtol=1e-5, atol=1e-6)
    assert not [w for w in said if "missing" in w.lower() or "unexpected" in w.lower()], said


def test_a_nudged_factor_shows_on_the_outputs(tmp_path: Path) -> None:
    """The check can fail: the k rows of the fused adapter's B must stay zero (k had no
    adapter); one of them nudged changes what the model computes."""
    from safetensors.torch import load_file, save_file

    before = trained_adapter(tmp_path / "v1")
    cm.upgrade_adapter(tmp_path / "v1", schema(), from_version="1.0.0", out=tmp_path / "v2")
    weights = tmp_path / "v2" / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    b = tensors["base_model.model.layers.0.attn.qkv.lora_B.weight"]
    assert b[4:6].eq(0).all()
    b[4, 0] = 0.1
    save_file(tensors, str(weights), metadata={"format": "pt"})
    base = cm.upgrade(cm.Checkpoint(old_base().state_dict(), schema="tiny", version="1.0.0"),
                      schema())  # fmt: skip
    new = New().eval()
    new.load_state_dict(base.state_dict)
    after, _ = loaded(new, tmp_path / "v2")
    assert not torch.allclose(after, before, rtol=1e-5, atol=1e-6)
