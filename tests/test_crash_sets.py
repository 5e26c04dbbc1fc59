"""Crash-consistency of sharded sets: SIGKILL at any moment of an in-place upgrade or stamp of
a set leaves the old set or the new one, whole; the next run of the same command succeeds and
leaves no debris (no temporaries, orphaned shards, journal or lock; the backup as promised).

Kill points are those of ``tests/test_crash.py`` (``CKPTMIGRATE_CRASH_AT=EVENT:N``: each
write, pwrite or copy_file_range into a temporary, each fsync, before and after each rename),
spread evenly over one run's events. CI runs ``CKPTMIGRATE_KILL_POINTS`` of them per case
(default 8); by hand: ``CKPTMIGRATE_KILL_POINTS=200 pytest tests/test_crash_sets.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from crash_points import (
    NOT_US,
    events_of,
    killed_child,
    live_child,
    our_pid_but,
    spec_where,
    spread,
)
from hostile import write_set
from toy import toy_schema

from ckptmigrate.engine.inplace import stamp_in_place, upgrade_in_place
from ckptmigrate.errors import AlreadyStampedError
from ckptmigrate.formats import atomic, set_swap
from ckptmigrate.io.files import read_checkpoint

KILL_POINTS = int(os.environ.get("CKPTMIGRATE_KILL_POINTS", "8"))


def set_shards(ext: str) -> dict[str, dict[str, torch.Tensor]]:
    """Three shards of 24 small tensors: many writes to kill between, in every shard."""
    gen = torch.Generator().manual_seed(0)
    return {
        f"model-{i:05d}-of-00003{ext}": {
            f"blocks.{i}.{j}.weight": torch.randn(8, 8, generator=gen) for j in range(24)
        }
        for i in range(1, 4)
    }


def flat(shards: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: v for tensors in shards.values() for k, v in tensors.items()}


@pytest.fixture
def work(fast_tmp_path: Path) -> Path:
    return fast_tmp_path


class Case:
    """One command on one set: how to lay the set out, run the command, and tell old from new."""

    def __init__(self, command: str, ext: str) -> None:
        self.command, self.ext = command, ext
        self.shards = set_shards(ext)
        self.old_version = None if command == "stamp" else "1.0.0"
        self.new_version = {"stamp": "1.0.0", "upgrade-streamed": "2.0.0"}.get(command, "3.0.0")
        renamed = {k.replace("blocks.", "layers.", 1): v for k, v in flat(self.shards).items()}
        self.old = flat(self.shards)
        self.new = self.old if command == "stamp" else renamed

    def lay_out(self, root: Path) -> Path:
        for child in root.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
        folder = root / "set"
        index_name = f"model{self.ext}.index.json"
        write_set(folder, self.shards, index_name, version=self.old_version)
        (folder / "notes.txt").write_text("the user's notes")
        return folder

    def run(self, folder: Path) -> None:
        if self.command == "stamp":
            with contextlib.suppress(AlreadyStampedError):  # the killed one got to the commit
                stamp_in_place(folder, "toy", "1.0.0")
            return
        upgrade_in_place(folder, toy_schema(), to=self.new_version)

    def survivor(self, folder: Path) -> str:
        """The set is the old one or the new one, every shard its index names whole."""
        ckpt = read_checkpoint(folder)  # a missing or partial shard raises here
        version = None if ckpt.version is None else str(ckpt.version)
        which = "old" if version == self.old_version else "new"
        assert version == (self.old_version if which == "old" else self.new_version)
        expected = self.old if which == "old" else self.new
        assert ckpt.state_dict.keys() == expected.keys()
        assert all(torch.equal(ckpt.state_dict[k], v) for k, v in expected.items())
        return which

    def assert_tidy(self, root: Path, folder: Path, old_files: dict[str, bytes]) -> None:
        """After the rerun: the new set, its files, the user's, the backup; nothing else."""
        assert self.survivor(folder) == "new"
        index = next(folder.glob("*.index.json"))
        named = set(json.loads(index.read_text())["weight_map"].values())
        assert sorted(p.name for p in folder.iterdir()) == sorted({index.name, "notes.txt", *named})
        assert (folder / "notes.txt").read_text() == "the user's notes"
        if self.command == "stamp":
            assert sorted(p.name for p in root.iterdir()) == ["set"]
            return
        backup = root / "set.1.0.0.bak"
        assert sorted(p.name for p in root.iterdir()) == ["set", backup.name]
        assert {p.name: p.read_bytes() for p in backup.iterdir()} == old_files


