"""DCP folders: metadata read through a restricted unpickler, upgrade through DCP's own APIs."""

from __future__ import annotations

import dataclasses
import enum
import io
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.filesystem as dcp_fs
from folder_schema import rename_drop_schema

import ckptmigrate as cm
from ckptmigrate import cli as cm_cli
from ckptmigrate.engine.rewrite import upgrade_file
from ckptmigrate.formats.dcp import DCP_ENUMS, STAMP_FILE, SafeFileSystemReader, read_dcp_metadata
from ckptmigrate.io.files import read_checkpoint, read_metadata


def _model_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(6, 4),
        "blocks.0.rotary": torch.randn(3),
        "head.bias": torch.arange(5),
    }


@pytest.fixture()
def dcp_dir(tmp_path):
    folder = tmp_path / "step-100"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": _model_sd(), "epoch": 7}, checkpoint_id=folder)
    return folder


@pytest.fixture()
def no_plain_pickle(monkeypatch):
    """torch's FileSystemReader reads .metadata with pickle.load: make that fail loudly."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch's unguarded pickle.load ran on .metadata")

    monkeypatch.setattr(dcp_fs.pickle, "load", refuse)


def test_metadata_read_lists_keys_shapes_and_dtypes(dcp_dir, no_plain_pickle):
    ckpt = read_metadata(dcp_dir)
    assert list(ckpt.state_dict) == ["blocks.0.weight", "blocks.0.rotary", "head.bias"]
    assert ckpt.state_dict["blocks.0.weight"].shape == (6, 4)
    assert ckpt.state_dict["head.bias"].dtype == "int64"
    assert "epoch" in ckpt.extra


def test_full_read_goes_through_the_restricted_reader(dcp_dir, no_plain_pickle):
    ckpt = read_checkpoint(dcp_dir)
    assert torch.equal(ckpt.state_dict["blocks.0.weight"], _model_sd()["blocks.0.weight"])
    assert ckpt.extra["epoch"] == 7


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_hostile_metadata_is_refused_before_anything_runs(dcp_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(cm.UnsafeCheckpointError, match="system"):
        read_metadata(dcp_dir)
    with pytest.raises(cm.UnsafeCheckpointError):
        read_checkpoint(dcp_dir)
    with pytest.raises(BaseException):  # noqa: B017 - DCP wraps our refusal in its own error
        dcp.load({}, storage_reader=SafeFileSystemReader(dcp_dir))
    assert not (tmp_path / "pwned").exists()


class _EnumsByName(pickle.Pickler):
    """Pickles an enum member as early Python 3.11 releases (3.11.2) do: by name, through
    ``getattr(EnumClass, "NAME")``."""

    def reducer_override(self, obj):
        if isinstance(obj, enum.Enum):
            return getattr, (type(obj), obj.name)
        return NotImplemented


def _repickle_metadata(folder, pickler=_EnumsByName, hook=None) -> bytes:
    """``.metadata`` written again by ``pickler`` (after ``hook(md)``), as DCP wrote it."""
    with open(folder / ".metadata", "rb") as f:
        md = pickle.Unpickler(f).load()  # noqa: S301 - a folder this test just wrote
    if hook is not None:
        hook(md)
    buffer = io.BytesIO()
    pickler(buffer, protocol=pickle.HIGHEST_PROTOCOL).dump(md)
    (folder / ".metadata").write_bytes(buffer.getvalue())
    return buffer.getvalue()


def test_metadata_written_by_python_3_11_2_reads_and_loads(dcp_dir, no_plain_pickle):
    # Python 3.11.2's enum pickles as builtins.getattr(_MEM_FORMAT_ENCODING, "NAME"): every
    # DCP checkpoint saved there was refused as unsafe
    data = _repickle_metadata(dcp_dir)
    assert b"getattr" in data and b"TORCH_CONTIGUOUS_FORMAT" in data
    ckpt = read_metadata(dcp_dir)
    assert ckpt.state_dict["blocks.0.weight"].shape == (6, 4)
    loaded = read_checkpoint(dcp_dir)
    for key, want in _model_sd().items():
        torch.testing.assert_close(loaded.state_dict[key], want, rtol=0, atol=0)
    props = read_dcp_metadata(dcp_dir, torch_classes=True).state_dict_metadata["model.head.bias"]
    assert props.properties.memory_format == torch.contiguous_format


def test_the_enum_stand_ins_match_torchs_enums():
    from torch.distributed.checkpoint import metadata as dcp_md

    for name, members in DCP_ENUMS.items():
        real = getattr(dcp_md, name.rpartition(".")[2])
        assert members == {m.name: m.value for m in real}


class _Getattr:
    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


@pytest.mark.parametrize(
    "target",
    [
        ("properties class", lambda: dcp_md_module().TensorProperties, "__init__"),
        ("enum dunder", lambda: dcp_md_module()._MEM_FORMAT_ENCODING, "__class__"),
        ("enum not member", lambda: dcp_md_module()._MEM_FORMAT_ENCODING, "_member_map_"),
        ("a name not a string", lambda: dcp_md_module()._MEM_FORMAT_ENCODING, 0),
    ],
    ids=lambda t: t[0],
)
@pytest.mark.parametrize("torch_classes", [False, True])
def test_getattr_reaches_nothing_but_an_enum_member(dcp_dir, tmp_path, target, torch_classes):
    _, owner, attr = target

    def plant(md):
        md.planner_data = _Getattr(owner(), attr)

    monkey = tmp_path / "pwned"
    _repickle_metadata(dcp_dir, pickle.Pickler, plant)
    with pytest.raises(cm.UnsafeCheckpointError):
        read_dcp_metadata(dcp_dir, torch_classes=torch_classes)
    assert not monkey.exists()


def dcp_md_module():
    from torch.distributed.checkpoint import metadata as dcp_md

    return dcp_md


@pytest.mark.parametrize("command", ["upgrade", "diff-values"])
def test_a_truncated_rank_file_is_one_error_line_and_exit_2(dcp_dir, tmp_path, command):
    # DCP raises CheckpointException, a BaseException: it escaped every handler as 48 lines of
    # traceback and exit 1, which diff documents as "drift"
    for rank_file in dcp_dir.glob("*.distcp"):
        rank_file.write_bytes(rank_file.read_bytes()[:40])
    argv = {
        "upgrade": ["upgrade", str(dcp_dir), "-o", str(tmp_path / "out.pth"), "--from-version"]
        + ["1.0.0", "--schema", "lm"],
        "diff-values": ["diff", "--values", str(dcp_dir), str(dcp_dir)],
    }[command]
    migrations = tmp_path / "lm.py"
    migrations.write_text(
        "import ckptmigrate as cm\nschema = cm.Schema('lm', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('blocks.', 'layers.')])\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *argv, "--migrations", str(migrations)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("ckptmigrate: error:"), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "out.pth").exists()


def _point_storage_at(folder, name: str | None = None, *, length: int | None = None) -> None:
    """Rewrite ``.metadata`` so that its first storage entry names ``name`` (or claims
    ``length`` bytes), as a hostile file would."""
    md_path = folder / ".metadata"
    with md_path.open("rb") as f:
        md = pickle.load(f)  # our own test file: torch's classes, written just now
    index, info = next(iter(md.storage_data.items()))
    changes = {"relative_path": name} if name is not None else {"length": length}
    md.storage_data[index] = dataclasses.replace(info, **changes)
    with md_path.open("wb") as f:
        pickle.dump(md, f)


@pytest.mark.parametrize(
    "hostile",
    ["parent", "absolute", "symlink-to-dev-zero", "fifo", "past-the-end", "missing"],
)
def test_storage_paths_stay_inside_the_checkpoint(dcp_dir, tmp_path, hostile, capsys):
    # another checkpoint beside it, whose tensors a "../" path would read and copy in
    other = tmp_path / "other"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"blocks.0.weight": torch.full((6, 4), 7.0)}}, checkpoint_id=other)
    rank_file = next(dcp_dir.glob("*.distcp")).name
    if hostile == "parent":
        _point_storage_at(dcp_dir, f"../other/{next(other.glob('*.distcp')).name}")
    elif hostile == "absolute":
        _point_storage_at(dcp_dir, str(next(other.glob("*.distcp"))))
    elif hostile == "symlink-to-dev-zero":
        (dcp_dir / "zero.distcp").symlink_to("/dev/zero")
        _point_storage_at(dcp_dir, "zero.distcp")
    elif hostile == "fifo":
        os.mkfifo(dcp_dir / "pipe.distcp")
        _point_storage_at(dcp_dir, "pipe.distcp")
    elif hostile == "past-the-end":
        _point_storage_at(dcp_dir, length=(dcp_dir / rank_file).stat().st_size + 1)
    else:
        _point_storage_at(dcp_dir, "nowhere.distcp")

    with pytest.raises(cm.CheckpointFormatError, match="DCP metadata"):
        read_checkpoint(dcp_dir)
    code = cm_cli.main(["diff", "--values", str(dcp_dir), str(dcp_dir)])
    assert code == 2 and "DCP metadata" in capsys.readouterr().err
    code = cm_cli.main(["info", str(dcp_dir)])
    assert code == 2


def test_upgrade_renames_drops_sets_hparams_and_stamps(dcp_dir, tmp_path, no_plain_pickle):
    out = tmp_path / "upgraded"
    result = upgrade_file(dcp_dir, out, rename_drop_schema(), from_version="1.0.0")
    assert str(result.target_version) == "2.0.0"
    assert (out / STAMP_FILE).is_file()
    meta = read_metadata(out)
    assert list(meta.state_dict) == ["layers.0.weight", "head.bias"]
    assert str(meta.version) == "2.0.0" and meta.hparams == {"eps": 1e-6}
    loaded = read_checkpoint(out)
    assert torch.equal(loaded.state_dict["layers.0.weight"], _model_sd()["blocks.0.weight"])
    assert loaded.extra["epoch"] == 7
    # torch's own loader reads it into a model-shaped state dict
    target = {
        "model": {
            "layers.0.weight": torch.zeros(6, 4),
            "head.bias": torch.zeros(5, dtype=torch.long),
        }
    }
    dcp.load(target, storage_reader=SafeFileSystemReader(out))
    assert torch.equal(target["model"]["head.bias"], torch.arange(5))


def test_in_place_upgrade_replaces_the_folder(dcp_dir):
    upgrade_file(dcp_dir, dcp_dir, rename_drop_schema(), from_version="1.0.0")
    assert str(read_metadata(dcp_dir).version) == "2.0.0"
    assert [p.name for p in dcp_dir.parent.iterdir()] == [dcp_dir.name]


def test_unstamped_folder_without_from_version_is_refused_untouched(dcp_dir, tmp_path):
    with pytest.raises(cm.UnversionedCheckpointError):
        upgrade_file(dcp_dir, tmp_path / "out", rename_drop_schema())
    assert not (tmp_path / "out").exists()


def test_cli_in_place_upgrade_of_a_dcp_folder_keeps_a_folder_backup(dcp_dir, tmp_path, capsys):
    from ckptmigrate import cli

    before = {p.name: p.read_bytes() for p in dcp_dir.iterdir()}
    mig = tmp_path / "mig.py"
    mig.write_text(
        "import ckptmigrate as cm\n"
        "schema = cm.Schema('lm', current='2.0.0')\n"
        "schema.add_migration('1.0.0', '2.0.0', [cm.ops.RenamePrefix('blocks.', 'layers.')])\n"
    )
    args = ["upgrade", str(dcp_dir), "--in-place", "--migrations", str(mig), "--schema", "lm"]
    assert cli.main([*args, "--from-version", "1.0.0"]) == 0, capsys.readouterr()
    backup = dcp_dir.with_name(dcp_dir.name + ".1.0.0.bak")
    assert {p.name: p.read_bytes() for p in backup.iterdir()} == before
    ckpt = read_checkpoint(dcp_dir)
    assert str(ckpt.version) == "2.0.0" and "layers.0.weight" in ckpt.state_dict


def test_hparams_json_cannot_hold_are_one_error_and_nothing_written(dcp_dir, tmp_path):
    # a DCP folder's hparams live in ckptmigrate.json: a tensor there was "internal error
    # (TypeError: Object of type Tensor is not JSON serializable)"
    migrations = tmp_path / "lm.py"
    migrations.write_text(
        "import torch\nimport ckptmigrate as cm\nschema = cm.Schema('lm', current='2.0.0')\n"
        "@schema.migration('1.0.0', '2.0.0')\ndef step(ckpt):\n"
        "    ckpt.hparams['scale'] = torch.ones(2)\n"
    )
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", str(dcp_dir), "-o", str(out)]
        + ["--from-version", "1.0.0", "--schema", "lm", "--migrations", str(migrations)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done
    assert done.stderr.startswith("ckptmigrate: error: a DCP folder keeps its hparams")
    assert "internal error" not in done.stderr and len(done.stderr.splitlines()) == 1
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["lm.py", "step-100"]


# -- review: a BUILD in .metadata never reaches a class -----------------------------------------


BUILD_ON_A_CLASS = r"""
import pathlib, sys
import torch.distributed.checkpoint.metadata as dcp_md
from ckptmigrate.formats.dcp import SafeFileSystemReader
folder = pathlib.Path(sys.argv[1])
try:
    SafeFileSystemReader(folder).read_metadata()
