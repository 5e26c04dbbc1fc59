"""Classes that moved: a global redirect (``--redirect-global OLD=NEW``, ``Schema(redirects=)``,
``cm.GlobalRedirect`` in ``safe_globals=``) reads a global an old pickle names as one that is
allowed today, and never makes anything new reachable.

The old files are real ``torch.save`` output of a tiny fake old package, written in a
subprocess from a temporary folder; the package is on no path when the files are read (and
where it is, importing it leaves a mark, which no test finds).
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from hostile import replace_member
from processes import one_error_line, run

import ckptmigrate as cm
from ckptmigrate.formats.torch import WEIGHTS_ONLY_GLOBALS, GlobalRedirect, redirect_map
from ckptmigrate.formats.torch.allowlist import MAX_REDIRECTS
from ckptmigrate.formats.torch.metadata import read_torch_metadata

OLD = "gonepkg.utilities.parsing.AttributeDict"
PL_OLD = "pytorch_lightning.utilities.parsing.AttributeDict"
PL_NEW = "lightning.pytorch.utilities.parsing.AttributeDict"
HPARAMS = {"lr": 0.01, "layers": 3}

# The old code: every module leaves a mark in $MARKS when it is imported.
MARK = "import os, pathlib\npathlib.Path(os.environ['MARKS'], {name!r}).touch()\n"
OLD_CLASS = """
class AttributeDict(dict):
    def __getattr__(self, key):
        return self[key]

    def __setattr__(self, key, value):
        self[key] = value
"""
LOOP_CLASS = """
class Loop:
    def __init__(self):
        self.step = 7
"""
WRITER = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from gonepkg.utilities.parsing import AttributeDict
from pytorch_lightning.utilities.parsing import AttributeDict as PlDict
from pytorch_lightning.trainer import Loop

out = sys.argv[2]
for legacy in (False, True):
    tail = "-legacy.ckpt" if legacy else ".ckpt"
    sd = {"w": torch.arange(6.0).reshape(2, 3)}
    files = {
        "old": {"state_dict": sd, "hyper_parameters": AttributeDict(lr=0.01, layers=3)},
        "pl": {"state_dict": sd, "hyper_parameters": PlDict(lr=0.01, layers=3)},
        "pl-loop": {"state_dict": sd, "hyper_parameters": PlDict(lr=0.01), "loop": Loop()},
    }
    for name, obj in files.items():
        torch.save(obj, f"{out}/{name}{tail}", _use_new_zipfile_serialization=not legacy)
"""
MIGRATIONS = {
    # an hparam op: the upgrade copies tensor bytes as stored (the graph is replayed)
    "streamed": "[cm.ops.SetHparam('width', 3)]",
    # a tensor op: the upgrade loads the file with torch's weights-only loader
    "loaded": "[cm.ops.Cast('w', torch.float64), cm.ops.SetHparam('width', 3)]",
}
SCHEMA_MODULE = """
import torch
import ckptmigrate as cm

schema = cm.Schema("gone", current="2.0.0", redirects={redirects!r})
schema.add_migration("1.0.0", "2.0.0", {ops})
"""


def _package(root: Path, dotted: str, body: str) -> None:
    """``dotted`` (a module) under ``root``, each package marking its import."""
    parts = dotted.split(".")
    for depth in range(1, len(parts) + 1):
        name = ".".join(parts[:depth])
        folder = root.joinpath(*parts[:depth])
        leaf = depth == len(parts)
        target = folder.with_suffix(".py") if leaf else folder / "__init__.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        if not target.exists():
            target.write_text(MARK.format(name=name) + (body if leaf else ""))


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> dict[str, Path]:
    """The old code, the files it wrote (``old``, ``pl``, ``pl-loop``, each also ``-legacy``),
    migrations using a schema's redirects, and an empty folder of marks."""
    root = tmp_path_factory.mktemp("redirects")
    code, marks = root / "oldcode", root / "marks"
    _package(code, "gonepkg.utilities.parsing", OLD_CLASS)
    _package(code, "pytorch_lightning.utilities.parsing", OLD_CLASS)
    _package(code, "pytorch_lightning.trainer", LOOP_CLASS)
    (root / "writer-marks").mkdir()
    import os
    import subprocess

    subprocess.run(
        [sys.executable, "-c", WRITER, str(code), str(root)],
        check=True,
        env={**os.environ, "MARKS": str(root / "writer-marks")},
    )
    assert (root / "writer-marks" / "gonepkg").exists()  # the writer did import the old code
    marks.mkdir()
    for name, ops in MIGRATIONS.items():
        text = SCHEMA_MODULE.format(redirects={OLD: "builtins.dict"}, ops=ops)
        (root / f"schema_{name}.py").write_text(textwrap.dedent(text))
        (root / f"plain_{name}.py").write_text(SCHEMA_MODULE.format(redirects={}, ops=ops))
    return {"root": root, "code": code, "marks": marks}


