"""Fused and split tensors: ``ckptmigrate new`` writes ``Merge``/``Split``, in the right order."""

from __future__ import annotations

import re
from pathlib import Path

import torch
from processes import run

import ckptmigrate as cm
from ckptmigrate.inspection.fusion import infer_fusions
from ckptmigrate.schema.discovery import find_schemas

SQUARE = ((32, 32), "float32")


NEW = ["new", "mlp", "--from-version", "1.0.0", "--to-version", "2.0.0"]
NEW += ["--from-file", "old.pth", "--to-file", "new.pth", "-o", "step.py"]


def separate(layers: int = 2, seed: int = 0) -> dict[str, torch.Tensor]:
    """Old layout: gate, up and down projections of each layer (``up`` listed before ``gate``)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for i in range(layers):
        for name in ("up", "gate", "down"):  # down has the same shape: a distractor
            sd[f"layers.{i}.mlp.{name}.weight"] = torch.randn(32, 32, generator=gen)
    return sd


def fused(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New layout, converted from ``sd``: gate and up concatenated, in that order."""
    out = {}
    for key, value in sd.items():
        if ".mlp.gate." in key:
            out[key.replace(".gate.", ".gate_up.")] = torch.cat(
                [value, sd[key.replace(".gate.", ".up.")]]
            )
        elif ".mlp.up." not in key:
            out[key] = value
    return out


def test_parts_are_ordered_as_the_fused_name_spells_them_not_as_the_file_lists_them() -> None:
    removed = {"mlp.up.weight": SQUARE, "mlp.gate.weight": SQUARE, "mlp.down.weight": SQUARE}
    [fusion] = infer_fusions(removed, {"mlp.gate_up.weight": ((64, 32), "float32")})
    assert (fusion.kind, fusion.parts, fusion.dim, fusion.sizes) == (
        "merge",
        ["mlp.gate.weight", "mlp.up.weight"],
        0,
        [32, 32],
    )
    assert fusion.confirmed is None  # names and shapes only


def test_q_k_v_projections_fuse_along_the_dim_that_grew_with_unequal_sizes() -> None:
    removed = {
        "attn.q_proj.weight": ((16, 8), "float32"),
        "attn.kv_proj.weight": ((16, 16), "float32"),
    }
    [fusion] = infer_fusions(removed, {"attn.qkv_proj.weight": ((16, 24), "float32")})
    assert (fusion.parts, fusion.dim, fusion.sizes) == (
        ["attn.q_proj.weight", "attn.kv_proj.weight"],
        1,
        [8, 16],
    )


def test_values_decide_the_order_whatever_the_names_say() -> None:
    old = separate(layers=1)
    whole = torch.cat([old["layers.0.mlp.up.weight"], old["layers.0.mlp.gate.weight"]])
    new = {"layers.0.mlp.gate_up.weight": whole}  # misnamed: up comes first
    removed = {k: SQUARE for k in old}
    [fusion] = infer_fusions(removed, {k: ((64, 32), "float32") for k in new}, tensors=(old, new))
    assert fusion.parts == ["layers.0.mlp.up.weight", "layers.0.mlp.gate.weight"]
    assert fusion.confirmed is True


def test_values_that_refute_every_order_leave_no_fusion() -> None:
    old = separate(layers=1)
    new = {"layers.0.mlp.gate_up.weight": torch.randn(64, 32)}  # a fresh tensor, not a fusion
    found = infer_fusions(
        {k: SQUARE for k in old}, {k: ((64, 32), "float32") for k in new}, tensors=(old, new)
    )
    assert found == []


