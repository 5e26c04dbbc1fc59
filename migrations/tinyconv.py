"""tinyconv: a tiny DenseNet-style image classifier, its current code and its migration history.

The history replays changes that happened to real vision code bases:

- 1.0.0  layer names with dots (``denselayer1.norm.1``), as torchvision's DenseNet once wrote
         them; a ``fc`` classifier; ReLU; ``n_classes``. Several weights per version: one per
         dataset, each with its own number of classes and metadata.
- 1.1.0  the dotted names fixed to ``norm1``/``conv1`` (torchvision's regex key fix).
- 2.0.0  the classifier head renamed ``fc`` -> ``head``.
- 3.0.0  BC-breaking, same architecture: the default activation became SiLU; older checkpoints
         are pinned to ReLU through their hparams.
- 4.0.0  the head became ``Sequential(Dropout, Linear)`` (keys ``head.1.*``) and the hparam
         ``n_classes`` was renamed ``num_classes``.

This file is imported on its own by discovery: it may import torch and ckptmigrate only.
"""

from __future__ import annotations

import torch
from torch import nn

import ckptmigrate as cm

# Read at construction time, so that changing it is a change of the code's default.
DEFAULT_ACTIVATION = "silu"
DEFAULT_DROPOUT = 0.1

ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU}


class DenseLayer(nn.Module):
    """BN-act-conv1x1-BN-act-conv3x3, its output concatenated to its input."""

    def __init__(self, channels: int, growth: int, activation: str) -> None:
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels)
        self.act1 = ACTIVATIONS[activation]()
        self.conv1 = nn.Conv2d(channels, 2 * growth, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(2 * growth)
        self.act2 = ACTIVATIONS[activation]()
        self.conv2 = nn.Conv2d(2 * growth, growth, kernel_size=3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.act1(self.norm1(x)))
        out = self.conv2(self.act2(self.norm2(out)))
        return torch.cat([x, out], dim=1)


class TinyConv(nn.Module):
    """The current tinyconv (schema version 4.0.0): images ``(batch, 3, H, W)`` -> logits."""

    def __init__(
        self,
        num_classes: int = 10,
        width: int = 8,
        growth: int = 4,
        n_layers: int = 2,
        activation: str | None = None,
        dropout: float | None = None,
    ) -> None:
        super().__init__()
        activation = DEFAULT_ACTIVATION if activation is None else activation
        dropout = DEFAULT_DROPOUT if dropout is None else dropout
        self.hparams = {
            "num_classes": num_classes,
            "width": width,
            "growth": growth,
            "n_layers": n_layers,
            "activation": activation,
            "dropout": dropout,
        }
        self.conv0 = nn.Conv2d(3, width, kernel_size=3, padding=1, bias=False)
        self.norm0 = nn.BatchNorm2d(width)
        self.act0 = ACTIVATIONS[activation]()
        self.block = nn.Sequential()
        for i in range(n_layers):
            layer = DenseLayer(width + i * growth, growth, activation)
            self.block.add_module(f"denselayer{i + 1}", layer)
        self.norm_final = nn.BatchNorm2d(width + n_layers * growth)
        self.act_final = ACTIVATIONS[activation]()
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(width + n_layers * growth, num_classes)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.block(self.act0(self.norm0(self.conv0(images))))
        x = self.act_final(self.norm_final(x)).mean(dim=(2, 3))
        return self.head(x)


def example_input() -> torch.Tensor:
    """A deterministic batch of two 3x8x8 images."""
    return torch.linspace(-2.0, 2.0, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)


schema = cm.Schema(
    "tinyconv",
    current="4.0.0",
    build=lambda hparams: TinyConv(**hparams),
    example_input=example_input,
)

# torchvision's DenseNet fix: 'denselayer1.norm.1.weight' -> 'denselayer1.norm1.weight'.
DOTTED_KEY = r"(.*denselayer\d+\.(?:norm|conv))\.([12])\.(\w+)"
FIXED_KEY = r"(.*denselayer\d+\.(?:norm|conv))([12])\.(\w+)"

schema.add_migration(
    "1.0.0", "1.1.0", [cm.ops.RenameKeys(DOTTED_KEY, r"\1\2.\3", reverse=(FIXED_KEY, r"\1.\2.\3"))]
)

schema.add_migration("1.1.0", "2.0.0", [cm.ops.RenamePrefix("fc.", "head.")])


@schema.migration("2.0.0", "3.0.0", breaking=True)
def pin_relu(ckpt: cm.Checkpoint) -> None:
    """3.0.0 made SiLU the default activation; older checkpoints were trained with ReLU."""
    ckpt.hparams.setdefault("activation", "relu")


schema.add_migration(
    "3.0.0",
    "4.0.0",
    [
        cm.ops.RenameHparam("n_classes", "num_classes"),
        cm.ops.RenameKeys(
            r"head\.(weight|bias)", r"head.1.\1", reverse=(r"head\.1\.(weight|bias)", r"head.\1")
        ),
    ],
)
