"""Composed prefix renames: one pass over the keys gives what the steps give one by one."""

from __future__ import annotations

import importlib
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.version import Version

import ckptmigrate as cm
from ckptmigrate.errors import MigrationError, OpMatchedNothingError
from ckptmigrate.schema.compose import PrefixMap, literal_prefix_rename

upgrade_mod = importlib.import_module("ckptmigrate.engine.upgrade")  # cm.upgrade is the function
# a tiny alphabet makes prefixes overlap, extend and collide often
TEXT = st.text(alphabet="ab.", max_size=5)
PREFIX = st.sampled_from(["", "a", "b", "ab", "ba", "aa", "bb", "a.", "b."])


def rename_prefix(key: str, old: str, new: str) -> str:
    return new + key[len(old) :] if key.startswith(old) else key


@settings(max_examples=1500, deadline=None)
@given(
    renames=st.lists(st.tuples(PREFIX, PREFIX).filter(lambda r: r[0] != r[1]), max_size=5),
    keys=st.lists(TEXT, max_size=8),
)
def test_composite_equals_the_renames_one_by_one(renames, keys):
    rules = PrefixMap()
    changed_by: set[int] = set()
    current = list(keys)
    for step, (old, new) in enumerate(renames):
        rules.then(old, new, step=step)
        after = [rename_prefix(k, old, new) for k in current]
        if after != current:
            changed_by.add(step)
        current = after
    out, fired = rules.apply(keys)
    assert out == current
    assert fired == changed_by


@settings(max_examples=200, deadline=None)
@given(renames=st.lists(st.tuples(TEXT, TEXT), max_size=6), modules=st.lists(TEXT, max_size=8))
def test_modules_follow_the_composite_as_they_follow_each_rename(renames, modules):
    renames = [(old, new + "x.") for old, new in renames]  # dot-aligned, as upgrade requires
    rules = PrefixMap()
    current = list(modules)
    for step, (old, new) in enumerate(renames):
        rules.then(old, new, step=step)
        current = [cm.ops.prefix_mover(old, new)(m) for m in current]
    move = rules.module_renamer()
    assert [move(m) for m in modules] == current


@pytest.mark.parametrize(
    ("pattern", "repl", "expected"),
    [
        (r"blocks\.(.*)", r"layers.\1", ("blocks.", "layers.")),
        (r"blocks\.(.*)", r"\1", ("blocks.", "")),
        (r"(.*)", r"module.\g<1>", ("", "module.")),
        (r"enc\.(?P<rest>.*)", r"encoder.\g<rest>", ("enc.", "encoder.")),
        (r"a\\(.*)", r"b\1", ("a\\", "b")),
        (r"blocks\.(\d+)\.(.*)", r"layers.\1.\2", None),  # two groups
        (r"blocks.(.*)", r"layers.\1", None),  # an unescaped dot matches any character
        (r"blocks\.(.*)", r"\1.x", None),  # the group is not at the end of the result
        (r"a\d(.*)", r"b\1", None),
        (r"a\(.*)", r"b\1", None),  # an escaped parenthesis: no group at all
        (r"(?i)a(.*)", r"b\1", None),
        (r"a(.*)", r"b\\\1", None),
    ],
)
def test_literal_prefix_rename(pattern, repl, expected):
    assert literal_prefix_rename(pattern, repl) == expected


@settings(max_examples=300, deadline=None)
@given(head=st.text(alphabet="ab.\\*(", max_size=4), new=TEXT, keys=st.lists(TEXT, max_size=8))
def test_a_recognised_regex_renames_like_its_prefix(head, new, keys):
    pattern, repl = re.escape(head) + "(.*)", new.replace("\\", "") + r"\1"
    pair = literal_prefix_rename(pattern, repl)
    assert pair == (head, new.replace("\\", ""))
    for key in keys:
        m = re.fullmatch(pattern, key)
        regex = m.expand(repl) if m else key
        assert regex == rename_prefix(key, *pair)


# ---------------------------------------------------------------- through cm.upgrade


def chain_schema(n: int = 8) -> cm.Schema:
    """Alternating regex and prefix renames, an hparam op on the way, one step back and forth."""
    schema = cm.Schema("chain", current=str(n + 1))
    for i in range(1, n + 1):
        if i % 2:
            op = cm.ops.RenameKeys(
                rf"stage{i - 1}\.(.*)",
                rf"stage{i}.\1",
                reverse=(rf"stage{i}\.(.*)", rf"stage{i - 1}.\1"),
            )
        else:
            op = cm.ops.RenamePrefix(f"stage{i - 1}.", f"stage{i}.")
        ops = [op, cm.ops.SetHparam(f"h{i}", i, previous=cm.ops.ABSENT)] if i == 3 else [op]
        schema.add_migration(str(i), str(i + 1), ops)
    return schema


