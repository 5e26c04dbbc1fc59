"""Legacy fixtures: every shipped one passes, and the check fails when the guarantee is broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import ckptmigrate as cm
from ckptmigrate.errors import CheckpointFormatError
from ckptmigrate.inspection.fixtures import (
    Fixture,
    FixtureResult,
    check_fixture,
    check_fixtures,
    find_fixtures,
    load_fixture,
    read_golden,
)
from ckptmigrate.schema.discovery import import_source

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
MIGRATIONS = REPO / "migrations"


def model_module(name: str):
    """The migrations module (as discovery imported it) that defines the current model code."""
    return import_source(str(MIGRATIONS / f"{name}.py"))[0]


def schema_without(schema: cm.Schema, source: str, replacement=None) -> cm.Schema:
    """A copy of ``schema`` without its step from ``source``, or with ``replacement`` there."""
    copy = cm.Schema(
        schema.name, current=schema.current, build=schema.build, example_input=schema.example_input
    )
    for step in schema.steps:
        if str(step.source) != source:
            copy.graph.add(step)
        elif replacement is not None:
            copy.migration(str(step.source), str(step.target))(replacement)
    return copy


def copy_fixture(fixture: Fixture, folder: Path) -> Fixture:
    shutil.copy(fixture.path, folder / fixture.path.name)
    shutil.copy(fixture.golden_path, folder / fixture.golden_path.name)
    return find_fixtures(folder / fixture.golden_path.name)[0]


def shipped(label: str) -> Fixture:
    return next(f for f in find_fixtures(FIXTURES) if f.label == label)


def failures(results: list[FixtureResult]) -> dict[str, str | None]:
    return {r.fixture.label: r.reason for r in results if not r.ok}


# --- the shipped fixtures -------------------------------------------------------------------


def test_every_shipped_fixture_upgrades_loads_strictly_and_reproduces_its_outputs(schemas):
    results = check_fixtures(FIXTURES, schemas)
    assert results
    assert failures(results) == {}
    assert all(r.max_abs_error is not None and r.max_abs_error <= 1e-5 for r in results)


def test_older_fixtures_go_through_more_steps(schemas):
    steps = {r.fixture.label: r.steps_applied for r in check_fixtures(FIXTURES, schemas)}
    assert steps["tinylm 1.0.0"] == 4
    assert steps["tinylm 3.0.0"] == 1
    assert steps["tinylm 4.0.0"] == 0
    assert steps["tinyconv 1.0.0 stripes"] == 4


def test_shipped_fixtures_span_four_historic_versions_per_schema_and_several_variants():
    fixtures = find_fixtures(FIXTURES)
    versions = {(f.schema, f.version) for f in fixtures}
    for name in ("tinylm", "tinyconv"):
        historic = {v for s, v in versions if s == name and v != "4.0.0"}
        assert len(historic) >= 4, (name, historic)
    variants = Counter((f.schema, f.version) for f in fixtures if f.variant in ("stripes", "blobs"))
    assert all(count == 2 for count in variants.values()) and len(variants) == 5


def test_shipped_fixtures_include_safetensors_unstamped_and_legacy_format_files(schemas):
    fixtures = find_fixtures(FIXTURES)
    assert {f.path.suffix for f in fixtures} == {".pth", ".safetensors"}
    unstamped = [
        f
        for f in fixtures
        if cm.load(f.path, schema=schemas[f.schema], upgrade=False).version is None
    ]
    assert {f.label for f in unstamped} == {"tinylm 1.0.0 unstamped", "tinyconv 1.1.0 blobs"}
    legacy = shipped("tinyconv 1.1.0 blobs").path
    assert not zipfile.is_zipfile(legacy)  # the pre-1.6 torch.save format


def test_shipped_fixtures_stay_small():
    sizes = {p.name: p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    assert max(sizes.values()) < 64 * 1024, sizes


def test_stamped_fixtures_carry_the_version_their_golden_record_states(schemas):
    for fixture in find_fixtures(FIXTURES):
        stored = cm.load(fixture.path, schema=schemas[fixture.schema], upgrade=False)
        if stored.version is not None:
            assert (stored.schema, str(stored.version)) == (fixture.schema, fixture.version)


def test_multi_weight_variants_keep_their_own_metadata_through_the_upgrade(schemas):
    ckpt = load_fixture(shipped("tinyconv 1.0.0 stripes"), schemas["tinyconv"])
    assert ckpt.meta["dataset"] == "stripes"
    assert ckpt.hparams["num_classes"] == len(ckpt.meta["categories"]) == 4
    assert ckpt.state_dict["head.1.weight"].shape[0] == 4
    blobs = load_fixture(shipped("tinyconv 1.0.0 blobs"), schemas["tinyconv"])
    assert blobs.meta["dataset"] == "blobs" and blobs.hparams["num_classes"] == 3


@pytest.mark.parametrize("capability", [None, "default"])
def test_the_fixture_generator_reproduces_every_shipped_fixture_on_any_cpu_kernel(capability):
    # ATEN_CPU_CAPABILITY=default runs torch's non-vectorised kernels: the float results (even
    # torch.randn's) differ from the AVX2/AVX-512 ones the fixtures were made with by a few ulp,
    # as they would on another CPU, and --verify must still prove the generator matches
    done = run_generator("--verify", capability=capability)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("same ") == len(find_fixtures(FIXTURES)), done.stdout


def copy_fixture_tree(tmp_path: Path) -> Path:
    out = tmp_path / "fixtures"
    shutil.copytree(FIXTURES, out)
    return out


def nudge(path: Path, change) -> None:
    raw = torch.load(path, weights_only=True)
    change(raw)
    torch.save(raw, path)


def add_to(container: dict, key: str, amount) -> None:
    container[key] = container[key] + amount


@pytest.mark.parametrize(
    "file, change, reported",
    [
        # a float weight past the golden tolerance
        (
            "tinylm/1.0.0.pth",
            lambda raw: add_to(raw["state_dict"], "ln_f.weight", 1e-3),
            "ln_f.weight: max |diff|",
        ),
        # an integer tensor by one: no CPU changes those, so no tolerance
        (
            "tinyconv/1.0.0-stripes.pth",
            lambda raw: add_to(raw["state_dict"], "norm0.num_batches_tracked", 1),
            "integer values differ",
        ),
        # a golden output
        ("tinylm/2.0.0.golden.pt", lambda raw: add_to(raw, "output", 1e-3), "/output"),
        # a key-bias entry that Adam moved on rounding noise, past the most Adam can move it
        (
            "tinylm/1.0.0-resume.pth",
            lambda raw: raw["state_dict"]["blocks.0.attn.c_attn.bias"][8:16].add_(0.5),
            "c_attn.bias",
        ),
        # a trained entry with a real gradient, by more than the golden tolerance only
        (
            "tinylm/1.0.0-resume.pth",
            lambda raw: raw["state_dict"]["blocks.0.attn.c_attn.bias"][0:8].add_(1e-4),
            "c_attn.bias",
        ),
    ],
)
def test_the_fixture_generator_reports_a_committed_fixture_it_no_longer_reproduces(
    tmp_path, file, change, reported
):
    out = copy_fixture_tree(tmp_path)
    nudge(out / file, change)

    done = run_generator("--verify", "--out", str(out))

    assert done.returncode == 1
    differs = [line for line in done.stdout.splitlines() if line.startswith("DIFFERS")]
    assert len(differs) == 1 and file.split("/")[1].split(".golden")[0] in differs[0], differs
    assert reported in differs[0], differs


def run_generator(*args: str, capability: str | None = None) -> subprocess.CompletedProcess[str]:
    script = REPO / "scripts" / "make_fixtures.py"
    env = dict(os.environ)
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability:
        env["ATEN_CPU_CAPABILITY"] = capability
    return subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, cwd=REPO, env=env
    )


def test_the_fixture_generator_never_overwrites_a_fixture_unless_forced(tmp_path, capsys, old_code):
    out = ["--out", str(tmp_path), "--schema", "tinylm"]

    assert old_code.main(out) == 0
    written = tmp_path / "tinylm" / "1.0.0.pth"
    written.write_bytes(b"stand-in for history")
    capsys.readouterr()

    assert old_code.main(out) == 0
    assert written.read_bytes() == b"stand-in for history"
    assert "kept" in capsys.readouterr().out

    assert old_code.main([*out, "--force"]) == 0
    assert written.read_bytes() != b"stand-in for history"


# --- the guarantee can fail -----------------------------------------------------------------


@pytest.mark.parametrize(
    "label, key",
    [
        ("tinylm 1.0.0", "blocks.0.attn.c_attn.bias"),
        ("tinylm 1.0.0 unstamped", "ln_f.weight"),
        ("tinyconv 1.0.0 stripes", "block.denselayer1.norm.1.running_var"),
    ],
)
def test_a_nudged_tensor_in_an_old_fixture_fails_the_check(tmp_path, schemas, label, key):
    fixture = copy_fixture(shipped(label), tmp_path)
    raw = torch.load(fixture.path, weights_only=True)
    state_dict = raw["state_dict"] if "state_dict" in raw else raw
    state_dict[key] = state_dict[key] + 1e-3
    torch.save(raw, fixture.path)

    result = check_fixture(fixture, schemas)

    assert not result.ok
    assert "differs from the golden output" in result.reason
    assert result.max_abs_error > fixture.atol


@pytest.mark.parametrize("name", ["tinylm", "tinyconv"])
def test_removing_any_migration_step_fails_every_fixture_older_than_it(schemas, name):
    for step in schemas[name].steps:
        broken = {**schemas, name: schema_without(schemas[name], str(step.source))}
        failed = failures(check_fixtures(FIXTURES / name, broken))
        older = {
            f.label for f in find_fixtures(FIXTURES / name) if Version(f.version) <= step.source
        }
        assert set(failed) == older, step
        assert all("no migration path" in reason for reason in failed.values())


def test_replacing_the_gelu_pin_by_a_no_op_fails_the_outputs_of_older_fixtures(schemas):
    broken = {**schemas, "tinylm": schema_without(schemas["tinylm"], "2.0.0", lambda ckpt: None)}
    failed = failures(check_fixtures(FIXTURES / "tinylm", broken))
    older = {"tinylm 1.0.0", "tinylm 1.0.0 unstamped", "tinylm 1.0.0 resume", "tinylm 1.1.0"}
    assert set(failed) == older | {"tinylm 2.0.0"}
    assert all("differs from the golden output" in reason for reason in failed.values())


def test_replacing_the_densenet_key_fix_by_a_no_op_fails_the_strict_load(schemas):
    broken = schema_without(schemas["tinyconv"], "1.0.0", lambda ckpt: None)
    result = check_fixture(shipped("tinyconv 1.0.0 stripes"), {"tinyconv": broken})
    assert not result.ok
    assert result.reason.startswith("load_state_dict(strict=True)")
    assert "norm.1" in result.reason


def test_changing_a_model_default_without_a_pinning_migration_fails_the_check(schemas, monkeypatch):
    monkeypatch.setattr(model_module("tinylm"), "DEFAULT_NORM_EPS", 1e-6)  # as Llama did
    failed = failures(check_fixtures(FIXTURES / "tinylm", schemas))
    # every file written before 4.0.0 relied on the default; 4.0.0 recorded its eps in hparams
    assert set(failed) == {
        f.label for f in find_fixtures(FIXTURES / "tinylm") if Version(f.version) < Version("4")
    }
    assert all("differs from the golden output" in reason for reason in failed.values())


@pytest.mark.parametrize(
    "name, constant, value",
    [("tinylm", "DEFAULT_ACTIVATION", "gelu"), ("tinyconv", "DEFAULT_ACTIVATION", "relu")],
)
def test_changing_a_default_that_a_migration_pins_changes_nothing(
    schemas, monkeypatch, name, constant, value
):
    monkeypatch.setattr(model_module(name), constant, value)
    assert failures(check_fixtures(FIXTURES / name, schemas)) == {}


# --- how a fixture is read ------------------------------------------------------------------


def test_the_golden_record_version_wins_over_the_file_name(tmp_path, schemas):
    source = shipped("tinylm 1.0.0 unstamped")
    shutil.copy(source.path, tmp_path / "4.0.0.pth")
    record = read_golden(source.golden_path)
    torch.save({**record, "fixture": "4.0.0.pth"}, tmp_path / "4.0.0.golden.pt")

    (fixture,) = find_fixtures(tmp_path)
    result = check_fixture(fixture, schemas)

    assert fixture.version == "1.0.0"
    assert result.ok, result.reason
    assert result.steps_applied == 4


def test_a_stamp_that_contradicts_the_golden_record_fails_the_check(tmp_path, schemas):
    fixture = copy_fixture(shipped("tinylm 2.0.0"), tmp_path)
    record = read_golden(fixture.golden_path)
    torch.save({**record, "version": "1.1.0"}, fixture.golden_path)

    result = check_fixture(find_fixtures(tmp_path)[0], schemas)

    assert not result.ok
    assert "stamped tinylm 2.0.0" in result.reason and "1.1.0" in result.reason


def test_a_fixture_of_an_unknown_schema_is_a_failing_result(schemas):
    result = check_fixture(shipped("tinylm 1.0.0"), {"tinyconv": schemas["tinyconv"]})
    assert not result.ok
    assert "no schema named 'tinylm'" in result.reason


def test_a_missing_checkpoint_file_is_a_failing_result(tmp_path, schemas):
    fixture = copy_fixture(shipped("tinylm 1.1.0"), tmp_path)
    fixture.path.unlink()
    result = check_fixture(fixture, schemas)
    assert not result.ok
    assert result.reason.startswith("loading")
    assert "\n" not in result.reason


def test_a_golden_record_that_is_not_a_dict_is_a_format_error(tmp_path):
    torch.save([1, 2, 3], tmp_path / "bad.golden.pt")
    with pytest.raises(CheckpointFormatError, match="golden record is a dict"):
        find_fixtures(tmp_path)


def test_progress_is_reported_after_every_fixture(schemas):
    seen = []
    results = check_fixtures(
        FIXTURES / "tinylm", schemas, progress=lambda done, total, r: seen.append((done, total))
    )
    assert seen == [(i, len(results)) for i in range(1, len(results) + 1)]
