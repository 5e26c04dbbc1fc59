"""Crash-consistency of folder rewrites and of stamps: SIGKILL at any moment of a DCP upgrade
(``-o`` and ``--in-place``), a DCP stamp (``-o`` and ``--in-place``) or a single-file stamp
leaves the old checkpoint or the new one at the path, whole; the same command run again
succeeds and leaves nothing behind.

Each command runs through the CLI in a forked child with ``CKPTMIGRATE_CRASH_AT=EVENT:N``
armed (``formats/atomic.py``): every ``write()`` into a file being written (DCP's own writer
included), every fsync, before and after every rename. Folders are swapped with
``renameat2(RENAME_EXCHANGE)`` where the kernel has it, else with two renames
(``formats/folder_swap.py``); the sweeps run both ways.

``CKPTMIGRATE_KILL_POINTS=N`` sets the kill points per sweep (a few in CI; 100+ by hand).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import signal
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from crash_points import (
    NOT_US,
    dead_pid,
    events_of,
    killed_child,
    live_child,
    our_pid_but,
    spread_keeping_steps,
)
from toy import TOY_MIGRATIONS

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.formats import atomic, folder_swap
from ckptmigrate.io.files import read_checkpoint

KILL_POINTS = int(os.environ.get("CKPTMIGRATE_KILL_POINTS", "8"))


def model_sd() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {f"blocks.{i}.weight": torch.randn(8, 8, generator=gen) for i in range(12)}


def upgraded_sd() -> dict[str, torch.Tensor]:
    return {k.replace("blocks.", "layers.", 1): v for k, v in model_sd().items()}


def save_dcp(folder: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": model_sd(), "epoch": 3}, checkpoint_id=folder)


def tree(path: Path) -> dict[str, bytes] | None:
    """A file's bytes, or a folder's files by relative name; None when nothing is there."""
    if not os.path.lexists(path):
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): p.read_bytes() for p in path.rglob("*") if p.is_file()}


def debris(folder: Path) -> list[str]:
    """Every temporary, old/new swap folder or lock under ``folder``."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if ".ckptmigrate" in p.name)


# ----------------------------------------------------------------------------- scenarios


@dataclass
class Scenario:
    """One command on a work folder: the files it starts from, what may stand at ``path``
    after a kill (the old tree, or a checkpoint with these values and version), and the
    names that may stay in the folder afterwards."""

    args: list[str]
    path: Path
    old: dict[str, bytes] | None
    new_version: str
    new_sd: dict[str, torch.Tensor]
    kept: set[str]
    stamp: bool = False  # a rerun after the stamp landed says "already stamped"


def _migrations(work: Path) -> Path:
    mig = work.parent / f"{work.name}-mig.py"
    mig.write_text(TOY_MIGRATIONS)
    return mig


def scenario(kind: str, originals: Path, work: Path) -> Scenario:
    """Set ``work`` up for ``kind`` from the pristine trees in ``originals``."""
    for child in list(work.iterdir()):
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    mig = ["--migrations", str(_migrations(work))]
    stamp = ["--schema", "toy", "--version", "1.0.0"]
    if kind == "file-stamp-in-place":
        path = work / "model.pth"
        shutil.copyfile(originals / "raw.pth", path)
        args = ["stamp", str(path), *stamp, "--in-place"]
        return Scenario(args, path, tree(path), "1.0.0", model_sd(), {"model.pth"}, stamp=True)
    if kind == "dcp-stamp-in-place":
        path = work / "step"
        shutil.copytree(originals / "raw", path)
        args = ["stamp", str(path), *stamp, "--in-place"]
        return Scenario(args, path, tree(path), "1.0.0", model_sd(), {"step"}, stamp=True)
    if kind == "dcp-stamp-o":
        src, path = work / "raw", work / "out"
        shutil.copytree(originals / "raw", src)
        shutil.copytree(originals / "raw", path)  # an earlier output, replaced
        args = ["stamp", str(src), *stamp, "-o", str(path)]
        return Scenario(args, path, tree(path), "1.0.0", model_sd(), {"raw", "out"})
    if kind == "dcp-upgrade-in-place":
        path = work / "step"
        shutil.copytree(originals / "stamped", path)
        args = ["upgrade", str(path), "--in-place", *mig]
        kept = {"step", "step.1.0.0.bak"}  # the backup is promised
        return Scenario(args, path, tree(path), "3.0.0", upgraded_sd(), kept)
    if kind == "dcp-upgrade-o":
        src, path = work / "step", work / "out"
        shutil.copytree(originals / "stamped", src)
        shutil.copytree(originals / "raw", path)  # an earlier output, replaced
        args = ["upgrade", str(src), "-o", str(path), *mig]
        return Scenario(args, path, tree(path), "3.0.0", upgraded_sd(), {"step", "out"})
    if kind == "dcp-upgrade-o-new":
        src, path = work / "step", work / "out"
        shutil.copytree(originals / "stamped", src)
        args = ["upgrade", str(src), "-o", str(path), *mig]
        return Scenario(args, path, None, "3.0.0", upgraded_sd(), {"step", "out"})
    raise AssertionError(kind)


