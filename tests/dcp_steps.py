"""What the tests of function steps on DCP folders share: a small folder, a schema of steps,
exact comparison, and a chunk made unreadable."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

import ckptmigrate as cm
from ckptmigrate.formats.dcp import read_dcp_metadata

EXACT = {"rtol": 0.0, "atol": 0.0}  # copies and reads: the stored values themselves


def small_model(big: bool = False) -> dict[str, torch.Tensor]:
    """Three small tensors (float, float, int32), and with ``big`` a 320 x 256 one."""
    gen = torch.Generator().manual_seed(0)
    sd = {
        "a": torch.randn(4, 6, generator=gen),
        "b": torch.randn(6, generator=gen),
        "i": torch.arange(12, dtype=torch.int32).reshape(3, 4),
    }
    if big:
        sd["big"] = torch.randn(320, 256, generator=gen)
    return sd


def save_folder(out: Path, state: dict, **writer: int) -> Path:
    """``state`` saved as a DCP folder at ``out`` by a single process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save(state, storage_writer=FileSystemWriter(out, **writer))
    return out


def schema_of(*steps) -> cm.Schema:
    """Schema ``lm``: step n migrates n.0.0 -> n+1.0.0."""
    schema = cm.Schema("lm", current=f"{len(steps) + 1}.0.0")
    for n, step in enumerate(steps, start=1):
        schema.migration(f"{n}.0.0", f"{n + 1}.0.0")(step)
    return schema


def assert_same(got: dict, want: dict, *, ordered: bool = True) -> None:
    """The same keys (in the same order, where ``ordered``), dtypes and values, exactly."""
    assert (list(got) if ordered else sorted(got)) == (list(want) if ordered else sorted(want))
    for key, value in want.items():
        assert got[key].dtype == value.dtype, key
        torch.testing.assert_close(got[key], value, **EXACT, msg=key)


def clobber_chunk(folder: Path, fqn: str) -> None:
    """Overwrite the first bytes of ``fqn``'s chunk in its rank file: reading it fails."""
    md = read_dcp_metadata(folder)
    (info,) = [info for index, info in md.storage_data.items() if index.fqn == fqn]
    with open(folder / info.relative_path, "r+b") as f:
        f.seek(info.offset)
        f.write(b"\0" * 64)


def upgraded_without_reading(folder: Path, tmp_path: Path, fqn: str, step) -> Path:
    """``folder`` upgraded by ``step`` with ``fqn``'s chunk made unreadable first: it
    succeeds only if the step never reads that tensor. The output folder."""
    clobber_chunk(folder, fqn)
    out = tmp_path / "v2"
    cm.upgrade_file(folder, out, schema_of(step), from_version="1.0.0")
    return out


def refused_as_when_loaded(folder: Path, tmp_path: Path, step, match: str | None = None) -> None:
    """``step`` fails with the same MigrationError on the loaded folder (``cm.load``) and on
    touch (``upgrade_file``), which writes nothing."""
    with pytest.raises(cm.MigrationError, match=match) as loaded:
        cm.load(folder, schema=schema_of(step), from_version="1.0.0")
    out = tmp_path / "v2"
    with pytest.raises(cm.MigrationError, match=match) as upgraded:
        cm.upgrade_file(folder, out, schema_of(step), from_version="1.0.0")
    assert str(upgraded.value) == str(loaded.value)
    assert not out.exists()
