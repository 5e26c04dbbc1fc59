"""Downgrades that travel with the file: a step of ops records its inverse as data in the
history, so older code, which knows only the older versions, writes a newer file back.

The story: ``net`` 1.1.0 is the old code (it knows 1.0.0 -> 1.1.0 only). The new code adds
1.1.0 -> 2.0.0 (a regex rename and a fused-qkv split) and upgrades a file. The old code, given
that file, goes back to 1.1.0 through the inverses the file's history records, and its model
loads the result strictly and computes what it computed before.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from packaging.version import Version
from torch import nn

import ckptmigrate as cm
from ckptmigrate.schema.ops.data import MAX_DEPTH, op_from_data
from tests.processes import one_error_line, run

#: split, merge and rename move values and compute none, so values come back exactly
EXACT = {"rtol": 0.0, "atol": 0.0}

OLD_MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("net", current="1.1.0")
schema.add_migration("1.0.0", "1.1.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
"""

NEW_STEP = """
schema.add_migration(
    "1.1.0",
    "2.0.0",
    [
        cm.ops.RenameKeys(
            r"layers\\.(\\d+)\\.fc\\.(.*)",
            r"layers.\\1.up.\\2",
            reverse=(r"layers\\.(\\d+)\\.up\\.(.*)", r"layers.\\1.fc.\\2"),
        ),
        cm.ops.Split(
            "layers.{n}.qkv.{kind}",
            ["layers.{n}.q.{kind}", "layers.{n}.k.{kind}", "layers.{n}.v.{kind}"],
        ),
    ],
)
"""

NEW_MIGRATIONS = OLD_MIGRATIONS.replace('current="1.1.0"', 'current="2.0.0"') + NEW_STEP

FUNCTION_STEP = """

def _undo_scale(ckpt):
    ckpt.hparams.pop("scale")


@schema.migration("2.0.0", "3.0.0", inverse=_undo_scale)
def add_scale(ckpt):
    ckpt.hparams["scale"] = 1.0
"""

NEWEST_MIGRATIONS = NEW_MIGRATIONS.replace('current="2.0.0"', 'current="3.0.0"') + FUNCTION_STEP


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(4, 12)
        self.fc = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.fc(q * k + v)


class OldNet(nn.Module):
    """The model of net 1.1.0, the old code."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def schema_from(tmp_path: Path, name: str, source: str) -> tuple[cm.Schema, Path]:
    """The schema ``net`` of a migrations file written as ``name/net_migrations.py``."""
    from ckptmigrate.schema.registry import find_schemas

    folder = tmp_path / name
    folder.mkdir()
    (folder / "net_migrations.py").write_text(source)
    return find_schemas([str(folder)])["net"], folder


@pytest.fixture
def old(tmp_path):
    return schema_from(tmp_path, "old", OLD_MIGRATIONS)


@pytest.fixture
def new(tmp_path):
    return schema_from(tmp_path, "new", NEW_MIGRATIONS)


def original_1_0(tmp_path: Path, suffix: str = ".pth") -> tuple[Path, OldNet]:
    """A net 1.0.0 file (``blocks.N``) holding a seeded OldNet's weights, and that model."""
    torch.manual_seed(0)
    model = OldNet().eval()
    sd = {k.replace("layers.", "blocks.", 1): v for k, v in model.state_dict().items()}
    path = tmp_path / f"net-1.0.0{suffix}"
    cm.save(path, sd, schema="net", version="1.0.0", hparams={"width": 4})
    return path, model