KINDS = [
    "dcp-upgrade-in-place",
    "dcp-upgrade-o",
    "dcp-upgrade-o-new",
    "dcp-stamp-in-place",
    "dcp-stamp-o",
    "file-stamp-in-place",
]


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("originals")
    save_dcp(folder / "raw")
    shutil.copytree(folder / "raw", folder / "stamped")
    cm.stamp_in_place(folder / "stamped", "toy", "1.0.0")
    (folder / "stamped.ckptmigrate.lock").unlink(missing_ok=True)
    torch.save(model_sd(), folder / "raw.pth")
    return folder


@pytest.fixture()
def work(fast_tmp_path: Path) -> Path:
    return fast_tmp_path / "w"


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The kernel's atomic exchange, or a file system that refuses it (ENOSYS)."""
    if request.param == "two-renames":
        no_exchange(monkeypatch)
    elif not _exchange_works(Path(tempfile.gettempdir())):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    return request.param


def no_exchange(monkeypatch: pytest.MonkeyPatch, err: int = errno.ENOSYS) -> None:
    def refuse(*args: object) -> int:
        ctypes.set_errno(err)
        return -1

    monkeypatch.setattr(folder_swap, "_RENAMEAT2", [refuse])


def _exchange_works(base: Path) -> bool:
    with tempfile.TemporaryDirectory(dir=base) as d:
        a, b = Path(d, "a"), Path(d, "b")
        a.mkdir()
        b.mkdir()
        return folder_swap.exchange(a, b)


# ----------------------------------------------------------------------------- the harness


def check_survivor(s: Scenario, spec: str, gap_ok: bool = False) -> str:
    """At the path: the old checkpoint (its files; a dead writer's temporary inside may
    stay until the next run) or a whole new one; returns which. With ``gap_ok`` (two
    renames) the path may be empty between them, the whole new folder beside it, and a
    reader told where it is."""
    now = tree(s.path)
    if now is not None:
        now = {k: v for k, v in now.items() if atomic.TEMP_MARKER not in k}
    if now == s.old:
        return "old"
    where = s.path
    if now is None:
        beside = sorted(os.listdir(s.path.parent))
        assert gap_ok, f"{spec}: nothing at {s.path.name}: {beside}"
        ready = [n for n in beside if n.startswith(s.path.name + folder_swap.NEW_MARKER)]
        assert len(ready) == 1, (spec, beside)
        with pytest.raises(cm.CheckpointFormatError, match=ready[0]):
            read_checkpoint(s.path)  # the reader says where the checkpoint is
        where = s.path.parent / ready[0]
    ckpt = read_checkpoint(where)  # a partial checkpoint raises here
    assert str(ckpt.version) == s.new_version, spec
    assert ckpt.state_dict.keys() == s.new_sd.keys(), spec
    for key, value in s.new_sd.items():
        assert torch.equal(ckpt.state_dict[key], value), (spec, key)
    return "new" if where == s.path else "between"


