"""cm.diff: key, shape, dtype, hparam and value drift between two checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate.inspection.diff import Diff, diff, match_renames, name_similarity
from ckptmigrate.schema.discovery import find_schemas


def model_sd(prefix: str = "blocks", layers: int = 2, width: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {}
    for i in range(layers):
        sd[f"{prefix}.{i}.attn.weight"] = torch.randn(width, width)
        sd[f"{prefix}.{i}.attn.bias"] = torch.randn(width)
        sd[f"{prefix}.{i}.ln.weight"] = torch.ones(width)
    sd["head.weight"] = torch.randn(8, width)
    return sd


def renamed(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("blocks.", "layers."): v for k, v in sd.items()}


MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("toy", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
"""


def test_identical_files_have_no_drift(tmp_path: Path) -> None:
    cm.save(tmp_path / "a.pth", model_sd(), schema="toy", version="1.0.0", hparams={"d": 4})
    d = diff(tmp_path / "a.pth", tmp_path / "a.pth")
    assert not d.has_drift
    assert d.stamps == {
        "a": {"schema": "toy", "version": "1.0.0"},
        "b": {"schema": "toy", "version": "1.0.0"},
    }


def test_renamed_keys_are_reported_once_not_also_as_added_and_removed(tmp_path: Path) -> None:
    cm.save(tmp_path / "a.pth", model_sd(), schema="toy", version="1.0.0")
    cm.save(tmp_path / "b.safetensors", renamed(model_sd()), schema="toy", version="2.0.0")
    d = diff(tmp_path / "a.pth", tmp_path / "b.safetensors")
    pairs = {r["from"]: r["to"] for r in d.renamed}
    assert pairs == {k: k.replace("blocks.", "layers.") for k in model_sd() if "blocks" in k}
    assert d.added == [] and d.removed == []
    assert all(0.6 <= r["confidence"] <= 1 and r["reason"] for r in d.renamed)
    assert d.has_drift


def test_rename_needs_same_shape_and_dtype() -> None:
    a = {"blocks.0.w": torch.zeros(3), "blocks.0.b": torch.zeros(2)}
    b = {"layers.0.w": torch.zeros(4), "layers.0.b": torch.zeros(2, dtype=torch.float16)}
    d = diff(a, b)
    assert d.renamed == []
    assert [r["key"] for r in d.removed] == ["blocks.0.w", "blocks.0.b"]
    assert d.added[0] == {"key": "layers.0.w", "shape": [4], "dtype": "float32"}


def test_rename_matching_is_one_to_one_and_keeps_layer_indices() -> None:
    a = {f"blocks.{i}.w": torch.zeros(3) for i in range(3)}
    b = {f"layers.{i}.w": torch.zeros(3) for i in (2, 0, 1)}
    d = diff(a, b)
    assert sorted((r["from"], r["to"]) for r in d.renamed) == [
        (f"blocks.{i}.w", f"layers.{i}.w") for i in range(3)
    ]


def test_dissimilar_names_are_added_and_removed_unless_values_are_equal(tmp_path: Path) -> None:
    a = {"encoder.proj.weight": torch.arange(6.0).reshape(2, 3)}
    b = {"head.out.weight": torch.arange(6.0).reshape(2, 3)}
    assert name_similarity("encoder.proj.weight", "head.out.weight") < 0.6
    by_name = diff(a, b)
    assert by_name.renamed == [] and len(by_name.added) == len(by_name.removed) == 1
    by_value = diff(a, b, values=True)
    assert [(r["from"], r["to"]) for r in by_value.renamed] == [
        ("encoder.proj.weight", "head.out.weight")
    ]
    assert "equal values" in by_value.renamed[0]["reason"]
    assert by_value.values == [
        {
            "key": "head.out.weight",
            "max_abs_diff": 0.0,
            "equal": True,
            "from": "encoder.proj.weight",
        }
    ]


def test_match_renames_prefers_the_closest_name() -> None:
    sig = ((4,), "float32")
    removed = {"ln.weight": sig}
    added = {"ln.bias": sig, "norm.weight": sig}
    assert [r["to"] for r in match_renames(removed, added)] == ["norm.weight"]


def test_shape_and_dtype_changes_are_listed_per_key() -> None:
    a = {"w": torch.zeros(2, 3), "b": torch.zeros(3), "both": torch.zeros(2)}
    b = {
        "w": torch.zeros(3, 2),
        "b": torch.zeros(3, dtype=torch.bfloat16),
        "both": torch.zeros(3).half(),
    }
    d = diff(a, b)
    assert d.shape_changed == [
        {"key": "w", "a": [2, 3], "b": [3, 2]},
        {"key": "both", "a": [2], "b": [3]},
    ]
    assert d.dtype_changed == [
        {"key": "b", "a": "float32", "b": "bfloat16"},
        {"key": "both", "a": "float32", "b": "float16"},
    ]