def upgraded_by_new_code(tmp_path: Path, new_schema: cm.Schema, suffix: str = ".pth") -> Path:
    source, _ = original_1_0(tmp_path, suffix)
    path = tmp_path / f"net-2.0.0{suffix}"
    cm.save(path, cm.load(source, schema=new_schema))
    return path


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_old_code_writes_a_file_of_new_code_back_through_the_inverses_it_records(
    tmp_path, old, new, suffix
):
    source, model = original_1_0(tmp_path, suffix)
    newer = tmp_path / f"net-2.0.0{suffix}"
    cm.save(newer, cm.load(source, schema=new[0]))
    assert "layers.0.q.weight" in cm.load(newer, upgrade=False).state_dict

    back = cm.load(newer, schema=old[0], to="1.1.0")

    # the same values the old code's own upgrade of the original gives, key for key
    own = cm.load(source, schema=old[0])
    assert back.version == own.version == Version("1.1.0")
    assert list(back.state_dict) == list(own.state_dict)
    for key, value in own.state_dict.items():
        torch.testing.assert_close(back.state_dict[key], value, **EXACT)
    assert back.hparams == {"width": 4}
    assert [(h["from"], h["to"], h["downgrade"]) for h in back.history[-1:]] == [
        ("2.0.0", "1.1.0", True)
    ]

    fresh = OldNet().eval()
    cm.load_into(fresh, newer, schema=old[0], to="1.1.0", strict=True)
    x = torch.linspace(-1, 1, 8).reshape(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x), rtol=1e-6, atol=1e-6)


def test_the_cli_of_old_code_downgrades_the_file_and_old_code_then_loads_it_as_current(
    tmp_path, old, new
):
    newer = upgraded_by_new_code(tmp_path, new[0])
    out = tmp_path / "net-1.1.0.pth"
    proc = run(tmp_path, "upgrade", str(newer), "-o", str(out), "--to", "1.1.0",
               "--migrations", str(old[1]))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "2.0.0 -> 1.1.0" in proc.stdout
    written = cm.load(out, schema=old[0], upgrade=False)
    assert str(written.version) == "1.1.0" and "layers.0.qkv.weight" in written.state_dict
    model = OldNet()
    cm.load_into(model, out, schema=old[0], strict=True)  # current for the old code: no steps
    # and the new code takes the written-back file up again, to the same values
    again = cm.load(out, schema=new[0])
    for key, value in cm.load(newer, upgrade=False).state_dict.items():
        torch.testing.assert_close(again.state_dict[key], value, **EXACT)


def test_old_code_continues_below_the_recorded_inverses_with_its_own_reversible_steps(
    tmp_path, old, new
):
    newer = upgraded_by_new_code(tmp_path, new[0])
    back = cm.load(newer, schema=old[0], to="1.0.0")
    stored = cm.load(tmp_path / "net-1.0.0.pth", upgrade=False)
    assert str(back.version) == "1.0.0" and list(back.state_dict) == list(stored.state_dict)
    for key, value in stored.state_dict.items():
        torch.testing.assert_close(back.state_dict[key], value, **EXACT)


def test_a_newer_file_without_a_target_is_a_future_version_error_that_names_the_way_back(
    tmp_path, old, new
):
    newer = upgraded_by_new_code(tmp_path, new[0])
    with pytest.raises(cm.FutureVersionError) as caught:
        cm.load(newer, schema=old[0])
    assert caught.value.recorded_to == Version("1.1.0")
    assert "to='1.1.0'" in str(caught.value)
    proc = run(tmp_path, "upgrade", str(newer), "-o", str(tmp_path / "x.pth"),
               "--migrations", str(old[1]))  # fmt: skip
    assert "--to 1.1.0" in one_error_line(proc)
    assert not (tmp_path / "x.pth").exists()