def chain_checkpoint() -> cm.Checkpoint:
    sd = {f"stage0.block{b}.{p}": torch.full((2,), float(b)) for b in range(3) for p in "wb"}
    sd["head.w"] = torch.ones(2)
    params = list(sd)
    opt = torch.optim.Adam([torch.nn.Parameter(t.clone()) for t in sd.values()])
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    opt.step()
    opt_sd = opt.state_dict()
    opt_sd["param_groups"][0]["param_names"] = params
    modules = {"": {"version": 1}, "stage0": {}, "stage0.block0": {"version": 2}, "stage0.act": {}}
    return cm.Checkpoint(
        sd, hparams={"d": 2}, schema="chain", version="1", optimizer=opt_sd, module_metadata=modules
    )


def one_by_one(monkeypatch, *args, **kwargs):
    with monkeypatch.context() as m:
        m.setattr(upgrade_mod, "apply_composed", lambda *a: None)
        return cm.upgrade(*args, **kwargs)


def same(a: cm.Checkpoint, b: cm.Checkpoint) -> None:
    assert list(a.state_dict) == list(b.state_dict)
    assert all(a.state_dict[k] is b.state_dict[k] for k in a.state_dict)
    assert a.hparams == b.hparams and a.version == b.version
    assert a.module_metadata == b.module_metadata
    strip = [{k: v for k, v in h.items() if k != "applied_at"} for h in a.history]
    assert strip == [{k: v for k, v in h.items() if k != "applied_at"} for h in b.history]
    assert repr(a.optimizer) == repr(b.optimizer)