except Exception as exc:
    print("refused:", type(exc).__name__)
print("Metadata patched:", getattr(dcp_md.Metadata, "poisoned", None))
print("PosixPath patched:", getattr(pathlib.PosixPath, "poisoned", None))
import torch.serialization
print("_get_layout patched:", getattr(torch.serialization._get_layout, "poisoned", None))
"""


def test_dcp_metadata_cannot_patch_torch_or_pathlib_classes_by_build(tmp_path):
    # BUG: the DCP .metadata unpickler (formats/dcp.py, torch_classes=True: what
    # SafeFileSystemReader and read_dcp use) resolves globals to torch's real DCP classes and
    # the real pathlib.PosixPath, and lets a pickle's BUILD opcode run on the class object
    # itself (also torch.serialization._get_layout, whose .cache torch.load resolves layouts
    # by): `GLOBAL Metadata; (None, {"poisoned": 1}); BUILD` is setattr(Metadata, ...),
    # which patches the class for the whole process (every later DCP load, every Path) even
    # though the read then fails. The torch readers guard this (formats/torch/guards.py) and
    # torch's weights-only loader refuses BUILD on anything but tensors and dicts. Right: an
    # UnsafeCheckpointError (or CheckpointFormatError) and no class changed.
    import subprocess
    import sys

    def build_on(module: str, name: str) -> bytes:
        return (
            b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n"
            b"N}X\x08\x00\x00\x00poisonedK\x01s\x86b."
        )

    for module, name in (
        ("torch.distributed.checkpoint.metadata", "Metadata"),
        ("pathlib", "PosixPath"),
        ("torch.serialization", "_get_layout"),  # its .cache is what torch.load resolves by
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / ".metadata").write_bytes(build_on(module, name))
        done = subprocess.run(
            [sys.executable, "-c", BUILD_ON_A_CLASS, str(folder)],
            capture_output=True,
            text=True,
            check=True,
        )
        assert "refused: UnsafeCheckpointError" in done.stdout or "refused: Checkpoint" in (
            done.stdout
        ), done.stdout
        assert "Metadata patched: None" in done.stdout, done.stdout
        assert "PosixPath patched: None" in done.stdout, done.stdout
        assert "_get_layout patched: None" in done.stdout, done.stdout


CM_LOAD_DCP = r"""
import pathlib, sys
import ckptmigrate as cm
try:
    print("loaded:", list(cm.load(sys.argv[1], upgrade=False).state_dict))
