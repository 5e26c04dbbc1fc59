"""Write the legacy fixtures of the reference models by running their OLD code.

Each historic version of ``tinylm`` and ``tinyconv`` is defined below as it was then (frozen
copies: never edit a class once a fixture was written from it). For every fixture the old model
is built from a fixed seed, saved as that version wrote it, and run on a golden input in eval
mode; the input, the output and the tolerance are stored beside the fixture in
``<stem>.golden.pt``.

Fixtures are history: they are added, never rewritten. By default only missing fixtures are
written; an existing one is overwritten only with ``--force``. ``--verify`` regenerates every
fixture in a temporary folder and checks it against the committed one: names, shapes, dtypes and
integer tensors equal, float tensors within the golden record's tolerance (float kernels differ
by CPU; see ``tensor_drift``).

    python scripts/make_fixtures.py                 # write the missing fixtures
    python scripts/make_fixtures.py --verify        # regenerate and compare, write nothing
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import ckptmigrate as cm

ATOL = 1e-5
RTOL = 1e-5

# ---------------------------------------------------------------------------------------------
# tinylm, as it was
# ---------------------------------------------------------------------------------------------


class FusedAttention_1_0(nn.Module):
    """tinylm 1.x attention: GPT-2's fused q|k|v projection ``c_attn``."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.c_attn = nn.Linear(d_model, 3 * d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = self.c_attn(x).split(width, dim=2)
        q, k, v = (
            t.view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)
            for t in (q, k, v)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, width))


class SplitAttention_2_0(nn.Module):
    """tinylm 2.0.0 attention: separate q/k/v projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        q, k, v = (
            proj(x).view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP_1_0(nn.Module):
    def __init__(self, d_model: int, approximate: str = "none") -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU(approximate=approximate)
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Block_1_0(nn.Module):
    def __init__(self, d_model: int, n_heads: int, attention: type, approximate: str) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model)
        self.attn = attention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model)
        self.mlp = MLP_1_0(d_model, approximate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM_1_0(nn.Module):
    """tinylm 1.0.0: ``blocks.N`` with fused attention, exact GELU."""

    def __init__(self, vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_len=16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.blocks = nn.ModuleList(
            Block_1_0(d_model, n_heads, FusedAttention_1_0, "none") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


class TinyLM_1_1(nn.Module):
    """tinylm 1.1.0: ``blocks`` renamed ``layers``."""

    def __init__(self, vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_len=16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(
            Block_1_0(d_model, n_heads, FusedAttention_1_0, "none") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


class TinyLM_2_0(nn.Module):
    """tinylm 2.0.0: q/k/v projections split."""

    def __init__(self, vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_len=16) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(
            Block_1_0(d_model, n_heads, SplitAttention_2_0, "none") for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


class TinyLM_3_0(nn.Module):
    """tinylm 3.0.0: an ``activation`` hparam whose default is now tanh-approximated GELU."""

    def __init__(
        self, vocab_size=32, d_model=16, n_layers=2, n_heads=2, max_len=16, activation="gelu_tanh"
    ) -> None:
        super().__init__()
        approximate = {"gelu": "none", "gelu_tanh": "tanh"}[activation]
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(
            Block_1_0(d_model, n_heads, SplitAttention_2_0, approximate) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) + self.wpe(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


class TinyLM_4_0(nn.Module):
    """tinylm 4.0.0: a persistent ``embed_scale`` buffer, sqrt(d_model) for new models."""

    def __init__(
        self,
        vocab_size=32,
        d_model=16,
        n_layers=2,
        n_heads=2,
        max_len=16,
        activation="gelu_tanh",
        norm_eps=1e-5,
    ) -> None:
        super().__init__()
        approximate = {"gelu": "none", "gelu_tanh": "tanh"}[activation]
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(d_model)))
        self.layers = nn.ModuleList(
            Block_1_0(d_model, n_heads, SplitAttention_2_0, approximate) for _ in range(n_layers)
        )
        for layer in self.layers:
            layer.ln_1.eps = layer.ln_2.eps = norm_eps
        self.ln_f = nn.LayerNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.wte(tokens) * self.embed_scale + self.wpe(torch.arange(tokens.shape[1]))
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def lm_optimizer_1_0(model: nn.Module) -> torch.optim.Optimizer:
    """How tinylm 1.0.0 trained: Adam over named_parameters (its state carries param_names)."""
    return torch.optim.Adam(model.named_parameters(), lr=1e-2)


def lm_train_step_1_0(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor):
    """tinylm 1.0.0's training step: next-token cross-entropy; returns the loss before it."""
    model.train()
    optimizer.zero_grad()
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    loss.backward()
    optimizer.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------------------------