def rerun(s: Scenario, capsys: pytest.CaptureFixture[str], spec: str) -> None:
    """The same command again succeeds (a stamp may find its work done) and leaves nothing."""
    capsys.readouterr()
    code = cli.main(s.args)
    err = capsys.readouterr().err
    if s.stamp and code == 2:
        assert "already stamped as toy 1.0.0" in err, (spec, err)
    else:
        assert code == 0, (spec, err)
    assert check_survivor(s, spec) == "new"
    assert debris(s.path.parent) == [], spec
    assert {p.name for p in s.path.parent.iterdir()} == s.kept, spec
    if s.path.name + ".1.0.0.bak" in s.kept:
        backup = s.path.with_name(s.path.name + ".1.0.0.bak")
        assert tree(backup) == s.old, spec  # the promised backup is the old checkpoint


def sweep(
    kind: str,
    originals: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    count: int,
    gap_ok: bool = False,
    rerun_every: int = 1,
) -> dict[str, int]:
    work.mkdir(exist_ok=True)
    s = scenario(kind, originals, work)
    events = events_of(lambda: cli.main(s.args), monkeypatch)
    specs = spread_keeping_steps(events, count)
    outcomes = {"old": 0, "new": 0, "between": 0}
    for i, spec in enumerate(specs):
        s = scenario(kind, originals, work)
        status = killed_child(spec, lambda s=s: cli.main(s.args), quiet=True)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, spec
        outcomes[check_survivor(s, spec, gap_ok)] += 1
        if i % rerun_every == 0 or i == len(specs) - 1:
            rerun(s, capsys, spec)
    with capsys.disabled():  # the counts, for runs by hand (pytest -s)
        print(f"\n{kind}: {len(specs)} kills of {len(events)} points: {outcomes}", end="")
    return outcomes


# ----------------------------------------------------------------------------- SIGKILL sweeps