except Exception as exc:
    print("refused:", type(exc).__name__)
print("PosixPath patched:", getattr(pathlib.PosixPath, "poisoned", None))
"""


def test_cm_load_of_a_dcp_folder_never_patches_pathlib_through_its_metadata(tmp_path):
    # BUG: the same BUILD-on-a-class hole, through plain cm.load: a real DCP folder whose
    # .metadata has a side-effect `GLOBAL pathlib.PosixPath; (None, {...}); BUILD; POP`
    # spliced in front passes the torch-free check (there PosixPath is a lambda, which
    # takes the attribute), then the torch-classes read runs the BUILD on the real
    # pathlib.PosixPath: cm.load succeeds and every Path in the process is patched. Right:
    # cm.load refuses the file (UnsafeCheckpointError naming the BUILD) and patches nothing.
    import subprocess
    import sys

    import torch.distributed.checkpoint as dcp

    folder = tmp_path / "ckpt"
    dcp.save({"w": torch.randn(3, 4)}, checkpoint_id=str(folder))
    raw = (folder / ".metadata").read_bytes()
    side_effect = b"cpathlib\nPosixPath\nN}X\x08\x00\x00\x00poisonedK\x01s\x86b0"
    (folder / ".metadata").write_bytes(raw[:2] + side_effect + raw[2:])
    done = subprocess.run(
        [sys.executable, "-c", CM_LOAD_DCP, str(folder)], capture_output=True, text=True
    )
    assert "PosixPath patched: None" in done.stdout, done.stdout + done.stderr
    assert "refused: UnsafeCheckpointError" in done.stdout, done.stdout + done.stderr
