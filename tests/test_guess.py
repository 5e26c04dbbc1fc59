"""Which version is an unstamped file? Identified by its key signature, or refused with candidates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.guess import guess_version, key_pattern
from ckptmigrate.errors import AmbiguousVersionError
from ckptmigrate.inspection.fixtures import find_fixtures
from ckptmigrate.schema.discovery import find_schemas

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
SCHEMAS = find_schemas([str(REPO / "migrations")])
ALL = find_fixtures(FIXTURES)


def unstamped_copy(fixture, tmp_path: Path) -> Path:
    """What a user has in the wild: the fixture's tensors in a plain torch.save file."""
    ckpt = cm.load(fixture.path, upgrade=False)
    path = tmp_path / "wild.pt"
    torch.save(dict(ckpt.state_dict), path)
    return path


def test_key_pattern_folds_layer_indices_only():
    assert key_pattern("layers.12.attn.q_proj.weight") == "layers.#.attn.q_proj.weight"
    assert key_pattern("0.weight") == "#.weight"
    assert key_pattern("conv1.weight") == "conv1.weight"


@pytest.mark.parametrize("fixture", ALL, ids=[f.label for f in ALL])
def test_unstamped_copy_of_each_fixture_is_identified_or_refused_with_its_version(
    fixture, tmp_path
):
    ckpt = cm.load(unstamped_copy(fixture, tmp_path), upgrade=False)
    schema = SCHEMAS[fixture.schema]
    try:
        guess = guess_version(ckpt, schema, fixtures=[FIXTURES])
    except AmbiguousVersionError as exc:
        versions = [v for v, _ in exc.candidates]
        assert fixture.version in versions and len(versions) > 1
        assert fixture.version in str(exc)
    else:
        assert str(guess.version) == fixture.version
        assert guess.confidence == 1.0


def test_from_version_auto_loads_and_upgrades_an_identified_file(tmp_path):
    fixture = next(f for f in ALL if f.schema == "tinylm" and f.version == "1.0.0")
    path = unstamped_copy(fixture, tmp_path)
    schema = SCHEMAS["tinylm"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO)  # the fixtures come from [tool.ckptmigrate] fixtures
        ckpt = cm.load(path, schema=schema, from_version="auto")
    assert ckpt.version == schema.current
    assert ckpt.history[0]["from"] == "1.0.0"


def test_a_file_matching_no_version_is_refused(tmp_path):
    path = tmp_path / "other.pt"
    torch.save({"something.else.weight": torch.zeros(2, 2)}, path)
    ckpt = cm.load(path, upgrade=False)
    with pytest.raises(AmbiguousVersionError, match="match no recorded version"):
        guess_version(ckpt, SCHEMAS["tinylm"], fixtures=[FIXTURES])


def test_stamp_guess_writes_the_identified_version(tmp_path, monkeypatch, capsys):
    fixture = next(f for f in ALL if f.schema == "tinyconv" and f.version == "1.0.0")
    path = unstamped_copy(fixture, tmp_path)
    monkeypatch.chdir(REPO)
    out = tmp_path / "stamped.pt"
    code = cli.main(["stamp", str(path), "--schema", "tinyconv", "--guess", "-o", str(out)])
    assert code == 0, capsys.readouterr().err
    assert "guessed version 1.0.0" in capsys.readouterr().out
    assert str(cm.load(out, upgrade=False).version) == "1.0.0"


def test_stamp_guess_refuses_a_tie_listing_both_candidates(tmp_path, monkeypatch, capsys):
    # tinylm 2.0.0 -> 3.0.0 only pinned an hparam: the two versions have one signature
    fixture = next(f for f in ALL if f.schema == "tinylm" and f.version == "3.0.0")
    path = unstamped_copy(fixture, tmp_path)
    monkeypatch.chdir(REPO)
    code = cli.main(["stamp", str(path), "--schema", "tinylm", "--guess", "--in-place"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ckptmigrate: error:") and "2.0.0" in err and "3.0.0" in err
    assert cm.load(path, upgrade=False).version is None  # nothing written


STAMPED = [f for f in ALL if cm.load(f.path, upgrade=False).version is not None]


@pytest.mark.parametrize("fixture", STAMPED, ids=[f.label for f in STAMPED])
def test_info_reports_the_schema_and_version_of_each_stamped_fixture(fixture, capsys):
    assert cli.main(["info", str(fixture.path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["schema"], info["version"]) == (fixture.schema, fixture.version)