def test_a_rename_chain_runs_composed_and_matches_the_steps_one_by_one(monkeypatch):
    schema, ckpt = chain_schema(), chain_checkpoint()
    calls = []
    real = upgrade_mod.apply_step
    monkeypatch.setattr(upgrade_mod, "apply_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    fast = cm.upgrade(ckpt, schema)
    assert calls == []  # no step ran on its own
    assert list(fast.state_dict)[0] == "stage8.block0.w"
    assert fast.module_metadata["stage8.act"] == {}  # a module without tensors moves too
    assert fast.hparams["h3"] == 3 and len(fast.history) == 8
    assert fast.optimizer["param_groups"][0]["param_names"][0] == "stage8.block0.w"
    same(fast, one_by_one(monkeypatch, ckpt, schema))
    assert len(calls) == 8  # one by one, each step ran on its own
    calls.clear()
    back = cm.upgrade(fast, schema, to="1")  # downgrades compose too
    assert calls == []
    same(back, one_by_one(monkeypatch, fast, schema, to="1"))
    assert list(back.state_dict) == list(ckpt.state_dict)
    assert back.module_metadata == ckpt.module_metadata


def test_a_step_that_collides_fails_with_its_own_name(monkeypatch):
    schema = chain_schema(4)
    ckpt = chain_checkpoint()
    ckpt.state_dict["stage2.block0.w"] = torch.zeros(2)  # stage1 -> stage2 collides with it
    with pytest.raises(MigrationError) as fast:
        cm.upgrade(ckpt, schema)
    with pytest.raises(MigrationError) as slow:
        one_by_one(monkeypatch, ckpt, schema)
    assert str(fast.value) == str(slow.value)
    assert "2 -> 3" in str(fast.value) and "already exists" in str(fast.value)


def test_a_step_with_nothing_to_rename_is_left_to_the_steps(monkeypatch):
    schema = chain_schema(4)
    ckpt = chain_checkpoint()
    ckpt.state_dict = {k.replace("stage0.", "stage1."): v for k, v in ckpt.state_dict.items()}
    ckpt.optimizer = None
    with pytest.raises(MigrationError) as fast:  # step 1 -> 2 finds the new layout already
        cm.upgrade(ckpt, schema)
    with pytest.raises(MigrationError) as slow:
        one_by_one(monkeypatch, ckpt, schema)
    assert str(fast.value) == str(slow.value) and "already has the new layout" in str(fast.value)
    ckpt.state_dict = {"head.w": torch.ones(2)}  # nothing to rename anywhere: the same error
    with pytest.raises(OpMatchedNothingError) as fast:
        cm.upgrade(ckpt, schema)
    with pytest.raises(OpMatchedNothingError) as slow:
        one_by_one(monkeypatch, ckpt, schema)
    assert str(fast.value) == str(slow.value) and "matched no key" in str(fast.value)
    assert fast.value.to_version == slow.value.to_version == Version("2")


def test_a_newline_in_a_key_keeps_regex_semantics(monkeypatch):
    schema = chain_schema(2)
    ckpt = cm.Checkpoint(
        {"stage0.a": torch.ones(1), "stage0.b\nc": torch.ones(1)}, schema="chain", version="1"
    )
    out = cm.upgrade(ckpt, schema)
    assert list(out.state_dict) == ["stage2.a", "stage0.b\nc"]  # `.` stops at the newline
    same(out, one_by_one(monkeypatch, ckpt, schema))


def test_an_in_place_upgrade_composes_the_run_and_reports_progress(tmp_path, monkeypatch):
    from ckptmigrate.engine.inplace import migrate_file

    target = tmp_path / "model.pth"
    ckpt = chain_checkpoint()
    cm.save(target, ckpt.state_dict, schema="chain", version="1", hparams=ckpt.hparams)
    monkeypatch.setattr(upgrade_mod, "apply_step", None)  # a step run on its own would fail
    seen = []
    migrate_file(target, None, schemas=chain_schema(), progress=lambda *a: seen.append(a))
    assert seen == [(8, 8)]
    out = cm.load(target)
    assert list(out.state_dict)[0] == "stage8.block0.w" and out.hparams["h3"] == 3
    assert [h["to"] for h in out.history] == [str(v) for v in range(2, 10)]


def _outcome(fn):
    try:
        out = fn()
    except MigrationError as exc:
        return str(exc)
    return (
        list(out.state_dict),
        out.module_metadata,
        out.hparams,
        [{k: v for k, v in h.items() if k != "applied_at"} for h in out.history],
    )


def _schema_of(steps: list[list]) -> cm.Schema:
    schema = cm.Schema("s", current=str(len(steps) + 1))
    for i, ops in enumerate(steps, 1):
        schema.add_migration(str(i), str(i + 1), ops)
    return schema


RP, SET = cm.ops.RenamePrefix, cm.ops.SetHparam


@pytest.mark.parametrize(
    ("steps", "keys", "modules"),
    [
        # one rename of a step finds the new layout: that step's error, not a silent pass
        (
            [[RP("enc.", "encoder."), RP("dec.", "decoder.")], [SET("x", 1)]],
            ["enc.w", "decoder.w"],
            None,
        ),
        # a rename that renames no key moves no module
        (
            [[RP("enc.", "encoder."), RP("dec.", "decoder.")], [SET("x", 1)]],
            ["enc.w"],
            ["", "enc", "dec"],
        ),
        # a module stripped to the root merges into it one by one
        (
            [[cm.ops.STRIP_DATAPARALLEL], [RP("", "model.")]],
            ["module.fc.w"],
            ["", "module", "module.fc"],
        ),
        # two modules that meet: the one-by-one order decides which value stays
        ([[RP("a.", "b.")], [RP("c.", "b.")]], ["a.w", "c.k"], ["a", "c", "b"]),
    ],
)
def test_composed_runs_agree_with_the_steps_in_corner_cases(monkeypatch, steps, keys, modules):
    schema = _schema_of(steps)
    metadata = {m: {"version": i} for i, m in enumerate(modules)} if modules else None
    ckpt = cm.Checkpoint(
        {k: torch.zeros(1) for k in keys}, schema="s", version="1", module_metadata=metadata
    )
    fast = _outcome(lambda: cm.upgrade(ckpt, schema))
    assert fast == _outcome(lambda: one_by_one(monkeypatch, ckpt, schema))


OPS = st.one_of(
    st.builds(RP, PREFIX, PREFIX).filter(lambda op: op.old != op.new),
    st.builds(
        lambda old, new: cm.ops.RenameKeys(re.escape(old) + "(.*)", new + r"\1"), PREFIX, PREFIX
    ),
    st.builds(lambda v: SET("h", v), st.integers(0, 3)),
)


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(st.lists(OPS, min_size=1, max_size=2), min_size=2, max_size=5),
    keys=st.lists(TEXT, max_size=6, unique=True),
    modules=st.lists(st.text(alphabet="ab.", min_size=1, max_size=4), max_size=4, unique=True),
)
def test_composed_runs_agree_with_the_steps(steps, keys, modules):
    schema = _schema_of(steps)
    metadata = {"": {"v": -1}, **{m: {"v": i} for i, m in enumerate(modules)}}
    ckpt = cm.Checkpoint(
        {k: torch.zeros(1) for k in keys}, schema="s", version="1", module_metadata=metadata
    )
    fast = _outcome(lambda: cm.upgrade(ckpt, schema))
    real = upgrade_mod.apply_composed
    upgrade_mod.apply_composed = lambda *a: None
    try:
        slow = _outcome(lambda: cm.upgrade(ckpt, schema))
    finally:
        upgrade_mod.apply_composed = real
    assert fast == slow