# tinyconv, as it was
# ---------------------------------------------------------------------------------------------


class DottedDenseLayer_1_0(nn.Module):
    """tinyconv 1.0.0 dense layer: modules named ``norm.1``/``conv.1`` as old DenseNet did.

    Today's PyTorch refuses dots in module names, so the nesting below reproduces the keys
    (``norm.1.weight``) that the old code wrote.
    """

    def __init__(self, channels: int, growth: int) -> None:
        super().__init__()
        self.norm = nn.ModuleDict({"1": nn.BatchNorm2d(channels), "2": nn.BatchNorm2d(2 * growth)})
        self.conv = nn.ModuleDict(
            {
                "1": nn.Conv2d(channels, 2 * growth, kernel_size=1, bias=False),
                "2": nn.Conv2d(2 * growth, growth, kernel_size=3, padding=1, bias=False),
            }
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv["1"](torch.relu(self.norm["1"](x)))
        out = self.conv["2"](torch.relu(self.norm["2"](out)))
        return torch.cat([x, out], dim=1)


class DenseLayer_1_1(nn.Module):
    """tinyconv 1.1.0 dense layer: ``norm1``/``conv1``; the activation a parameter from 3.0.0."""

    def __init__(self, channels: int, growth: int, act: type = nn.ReLU) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.act1 = act()
        self.conv1 = nn.Conv2d(channels, 2 * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.act2 = act()
        self.conv2 = nn.Conv2d(2 * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.norm1(x)))
        out = self.conv2(self.act2(self.norm2(out)))
        return torch.cat([x, out], dim=1)


class TinyConv_1_0(nn.Module):
    """tinyconv 1.0.0 (also 1.1.0 and 2.0.0, with their own layer and head names)."""

    layer_class: type = DottedDenseLayer_1_0
    head_name = "fc"

    def __init__(self, n_classes=10, width=8, growth=4, n_layers=2) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, width, kernel_size=3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(width)
        self.block = nn.Sequential()
        for i in range(n_layers):
            self.block.add_module(
                f"denselayer{i + 1}", self.layer_class(width + i * growth, growth)
            )
        self.norm_final = nn.BatchNorm2d(width + n_layers * growth)
        setattr(self, self.head_name, nn.Linear(width + n_layers * growth, n_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.block(torch.relu(self.norm0(self.conv0(images))))
        x = torch.relu(self.norm_final(x)).mean(dim=(2, 3))
        return getattr(self, self.head_name)(x)


class TinyConv_1_1(TinyConv_1_0):
    """tinyconv 1.1.0: dense layer keys fixed to ``norm1``/``conv1``."""

    layer_class = DenseLayer_1_1


class TinyConv_2_0(TinyConv_1_1):
    """tinyconv 2.0.0: classifier ``fc`` renamed ``head``."""

    head_name = "head"


class TinyConv_3_0(nn.Module):
    """tinyconv 3.0.0: an ``activation`` hparam whose default is now SiLU."""

    def __init__(self, n_classes=10, width=8, growth=4, n_layers=2, activation="silu") -> None:
        super().__init__()
        act = {"relu": nn.ReLU, "silu": nn.SiLU}[activation]
        self.conv0 = nn.Conv2d(3, width, kernel_size=3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(width)
        self.act0 = act()
        self.block = nn.Sequential()
        for i in range(n_layers):
            self.block.add_module(
                f"denselayer{i + 1}", DenseLayer_1_1(width + i * growth, growth, act)
            )
        self.norm_final = nn.BatchNorm2d(width + n_layers * growth)
        self.act_final = act()
        self.head = nn.Linear(width + n_layers * growth, n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.block(self.act0(self.norm0(self.conv0(images))))
        x = self.act_final(self.norm_final(x)).mean(dim=(2, 3))
        return self.head(x)


class TinyConv_4_0(TinyConv_3_0):
    """tinyconv 4.0.0: ``head`` is ``Sequential(Dropout, Linear)``; ``num_classes``."""

    def __init__(
        self, num_classes=10, width=8, growth=4, n_layers=2, activation="silu", dropout=0.1
    ) -> None:
        super().__init__(num_classes, width, growth, n_layers, activation)
        self.head = nn.Sequential(nn.Dropout(dropout), self.head)


# ---------------------------------------------------------------------------------------------
# the fixtures
# ---------------------------------------------------------------------------------------------

DATASETS = {
    "stripes": {"categories": ["horizontal", "vertical", "diagonal", "checker"]},
    "blobs": {"categories": ["red", "green", "blue"]},
}


@dataclass(frozen=True)
class FixtureSpec:
    """One fixture: which old code wrote it, with which hparams, in which file format."""

    schema: str
    version: str
    variant: str | None
    model: Callable[..., nn.Module]
    hparams: dict[str, Any]
    input: Callable[[torch.Generator], torch.Tensor]
    storage: str = "stamped"  # stamped | safetensors | unstamped | unstamped-legacy-format
    meta: dict[str, Any] = field(default_factory=dict)
    #: a resume fixture: train this many steps with the old code's optimizer, then save the
    #: model with its optimizer state, and record the losses of the next ``RESUME_STEPS`` steps
    train_steps: int = 0

    @property
    def stem(self) -> str:
        return self.version + (f"-{self.variant}" if self.variant else "")

    @property
    def file_name(self) -> str:
        return self.stem + (".safetensors" if self.storage == "safetensors" else ".pth")


def tokens(generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 32, (2, 8), generator=generator)


def images(generator: torch.Generator) -> torch.Tensor:
    return torch.randn(2, 3, 8, 8, generator=generator)


LM = {"vocab_size": 32, "d_model": 16, "n_layers": 2, "n_heads": 2, "max_len": 16}
#: resume fixtures hold Adam's two moments as well: a narrower model keeps the file small
LM_RESUME = {"vocab_size": 32, "d_model": 8, "n_layers": 1, "n_heads": 2, "max_len": 16}
RESUME_STEPS = 4
RESUME_ATOL = 1e-5
RESUME_RTOL = 1e-5


def lm_batch(generator: torch.Generator) -> torch.Tensor:
    """Token ids ``(4, 9)``: inputs are the first 8 columns, targets the last 8."""
    return torch.randint(0, 32, (4, 9), generator=generator)


def conv_specs(version: str, model: Callable[..., nn.Module], extra: dict[str, Any]) -> list:
    """One tinyconv fixture per dataset: the multi-weight scenario."""
    classes_key = "num_classes" if version == "4.0.0" else "n_classes"
    specs = []
    for dataset, info in DATASETS.items():
        num_classes = len(info["categories"])
        hparams = {classes_key: num_classes, "width": 8, "growth": 4, "n_layers": 2, **extra}
        meta = {"dataset": dataset, "num_classes": num_classes, **info}
        specs.append(FixtureSpec("tinyconv", version, dataset, model, hparams, images, meta=meta))
    return specs


def all_specs() -> list[FixtureSpec]:
    """Every fixture the reference models have, oldest first."""
    lm_meta = {"dataset": "random-tokens", "note": "seeded init, not trained"}
    specs = [
        FixtureSpec("tinylm", "1.0.0", None, TinyLM_1_0, LM, tokens, meta=lm_meta),
        FixtureSpec("tinylm", "1.0.0", "unstamped", TinyLM_1_0, LM, tokens, storage="unstamped"),
        FixtureSpec("tinylm", "1.1.0", None, TinyLM_1_1, LM, tokens, meta=lm_meta),
        FixtureSpec("tinylm", "2.0.0", None, TinyLM_2_0, LM, tokens, meta=lm_meta),
        FixtureSpec(
            "tinylm",
            "3.0.0",
            None,
            TinyLM_3_0,
            {**LM, "activation": "gelu_tanh"},
            tokens,
            storage="safetensors",
            meta=lm_meta,
        ),
        FixtureSpec(
            "tinylm",
            "4.0.0",
            None,
            TinyLM_4_0,
            {**LM, "activation": "gelu_tanh", "norm_eps": 1e-5},
            tokens,
            meta=lm_meta,
        ),
    ]
    # model + Adam state after a few steps of the 1.0.0 code (before the q/k/v split)
    specs.append(
        FixtureSpec(
            "tinylm",
            "1.0.0",
            "resume",
            TinyLM_1_0,
            LM_RESUME,
            tokens,
            meta={"dataset": "random-tokens", "note": "trained 3 Adam steps"},
            train_steps=3,
        )
    )
    specs += conv_specs("1.0.0", TinyConv_1_0, {})
    specs += conv_specs("1.1.0", TinyConv_1_1, {})
    specs += conv_specs("2.0.0", TinyConv_2_0, {})
    specs += conv_specs("3.0.0", TinyConv_3_0, {"activation": "silu"})
    specs += conv_specs("4.0.0", TinyConv_4_0, {"activation": "silu", "dropout": 0.1})
    # Legacy files in the wild carry no stamp: one written as a plain state_dict in the pre-1.6
    # (non-zip) torch.save format.
    for i, spec in enumerate(specs):
        if (spec.schema, spec.version, spec.variant) == ("tinyconv", "1.1.0", "blobs"):
            specs[i] = replace(spec, storage="unstamped-legacy-format")
        if (spec.schema, spec.version, spec.variant) == ("tinyconv", "2.0.0", "blobs"):
            specs[i] = replace(spec, storage="safetensors")
    return specs


def seed_of(spec: FixtureSpec) -> int:
    return zlib.crc32(f"{spec.schema}/{spec.version}/{spec.variant}".encode())


def build_old_model(spec: FixtureSpec) -> nn.Module:
    """The old model with deterministic, non-trivial weights and BatchNorm statistics."""
    torch.manual_seed(seed_of(spec))
    model = spec.model(**spec.hparams)
    generator = torch.Generator().manual_seed(seed_of(spec))
    with torch.no_grad():
        # Move every parameter off its init (LayerNorm/BatchNorm start at 1 and 0) so that a
        # misplaced tensor shows in the outputs.
        for param in model.parameters():
            param.add_(0.2 * torch.randn(param.shape, generator=generator))
        # GPT-2's initialisation of embeddings (std 0.02): small activations, as in real LMs,
        # make LayerNorm's eps matter, so a changed eps default shows in the outputs
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.copy_(0.02 * torch.randn(module.weight.shape, generator=generator))
        if any(isinstance(m, nn.BatchNorm2d) for m in model.modules()):
            model.train()
            for _ in range(3):
                model(2.0 * spec.input(generator) + 0.5)
    return model.eval()


def write_fixture(spec: FixtureSpec, folder: Path) -> tuple[Path, Path]:
    """Run the old code and write the fixture and its golden record into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model = build_old_model(spec)
    generator = torch.Generator().manual_seed(seed_of(spec) + 1)
    resume = None
    if spec.train_steps:
        model, optimizer_state, resume = train_old_model(spec, model, generator)
    golden_input = spec.input(generator)
    with torch.no_grad():
        golden_output = model(golden_input)
    state_dict = model.state_dict()
    path = folder / spec.file_name
    if resume is not None:
        ckpt = cm.Checkpoint(
            state_dict=dict(state_dict),
            hparams=dict(spec.hparams),
            meta=dict(spec.meta),
            schema=spec.schema,
            version=spec.version,
            optimizer=optimizer_state,
            module_metadata=dict(state_dict._metadata),  # type: ignore[attr-defined]
        )
        cm.save(path, ckpt)
    elif spec.storage in ("stamped", "safetensors"):
        cm.save(
            path,
            state_dict,
            schema=spec.schema,
            version=spec.version,
            hparams=spec.hparams,
            meta=spec.meta,
        )
    elif spec.storage == "unstamped":
        torch.save(state_dict, path)
    elif spec.storage == "unstamped-legacy-format":
        torch.save(state_dict, path, _use_new_zipfile_serialization=False)
    else:
        raise ValueError(f"unknown storage {spec.storage!r}")
    golden = {
        "fixture": spec.file_name,
        "schema": spec.schema,
        "version": spec.version,
        "variant": spec.variant,
        "input": golden_input,
        "output": golden_output,
        "atol": ATOL,
        "rtol": RTOL,
        "hparams": spec.hparams,
        "torch": str(torch.__version__),
    }
    if resume is not None:
        golden["resume"] = resume
    golden_path = folder / f"{spec.stem}.golden.pt"
    torch.save(golden, golden_path)
    return path, golden_path


def train_old_model(
    spec: FixtureSpec, model: nn.Module, generator: torch.Generator
) -> tuple[nn.Module, dict[str, Any], dict[str, Any]]:
    """Train with the old code, then record the next steps' losses from a copy of that state.

    Returns the model as saved (eval mode), its optimizer state, and the ``resume`` record:
    the batches and the losses the old code computed on them when it went on training.
    """
    import copy

    optimizer = lm_optimizer_1_0(model)
    for _ in range(spec.train_steps):
        lm_train_step_1_0(model, optimizer, lm_batch(generator))
    batches = [lm_batch(generator) for _ in range(RESUME_STEPS)]
    saved_model, saved_state = copy.deepcopy(model), copy.deepcopy(optimizer.state_dict())
    losses = [lm_train_step_1_0(model, optimizer, batch) for batch in batches]
    resume = {
        "batches": batches,
        "losses": torch.tensor(losses, dtype=torch.float64),
        "atol": RESUME_ATOL,
        "rtol": RESUME_RTOL,
    }
    return saved_model.eval(), saved_state, resume


def read_tensors(path: Path) -> dict[str, Any]:
    """Every tensor of a fixture or golden file, by a flat name (for --verify)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    found: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            found[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, list):  # resume batches, optimizer param groups
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)

    walk("", torch.load(path, weights_only=True))
    return found


#: An Adam entry whose gradient RMS stays below this was moved by rounding noise alone: a
#: gradient that is zero in exact arithmetic (a key bias: softmax ignores a shift of all
#: scores) comes out as +-1e-10 on one CPU and other noise on another, and Adam's normalised
#: update turns either into a full step of about lr. Real gradients here are >= 1e-4.
NOISE_GRADIENT = 1e-6


def noise_moved_entries(path: Path, spec: FixtureSpec) -> dict[str, Any]:
    """For a trained fixture: per parameter, a mask of the entries rounding noise moved."""
    if not spec.train_steps:
        return {}
    optimizer = torch.load(path, weights_only=True)["optimizer"]
    masks: dict[str, Any] = {}
    for group in optimizer["param_groups"]:
        beta2 = group["betas"][1]
        for position, name in zip(group["params"], group["param_names"]):
            state = optimizer["state"][position]
            rms = (state["exp_avg_sq"] / (1 - beta2 ** float(state["step"]))).sqrt()
            masks[f"/state_dict/{name}"] = rms < NOISE_GRADIENT
    return masks


def adam_step_bound(spec: FixtureSpec) -> float:
    """How far Adam can move one entry in the fixture's training: about lr per step."""
    lr = lm_optimizer_1_0(nn.Linear(1, 1)).param_groups[0]["lr"]
    return lr * spec.train_steps


def tensor_drift(
    new: Path,
    old: Path,
    *,
    atol: float,
    rtol: float,
    free: dict[str, Any] | None = None,
    free_bound: float = 0.0,
) -> tuple[list[str], float]:
    """How a regenerated file's tensors differ from the committed one's.

    Names, shapes, dtypes and integer tensors (token inputs, step counts, BatchNorm counters)
    do not depend on the CPU and must be equal. Float tensors come from float kernels, which
    differ between CPUs (AVX-512, AVX2, ``ATEN_CPU_CAPABILITY=default``) by a few ulp, even
    torch.randn's: they must agree within the golden check's own tolerance. Entries in ``free``
    (moved by rounding noise alone, see NOISE_GRADIENT) may differ by up to ``free_bound``.
    Returns the problems found and the largest float difference.
    """
    ta, tb = read_tensors(new), read_tensors(old)
    problems = [f"{k}: only in one" for k in sorted(ta.keys() ^ tb.keys())]
    largest = 0.0
    for key in sorted(ta.keys() & tb.keys()):
        a, b = ta[key], tb[key]
        if a.shape != b.shape or a.dtype != b.dtype:
            problems.append(f"{key}: {a.dtype}{list(a.shape)} vs {b.dtype}{list(b.shape)}")
        elif not a.is_floating_point():
            if not torch.equal(a, b):
                problems.append(f"{key}: integer values differ")
        elif a.numel():
            gap = (a.double() - b.double()).abs()
            close = torch.isclose(a.double(), b.double(), atol=atol, rtol=rtol)
            mask = (free or {}).get(key)
            if mask is not None:
                close |= mask & (gap <= free_bound)
                gap = gap.masked_fill(mask, 0.0)
            largest = max(largest, float(gap.max()))
            if not bool(close.all()):
                problems.append(f"{key}: max |diff| {float(gap.max()):.3g} > atol {atol:g}")
    return problems, largest


def verify_fixture(spec: FixtureSpec, new: Path, old: Path, new_golden: Path, old_golden: Path):
    """Problems of a regenerated fixture against the committed one, and the largest drift."""
    golden = torch.load(old_golden, weights_only=True)
    tol = {"atol": golden["atol"], "rtol": golden["rtol"]}
    free = noise_moved_entries(old, spec)
    problems, drift = tensor_drift(new, old, **tol, free=free, free_bound=adam_step_bound(spec))
    more, golden_drift = tensor_drift(new_golden, old_golden, **tol)
    return problems + more, max(drift, golden_drift)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent.parent / "fixtures")
    parser.add_argument("--force", action="store_true", help="overwrite existing fixtures")
    parser.add_argument("--verify", action="store_true", help="regenerate and compare only")
    parser.add_argument("--schema", action="append", help="only this schema (repeatable)")
    args = parser.parse_args(argv)
    specs = [s for s in all_specs() if not args.schema or s.schema in args.schema]

    if args.verify:
        bad = 0
        with tempfile.TemporaryDirectory() as tmp:
            for spec in specs:
                folder = args.out / spec.schema
                new_path, new_golden = write_fixture(spec, Path(tmp) / spec.schema)
                old_path, old_golden = folder / new_path.name, folder / new_golden.name
                if not (old_path.exists() and old_golden.exists()):
                    print(f"missing  {old_path}")
                    bad += 1
                else:
                    problems, drift = verify_fixture(
                        spec, new_path, old_path, new_golden, old_golden
                    )
                    if problems:
                        print(f"DIFFERS  {old_path}: " + "; ".join(problems[:3]))
                        bad += 1
                    else:
                        print(f"same     {old_path} (max float drift {drift:.2g})")
        return 1 if bad else 0

    for spec in specs:
        folder = args.out / spec.schema
        path, golden_path = folder / spec.file_name, folder / f"{spec.stem}.golden.pt"
        present = [p for p in (path, golden_path) if p.exists()]
        if present and not args.force:
            print(f"kept     {path} (fixtures are history; --force rewrites it)")
            continue
        write_fixture(spec, folder)
        print(f"wrote    {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