def test_a_function_step_in_the_way_refuses_clearly_and_nothing_is_written(tmp_path, old):
    newest, folder = schema_from(tmp_path, "newest", NEWEST_MIGRATIONS)
    source, _ = original_1_0(tmp_path)
    path = tmp_path / "net-3.0.0.pth"
    cm.save(path, cm.load(source, schema=newest))
    before = path.read_bytes()
    with pytest.raises(cm.NoRecordedInverseError) as caught:
        cm.load(path, schema=old[0], to="1.1.0")
    assert caught.value.step == "add_scale" and caught.value.function
    assert "step add_scale is a function; it stored no inverse" in str(caught.value)
    out = tmp_path / "out.pth"
    proc = run(tmp_path, "upgrade", str(path), "-o", str(out), "--to", "1.1.0",
               "--migrations", str(old[1]))  # fmt: skip
    assert "is a function; it stored no inverse" in one_error_line(proc)
    assert not out.exists() and path.read_bytes() == before
    # the code that knows the step still downgrades with its inverse function
    assert str(cm.load(path, schema=newest, to="1.1.0").version) == "1.1.0"


def test_a_step_declared_forward_only_records_no_inverse_and_refuses(tmp_path, old):
    source = NEW_MIGRATIONS.replace("    ],\n)\n", "    ],\n    reversible=False,\n)\n")
    forward_only, _ = schema_from(tmp_path, "forward", source)
    src, _ = original_1_0(tmp_path)
    upgraded = cm.load(src, schema=forward_only)
    assert "inverse" not in upgraded.history[-1] and "inverse" in upgraded.history[0]
    path = tmp_path / "net-2.0.0.pth"
    cm.save(path, upgraded)
    with pytest.raises(cm.NoRecordedInverseError, match="stored no inverse") as caught:
        cm.load(path, schema=old[0], to="1.1.0")
    assert not caught.value.function


def test_a_file_written_before_inverses_were_recorded_refuses_as_before(tmp_path, old, new):
    newer = upgraded_by_new_code(tmp_path, new[0])
    ckpt = cm.load(newer, upgrade=False)
    ckpt.history = [
        {k: v for k, v in h.items() if k not in ("digest", "inverse")} for h in ckpt.history
    ]
    cm.save(newer, ckpt)
    with pytest.raises(cm.NoRecordedInverseError, match="before ckptmigrate recorded inverses"):
        cm.load(newer, schema=old[0], to="1.1.0")


def test_a_mount_goes_back_through_the_inverses_its_own_history_records(tmp_path, old, new):
    torch.manual_seed(0)
    inner = OldNet().state_dict()
    sd = {f"net.{k.replace('layers.', 'blocks.', 1)}": v for k, v in inner.items()}
    sd["head.weight"] = torch.ones(2, 2)
    path = tmp_path / "lit.pth"
    cm.save(path, sd, schema="net", version="1.0.0", prefix="net.")
    cm.save(path, cm.load(path, schema=new[0]))
    back = cm.load(path, schema=old[0], to="1.1.0")
    assert [str(m.version) for m in back.mounts] == ["1.1.0"]
    for key, value in inner.items():
        torch.testing.assert_close(back.state_dict[f"net.{key}"], value, **EXACT)
    assert torch.equal(back.state_dict["head.weight"], torch.ones(2, 2))


# -- hostile history: a clear error, nothing imported, evaluated or run -------------------------


def with_inverse(path: Path, inverse) -> None:
    """Rewrite the file's last history entry to record ``inverse``."""
    ckpt = cm.load(path, upgrade=False)
    ckpt.history[-1]["inverse"] = inverse
    cm.save(path, ckpt)


def deep(levels: int):
    value: list = []
    for _ in range(levels):
        value = [value]
    return value


HOSTILE = {
    "unknown class": [{"op": "EvilOp", "args": {}}],
    "os.system": [{"op": "os.system", "args": {"command": "touch {sentinel}"}}],
    "builtins eval": [{"op": "builtins.eval", "args": {"source": "open('{sentinel}', 'w')"}}],
    "Call with a name": [{"op": "Call", "args": {"fn": "os.system"}}],
    "dunder field": [{"op": "RenamePrefix", "args": {"old": "a.", "new": "b.", "__class__": 1}}],
    "wrong field type": [{"op": "RenameKeys", "args": {"pattern": 5, "repl": "x"}}],
    "string for a list": [{"op": "Merge", "args": {"sources": "abc", "target": "t"}}],
    "bool for an int": [
        {"op": "Merge", "args": {"sources": ["a", "b"], "target": "t", "dim": True}}
    ],
    "missing field": [{"op": "RenamePrefix", "args": {"old": "a."}}],
    "not a list": "__import__('os').system('touch {sentinel}')",
    "entry not a dict": ["RenamePrefix"],
    "unknown marker": [{"op": "SetHparam", "args": {"name": "x", "value": {"$marker": "os"}}}],
    "huge nesting": [{"op": "SetHparam", "args": {"name": "x", "value": deep(MAX_DEPTH + 20)}}],
    "too many ops": [{"op": "RenamePrefix", "args": {"old": "a.", "new": "b."}}] * 5000,
}