def test_new_values_writes_one_confirmed_merge_that_upgrades_and_downgrades(
    tmp_path: Path,
) -> None:
    old = separate(layers=3)
    new = fused(old)
    cm.save(tmp_path / "old.pth", old, schema="mlp", version="1.0.0")
    cm.save(tmp_path / "new.pth", new, schema="mlp", version="2.0.0")

    made = run(tmp_path, *NEW, "--values")
    assert made.returncode == 0, made.stderr
    code = (tmp_path / "step.py").read_text()
    assert code.count("cm.ops.Merge(") == 1  # one templated op for the three layers
    assert "confirmed by values" in code and "UNCONFIRMED" not in code
    assert "DropKeys" not in code and "AddKey" not in code and "UNCONFIRMED" not in made.stderr

    up = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", "step.py")
    assert up.returncode == 0, up.stderr
    upgraded = cm.load(tmp_path / "up.pth", upgrade=False)
    assert list(upgraded.state_dict) == list(new)
    for key, value in new.items():  # concatenation copies values: exact (tolerance 0)
        torch.testing.assert_close(upgraded.state_dict[key], value, rtol=0, atol=0)
    drift = run(
        tmp_path, "diff", "--upgrade", "--values", "old.pth", "new.pth", "--migrations", "step.py"
    )
    assert drift.returncode == 0, drift.stdout + drift.stderr

    schema = find_schemas([str(tmp_path / "step.py")])["mlp"]
    back = cm.upgrade(upgraded, schema, to="1.0.0")  # the Merge's inverse splits again
    assert sorted(back.state_dict) == sorted(old)
    for key, value in old.items():
        torch.testing.assert_close(back.state_dict[key], value, rtol=0, atol=0)


def test_a_split_without_values_is_written_but_marked_unconfirmed(tmp_path: Path) -> None:
    new_sd = separate(layers=2)
    old_sd = fused(new_sd)  # the old code had the fused projection, the new one splits it
    cm.save(tmp_path / "old.pth", old_sd, schema="mlp", version="1.0.0")
    cm.save(tmp_path / "new.pth", new_sd, schema="mlp", version="2.0.0")

    made = run(tmp_path, *NEW)
    assert made.returncode == 0, made.stderr
    code = (tmp_path / "step.py").read_text()
    assert code.count("cm.ops.Split(") == 1 and "UNCONFIRMED" in code  # one for both layers
    assert "rerun with --values" in made.stderr

    up = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", "step.py")
    assert up.returncode == 0, up.stderr
    upgraded = cm.load(tmp_path / "up.pth", upgrade=False).state_dict
    assert sorted(upgraded) == sorted(new_sd)
    for key, value in new_sd.items():
        torch.testing.assert_close(upgraded[key], value, rtol=0, atol=0)


def test_with_values_a_fresh_fused_tensor_stays_a_todo_not_a_guessed_merge(tmp_path: Path) -> None:
    old = separate(layers=1)
    new = fused(separate(layers=1, seed=5))  # the new code's own initialisation
    cm.save(tmp_path / "old.pth", old, schema="mlp", version="1.0.0")
    cm.save(tmp_path / "new.pth", new, schema="mlp", version="2.0.0")
    made = run(tmp_path, *NEW, "--values")
    assert made.returncode == 0, made.stderr
    code = (tmp_path / "step.py").read_text()
    assert "cm.ops.Merge(" not in code
    assert re.search(r'cm\.ops\.AddKey\(\s*"layers\.0\.mlp\.gate_up\.weight",\s*todo\(', code)


def test_unequal_parts_along_dim_1_round_trip_with_their_sizes(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    old = {"attn.q_proj.weight": torch.randn(16, 8, generator=gen)}
    old["attn.kv_proj.weight"] = torch.randn(16, 16, generator=gen)
    new = {"attn.qkv_proj.weight": torch.cat(list(old.values()), dim=1)}
    cm.save(tmp_path / "old.pth", old, schema="mlp", version="1.0.0")
    cm.save(tmp_path / "new.pth", new, schema="mlp", version="2.0.0")
    made = run(tmp_path, *NEW, "--values")
    assert made.returncode == 0, made.stderr
    code = " ".join((tmp_path / "step.py").read_text().split())
    assert "dim=1, sizes=[8, 16]" in code

    schema = find_schemas([str(tmp_path / "step.py")])["mlp"]
    upgraded = cm.upgrade(cm.load(tmp_path / "old.pth", upgrade=False), schema)
    torch.testing.assert_close(
        upgraded.state_dict["attn.qkv_proj.weight"], new["attn.qkv_proj.weight"], rtol=0, atol=0
    )
    back = cm.upgrade(upgraded, schema, to="1.0.0")
    for key, value in old.items():  # splitting back needs the unequal sizes
        torch.testing.assert_close(back.state_dict[key], value, rtol=0, atol=0)