def _file(old: dict[str, Path], name: str, legacy: bool = False) -> Path:
    return old["root"] / f"{name}{'-legacy' if legacy else ''}.ckpt"


def _no_marks(old: dict[str, Path]) -> None:
    assert sorted(p.name for p in old["marks"].iterdir()) == [], "the old code was imported"


def _cli(old: dict[str, Path], *args: str, on_path: bool = True):
    """``ckptmigrate ARGS`` with the old code on PYTHONPATH (``on_path``): it must not be
    imported, and an import would leave a mark."""
    path = f"{old['code']}:{Path(cm.__file__).parent.parent}" if on_path else ""
    env = {"MARKS": str(old["marks"])} | ({"PYTHONPATH": path} if on_path else {})
    done = run(old["root"], *args, **env)
    _no_marks(old)
    return done


def _dict_redirect() -> GlobalRedirect:
    return GlobalRedirect(OLD, "builtins.dict")


# -- without a redirect ------------------------------------------------------------------------


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_without_a_redirect_the_old_class_is_refused_naming_it_and_the_flag(old, legacy):
    line = one_error_line(_cli(old, "info", str(_file(old, "old", legacy))))
    assert f"'{OLD}'" in line
    assert f"--redirect-global {OLD}=" in line and f"--allow-global {OLD}" in line
    with pytest.raises(cm.UnsafeCheckpointError) as info:
        cm.load(_file(old, "old", legacy))
    assert info.value.global_name == OLD
    assert "redirects=" in str(info.value)


# -- a redirect to dict ------------------------------------------------------------------------


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_redirect_to_dict_loads_the_hparams_as_a_plain_dict(old, legacy, mmap):
    ckpt = cm.load(_file(old, "old", legacy), safe_globals=[_dict_redirect()], mmap=mmap)
    assert type(ckpt.hparams) is dict and ckpt.hparams == HPARAMS
    # the tensor bytes are copied as stored: exact, zero tolerance
    torch.testing.assert_close(
        ckpt.state_dict["w"], torch.arange(6.0).reshape(2, 3), atol=0, rtol=0
    )
    assert "gonepkg" not in sys.modules


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_info_and_diff_read_the_old_class_as_a_dict_with_the_flag(old, legacy):
    flag = ["--redirect-global", f"{OLD}=builtins.dict"]
    done = _cli(old, "info", str(_file(old, "old", legacy)), "--json", *flag)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hparams"] == HPARAMS
    plain = old["root"] / f"plain-{legacy}.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2, 3)}, "hyper_parameters": HPARAMS}, plain)
    done = _cli(old, "diff", str(_file(old, "old", legacy)), str(plain), "--json", *flag)
    assert done.returncode == 0, done.stderr  # same keys, shapes and hparams: no drift
    assert json.loads(done.stdout)["hparams"] in ([], {})