CASES = [
    (command, ext)
    for command in ("upgrade-streamed", "upgrade-loaded", "stamp")
    for ext in (".safetensors", ".bin")
]


@pytest.mark.parametrize(("command", "ext"), CASES)
def test_sigkill_anywhere_in_a_set_rewrite_then_a_rerun_finishes_it_tidily(
    command: str, ext: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = Case(command, ext)
    folder = case.lay_out(work)
    old_files = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "notes.txt"}

    def action() -> None:
        case.run(folder)

    events = events_of(action, monkeypatch)
    if (command, ext) == ("stamp", ".bin"):
        # the stamp lives in the index: every shard is left as it is, the journal and the
        # index are all that is written
        assert events.count("replaced") >= 2 and not any("copy" in e for e in events), events
    else:
        # safetensors' own writer (the loaded path) writes from Rust: no write() to hook there
        assert events.count("replaced") >= 4 and len(events) >= 20, events
    specs = spread(events, KILL_POINTS)
    outcomes = {"old": 0, "new": 0}
    for spec in specs:
        assert case.lay_out(work) == folder
        status = killed_child(spec, action)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, spec
        outcomes[case.survivor(folder)] += 1
        backup = work / "set.1.0.0.bak"
        if backup.is_dir():  # a backup is whole, or absent
            assert {p.name: p.read_bytes() for p in backup.iterdir()} == old_files, spec
        case.run(folder)  # the same command again: it succeeds...
        case.assert_tidy(work, folder, old_files)  # ...and leaves no debris
    assert outcomes["old"] > 0 and (outcomes["new"] > 0 or KILL_POINTS < 4), outcomes
    print(f"{command}{ext}: {len(specs)} kill points of {len(events)} events, {outcomes}")