def fill(value, sentinel: str):
    return json.loads(json.dumps(value).replace("{sentinel}", sentinel))


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_recorded_inverse_is_a_clear_error_and_nothing_runs(tmp_path, old, new, case):
    newer = upgraded_by_new_code(tmp_path, new[0])
    sentinel = tmp_path / "pwned"
    with_inverse(newer, fill(HOSTILE[case], str(sentinel)))
    before = newer.read_bytes()
    with pytest.raises(cm.RecordedInverseError) as caught:
        cm.load(newer, schema=old[0], to="1.1.0")
    assert isinstance(caught.value, cm.CheckpointFormatError)
    assert "1.1.0 -> 2.0.0" in str(caught.value) and "Nothing was run" in str(caught.value)
    out = tmp_path / "out.pth"
    proc = run(tmp_path, "upgrade", str(newer), "-o", str(out), "--to", "1.1.0",
               "--migrations", str(old[1]))  # fmt: skip
    assert "cannot be used" in one_error_line(proc)
    assert not out.exists() and not sentinel.exists() and newer.read_bytes() == before
    # the file itself still reads, and the code that knows the step still downgrades it
    assert str(cm.load(newer, schema=new[0], to="1.1.0").version) == "1.1.0"


def test_data_nested_a_hundred_thousand_deep_is_refused_without_recursion():
    with pytest.raises(cm.OpDataError, match="nests deeper"):
        op_from_data({"op": "SetHparam", "args": {"name": "x", "value": deep(100_000)}})


def test_only_declarative_op_classes_this_process_imported_are_known():
    from ckptmigrate.schema.ops.data import known_ops

    known = known_ops()
    assert "RenameKeys" in known and "Split" in known and "Call" not in known
    assert all(not name.startswith(("os", "builtins", "subprocess")) for name in known)


# -- review16: what a recorded inverse may still do --------------------------------------------

FORMAT_TRICKS = {
    # str.format walks attributes and indexes: a small interpreter over the file's own text
    "attribute walk": "layers.{n.__class__.__mro__}.qkv.{kind}",
    "index": "layers.{n[0]}.qkv.{kind}",
    "conversion": "layers.{n!r}.qkv.{kind}",
    # a format spec pads to any width: a key of a megabyte here, of gigabytes just as easily
    "format width": "layers.{n:>1000000}.qkv.{kind}",
}


@pytest.mark.parametrize("case", sorted(FORMAT_TRICKS))
def test_a_recorded_template_holds_plain_fields_only_and_anything_else_is_refused_before_running(
    tmp_path, old, new, case
):
    newer = upgraded_by_new_code(tmp_path, new[0])
    parts = ["layers.{n}.q.{kind}", "layers.{n}.k.{kind}", "layers.{n}.v.{kind}"]
    with_inverse(
        newer, [{"op": "Merge", "args": {"sources": parts, "target": FORMAT_TRICKS[case]}}]
    )
    with pytest.raises(cm.RecordedInverseError):
        cm.load(newer, schema=old[0], to="1.1.0")