def test_hparam_on_one_side_only_is_drift_even_when_the_other_has_none(tmp_path: Path) -> None:
    sd = {"w": torch.zeros(1)}
    cm.save(tmp_path / "a.pth", sd, schema="toy", version="1.0.0")
    cm.save(tmp_path / "b.pth", sd, schema="toy", version="1.0.0", hparams={"eps": 1e-5})
    d = diff(tmp_path / "a.pth", tmp_path / "b.pth")
    assert d.hparams == [{"path": "eps", "a": None, "b": 1e-5, "change": "added"}]
    assert d.has_drift
    assert diff(tmp_path / "b.pth", tmp_path / "a.pth").hparams[0]["change"] == "removed"


def test_nested_hparam_changes_are_reported_by_path() -> None:
    a = cm.Checkpoint({}, hparams={"opt": {"betas": [0.9, 0.99], "lr": 1}, "act": "gelu"})
    b = cm.Checkpoint({}, hparams={"opt": {"betas": [0.9, 0.95], "wd": 0.1, "lr": 1.0}})
    d = diff(a, b)
    assert {(h["path"], h["change"]) for h in d.hparams} == {
        ("opt.betas[1]", "changed"),
        ("opt.wd", "added"),
        ("act", "removed"),
    }
    assert json.loads(d.to_json())["hparams"] == d.hparams


def test_meta_and_stamps_are_shown_but_are_not_drift(tmp_path: Path) -> None:
    sd = {"w": torch.zeros(1)}
    cm.save(tmp_path / "a.pth", sd, schema="toy", version="1.0.0", meta={"run": "a"})
    cm.save(tmp_path / "b.pth", sd, schema="toy", version="2.0.0", meta={"run": "b"})
    d = diff(tmp_path / "a.pth", tmp_path / "b.pth")
    assert d.meta == [{"path": "run", "a": "a", "b": "b", "change": "changed"}]
    assert d.stamps["b"] == {"schema": "toy", "version": "2.0.0"}
    assert not d.has_drift


def test_values_report_max_abs_diff_and_a_nudged_tensor_is_drift(tmp_path: Path) -> None:
    sd = model_sd()
    nudged = dict(sd, **{"head.weight": sd["head.weight"] + 0.25})
    nudged["blocks.0.ln.weight"] = torch.full((4,), float("nan"))
    cm.save(tmp_path / "a.pth", sd, schema="toy", version="1.0.0")
    cm.save(tmp_path / "b.pth", nudged, schema="toy", version="1.0.0")
    assert not diff(tmp_path / "a.pth", tmp_path / "a.pth", values=True).has_drift
    d = diff(tmp_path / "a.pth", tmp_path / "b.pth", values=True)
    changed = {v["key"]: v for v in d.value_changes}
    assert set(changed) == {"head.weight", "blocks.0.ln.weight"}
    assert changed["head.weight"]["max_abs_diff"] == pytest.approx(0.25)
    assert changed["blocks.0.ln.weight"]["max_abs_diff"] == "inf"  # JSON-safe
    assert d.has_drift and not diff(sd, nudged).has_drift  # without values: same keys/shapes
    json.loads(d.to_json())


def test_plain_state_dicts_checkpoints_and_paths_mix(tmp_path: Path) -> None:
    torch.save(model_sd(), tmp_path / "raw.pth")
    ckpt = cm.Checkpoint(renamed(model_sd()), schema="toy", version="2.0.0")
    d = diff(tmp_path / "raw.pth", ckpt)
    assert len(d.renamed) == 6 and d.stamps["a"] is None
    assert not diff(model_sd(), tmp_path / "raw.pth").has_drift
    with pytest.raises(TypeError, match="paths, Checkpoints or state_dicts"):
        diff(42, model_sd())


def test_upgrade_migrates_a_to_b_version_then_shows_what_is_left(tmp_path: Path) -> None:
    (tmp_path / "mig.py").write_text(MIGRATIONS)
    schemas = find_schemas([str(tmp_path / "mig.py")])
    cm.save(tmp_path / "a.pth", model_sd(), schema="toy", version="1.0.0")
    full = renamed(model_sd())
    cm.save(tmp_path / "b.pth", full, schema="toy", version="2.0.0")
    d = diff(tmp_path / "a.pth", tmp_path / "b.pth", upgrade=True, schemas=schemas)
    assert not d.has_drift
    assert d.upgrade is not None and d.upgrade["from"] == "1.0.0" and d.upgrade["to"] == "2.0.0"
    assert d.stamps["a"] == {"schema": "toy", "version": "2.0.0"}

    cm.save(tmp_path / "c.pth", dict(full, extra=torch.zeros(1)), schema="toy", version="2.0.0")
    residual = diff(tmp_path / "a.pth", tmp_path / "c.pth", upgrade=True, schemas=schemas)
    assert residual.added == [{"key": "extra", "shape": [1], "dtype": "float32"}]
    assert residual.renamed == [] and residual.removed == []


