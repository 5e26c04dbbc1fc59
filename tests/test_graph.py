"""The migration graph: PEP 440 ordering, planning, and the errors raised before anything runs."""

from __future__ import annotations

import pytest
import torch
from packaging.version import Version

import ckptmigrate as cm
from ckptmigrate import ops


def ckpt_at(version: str, schema: str = "m") -> cm.Checkpoint:
    """Nothing but a tensor, stamped ``schema`` ``version``: all a plan needs."""
    return cm.Checkpoint({"w": torch.zeros(2)}, schema=schema, version=version)


def recording_step(schema: cm.Schema, source: str, target: str, calls: list, **kwargs):
    @schema.migration(source, target, **kwargs)
    def step(ckpt):
        calls.append((source, target))

    return step


def planned(schema: cm.Schema, start: str, target: str | None = None) -> list[tuple[str, str]]:
    return [(str(p.source), str(p.target)) for p in schema.plan(start, target)]


# ---------------------------------------------------------------- ordering and forward plans


@pytest.mark.parametrize(
    ("older", "newer"),
    [("1.9.0", "1.10.0"), ("1.0", "1.0.1"), ("2.0.0rc1", "2.0.0"), ("0.9", "0.10")],
)
def test_versions_compare_as_pep440_not_as_strings(older, newer):
    schema = cm.Schema("m", current=newer)
    schema.add_migration(older, newer, [])
    assert planned(schema, older) == [(str(Version(older)), str(Version(newer)))]


def test_plan_goes_through_1_9_before_1_10():
    schema = cm.Schema("m", current="1.10.0")
    calls: list = []
    # registered out of order on purpose: the plan follows versions, not registration
    recording_step(schema, "1.9.0", "1.10.0", calls)
    recording_step(schema, "1.8.0", "1.9.0", calls)
    assert planned(schema, "1.8.0") == [("1.8.0", "1.9.0"), ("1.9.0", "1.10.0")]
    out = cm.upgrade(ckpt_at("1.8.0"), schema)
    assert calls == [("1.8.0", "1.9.0"), ("1.9.0", "1.10.0")]
    assert out.version == Version("1.10.0")


def test_forward_plan_runs_every_step_in_order_and_stops_at_target():
    schema = cm.Schema("m", current="4.0.0")
    calls: list = []
    for a, b in [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0"), ("3.0.0", "4.0.0")]:
        recording_step(schema, a, b, calls)
    out = cm.upgrade(ckpt_at("1.0.0"), schema, to="3.0.0")
    assert calls == [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0")]
    assert out.version == Version("3.0.0")


def test_plan_from_current_to_current_is_empty():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [])
    assert schema.plan("2.0.0") == []


def test_steps_are_listed_oldest_first():
    schema = cm.Schema("m", current="1.10.0")
    schema.add_migration("1.9.0", "1.10.0", [])
    schema.add_migration("1.2.0", "1.9.0", [])
    assert [(str(s.source), str(s.target)) for s in schema.steps] == [
        ("1.2.0", "1.9.0"),
        ("1.9.0", "1.10.0"),
    ]


# ---------------------------------------------------------------- gaps and ambiguity


def test_gap_in_chain_raises_before_any_step_runs():
    schema = cm.Schema("m", current="3.0.0")
    calls: list = []
    recording_step(schema, "1.0.0", "2.0.0", calls)
    # no 2.0.0 -> 3.0.0 step
    with pytest.raises(cm.NoMigrationPathError) as info:
        cm.upgrade(ckpt_at("1.0.0"), schema)
    assert calls == []
    assert info.value.start == Version("1.0.0")
    assert info.value.target == Version("3.0.0")
    assert "1.0.0" in str(info.value) and "3.0.0" in str(info.value)


def test_unknown_start_version_is_a_gap():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [])
    with pytest.raises(cm.NoMigrationPathError, match="0.5.0"):
        schema.plan("0.5.0")


def test_two_paths_without_preference_raise_naming_both():
    schema = cm.Schema("m", current="3.0.0")
    calls: list = []
    recording_step(schema, "1.0.0", "2.0.0", calls)
    recording_step(schema, "2.0.0", "3.0.0", calls)
    recording_step(schema, "1.0.0", "3.0.0", calls)
    with pytest.raises(cm.AmbiguousMigrationPathError) as info:
        cm.upgrade(ckpt_at("1.0.0"), schema)
    assert calls == []
    assert not isinstance(info.value, cm.NoMigrationPathError)  # a gap and an ambiguity differ
    assert isinstance(info.value, cm.MigrationPathError)
    assert sorted(info.value.paths) == [["1.0.0", "2.0.0", "3.0.0"], ["1.0.0", "3.0.0"]]
    assert "1.0.0 -> 2.0.0 -> 3.0.0" in str(info.value)
    assert "1.0.0 -> 3.0.0" in str(info.value)
    assert "preferred=True" in str(info.value)