@pytest.mark.parametrize("migration", sorted(MIGRATIONS))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_an_upgrade_writes_a_plain_dict_that_torch_weights_only_reads(
    old, tmp_path, legacy, migration
):
    out = tmp_path / "upgraded.ckpt"
    done = _cli(
        old, "upgrade", str(_file(old, "old", legacy)), "-o", str(out),
        "--redirect-global", f"{OLD}=builtins.dict", "--schema", "gone", "--from-version",
        "1.0.0", "--migrations", str(old["root"] / f"plain_{migration}.py"),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    raw = torch.load(out, weights_only=True)  # no safe_globals: nothing but plain data left
    assert type(raw["hyper_parameters"]) is dict
    assert raw["hyper_parameters"] == HPARAMS | {"width": 3}
    # float32 -> float64 is exact: zero tolerance
    torch.testing.assert_close(
        raw["state_dict"]["w"].float(), torch.arange(6.0).reshape(2, 3), atol=0, rtol=0
    )
    with zipfile.ZipFile(out) as zf:
        pickled = b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    assert b"gonepkg" not in pickled


# -- schema redirects --------------------------------------------------------------------------


def test_a_schemas_redirects_apply_in_cm_load(old):
    schema = cm.Schema("gone", current="2.0.0", redirects={OLD: "builtins.dict"})
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.SetHparam("width", 3)])
    ckpt = cm.load(_file(old, "old"), schema=schema, from_version="1.0.0")
    assert type(ckpt.hparams) is dict and ckpt.hparams == HPARAMS | {"width": 3}
    assert str(ckpt.version) == "2.0.0"
    plain = cm.Schema("gone", current="2.0.0")
    with pytest.raises(cm.UnsafeCheckpointError):
        cm.load(_file(old, "old"), schema=plain, from_version="1.0.0")


