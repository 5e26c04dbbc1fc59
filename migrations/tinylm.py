"""tinylm: a tiny GPT-style language model, its current code and its migration history.

The history replays changes that happened to real transformer code bases:

- 1.0.0  GPT-2 layout: ``blocks.N``, a fused ``attn.c_attn`` projection, exact GELU.
- 1.1.0  ``blocks.`` renamed ``layers.`` (a pure key rename).
- 2.0.0  the fused ``c_attn`` split into ``q_proj``/``k_proj``/``v_proj`` (weights and biases).
- 3.0.0  BC-breaking: the default activation became tanh-approximated GELU ("gelu_new");
         older checkpoints are pinned to exact GELU through their hparams.
- 4.0.0  a persistent ``embed_scale`` buffer (Gemma-style sqrt(d_model) embedding scaling for
         new models); older checkpoints get 1.0, which is what their code computed.

Every step is reversible where the older code can represent the checkpoint (exact GELU, a unit
embedding scale, the default norm eps), so ``cm.upgrade(ckpt, schema, to="1.0.0")`` writes files
that the 1.0.0 code loads. The schema also says how tinylm trains (``optimizer=``,
``train_step=``), so that resume fixtures can check that Adam's state survives the migrations.

This file is imported on its own by discovery: it may import torch and ckptmigrate only.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import ckptmigrate as cm

# Read at construction time (not bound as argument defaults) so that a change here is a change of
# the model code's default, exactly what a migration must pin for older checkpoints.
DEFAULT_ACTIVATION = "gelu_tanh"
DEFAULT_NORM_EPS = 1e-5

ACTIVATIONS = {"gelu": "none", "gelu_tanh": "tanh"}


class Attention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.q_proj = nn.Linear(d_model, d_model)
        self.k_proj = nn.Linear(d_model, d_model)
        self.v_proj = nn.Linear(d_model, d_model)
        self.c_proj = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, width = x.shape
        heads = [
            proj(x).view(batch, length, self.n_heads, width // self.n_heads).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        ]
        q, k, v = heads
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
        future = torch.ones(length, length, dtype=torch.bool, device=x.device).triu(1)
        scores = scores.masked_fill(future, float("-inf"))
        out = scores.softmax(dim=-1) @ v
        return self.c_proj(out.transpose(1, 2).reshape(batch, length, width))


class MLP(nn.Module):
    def __init__(self, d_model: int, activation: str) -> None:
        super().__init__()
        self.c_fc = nn.Linear(d_model, 4 * d_model)
        self.act = nn.GELU(approximate=ACTIVATIONS[activation])
        self.c_proj = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class Layer(nn.Module):
    def __init__(self, d_model: int, n_heads: int, activation: str, norm_eps: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(d_model, eps=norm_eps)
        self.attn = Attention(d_model, n_heads)
        self.ln_2 = nn.LayerNorm(d_model, eps=norm_eps)
        self.mlp = MLP(d_model, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TinyLM(nn.Module):
    """The current tinylm (schema version 4.0.0): token ids ``(batch, length)`` -> logits."""

    def __init__(
        self,
        vocab_size: int = 32,
        d_model: int = 16,
        n_layers: int = 2,
        n_heads: int = 2,
        max_len: int = 16,
        activation: str | None = None,
        norm_eps: float | None = None,
    ) -> None:
        super().__init__()
        activation = DEFAULT_ACTIVATION if activation is None else activation
        norm_eps = DEFAULT_NORM_EPS if norm_eps is None else norm_eps
        self.hparams = {
            "vocab_size": vocab_size,
            "d_model": d_model,
            "n_layers": n_layers,
            "n_heads": n_heads,
            "max_len": max_len,
            "activation": activation,
            "norm_eps": norm_eps,
        }
        self.wte = nn.Embedding(vocab_size, d_model)
        self.wpe = nn.Embedding(max_len, d_model)
        self.register_buffer("embed_scale", torch.tensor(math.sqrt(d_model)))
        self.layers = nn.ModuleList(
            Layer(d_model, n_heads, activation, norm_eps) for _ in range(n_layers)
        )
        self.ln_f = nn.LayerNorm(d_model, eps=norm_eps)
        self.lm_head = nn.Linear(d_model, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.wte(tokens) * self.embed_scale + self.wpe(positions)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln_f(x))


def example_input() -> torch.Tensor:
    """A deterministic batch of token ids."""
    return (torch.arange(16).reshape(2, 8) * 7) % 32


LEARNING_RATE = 1e-2


def make_optimizer(model: nn.Module) -> torch.optim.Optimizer:
    """tinylm trains with Adam over ``named_parameters()`` (so its state carries param_names)."""
    return torch.optim.Adam(model.named_parameters(), lr=LEARNING_RATE)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One next-token step on ``batch`` (token ids, ``(batch, length + 1)``); the loss before it."""
    model.train()
    optimizer.zero_grad()
    logits = model(batch[:, :-1])
    loss = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1)
    )
    loss.backward()
    optimizer.step()
    return float(loss.detach())


schema = cm.Schema(
    "tinylm",
    current="4.0.0",
    build=lambda hparams: TinyLM(**hparams),
    example_input=example_input,
    optimizer=make_optimizer,
    train_step=train_step,
)

schema.add_migration("1.0.0", "1.1.0", [cm.ops.RenamePrefix("blocks.", "layers.")], reversible=True)

schema.add_migration(
    "1.1.0",
    "2.0.0",
    [
        # nn.Linear stores (out_features, in_features): the fused q|k|v rows are stacked on dim 0.
        cm.ops.Split(
            "layers.{n}.attn.c_attn.{kind}",
            [
                "layers.{n}.attn.q_proj.{kind}",
                "layers.{n}.attn.k_proj.{kind}",
                "layers.{n}.attn.v_proj.{kind}",
            ],
            dim=0,
        )
    ],
    reversible=True,
)


def unpin_exact_gelu(ckpt: cm.Checkpoint) -> None:
    """Back to 2.0.0, whose code had exact GELU only and no ``activation`` hparam."""
    activation = ckpt.hparams.pop("activation", "gelu_tanh")  # 3.0.0's default
    if activation != "gelu":
        raise ValueError(
            f"tinylm 2.0.0 code computes exact GELU only; this checkpoint uses {activation!r}"
        )


@schema.migration("2.0.0", "3.0.0", breaking=True, inverse=unpin_exact_gelu)
def pin_exact_gelu(ckpt: cm.Checkpoint) -> None:
    """3.0.0 made tanh-approximated GELU the default; older checkpoints used exact GELU."""
    ckpt.hparams.setdefault("activation", "gelu")


def drop_unit_embed_scale(ckpt: cm.Checkpoint) -> None:
    """Back to 3.0.0, which neither scaled embeddings nor let norm eps be chosen."""
    scale = ckpt.state_dict.pop("embed_scale", None)
    if scale is not None and float(scale) != 1.0:
        raise ValueError(f"tinylm 3.0.0 code cannot scale embeddings (embed_scale={float(scale)})")
    norm_eps = ckpt.hparams.pop("norm_eps", 1e-5)  # 4.0.0's default
    if norm_eps != 1e-5:
        raise ValueError(f"tinylm 3.0.0 code has LayerNorm eps 1e-5 only, this has {norm_eps}")


@schema.migration("3.0.0", "4.0.0", inverse=drop_unit_embed_scale)
def add_unit_embed_scale(ckpt: cm.Checkpoint) -> None:
    """4.0.0 scales token embeddings by a buffer; 1.0 reproduces what older code computed."""
    ckpt.state_dict["embed_scale"] = torch.tensor(1.0)
