"""The classic model-versioning changes, each migrated and checked against the old code's outputs.

Old and new model code live side by side here; the "old" checkpoints are written by running the
old code, and the migrated ones must reproduce its outputs exactly.
"""

from __future__ import annotations

import math

import pytest
import torch
from packaging.version import Version
from torch import nn

import ckptmigrate as cm

# --- DenseNet: torchvision's `norm.1` -> `norm1` key fix (built by hand: torchvision's own
# DenseNet used module names with dots, which today's nn.Module refuses) -----------------------

DENSENET_PATTERN = r"(.*denselayer\d+\.(?:norm|relu|conv))\.((?:[12])\.(?:weight|bias|running_mean|running_var|num_batches_tracked))"


class DenseLayer(nn.Module):
    def __init__(self, channels: int = 4, growth: int = 2) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(growth)
        self.conv2 = nn.Conv2d(growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.norm2(self.conv1(torch.relu(self.norm1(x))))))
        return torch.cat([x, out], 1)


class DenseNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential()
        self.features.add_module("denselayer1", DenseLayer(4))
        self.features.add_module("denselayer2", DenseLayer(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def old_densenet_state_dict(model: DenseNet) -> dict[str, torch.Tensor]:
    """What torchvision < 0.3 saved for the same weights: `norm.1` where today says `norm1`."""
    return {
        k.replace("norm1.", "norm.1.")
        .replace("norm2.", "norm.2.")
        .replace("conv1.", "conv.1.")
        .replace("conv2.", "conv.2."): v
        for k, v in model.state_dict().items()
    }


def densenet_schema() -> cm.Schema:
    schema = cm.Schema("densenet", current="1.1.0", build=lambda hp: DenseNet())
    schema.add_migration("1.0.0", "1.1.0", [cm.ops.RenameKeys(DENSENET_PATTERN, r"\1\2")])
    return schema


def test_densenet_dotted_keys_are_renamed_and_load_strictly_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    old = DenseNet().eval()
    for m in old.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running stats
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 4, 5, 5)
    golden = old(x)
    path = tmp_path / "densenet.pth"
    torch.save(old_densenet_state_dict(old), path)

    with pytest.raises(RuntimeError, match="Missing key"):
        DenseNet().load_state_dict(torch.load(path, weights_only=True))

    schema = densenet_schema()
    model = DenseNet().eval()
    ckpt = cm.load_into(model, path, schema=schema, from_version="1.0.0")
    assert ckpt.version == Version("1.1.0")
    assert "features.denselayer1.norm1.running_var" in ckpt.state_dict
    assert torch.equal(model(x), golden)


# --- GPT-2: fused `c_attn` (a Conv1D, weight stored (in, 3*out)) split into q/k/v nn.Linear ---


class Conv1D(nn.Module):
    """GPT-2's Conv1D: a linear layer whose weight is stored transposed."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    b, t, d = q.shape
    split = lambda x: x.view(b, t, heads, d // heads).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(d // heads)
    mask = torch.tril(torch.ones(t, t, dtype=torch.bool))
    att = att.masked_fill(~mask, float("-inf")).softmax(-1)
    return (att @ v).transpose(1, 2).reshape(b, t, d)


class OldAttention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.c_attn = Conv1D(3 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(x.shape[-1], dim=2)
        return attend(q, k, v, self.heads)


class NewAttention(nn.Module):
    def __init__(self, d: int = 8, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attend(self.q(x), self.k(x), self.v(x), self.heads)


class Block(nn.Module):
    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn


def gpt2_schema() -> cm.Schema:
    schema = cm.Schema("gpt2ish", current="2.0.0", build=lambda hp: Block(NewAttention(**hp)))
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.Split(
                "{p}.c_attn.weight", ["{p}.q.weight", "{p}.k.weight", "{p}.v.weight"], dim=1
            ),
            cm.ops.Split("{p}.c_attn.bias", ["{p}.q.bias", "{p}.k.bias", "{p}.v.bias"], dim=0),
            cm.ops.Transpose("{p}.{x}.weight", 0, 1),  # Conv1D (in, out) -> Linear (out, in)
        ],
    )
    return schema


def test_fused_c_attn_split_into_q_k_v_gives_identical_outputs(tmp_path):
    torch.manual_seed(1)
    old = Block(OldAttention())
    x = torch.randn(2, 5, 8)
    golden = old.attn(x)
    path = tmp_path / "gpt2.pth"
    cm.save(path, old.state_dict(), schema="gpt2ish", version="1.0.0", hparams={"d": 8, "heads": 2})

    schema = gpt2_schema()
    ckpt = cm.load(path, schema=schema)
    assert sorted(ckpt.state_dict) == sorted(
        f"attn.{n}.{p}" for n in "qkv" for p in ("weight", "bias")
    )
    model = schema.build(ckpt.hparams)
    model.load_state_dict(ckpt.state_dict_for_torch(), strict=True)
    torch.testing.assert_close(model.attn(x), golden, rtol=0, atol=1e-6)


def test_split_q_k_v_step_is_reversible_back_to_the_fused_layout(tmp_path):
    torch.manual_seed(2)
    old = Block(OldAttention())
    path = tmp_path / "gpt2.pth"
    cm.save(path, old.state_dict(), schema="gpt2ish", version="1.0.0", hparams={"d": 8, "heads": 2})
    schema = gpt2_schema()
    back = cm.upgrade(cm.load(path, schema=schema), schema, to="1.0.0")
    assert str(back.version) == "1.0.0"
    reloaded = Block(OldAttention())
    reloaded.load_state_dict(back.state_dict, strict=True)
    for key, value in old.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], value)


# --- BC-breaking: a default changed (LayerNorm eps), pinned in the hparams ------------------


class OldNorm(nn.Module):
    """Version 1 code: eps was hard-wired to 1e-5 (not in the hparams)."""

    def __init__(self, d: int = 4) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


class NewNorm(nn.Module):
    """Version 2 code: eps is an hparam, and its default changed to 1e-1 (exaggerated)."""

    def __init__(self, d: int = 4, norm_eps: float = 1e-1) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d, eps=norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(x)


def norm_schema(pin: bool) -> cm.Schema:
    schema = cm.Schema("norm", current="2.0.0", build=lambda hp: NewNorm(**hp))
    ops = [cm.ops.SetHparam("norm_eps", 1e-5, overwrite=False, previous=cm.ops.ABSENT)]
    schema.add_migration("1.0.0", "2.0.0", ops if pin else [], breaking=True)
    return schema


@pytest.mark.parametrize("pin", [True, False])
def test_breaking_default_change_is_pinned_through_hparams(tmp_path, pin):
    torch.manual_seed(3)
    old = OldNorm()
    with torch.no_grad():
        old.ln.weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4) * 0.05  # small activations: eps matters
    golden = old(x)
    path = tmp_path / "norm.pth"
    cm.save(path, old.state_dict(), schema="norm", version="1.0.0", hparams={"d": 4})

    schema = norm_schema(pin)
    ckpt = cm.load(path, schema=schema)
    model = schema.build(ckpt.hparams)
    model.load_state_dict(ckpt.state_dict_for_torch())
    assert ckpt.history[-1]["breaking"] is True
    if pin:
        assert ckpt.hparams["norm_eps"] == 1e-5
        assert torch.equal(model(x), golden)
    else:  # the guarantee can fail: without the pin the outputs drift
        assert not torch.allclose(model(x), golden, atol=1e-4)


# --- attach: plain model.load_state_dict upgrades too, for non-breaking plans only ----------


def test_attach_upgrades_an_old_flat_state_dict_inside_load_state_dict(tmp_path):
    torch.manual_seed(4)
    old = DenseNet()
    path = tmp_path / "old.pth"
    cm.save(path, old_densenet_state_dict(old), schema="densenet", version="1.0.0")
    raw = torch.load(path, weights_only=True)  # what old user code does
    model = DenseNet()
    handle = cm.attach(model, densenet_schema())
    model.load_state_dict(raw)
    for key, value in old.state_dict().items():
        assert torch.equal(model.state_dict()[key], value)
    handle.remove()
    with pytest.raises(RuntimeError, match="Missing key"):
        DenseNet().load_state_dict(torch.load(path, weights_only=True))


def test_attach_refuses_a_plan_with_a_breaking_step_and_points_to_load_into(tmp_path):
    path = tmp_path / "norm.pth"
    cm.save(path, OldNorm().state_dict(), schema="norm", version="1.0.0", hparams={"d": 4})
    model = NewNorm()
    cm.attach(model, norm_schema(pin=True))
    with pytest.raises(cm.BreakingMigrationError, match="load_into"):
        model.load_state_dict(torch.load(path, weights_only=True))


LINEAR_MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("linear", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("old.", "")])
"""


def test_attach_by_name_resolves_the_schema_through_discovery_at_once(tmp_path, monkeypatch):
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "linear_schema.py").write_text(LINEAR_MIGRATIONS)
    (tmp_path / "pyproject.toml").write_text('[tool.ckptmigrate]\nmigrations = ["mig"]\n')
    monkeypatch.chdir(tmp_path)
    model = nn.Linear(2, 2)
    cm.attach(model, "linear", default_version="1.0.0")
    old = {"old.weight": torch.ones(2, 2), "old.bias": torch.full((2,), 3.0)}
    model.load_state_dict(old)
    assert torch.equal(model.weight, old["old.weight"]) and torch.equal(model.bias, old["old.bias"])

    other = nn.Linear(2, 2)
    with pytest.raises(cm.SchemaMismatchError, match="no schema named 'lniear'.*found: linear"):
        cm.attach(other, "lniear")  # refused here, not later inside load_state_dict
    with pytest.raises(cm.MigrationGraphError, match="not a PEP 440 version"):
        cm.attach(other, "linear", default_version="one")
    assert not other._load_state_dict_pre_hooks  # nothing half-attached


def test_attach_needs_a_version_for_an_unstamped_dict():
    model = DenseNet()
    cm.attach(model, densenet_schema())
    with pytest.raises(cm.UnversionedCheckpointError):
        model.load_state_dict(old_densenet_state_dict(DenseNet()))
    other = DenseNet()
    cm.attach(other, densenet_schema(), default_version="1.0.0")
    other.load_state_dict(old_densenet_state_dict(DenseNet()))