def test_a_schemas_redirects_apply_on_the_command_line(old, tmp_path):
    migration = "loaded"  # the file goes through torch's loader; upgrade_file streams it below
    migrations = ["--migrations", str(old["root"] / f"schema_{migration}.py")]
    out = tmp_path / "upgraded.ckpt"
    done = _cli(
        old, "upgrade", str(_file(old, "old")), "-o", str(out), "--schema", "gone",
        "--from-version", "1.0.0", *migrations,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert torch.load(out, weights_only=True)["hyper_parameters"] == HPARAMS | {"width": 3}
    # info and diff find the file's schema only once it is read: they retry with the redirects
    done = _cli(old, "info", str(_file(old, "old")), "--json", *migrations)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hparams"] == HPARAMS
    done = _cli(
        old, "diff", str(_file(old, "old")), str(out), "--upgrade", "--schema", "gone",
        "--from-version", "1.0.0", "--json", *migrations,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr  # the upgrade is all the drift there is
    # without the schema's redirects it is the usual refusal
    plain = ["--migrations", str(old["root"] / f"plain_{migration}.py")]
    assert OLD in one_error_line(_cli(old, "info", str(_file(old, "old")), *plain))


MODEL_SCHEMA = """
import torch
import ckptmigrate as cm


class Net(torch.nn.Module):
    def __init__(self, **hparams):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2, 3))


schema = cm.Schema("gone", current="1.0.0", build=lambda hp: Net(**hp), redirects={redirects!r})
"""


def test_diff_model_reads_the_file_with_the_schemas_redirects(old):
    with_rule = old["root"] / "model_schema.py"
    with_rule.write_text(MODEL_SCHEMA.format(redirects={OLD: "builtins.dict"}))
    args = ["diff", str(_file(old, "old")), "--model", "gone", "--from-version", "1.0.0"]
    done = _cli(old, *args, "--json", "--migrations", str(with_rule))
    assert done.returncode == 0, done.stderr  # a strict load would succeed: no drift
    without = old["root"] / "model_plain.py"
    without.write_text(MODEL_SCHEMA.format(redirects={}))
    assert OLD in one_error_line(_cli(old, *args, "--migrations", str(without)))


def test_check_accepts_the_flag_and_refuses_a_bad_one(old, tmp_path):
    (tmp_path / "fixtures").mkdir()
    good = _cli(
        old, "check", str(tmp_path / "fixtures"), "--redirect-global", f"{OLD}=builtins.dict"
    )
    assert good.returncode == 0, good.stderr
    bad = _cli(old, "check", str(tmp_path / "fixtures"), "--redirect-global", f"{OLD}=os.system")
    assert "refusing the global redirect" in one_error_line(bad)


# -- a redirect can only point to an allowed global --------------------------------------------

NOT_ALLOWED = [
    "os.system", "posix.system", "nt.system", "sys.modules", "builtins.eval", "builtins.exec",
    "builtins.getattr", "builtins.__import__", "builtins.open", "subprocess.Popen",
    "torch.load", "torch.serialization.load", "pickle.loads", "functools.partial",
    "operator.attrgetter", "runpy.run_path", "gonepkg.utilities.parsing.AttributeDict",
]  # fmt: skip


def _payload_calling(tmp_path: Path, global_name: str, canary: Path) -> Path:
    """A torch zip whose pickle calls ``global_name`` with code that creates ``canary``."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1)}, good)
    module, name = global_name.rsplit(".", 1)
    code = f"open({str(canary)!r}, 'w').close()".encode()
    pickle = (
        b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
        b"X" + len(code).to_bytes(4, "little") + code + b"\x85R."
    )
    return replace_member(good, tmp_path / "evil.pth", "data.pkl", pickle)


@pytest.mark.parametrize("target", NOT_ALLOWED)
def test_a_redirect_to_a_global_not_allowed_is_refused_before_anything_is_read(tmp_path, target):
    canary = tmp_path / "ran"
    evil = _payload_calling(tmp_path, "evilmod.run", canary)
    with pytest.raises(cm.RedirectError) as info:
        cm.Schema("s", current="1.0.0", redirects={"evilmod.run": target})
    assert target in str(info.value)
    with pytest.raises(cm.RedirectError):  # before reading: the path does not even exist
        cm.load(tmp_path / "missing.pth", safe_globals=[GlobalRedirect("evilmod.run", target)])
    with pytest.raises(cm.RedirectError):
        cm.load(evil, safe_globals=[GlobalRedirect("evilmod.run", target)])
    schema = cm.Schema("s", current="1.0.0")
    with pytest.raises(cm.RedirectError):
        cm.upgrade_file(
            evil, tmp_path / "out.pth", schema, safe_globals=[GlobalRedirect("evilmod.run", target)]
        )
    assert not canary.exists() and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("target", ["os.system", "builtins.eval", "subprocess.Popen"])
def test_every_command_refuses_a_redirect_to_a_global_not_allowed(tmp_path, target):
    canary = tmp_path / "ran"
    evil = _payload_calling(tmp_path, "evilmod.run", canary)
    stamp = ["stamp", "--schema", "s", "--version", "1.0.0", "-o", str(tmp_path / "out.pth")]
    commands = [["info"], ["diff", str(evil)], ["check"], ["upgrade", "--in-place"], ["scan"]]
    for command in [*commands, stamp]:
        args = [command[0], str(evil), *command[1:], "--redirect-global", f"evilmod.run={target}"]
        line = one_error_line(run(tmp_path, *args))
        assert "refusing the global redirect" in line and target in line
    assert not canary.exists()


def test_a_redirect_to_a_blocked_module_is_refused_even_when_allowed(tmp_path):
    canary = tmp_path / "ran"
    evil = _payload_calling(tmp_path, "evilmod.run", canary)
    line = one_error_line(
        run(tmp_path, "info", str(evil), "--allow-global", "os.system",
            "--redirect-global", "evilmod.run=os.system")
    )  # fmt: skip
    assert "module 'os' is never allowed" in line
    with pytest.raises(cm.RedirectError):
        cm.load(evil, safe_globals=["os.system", GlobalRedirect("evilmod.run", "os.system")])
    assert not canary.exists()


def test_the_old_side_may_not_name_a_blocked_module_either():
    with pytest.raises(cm.RedirectError, match="never allowed"):
        GlobalRedirect("os.system", "builtins.dict")


# -- prefix rules ------------------------------------------------------------------------------


def test_a_prefix_rule_reads_only_the_names_that_are_allowed(old):
    rule = ["--redirect-global", "pytorch_lightning.*=lightning.pytorch.*"]
    # the target class is allowed: the old name reads as it (metadata only: nothing imported)
    done = _cli(old, "info", str(_file(old, "pl")), "--json", "--allow-global", PL_NEW, *rule)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["hparams"] == HPARAMS
    # the target is not allowed: the prefix rule maps nothing, the usual refusal names it
    line = one_error_line(_cli(old, "info", str(_file(old, "pl")), *rule))
    assert f"'{PL_OLD}'" in line
    # another name under the prefix is not allowed as lightning.pytorch.*: refused
    line = one_error_line(
        _cli(old, "info", str(_file(old, "pl-loop")), "--allow-global", PL_NEW, *rule)
    )
    assert "'pytorch_lightning.trainer.Loop'" in line


def test_a_prefix_rule_loads_through_torch_as_the_allowed_class(old, tmp_path, monkeypatch):
    home = tmp_path / "newcode"
    _package(home, "newhome.utilities.parsing", OLD_CLASS)
    monkeypatch.syspath_prepend(str(home))
    marks = tmp_path / "marks"
    marks.mkdir()
    monkeypatch.setenv("MARKS", str(marks))
    allowed = [
        "newhome.utilities.parsing.AttributeDict",
        GlobalRedirect("pytorch_lightning.*", "newhome.*"),
    ]
    ckpt = cm.load(_file(old, "pl"), safe_globals=allowed)
    assert type(ckpt.hparams) is dict and ckpt.hparams == HPARAMS
    # the allowed class was imported, by its new name only
    assert {p.name for p in marks.iterdir()} == {
        "newhome", "newhome.utilities", "newhome.utilities.parsing"
    }  # fmt: skip
    imported_before = "pytorch_lightning.trainer" in sys.modules  # the real one, by another test
    with pytest.raises(cm.UnsafeCheckpointError) as info:
        cm.load(_file(old, "pl-loop"), safe_globals=allowed)
    assert info.value.global_name == "pytorch_lightning.trainer.Loop"
    assert ("pytorch_lightning.trainer" in sys.modules) == imported_before


def test_a_prefix_rule_expands_over_allowed_names_only():
    found = redirect_map(["new.a.Cls", GlobalRedirect("old.*", "new.*")])
    assert found == {"old.a.Cls": "new.a.Cls"}
    found = redirect_map([GlobalRedirect("mine.*", "torch.*")])
    assert found["mine.FloatStorage"] == "torch.FloatStorage"
    assert all(target.startswith("torch.") for target in found.values())


# -- a redirect never imports what the file names ----------------------------------------------


def test_a_redirect_never_imports_the_module_the_file_names(old, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(old["code"]))  # importable, and an import would leave a mark
    monkeypatch.setenv("MARKS", str(old["marks"]))
    for legacy in (False, True):
        for mmap in (False, True):
            cm.load(_file(old, "old", legacy), safe_globals=[_dict_redirect()], mmap=mmap)
        out = tmp_path / f"up-{legacy}.ckpt"
        cm.upgrade_file(_file(old, "old", legacy), out, _schema_with_step(), from_version="1.0.0")
        assert torch.load(out, weights_only=True)["hyper_parameters"] == HPARAMS | {"width": 3}
    _no_marks(old)
    assert "gonepkg" not in sys.modules


def _schema_with_step() -> cm.Schema:
    schema = cm.Schema("gone", current="2.0.0", redirects={OLD: "builtins.dict"})
    schema.add_migration("1.0.0", "2.0.0", [cm.ops.SetHparam("width", 3)])
    return schema


# -- hostile rules -----------------------------------------------------------------------------

ODD = [
    "", "=", "a", ".a.B", "a.B.", "a..B", "a.*.B", "*.B", "a.B\n", "a.B\nos.system", "a.B c",
    "a.B;rm -rf /", "../a.B", "a/b.C", "a.B\x00", "a.\u043eB", "a.B\u202e", "1a.B", "a.B-c",
    "a." + "x" * 600, "a.B$", "a.B()", "a.__import__('os')",
]  # fmt: skip


@pytest.mark.parametrize("name", ODD, ids=range(len(ODD)))
def test_odd_names_on_either_side_are_refused_in_one_clear_line(tmp_path, name):
    for old, new in ((name, "builtins.dict"), ("old.Name", name)):
        with pytest.raises(cm.RedirectError) as info:
            GlobalRedirect(old, new)
        assert "\n" not in str(info.value) and "\x00" not in str(info.value)
        assert len(str(info.value)) < 1200
    if "\x00" in name:
        return  # no command line can carry a NUL byte
    line = one_error_line(
        run(tmp_path, "info", str(tmp_path / "none.pth"), "--redirect-global", f"old.Name={name}")
    )
    assert "refusing the global redirect" in line


def test_a_second_equals_sign_is_part_of_the_target_and_refused(tmp_path):
    line = one_error_line(
        run(tmp_path, "info", "x.pth", "--redirect-global", "a.B=builtins.dict=os.system")
    )
    assert "not a dotted name" in line


def test_many_redirects_are_read_and_too_many_refused(old):
    many = [GlobalRedirect(f"filler{i}.Old", "builtins.dict") for i in range(MAX_REDIRECTS - 1)]
    ckpt = cm.load(_file(old, "old"), safe_globals=[*many, _dict_redirect()])
    assert ckpt.hparams == HPARAMS
    with pytest.raises(cm.RedirectError, match="at most"):
        cm.load(
            _file(old, "old"),
            safe_globals=[*many, _dict_redirect(), GlobalRedirect("x.Y", "builtins.dict")],
        )
    flags = [a for i in range(300) for a in ("--redirect-global", f"filler{i}.Old=builtins.dict")]
    done = _cli(
        old,
        "info",
        str(_file(old, "old")),
        "--json",
        *flags,
        "--redirect-global",
        f"{OLD}=builtins.dict",
    )
    assert done.returncode == 0, done.stderr


def test_two_targets_for_one_old_name_are_refused():
    with pytest.raises(cm.RedirectError, match="as well"):
        redirect_map(
            [GlobalRedirect("a.B", "builtins.dict"), GlobalRedirect("a.B", "builtins.set")]
        )


def test_a_chain_never_reaches_a_global_that_is_not_allowed():
    # A -> B -> C with B not allowed: A -> B is refused, whatever C is
    with pytest.raises(cm.RedirectError, match="may only point to an allowed global"):
        redirect_map([GlobalRedirect("a.A", "b.B"), GlobalRedirect("b.B", "builtins.dict")])
    # B allowed: A -> B reads as B, and B -> C is refused (an allowed name stays itself)
    with pytest.raises(cm.RedirectError, match="allowed as itself"):
        redirect_map(["b.B", GlobalRedirect("a.A", "b.B"), GlobalRedirect("b.B", "builtins.dict")])
    # prefix rules: a.* -> b.* -> builtins.*: a.X reads as b.X, never as builtins.X
    found = redirect_map(
        ["b.set", GlobalRedirect("a.*", "b.*"), GlobalRedirect("b.*", "builtins.*")]
    )
    assert found["a.set"] == "b.set" and "b.set" not in found


def test_random_rules_only_ever_map_names_not_allowed_onto_allowed_ones():
    rng = random.Random(16)
    names = ["a.X", "a.Y", "b.X", "b.Y", "c.X", "builtins.dict", "builtins.set", "torch.Size"]
    prefixes = ["a.*", "b.*", "c.*", "builtins.*", "torch.*"]
    for _ in range(400):
        allowed = rng.sample(names[:5], rng.randint(0, 3))
        rules = []
        for _ in range(rng.randint(1, 4)):
            pool = prefixes if rng.random() < 0.4 else names
            rules.append(GlobalRedirect(rng.choice(pool), rng.choice(pool)) if pool is names else
                         GlobalRedirect(rng.choice(prefixes), rng.choice(prefixes)))  # fmt: skip
        try:
            found = redirect_map([*allowed, *rules])
        except cm.RedirectError:
            continue
        reachable = set(allowed) | set(WEIGHTS_ONLY_GLOBALS) | {"builtins.dict"}
        assert set(found.values()) <= reachable
        assert not set(found) & reachable  # no allowed name is redirected, so nothing chains


# -- review16: a class with attributes, redirected to a dict ------------------------------------


def test_a_plain_class_redirected_to_dict_reads_its_attributes_or_says_why_not(tmp_path):
    """The README's own example is ``GlobalRedirect("old.pkg.Cfg", "builtins.dict")``. A config
    class that is not a dict subclass pickles its attributes as BUILD state, and today that
    reads as ``corrupt pickle (AttributeError: 'dict' object has no attribute '__dict__')``:
    the file is fine, the redirect does not fit. Either its attributes become the dict, or the
    error says that the redirect's target cannot hold that object's state."""
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.01
        layers: int = 3

    path = _saved_under_a_gone_name(tmp_path, Cfg, Cfg, module="review16_gone")
    redirect = GlobalRedirect("review16_gone.Cfg", "builtins.dict")
    try:
        ckpt = cm.load(path, safe_globals=[redirect])
    except cm.CkptMigrateError as exc:
        assert "corrupt" not in str(exc) and "builtins.dict" in str(exc), str(exc)
    else:
        assert ckpt.hparams == {"lr": 0.01, "layers": 3}


class _Slotted:
    __slots__ = ("lr", "layers")

    def __init__(self) -> None:
        self.lr, self.layers = 0.01, 3


class _Stateful:
    def __init__(self) -> None:
        self.lr = 0.01

    def __getstate__(self):
        return [("lr", self.lr)]  # not a mapping: a dict cannot hold it as attributes

    def __setstate__(self, state):
        self.lr = dict(state)["lr"]


class _Listed(list):
    pass


class _Both(dict):
    pass


def _saved_under_a_gone_name(tmp_path, cls, value, module: str = "review16_gone2") -> Path:
    """A checkpoint whose hparams are ``value()``, its class ``cls`` saved as ``module.Cfg``,
    a module that is gone once it is written."""
    import types

    module = types.ModuleType(module)
    cls.__module__, cls.__qualname__ = module.__name__, "Cfg"
    module.Cfg = cls
    sys.modules[module.__name__] = module
    try:
        path = tmp_path / "cfg.ckpt"
        torch.save({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": value()}, path)
    finally:
        del sys.modules[module.__name__]
    return path


def test_slots_and_a_dict_subclass_with_attributes_become_the_dicts_items(tmp_path):
    def both():
        value = _Both(lr=0.01)
        value.layers = 3  # items and an attribute: BUILD after SETITEMS
        return value

    for cls, make in ((_Slotted, _Slotted), (_Both, both)):
        path = _saved_under_a_gone_name(tmp_path, cls, make)
        redirect = GlobalRedirect("review16_gone2.Cfg", "builtins.dict")
        ckpt = cm.load(path, safe_globals=[redirect])
        assert ckpt.hparams == {"lr": 0.01, "layers": 3} and type(ckpt.hparams) is dict, cls
        header = read_torch_metadata(path, allowed_globals=[redirect])  # our reader alone
        assert header["hyper_parameters"] == {"lr": 0.01, "layers": 3}, cls
        assert type(header["hyper_parameters"]) is dict


@pytest.mark.parametrize(
    ("cls", "make", "what"),
    [(_Stateful, _Stateful, "list state"), (_Listed, lambda: _Listed([1, 2]), "list items")],
)
def test_an_object_a_dict_cannot_hold_is_refused_naming_the_redirect(tmp_path, cls, make, what):
    path = _saved_under_a_gone_name(tmp_path, cls, make)
    with pytest.raises(cm.RedirectError, match=what) as caught:
        cm.load(path, safe_globals=[GlobalRedirect("review16_gone2.Cfg", "builtins.dict")])
    assert "review16_gone2.Cfg=builtins.dict" in str(caught.value)
    assert "corrupt" not in str(caught.value)