def test_a_recorded_dtype_name_is_looked_up_never_imported(tmp_path, old, new):
    """``Cast`` resolves its dtype with ``getattr(torch, name)``, and torch's module
    ``__getattr__`` imports its lazy submodules by name: ``"onnx"`` read from a file imports
    ``torch.onnx``. A dtype from data must be one of torch's dtypes, checked before running."""
    newer = upgraded_by_new_code(tmp_path, new[0])
    with_inverse(
        newer, [{"op": "Cast", "args": {"template": "layers.0.up.weight", "dtype": "onnx"}}]
    )
    script = f"""
import sys
import ckptmigrate as cm
from ckptmigrate.schema.registry import find_schemas
assert "torch.onnx" not in sys.modules
old = find_schemas([{str(old[1])!r}])["net"]
try:
    cm.load({str(newer)!r}, schema=old, to="1.1.0")
    print("loaded")
except cm.CkptMigrateError as exc:
    print("refused", type(exc).__name__)
print("imported torch.onnx" if "torch.onnx" in sys.modules else "nothing imported")
"""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "nothing imported" in done.stdout, done.stdout
    assert "refused RecordedInverseError" in done.stdout, done.stdout


def test_a_recorded_rename_pattern_cannot_hold_the_reader_for_hours(tmp_path, old, new):
    """A regex from the file runs against key names from the file: ``(a+)+b`` on a key of 40
    ``a`` backtracks some 2**40 times. Readers bound time; a recorded pattern must too (refuse
    nested quantifiers and backreferences in data, or bound the key length they run on)."""
    newer = upgraded_by_new_code(tmp_path, new[0])
    ckpt = cm.load(newer, upgrade=False)
    ckpt.state_dict["a" * 40] = torch.zeros(1)
    ckpt.history[-1]["inverse"] = [{"op": "RenameKeys", "args": {"pattern": "(a+)+b", "repl": "x"}}]
    cm.save(newer, ckpt)
    out = tmp_path / "out.pth"
    # exponential: a fixed pattern finishes in well under a second, this one in days
    proc = run(tmp_path, "upgrade", str(newer), "-o", str(out), "--to", "1.1.0",
               "--migrations", str(old[1]), timeout=60)  # fmt: skip
    assert "cannot be used" in one_error_line(proc)


def test_a_long_recorded_history_is_read_in_time_linear_in_its_length(tmp_path):
    """Finding how far a newer file's recorded inverses reach scans the whole history once per
    version it walks down (``_entry_into`` inside ``recorded_floor``), parsing every version
    again: quadratic. A file of a few hundred KB with a chain of 8,000 entries keeps
    ``cm.load`` (which only has to say FutureVersionError) busy for minutes; 1,000 take 2 s,
    4,000 take 35 s. An index by ``to`` version built once makes it linear."""
    n = 8000
    history = [
        {"from": f"2.{i}", "to": f"2.{i + 1}", "inverse": [], "step": "s", "downgrade": False}
        for i in range(n)
    ]
    history[0]["from"] = "1.0.1"
    ckpt = cm.Checkpoint(
        {"b.w": torch.ones(1)}, schema="h", version=Version(f"2.{n}"), history=history
    )
    path = tmp_path / "long.pth"
    cm.save(path, ckpt)
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "h_migrations.py").write_text(
        "import ckptmigrate as cm\n"
        "schema = cm.Schema('h', current='1.0.1')\n"
        "schema.add_migration('1.0.0', '1.0.1', [cm.ops.RenamePrefix('a.', 'b.')])\n"
    )
    # a linear reader answers in a second or two; the quadratic one in minutes
    proc = run(tmp_path, "info", str(path), "--migrations", str(folder), timeout=60)
    assert proc.returncode in (0, 1, 2), proc.stderr


# -- fixa: what a recorded op's values may make it do, op by op ----------------------------------