def test_upgrade_of_an_unstamped_file_needs_from_version(tmp_path: Path) -> None:
    (tmp_path / "mig.py").write_text(MIGRATIONS)
    schemas = find_schemas([str(tmp_path / "mig.py")])
    torch.save(model_sd(), tmp_path / "raw.pth")
    cm.save(tmp_path / "b.pth", renamed(model_sd()), schema="toy", version="2.0.0")
    with pytest.raises(cm.UnversionedCheckpointError):
        diff(tmp_path / "raw.pth", tmp_path / "b.pth", upgrade=True, schemas=schemas)
    d = diff(
        tmp_path / "raw.pth",
        tmp_path / "b.pth",
        upgrade=True,
        schemas=schemas,
        from_version="1.0.0",
    )
    assert not d.has_drift


def test_diff_is_a_dataclass_with_stable_json_fields() -> None:
    record = Diff().to_dict()
    assert list(record) == [
        "a",
        "b",
        "has_drift",
        "added",
        "removed",
        "renamed",
        "shape_changed",
        "dtype_changed",
        "hparams",
        "values",
        "stamps",
        "meta",
        "upgrade",
    ]


def test_cm_diff_is_still_the_function_after_the_submodule_is_imported() -> None:
    # ``from .diff import diff`` binds the submodule on the package; cm.diff must stay callable
    first = cm.diff
    assert callable(first) and callable(cm.diff)


PROBE = """
import os, sys
from ckptmigrate.inspection.diff import diff

def rchar():
    with open("/proc/self/io") as f:
        return int(next(l for l in f if l.startswith("rchar")).split()[1])

diff(sys.argv[1], sys.argv[1])  # warm up: every import happens here
counts = []
for a, b in zip(sys.argv[1::2], sys.argv[2::2]):
    before = rchar()
    d = diff(a, b)
    counts.append(rchar() - before)
    assert d.renamed, d
print(counts, "torch" in sys.modules)
"""


@pytest.mark.skipif(not Path("/proc/self/io").exists(), reason="needs Linux /proc/self/io")
def test_metadata_diff_reads_no_tensor_data_and_never_imports_torch(tmp_path: Path) -> None:
    paths = []
    for width in (4, 1024):  # 2 x 4 MiB per big matrix: reading data would show
        for name, sd in (("a", model_sd(width=width)), ("b", renamed(model_sd(width=width)))):
            for suffix in (".pth", ".safetensors"):
                path = tmp_path / f"{name}{width}{suffix}"
                cm.save(path, sd, schema="toy", version="1.0.0")
                paths.append(path)
    pairs = []
    for suffix in (".pth", ".safetensors"):
        for width in (4, 1024):
            pairs += [str(tmp_path / f"a{width}{suffix}"), str(tmp_path / f"b{width}{suffix}")]
    out = subprocess.run(
        [sys.executable, "-c", PROBE, *pairs], capture_output=True, text=True, cwd=tmp_path
    )
    assert out.returncode == 0, out.stderr
    counts_text, torch_loaded = out.stdout.rsplit(" ", 1)
    counts = json.loads(counts_text)
    big_file = (tmp_path / "a1024.pth").stat().st_size
    assert big_file > 8_000_000
    assert all(c < 200_000 for c in counts), counts  # bytes read for both files together
    small_pth, big_pth, small_st, big_st = counts
    assert big_pth < small_pth + 50_000 and big_st < small_st + 50_000
    assert torch_loaded.strip() == "False"


def test_importing_ckptmigrate_and_diff_module_stays_torch_free() -> None:
    code = textwrap.dedent("""
        import sys
        import ckptmigrate, ckptmigrate.inspection.diff, ckptmigrate.cli
        print("torch" in sys.modules)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_values_of_expanded_tensors_compare_what_is_stored_not_the_views(tmp_path):
    # torch.zeros(1).expand(2**31, 2**31) is 1.5 KB on disk and 2**62 elements as a view:
    # comparing the views ran for years
    torch.save({"w": torch.zeros(1).expand(2**31, 2**31)}, tmp_path / "a.pth")
    torch.save({"w": torch.ones(1).expand(2**31, 2**31)}, tmp_path / "b.pth")
    n = 2**20  # stored 2 * 2**20 elements, 2**40 when crossed
    torch.save({"w": torch.zeros(n, 1).expand(n, n)}, tmp_path / "rows.pth")
    torch.save({"w": torch.zeros(1, n).expand(n, n)}, tmp_path / "cols.pth")

    d = cm.diff(tmp_path / "a.pth", tmp_path / "b.pth", values=True)
    assert d.values == [{"key": "w", "max_abs_diff": 1.0, "equal": False}]
    assert cm.diff(tmp_path / "a.pth", tmp_path / "a.pth", values=True).values[0]["equal"]
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "diff", "--values"]
        + [str(tmp_path / "rows.pth"), str(tmp_path / "cols.pth")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "not compared" in done.stderr, done