@pytest.mark.parametrize("kind", KINDS)
def test_sigkill_at_any_moment_leaves_the_old_or_the_new_checkpoint_and_a_rerun_cleans_up(
    kind: str,
    swap_mode: str,
    originals: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if swap_mode == "two-renames" and kind == "file-stamp-in-place":
        pytest.skip("a single file is replaced with one rename either way")
    gap_ok = swap_mode == "two-renames"
    outcomes = sweep(kind, originals, work, monkeypatch, capsys, KILL_POINTS, gap_ok)
    assert outcomes["new"] > 0, outcomes  # the sweep reached past the swap
    if kind != "dcp-upgrade-o-new":
        assert outcomes["old"] > 0, outcomes


def _kill_between_the_renames(
    kind: str, originals: Path, work: Path, monkeypatch: pytest.MonkeyPatch
) -> Scenario:
    """Run ``kind`` with the exchange refused and kill it with the old folder moved aside and
    the new one not yet in (the second ``replaced`` of the swap)."""
    no_exchange(monkeypatch)
    work.mkdir(exist_ok=True)
    s = scenario(kind, originals, work)
    events = events_of(lambda: cli.main(s.args), monkeypatch)
    replaced = [i for i, e in enumerate(events) if e == "replaced"]
    # the swap's renames are the last three: new -> ready, target -> old, ready -> target
    spec = f"replaced:{len(replaced) - 1}"
    s = scenario(kind, originals, work)
    status = killed_child(spec, lambda: cli.main(s.args), quiet=True)
    assert os.WIFSIGNALED(status), spec
    return s


@pytest.mark.parametrize("kind", ["dcp-upgrade-in-place", "dcp-stamp-o", "dcp-upgrade-o"])
def test_a_swap_killed_between_its_two_renames_is_finished_by_the_next_run(
    kind: str,
    originals: Path,
    work: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = _kill_between_the_renames(kind, originals, work, monkeypatch)
    assert not s.path.exists()  # the moment this test is about: nothing at the path
    names = sorted(p.name for p in work.iterdir())
    assert any(folder_swap.NEW_MARKER in n for n in names), names
    assert any(folder_swap.OLD_MARKER in n for n in names), names
    rerun(s, capsys, "between the renames")


def test_a_reader_that_finds_nothing_says_where_the_checkpoint_is(
    originals: Path, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    s = _kill_between_the_renames("dcp-upgrade-in-place", originals, work, monkeypatch)
    capsys.readouterr()
    assert cli.main(["info", str(s.path)]) == 2
    err = capsys.readouterr().err
    assert "interrupted" in err and folder_swap.NEW_MARKER in err and "mv " in err, err
    with pytest.raises(cm.CheckpointFormatError, match="rerun the command"):
        read_checkpoint(s.path)
    assert not s.path.exists()  # reading wrote nothing
    monkeypatch.undo()
    rerun(s, capsys, "after the reads")


def test_a_swap_of_a_live_writer_is_left_alone(tmp_path: Path) -> None:
    target = tmp_path / "step"
    ready = tmp_path / f"step{folder_swap.NEW_MARKER}{os.getpid()}-ab12"
    old = tmp_path / f"step{folder_swap.OLD_MARKER}{os.getpid()}-ab12"
    ready.mkdir()
    old.mkdir()
    assert folder_swap.finish_interrupted_swap(target) == []
    assert ready.exists() and old.exists() and not target.exists()
    assert "replacing it right now" in (folder_swap.interrupted_swap_hint(target) or "")


@pytest.mark.parametrize("writer", sorted(NOT_US))
def test_a_swap_left_by_another_writer_with_our_pid_is_finished(
    tmp_path: Path, writer: str
) -> None:
    target = tmp_path / "step"
    token = f"{our_pid_but(NOT_US[writer]).token}-ab12"
    ready = tmp_path / f"step{folder_swap.NEW_MARKER}{token}"
    old = tmp_path / f"step{folder_swap.OLD_MARKER}{token}"
    ready.mkdir()
    (ready / "v").write_text("new")
    old.mkdir()
    assert "interrupted" in (folder_swap.interrupted_swap_hint(target) or "")
    folder_swap.finish_interrupted_swap(target)
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]


def test_a_swap_of_a_live_child_is_left_alone_until_it_dies(tmp_path: Path) -> None:
    target = tmp_path / "step"
    with live_child() as pid:
        token = f"{atomic.WriterIdentity.of(pid).token}-ab12"
        ready = tmp_path / f"step{folder_swap.NEW_MARKER}{token}"
        ready.mkdir()
        assert folder_swap.finish_interrupted_swap(target) == []
        assert f"process {pid} is replacing it" in (folder_swap.interrupted_swap_hint(target) or "")
    folder_swap.finish_interrupted_swap(target)
    assert target.is_dir() and not ready.exists()


def test_a_dead_writers_swap_with_only_the_old_folder_is_undone(tmp_path: Path) -> None:
    target = tmp_path / "step"
    old = tmp_path / f"step{folder_swap.OLD_MARKER}{dead_pid()}-ab12"
    old.mkdir()
    (old / "x").write_text("old")
    folder_swap.finish_interrupted_swap(target)
    assert (target / "x").read_text() == "old" and not old.exists()


# ----------------------------------------------------------------------------- the exchange


def test_an_existing_folder_is_replaced_in_one_exchange_where_the_kernel_can(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not _exchange_works(tmp_path):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here")
    target, new = tmp_path / "step", tmp_path / "step.new"
    target.mkdir()
    (target / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    renames: list[tuple[str, str]] = []
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append((a, b)), real(a, b))[1])
    folder_swap.swap_folder(new, target)
    assert renames == []  # no moment without a folder at the path
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOSYS, errno.EPERM])
def test_a_file_system_without_the_exchange_gets_two_renames(
    err: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_exchange(monkeypatch, err)
    target, new = tmp_path / "step", tmp_path / "step.new"
    target.mkdir()
    (target / "v").write_text("old")
    new.mkdir()
    (new / "v").write_text("new")
    folder_swap.swap_folder(new, target)
    assert (target / "v").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step"]


def test_another_exchange_error_is_raised_and_nothing_moves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    no_exchange(monkeypatch, errno.EACCES)
    target, new = tmp_path / "step", tmp_path / "step.new"
    target.mkdir()
    new.mkdir()
    with pytest.raises(PermissionError):
        folder_swap.swap_folder(new, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step", "step.new"]