@pytest.mark.parametrize(
    "data",
    [
        {"op": "RenameKeys", "args": {"pattern": r"(\w+)\1", "repl": "x"}},  # backreference
        {"op": "DropKeys", "args": {"pattern": r"(?=a)a.*"}},  # lookaround
        {"op": "DropKeys", "args": {"pattern": r"(a|ab)*c"}},  # alternation repeated
        {"op": "DropKeys", "args": {"pattern": r"(.*)(.*)(.*)(.*)x"}},  # 4 repeats
        {"op": "RenameKeys", "args": {"pattern": "a", "repl": "b", "reverse": ["(a*)*", "a"]}},
        {"op": "Cast", "args": {"template": "w", "dtype": "nn"}},
        {"op": "Split", "args": {"source": "{p}.w", "targets": ["{p}.{p}", "x"]}},
    ],
)
def test_recorded_values_that_could_run_unbounded_are_refused_as_data(data):
    with pytest.raises(cm.OpDataError):
        op_from_data(data)


def test_the_patterns_ckptmigrate_itself_writes_are_still_rebuilt():
    autogen = r"(?P<pre>(?:.*\.)?)blocks(?P<post>(?:\..*)?)"
    for pattern in [autogen, r"(.*denselayer\d+\.(?:norm|conv))\.([12])\.(\w+)", r"a\.(q|k)"]:
        op = op_from_data({"op": "DropKeys", "args": {"pattern": pattern}})
        assert op.pattern == pattern


def test_a_recorded_regex_refuses_a_key_longer_than_it_runs_on_and_code_does_not():
    data = {"op": "RenameKeys", "args": {"pattern": r"(.*)\.w", "repl": r"\1.weight"}}
    ckpt = cm.Checkpoint({"a" * 600 + ".w": torch.ones(1)})
    with pytest.raises(cm.OpError, match="at most 512 characters"):
        op_from_data(data).apply(ckpt)
    cm.ops.RenameKeys(r"(.*)\.w", r"\1.weight").apply(ckpt)  # the project's own code: unbounded
    assert list(ckpt.state_dict) == ["a" * 600 + ".weight"]


@pytest.mark.parametrize("op", ["RenameKeys", "DropKeys"])
def test_a_recorded_pattern_stops_after_its_time_over_many_worst_case_keys(op, monkeypatch):
    # three repeats are allowed, and ``a*a*a*b`` on 512 ``a`` costs some 0.1 s a key: a file
    # of thousands of such keys held the reader for minutes; now a budget for all its keys
    from ckptmigrate.schema.ops import keys as key_ops

    monkeypatch.setattr(key_ops, "MAX_RECORDED_MATCH_SECONDS", 0.3)
    args = {"pattern": "a*a*a*b", **({"repl": "x"} if op == "RenameKeys" else {})}
    recorded = op_from_data({"op": op, "args": args})
    ckpt = cm.Checkpoint({"a" * 508 + f"{i:04d}": torch.ones(1) for i in range(300)})
    started = time.monotonic()
    with pytest.raises(cm.OpError, match="more than 0.3 s"):
        recorded.apply(ckpt)
    assert time.monotonic() - started < 3  # 300 keys unbounded: 5 s or more
    unbounded = {"RenameKeys": cm.ops.RenameKeys, "DropKeys": cm.ops.DropKeys}[op]
    few = cm.Checkpoint({"a" * 20 + "c": torch.ones(1)})
    unbounded(**args, missing_ok=True).apply(few)  # the project's own code: no budget


def test_a_recorded_pad_adds_a_bounded_number_of_values():
    data = {"op": "Pad", "args": {"template": "w", "size": 2**40}}
    with pytest.raises(cm.OpError, match="adds at most"):
        op_from_data(data).apply(cm.Checkpoint({"w": torch.ones(2)}))


@pytest.mark.parametrize("template", ["{n!r}.w", "{n:>9}.w", "{n.x}.w", "{n[0]}.w", "{}.w", "a}"])
def test_a_template_written_in_code_with_format_syntax_is_an_op_error_at_definition(template):
    with pytest.raises(cm.OpError, match="brace syntax"):
        cm.ops.Transpose(template)
