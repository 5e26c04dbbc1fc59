"""The toy project most file-level tests work on: schema ``toy``, two blocks of 4x4 linears.

toy 1.0.0 names its blocks ``blocks.N``; 2.0.0 calls them ``layers.N``; 3.0.0 pins the
``width`` hparam (a breaking step). :data:`TOY_MIGRATIONS` is the steps alone;
:data:`TOY_MIGRATIONS_WITH_MODEL` adds the model that ``check`` builds, for golden fixtures.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import ckptmigrate as cm

TOY_MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("toy", current="3.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])


@schema.migration("2.0.0", "3.0.0", breaking=True)
def pin_width(ckpt):
    ckpt.hparams.setdefault("width", 4)
"""

TOY_MIGRATIONS_WITH_MODEL = """
import torch
from torch import nn

import ckptmigrate as cm


class Toy(nn.Module):
    def __init__(self, width=4, layers=2):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


schema = cm.Schema(
    "toy",
    current="3.0.0",
    build=lambda hp: Toy(hp.get("width", 4), hp.get("layers", 2)),
    example_input=lambda: torch.ones(1, 4),
)
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])


@schema.migration("2.0.0", "3.0.0", breaking=True)
def pin_width(ckpt):
    ckpt.hparams.setdefault("width", 4)
"""


def toy_schema():
    """The same toy schema as ``TOY_MIGRATIONS``, as an object."""
    schema = cm.Schema("toy", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])

    @schema.migration("2.0.0", "3.0.0", breaking=True)
    def pin_width(ckpt):
        ckpt.hparams.setdefault("width", 4)

    return schema


def toy_sd(prefix: str = "blocks", n: int = 2, width: int = 4) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    sd = {}
    for i in range(n):
        sd[f"{prefix}.{i}.weight"] = torch.randn(width, width, generator=gen)
        sd[f"{prefix}.{i}.bias"] = torch.randn(width, generator=gen)
    return sd


def write_golden(
    fixture: Path,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    version: str,
    hparams: dict,
    schema: str = "toy",
    **tolerances: float,
) -> Path:
    """The golden record beside ``fixture`` (``NAME.golden.pt``): ``x`` in, ``y`` out."""
    golden = {"fixture": fixture.name, "schema": schema, "version": version, "variant": None}
    golden |= {"input": x, "output": y, **tolerances, "hparams": hparams}
    path = fixture.with_name(f"{fixture.stem}.golden.pt")
    torch.save(golden, path)
    return path


def write_fixture(folder: Path, model: nn.Module, version: str, hparams: dict) -> Path:
    """``model``'s weights as toy ``version`` in ``folder``, and what it computes as golden."""
    folder.mkdir(parents=True, exist_ok=True)
    model.eval()
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        y = model(x)
    path = folder / f"{version}.pth"
    cm.save(path, model.state_dict(), schema="toy", version=version, hparams=hparams)
    write_golden(path, x, y, version=version, hparams=hparams, atol=1e-6, rtol=1e-6)
    return path


def write_toy_fixture(root: Path, width: int = 4, *, nudge: float = 0.0) -> None:
    """A toy 1.0.0 fixture whose golden output comes from running the current model."""
    folder = root / "fixtures" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    sd = toy_sd()
    path = folder / "toy_1.0.0.pth"
    cm.save(path, sd, schema="toy", version="1.0.0", hparams={"layers": 2})
    model = torch.nn.Sequential(*(torch.nn.Linear(width, width) for _ in range(2)))
    model.load_state_dict({k.replace("blocks.", ""): v for k, v in sd.items()})
    x = torch.ones(1, width)
    write_golden(path, x, model(x).detach() + nudge, version="1.0.0", hparams={"layers": 2})