def test_the_next_run_keeps_an_old_shard_that_changed_after_the_killed_one_read_it(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = Case("upgrade-streamed", ".safetensors")
    folder = case.lay_out(work)
    index_name = "model.safetensors.index.json"

    def action() -> None:
        case.run(folder)

    # the last "replaced" is the index's: killed after the commit, before the old shards went
    seen = events_of(action, monkeypatch)
    folder = case.lay_out(work)
    status = killed_child(f"replaced:{seen.count('replaced')}", action)
    assert os.WIFSIGNALED(status)
    old_shards = sorted(case.shards)
    assert all((folder / name).exists() for name in old_shards)  # orphans, for now
    assert case.survivor(folder) == "new"
    changed = folder / old_shards[0]
    changed.unlink()
    changed.write_bytes(b"the user saved something else under this name")
    case.run(folder)
    assert changed.read_bytes() == b"the user saved something else under this name"
    assert not any((folder / name).exists() for name in old_shards[1:])
    assert not list(folder.glob("*.ckptmigrate*")) and (folder / index_name).exists()


def test_a_killed_upgrade_into_another_folder_leaves_no_orphans_after_the_rerun(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ckptmigrate.engine.inplace import migrate_file

    case = Case("upgrade-streamed", ".safetensors")
    folder = case.lay_out(work)
    out = work / "out"

    def action() -> None:
        migrate_file(folder, out, schemas=toy_schema(), to="2.0.0")

    events = events_of(action, monkeypatch)
    for spec in spread(events, max(4, KILL_POINTS // 2)):
        shutil.rmtree(out)
        status = killed_child(spec, action)
        assert os.WIFSIGNALED(status), spec
        action()  # the same command again
        assert case.survivor(out) == "new"
        index = out / "model.safetensors.index.json"
        named = set(json.loads(index.read_text())["weight_map"].values())
        assert sorted(p.name for p in out.iterdir()) == sorted({index.name, "notes.txt", *named})


def test_a_kill_while_a_companion_file_is_copied_leaves_no_temporary_after_the_rerun(
    work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed with ``notes.txt``'s copy half written into the output folder, the rerun sweeps
    that temporary too, not only those of shards and the index (found at 100 kill points)."""
    from ckptmigrate.engine.inplace import migrate_file

    case = Case("upgrade-streamed", ".safetensors")
    folder = case.lay_out(work)
    out = work / "out"

    def action() -> None:
        migrate_file(folder, out, schemas=toy_schema(), to="2.0.0")

    def copying_notes() -> bool:
        return out.is_dir() and any(p.name.startswith("notes.txt.") for p in out.iterdir())

    spec = spec_where(action, monkeypatch, copying_notes)
    shutil.rmtree(out)
    assert os.WIFSIGNALED(killed_child(spec, action)), spec
    assert copying_notes()  # the kill left the half-written copy
    action()
    index = out / "model.safetensors.index.json"
    named = set(json.loads(index.read_text())["weight_map"].values())
    assert sorted(p.name for p in out.iterdir()) == sorted({index.name, "notes.txt", *named})


# ----------------------------------------------------------------------------- the journal


def journal_of(folder: Path) -> Path:
    return next(folder.glob("*.ckptmigrate-pending"))


def recorded(folder: Path) -> list[str]:
    """The new shards the journal on disk records as written whole."""
    with contextlib.suppress(StopIteration, OSError, ValueError, KeyError):
        return list(json.loads(journal_of(folder).read_text())["written"])
    return []


def killed_after_the_first_shard_is_recorded(
    case: Case, work: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, str, dict[str, bytes]]:
    """A run killed just after its journal records its first new shard: the folder, that
    shard's name, and the set's files before the run (what a backup of it holds)."""
    folder = case.lay_out(work)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.name != "notes.txt"}
    spec = spec_where(lambda: case.run(folder), monkeypatch, lambda: len(recorded(folder)) == 1)
    assert case.lay_out(work) == folder
    status = killed_child(spec, lambda: case.run(folder))
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, spec
    (name,) = recorded(folder)
    return folder, name, before


@pytest.fixture
def killed(work: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Case, Path, str, dict]:
    """A streamed upgrade of a safetensors set killed just after its journal records its
    first new shard: the case, then as :func:`killed_after_the_first_shard_is_recorded`."""
    case = Case("upgrade-streamed", ".safetensors")
    return (case, *killed_after_the_first_shard_is_recorded(case, work, monkeypatch))


#: the rewrites that write shards: a stamp of a .bin set leaves every shard as it is
WRITING_SHARDS = [case for case in CASES if case != ("stamp", ".bin")]


@pytest.mark.parametrize(("command", "ext"), WRITING_SHARDS)
def test_a_kill_after_a_shard_is_recorded_leaves_exactly_it_for_the_recovery(
    command: str, ext: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    case = Case(command, ext)
    folder, name, before = killed_after_the_first_shard_is_recorded(case, work, monkeypatch)
    journal = journal_of(folder)
    expected = {**before, "notes.txt": b"the user's notes"}
    assert sorted(p.name for p in folder.iterdir()) == sorted({*expected, journal.name, name})
    assert sorted(set_swap.recover(folder)) == sorted([name, journal.name])
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == expected
    case.run(folder)
    case.assert_tidy(work, folder, before)


def test_a_file_put_under_a_recorded_shard_name_survives_the_recovery(
    killed: tuple[Case, Path, str, dict],
) -> None:
    case, folder, name, _ = killed
    (folder / name).unlink()
    (folder / name).write_bytes(b"the user's own file under that name")  # another file
    set_swap.recover(folder)
    assert (folder / name).read_bytes() == b"the user's own file under that name"
    assert not list(folder.glob("*.ckptmigrate*")) and case.survivor(folder) == "old"
    case.run(folder)
    assert case.survivor(folder) == "new"
    assert (folder / name).read_bytes() == b"the user's own file under that name"


def rewrite_journal_writer(folder: Path, writer: atomic.WriterIdentity) -> None:
    journal = journal_of(folder)
    journal.write_text(json.dumps({**json.loads(journal.read_text()), **writer.record()}))


@pytest.mark.parametrize("writer", sorted(NOT_US))
def test_a_journal_of_another_writer_with_our_pid_is_settled_by_the_next_run(
    writer: str, work: Path, killed: tuple[Case, Path, str, dict]
) -> None:
    case, folder, _, before = killed
    rewrite_journal_writer(folder, our_pid_but(NOT_US[writer]))  # the dead writer had our pid
    case.run(folder)  # its recorded shard gone, else an orphan beside the new set
    case.assert_tidy(work, folder, before)


def test_a_journal_of_a_live_writer_is_kept_until_it_dies(
    killed: tuple[Case, Path, str, dict],
) -> None:
    _, folder, name, _ = killed
    journal = journal_of(folder)
    with live_child() as pid:
        rewrite_journal_writer(folder, atomic.WriterIdentity.of(pid))
        assert set_swap.recover(folder) == []
        assert journal.exists() and (folder / name).exists()
    assert sorted(set_swap.recover(folder)) == sorted([name, journal.name])