@pytest.mark.parametrize(
    ("preferred_step", "expected"),
    [
        (("1.0.0", "3.0.0"), [("1.0.0", "3.0.0")]),
        (("1.0.0", "2.0.0"), [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0")]),
    ],
)
def test_preferred_step_resolves_two_paths(preferred_step, expected):
    schema = cm.Schema("m", current="3.0.0")
    calls: list = []
    for step in [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0"), ("1.0.0", "3.0.0")]:
        recording_step(schema, *step, calls, preferred=step == preferred_step)
    cm.upgrade(ckpt_at("1.0.0"), schema)
    assert calls == expected


# ---------------------------------------------------------------- registration errors


@pytest.mark.parametrize(("source", "target"), [("2.0.0", "1.0.0"), ("1.0.0", "1.0.0")])
def test_step_that_does_not_go_forward_is_refused_at_registration(source, target):
    schema = cm.Schema("m", current="3.0.0")
    with pytest.raises(cm.MigrationGraphError, match="not forward"):

        @schema.migration(source, target)
        def step(ckpt):
            pass

    with pytest.raises(cm.MigrationGraphError):
        schema.add_migration(source, target, [])
    assert schema.steps == []


def test_duplicate_step_is_refused_at_registration():
    schema = cm.Schema("m", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def first(ckpt):
        pass

    with pytest.raises(cm.MigrationGraphError, match="first"):
        schema.add_migration("1.0.0", "2.0.0", [ops.DropKeys("x")])
    # "1.0" and "1.0.0" are one PEP 440 version
    with pytest.raises(cm.MigrationGraphError):
        schema.add_migration("1.0", "2.0", [])
    assert [s.name for s in schema.steps] == [first.__qualname__]


def test_step_beyond_current_is_refused_at_registration():
    schema = cm.Schema("m", current="2.0.0")
    with pytest.raises(cm.MigrationGraphError, match="beyond the current version"):
        schema.add_migration("2.0.0", "2.1.0", [])


@pytest.mark.parametrize("bad", ["not a version", "1.0.0-garbage!"])
def test_invalid_version_string_is_refused_at_registration(bad):
    schema = cm.Schema("m", current="2.0.0")
    with pytest.raises(cm.MigrationGraphError, match="PEP 440"):
        schema.add_migration(bad, "2.0.0", [])


# ---------------------------------------------------------------- future versions


def test_stored_version_newer_than_current_raises_future_version_error():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [])
    with pytest.raises(cm.FutureVersionError) as info:
        cm.upgrade(ckpt_at("2.1.0"), schema)
    assert info.value.stored == Version("2.1.0")
    assert info.value.current == Version("2.0.0")


def test_target_newer_than_current_raises_future_version_error():
    schema = cm.Schema("m", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", [])
    with pytest.raises(cm.FutureVersionError):
        schema.plan("1.0.0", "3.0.0")


# ---------------------------------------------------------------- downgrades


def test_downgrade_runs_inverse_ops_newest_first():
    schema = cm.Schema("m", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.RenamePrefix("a.", "b.")])
    schema.add_migration("2.0.0", "3.0.0", [ops.RenamePrefix("b.", "c.")])
    ckpt = cm.Checkpoint({"c.w": torch.ones(1)}, schema="m", version="3.0.0")
    assert planned(schema, "3.0.0", "1.0.0") == [("3.0.0", "2.0.0"), ("2.0.0", "1.0.0")]
    old = cm.upgrade(ckpt, schema, to="1.0.0")
    assert list(old.state_dict) == ["a.w"]
    assert old.version == Version("1.0.0")
    assert [(h["from"], h["to"], h["downgrade"]) for h in old.history] == [
        ("3.0.0", "2.0.0", True),
        ("2.0.0", "1.0.0", True),
    ]


def test_downgrade_through_irreversible_step_raises_no_migration_path():
    schema = cm.Schema("m", current="3.0.0")
    schema.add_migration("1.0.0", "2.0.0", [ops.DropKeys("x")])  # no inverse
    schema.add_migration("2.0.0", "3.0.0", [ops.RenamePrefix("b.", "c.")])
    ckpt = cm.Checkpoint({"c.w": torch.ones(1)}, schema="m", version="3.0.0")
    assert cm.upgrade(ckpt, schema, to="2.0.0").state_dict.keys() == {"b.w"}
    with pytest.raises(cm.NoMigrationPathError, match="reversible"):
        cm.upgrade(ckpt, schema, to="1.0.0")


def test_downgrade_through_function_step_needs_an_inverse():
    schema = cm.Schema("m", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def forward(ckpt):
        ckpt.hparams["x"] = 1

    with pytest.raises(cm.NoMigrationPathError):
        schema.plan("2.0.0", "1.0.0")

    other = cm.Schema("m", current="2.0.0")

    def backward(ckpt):
        del ckpt.hparams["x"]

    other.migration("1.0.0", "2.0.0", inverse=backward)(forward)
    ckpt = cm.Checkpoint({}, hparams={"x": 1}, schema="m", version="2.0.0")
    assert cm.upgrade(ckpt, other, to="1.0.0").hparams == {}


# ---------------------------------------------------------------- schemas are plain objects


def test_schemas_with_the_same_name_do_not_share_steps():
    a = cm.Schema("same", current="2.0.0")
    b = cm.Schema("same", current="2.0.0")
    a.add_migration("1.0.0", "2.0.0", [ops.RenamePrefix("x.", "y.")])
    assert len(a.steps) == 1
    assert b.steps == []
    with pytest.raises(cm.NoMigrationPathError):
        b.plan("1.0.0")
    # registering the same step on b is not a duplicate: the graphs are apart
    b.add_migration("1.0.0", "2.0.0", [])
    assert len(a.steps) == len(b.steps) == 1
