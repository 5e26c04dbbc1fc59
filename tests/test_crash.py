"""Crash-consistency of in-place rewrites: SIGKILL at any moment, or a failing disk, leaves the
complete old file or the complete new one, never a partial one, never none.

Kill points are deterministic: ``CKPTMIGRATE_CRASH_AT=EVENT:N`` makes ckptmigrate SIGKILL
itself at the Nth ``write()`` into a temporary file, before the fsync of a temporary, before
or after the rename, or before the fsync of the folder (``formats/atomic.py``). The upgrade
runs in a forked child (torch is already imported, so a kill point costs milliseconds) and a
few in real ``ckptmigrate`` processes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from crash_points import NOT_US, events_of, killed_child, live_child, our_pid_but, spread
from toy import TOY_MIGRATIONS, toy_schema

import ckptmigrate as cm
from ckptmigrate.engine.inplace import BackupExistsError, stamp_in_place, upgrade_in_place
from ckptmigrate.errors import AlreadyStampedError
from ckptmigrate.formats import atomic
from ckptmigrate.formats.lock import LOCK_SUFFIX

KILL_POINTS = 100


def big_sd(prefix: str = "blocks") -> dict[str, torch.Tensor]:
    """60 tensors: enough write() calls to kill in the middle of many records."""
    gen = torch.Generator().manual_seed(0)
    return {f"{prefix}.{i}.weight": torch.randn(16, 16, generator=gen) for i in range(60)}


def expected_new() -> dict[str, torch.Tensor]:
    return {k.replace("blocks.", "layers.", 1): v for k, v in big_sd().items()}


def _litter(folder: Path) -> list[str]:
    return sorted(
        p.name for p in folder.iterdir() if atomic.TEMP_MARKER in p.name or LOCK_SUFFIX in p.name
    )


# ----------------------------------------------------------------------------- SIGKILL


def _check_survivor(path: Path, old: bytes, new_version: str, new_sd: dict) -> str:
    """The file is the old bytes or a complete new file; returns which."""
    assert path.exists(), "the file is gone"
    data = path.read_bytes()
    if data == old:
        return "old"
    ckpt = cm.load(path, upgrade=False)  # a partial file would raise here
    assert str(ckpt.version) == new_version
    assert ckpt.state_dict.keys() == new_sd.keys()
    for key, value in new_sd.items():
        assert torch.equal(ckpt.state_dict[key], value), key
    return "new"


@pytest.mark.parametrize("kind", ["upgrade", "stamp"])
def test_sigkill_at_100_moments_leaves_the_old_or_the_new_file(
    kind: str, tmp_path: Path, fast_tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = toy_schema()
    original = tmp_path / "original.pth"
    if kind == "upgrade":
        cm.save(original, big_sd(), schema="toy", version="1.0.0", hparams={"width": 4})
        new_version, new_sd = "3.0.0", expected_new()
    else:
        torch.save(big_sd(), original)
        new_version, new_sd = "1.0.0", big_sd()
    old = original.read_bytes()
    work = fast_tmp_path
    target = work / "model.pth"

    def action() -> object:
        if kind == "upgrade":
            return upgrade_in_place(target, schema)
        return stamp_in_place(target, "toy", "1.0.0")

    shutil.copyfile(original, target)
    events = events_of(action, monkeypatch)
    assert events.count("write") > KILL_POINTS // 2 and "replace" in events
    specs = spread(events, KILL_POINTS)
    assert len(specs) == KILL_POINTS
    outcomes = {"old": 0, "new": 0}
    for i, spec in enumerate(specs):
        for child in work.iterdir():
            child.unlink()
        shutil.copyfile(original, target)
        status = killed_child(spec, action)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, spec
        outcomes[_check_survivor(target, old, new_version, new_sd)] += 1
        backup = work / "model.pth.1.0.0.bak"
        if backup.exists():
            assert backup.read_bytes() == old, spec  # a backup is whole, or absent
        if i % 4 and i != len(specs) - 1:
            continue
        # running again finishes the job and clears what the killed writer left
        again = action if kind == "upgrade" else (lambda: _stamp_or_done(target))
        again()
        _check_survivor(target, b"", new_version, new_sd)
        assert _litter(work) == [], spec
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes


def _stamp_or_done(target: Path) -> None:
    with contextlib.suppress(AlreadyStampedError):  # the killed one got as far as the rename
        stamp_in_place(target, "toy", "1.0.0")


def test_sigkill_of_a_safetensors_upgrade_at_each_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """safetensors writes from Rust (no Python write() to hook): kill at every other step."""
    schema = toy_schema()
    target = tmp_path / "model.safetensors"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    events = events_of(lambda: upgrade_in_place(target, schema), monkeypatch)
    target.write_bytes(old)
    for child in tmp_path.iterdir():
        if child != target:
            child.unlink()
    specs = spread(events, len(events))
    assert len(specs) >= 5  # link the backup, fsync, replace, replaced, fsync the folder
    for spec in specs:
        status = killed_child(spec, lambda: upgrade_in_place(target, schema))
        assert os.WIFSIGNALED(status), spec
        _check_survivor(target, old, "3.0.0", expected_new())
        upgrade_in_place(target, schema)
        assert _litter(tmp_path) == []
        target.write_bytes(old)
        for child in tmp_path.iterdir():
            if child != target:
                child.unlink()


@pytest.mark.parametrize("spec", ["write:7", "replaced:1"])  # the backup is a link: no replace
def test_a_real_cli_process_killed_mid_upgrade_leaves_a_whole_file(
    spec: str, tmp_path: Path
) -> None:
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "toy_migrations.py").write_text(TOY_MIGRATIONS)
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "upgrade", str(target), "--in-place"]
        + ["--migrations", str(tmp_path / "mig")],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, atomic.CRASH_ENV: spec},
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    which = _check_survivor(target, old, "3.0.0", expected_new())
    assert which == ("new" if spec == "replaced:1" else "old")


# ----------------------------------------------------------------------------- injected faults


def _fail_at(event: str, nth: int, exc: BaseException) -> Callable[[str], None]:
    count = {"n": 0}

    def hook(seen: str) -> None:
        if seen == event:
            count["n"] += 1
            if count["n"] == nth:
                raise exc

    return hook


def _enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _eio() -> OSError:
    return OSError(errno.EIO, os.strerror(errno.EIO))


Inject = Callable[[pytest.MonkeyPatch, str], None]  # (monkeypatch, "upgrade" | "stamp")
FAULTS: dict[str, tuple[str, Inject]] = {}


def fault(name: str, outcome: str = "old") -> Callable[[Inject], Inject]:
    def register(inject: Inject) -> Inject:
        FAULTS[name] = (outcome, inject)
        return inject

    return register


def _armed(monkeypatch: pytest.MonkeyPatch, hook: Callable[[str], None]) -> None:
    monkeypatch.setenv(atomic.CRASH_ENV, "faults")  # route writes through the hook
    monkeypatch.setattr(atomic, "crash_point", hook)


for _nth in (1, 20, 60):
    for _make, _label in ((_enospc, "ENOSPC"), (_eio, "EIO")):

        def _write_fault(mp: pytest.MonkeyPatch, kind: str, nth=_nth, make=_make) -> None:
            _armed(mp, _fail_at("write", nth, make()))

        FAULTS[f"{_label}-at-write-{_nth}"] = ("old", _write_fault)


@fault("KeyboardInterrupt-at-write-30")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    _armed(mp, _fail_at("write", 30, KeyboardInterrupt()))


def _failing_os(name: str, make: Callable[[], BaseException], nth: int = 1):
    real = getattr(os, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] == nth:
            raise make()
        return real(*args, **kwargs)

    return wrapper


# These faults run where hard links are refused (``os.link`` fails), so an in-place upgrade
# first copies its backup (fsync #1, rename #1, folder fsync #2), then writes the file (fsync
# #3, rename #2); a stamp writes the file only. The linked backup has its own tests below.
def _main_fsync(kind: str) -> int:
    return 3 if kind == "upgrade" else 1


def _main_rename(kind: str) -> int:
    return 2 if kind == "upgrade" else 1


@fault("EIO-at-fsync-of-the-temporary")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    mp.setattr(os, "fsync", _failing_os("fsync", _eio, _main_fsync(kind)))


@fault("ENOSPC-at-fsync-of-the-temporary")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    mp.setattr(os, "fsync", _failing_os("fsync", _enospc, _main_fsync(kind)))


@fault("EIO-at-rename")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    mp.setattr(os, "replace", _failing_os("replace", _eio, _main_rename(kind)))


@fault("EXDEV-at-rename")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    exdev = lambda: OSError(errno.EXDEV, "cross-device link")  # noqa: E731
    mp.setattr(os, "replace", _failing_os("replace", exdev, _main_rename(kind)))


@fault("EIO-at-fsync-of-the-folder", outcome="new")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    _armed(mp, _fail_at("fsync-dir", 2 if kind == "upgrade" else 1, _eio()))


@fault("ENOSPC-while-copying-the-backup", outcome="old-no-backup")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    def copy_half(src, dst, **kwargs):
        Path(dst).write_bytes(Path(src).read_bytes()[:100])
        raise _enospc()

    mp.setattr(shutil, "copyfile", copy_half)


@fault("EIO-at-fsync-of-the-backup", outcome="old-no-backup")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    mp.setattr(os, "fsync", _failing_os("fsync", _eio, 1))


@fault("EIO-at-rename-of-the-backup", outcome="old-no-backup")
def _(mp: pytest.MonkeyPatch, kind: str) -> None:
    mp.setattr(os, "replace", _failing_os("replace", _eio, 1))


def _no_links(src: object, dst: object, **kwargs: object) -> None:
    raise OSError(errno.EPERM, "hard links refused here")


@pytest.mark.parametrize("name", list(FAULTS))
@pytest.mark.parametrize("kind", ["upgrade", "stamp"])
def test_an_injected_fault_leaves_the_old_file_and_no_litter(
    name: str, kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcome, inject = FAULTS[name]
    schema = toy_schema()
    target = tmp_path / "model.pth"
    if kind == "upgrade":
        cm.save(target, big_sd(), schema="toy", version="1.0.0")
        new_version, new_sd = "3.0.0", expected_new()
        action: Callable[[], object] = lambda: upgrade_in_place(target, schema)  # noqa: E731
    else:
        if "backup" in name:
            pytest.skip("stamping keeps no backup")
        torch.save(big_sd(), target)
        new_version, new_sd = "1.0.0", big_sd()
        action = lambda: stamp_in_place(target, "toy", "1.0.0")  # noqa: E731
    old = target.read_bytes()
    monkeypatch.setattr(os, "link", _no_links)
    inject(monkeypatch, kind)
    with pytest.raises((OSError, KeyboardInterrupt)):
        action()
    monkeypatch.undo()
    which = _check_survivor(target, old, new_version, new_sd)
    assert which == ("new" if outcome == "new" else "old"), name
    assert _litter(tmp_path) == [], name
    backups = list(tmp_path.glob("*.bak"))
    if kind == "upgrade" and outcome == "old":
        assert [p.read_bytes() == old for p in backups] == [True]  # made before the write
    elif outcome == "old-no-backup":
        assert backups == []
    if which == "old":
        action()  # the next attempt succeeds (reusing an identical backup)
    _check_survivor(target, b"", new_version, new_sd)
    assert _litter(tmp_path) == []


# ----------------------------------------------------------------------------- backups


def test_in_place_upgrade_keeps_a_backup_unless_told_not_to(tmp_path: Path) -> None:
    schema = toy_schema()
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    outcome = upgrade_in_place(target, schema, to="2.0.0")
    assert outcome.backup == str(tmp_path / "model.pth.1.0.0.bak")
    assert Path(outcome.backup).read_bytes() == old
    outcome = upgrade_in_place(target, schema, backup=False)
    assert outcome.backup is None and outcome.written == str(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth", "model.pth.1.0.0.bak"]


def test_a_different_backup_in_the_way_stops_the_upgrade_before_writing(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    (tmp_path / "model.pth.1.0.0.bak").write_bytes(b"someone else's backup")
    with pytest.raises(BackupExistsError, match="already exists"):
        upgrade_in_place(target, toy_schema())
    assert target.read_bytes() == old
    assert (tmp_path / "model.pth.1.0.0.bak").read_bytes() == b"someone else's backup"
    assert _litter(tmp_path) == []


def test_upgrading_through_a_symlink_rewrites_the_file_it_names(tmp_path: Path) -> None:
    real = tmp_path / "store" / "model.pth"
    real.parent.mkdir()
    cm.save(real, big_sd(), schema="toy", version="1.0.0")
    link = tmp_path / "model.pth"
    link.symlink_to(real)
    upgrade_in_place(link, toy_schema())
    assert link.is_symlink() and str(cm.load(link, upgrade=False).version) == "3.0.0"
    assert (real.parent / "model.pth.1.0.0.bak").exists()


def test_a_new_file_keeps_the_permissions_of_the_old_one(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    target.chmod(0o640)
    upgrade_in_place(target, toy_schema(), backup=False)
    assert target.stat().st_mode & 0o777 == 0o640


def test_a_temporary_killed_mid_write_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    # a 0644 temporary let another user read a private checkpoint while it was being written,
    # and a kill left that partial copy behind for anyone to read
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    target.chmod(0o644)

    status = killed_child("write:3", lambda: upgrade_in_place(target, toy_schema(), backup=False))

    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    partial = [p for p in tmp_path.iterdir() if atomic.TEMP_MARKER in p.name]
    assert partial and all(p.stat().st_mode & 0o777 == 0o600 for p in partial)


def test_a_new_file_gets_the_umask_permissions_and_a_replaced_one_keeps_its_owner(
    tmp_path: Path,
) -> None:
    previous = os.umask(0o027)
    try:
        fresh = tmp_path / "fresh.pth"
        cm.save(fresh, big_sd(), schema="toy", version="1.0.0")
        assert fresh.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(previous)
    if os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    os.chown(fresh, 1234, 5678)
    upgrade_in_place(fresh, toy_schema(), backup=False)
    st = fresh.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (1234, 5678, 0o640)


@pytest.mark.parametrize("points_to", ["the file", "elsewhere"])
def test_a_backup_name_that_is_a_symlink_is_refused_and_the_old_version_kept(
    tmp_path: Path, points_to: str
) -> None:
    # a model.pth.1.0.0.bak symlink to model.pth looked "identical" and was kept: after the
    # upgrade it showed the new version, and the old one was gone
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    elsewhere = tmp_path / "elsewhere.pth"
    elsewhere.write_bytes(b"someone else's file")
    (tmp_path / "model.pth.1.0.0.bak").symlink_to(target if points_to == "the file" else elsewhere)

    with pytest.raises(BackupExistsError, match="symbolic link"):
        upgrade_in_place(target, toy_schema())

    assert target.read_bytes() == old
    assert elsewhere.read_bytes() == b"someone else's file"


@pytest.mark.parametrize("writer", ["cli -o", "upgrade_file"])
def test_an_upgraded_copy_of_a_private_checkpoint_is_private(tmp_path: Path, writer: str) -> None:
    src, dst = tmp_path / "private.pth", tmp_path / "copy.pth"
    cm.save(src, big_sd(), schema="toy", version="1.0.0")
    src.chmod(0o600)
    if writer == "cli -o":
        from ckptmigrate import cli

        migrations = tmp_path / "toy.py"
        migrations.write_text(TOY_MIGRATIONS)
        assert cli.main(["upgrade", str(src), "-o", str(dst), "--migrations", str(migrations)]) == 0
    else:
        cm.upgrade_file(src, dst, toy_schema())
    assert dst.stat().st_mode & 0o777 == 0o600


# ----------------------------------------------------------------------------- linked backups


def test_the_backup_is_a_hard_link_that_keeps_the_old_bytes(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old, old_inode = target.read_bytes(), target.stat().st_ino
    outcome = upgrade_in_place(target, toy_schema())
    backup = Path(outcome.backup)
    assert backup.stat().st_ino == old_inode and backup.stat().st_nlink == 1
    assert backup.read_bytes() == old  # the upgrade renamed a new file over the name
    assert target.stat().st_ino != old_inode
    assert _check_survivor(target, old, "3.0.0", expected_new()) == "new"


def test_a_failed_write_after_the_linked_backup_leaves_both_names_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "model.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    old = target.read_bytes()
    monkeypatch.setattr(os, "fsync", _failing_os("fsync", _eio, 1))  # the new file's fsync
    with pytest.raises(OSError):
        upgrade_in_place(target, toy_schema())
    monkeypatch.undo()
    assert target.read_bytes() == old and _litter(tmp_path) == []
    assert [p.read_bytes() == old for p in tmp_path.glob("*.bak")] == [True]
    upgrade_in_place(target, toy_schema())  # the rerun keeps the identical backup
    assert _check_survivor(target, old, "3.0.0", expected_new()) == "new"
    assert [p.read_bytes() == old for p in tmp_path.glob("*.bak")] == [True]


def test_a_set_backup_links_its_shards(tmp_path: Path) -> None:
    from ckptmigrate.engine.inplace import _write_backup

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.bin").write_bytes(b"a" * 100)
    (folder / "b.bin").write_bytes(b"b" * 100)
    kept = _write_backup(folder, "1.0.0")
    assert sorted(p.name for p in kept.iterdir()) == ["a.bin", "b.bin"]
    assert all((kept / n).stat().st_ino == (folder / n).stat().st_ino for n in ("a.bin", "b.bin"))


def test_a_dead_writers_temporary_folder_is_swept(tmp_path: Path) -> None:
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)  # that process has exited
    target = tmp_path / "set.1.0.0.bak"
    stale = tmp_path / f"set.1.0.0.bak{atomic.TEMP_MARKER}{pid}-0123abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "shard.safetensors").write_bytes(b"half a copy")
    live = tmp_path / f"set.1.0.0.bak{atomic.TEMP_MARKER}{os.getpid()}-0123abcd"
    live.mkdir()
    assert atomic.remove_stale_temps(target) == [stale]
    assert not stale.exists() and live.exists()


@pytest.mark.parametrize("writer", sorted(NOT_US))
def test_a_temporary_of_another_writer_with_our_pid_is_swept_by_the_next_run(
    tmp_path: Path, writer: str
) -> None:
    # a killed writer of a previous boot or another container had the pid we have now
    target = tmp_path / "a.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    stale = tmp_path / f"a.pth{atomic.TEMP_MARKER}{our_pid_but(NOT_US[writer]).token}-0123abcd"
    stale.write_bytes(b"half a file")
    upgrade_in_place(target, toy_schema(), to="3.0.0", backup=False)
    assert not stale.exists()
    assert _litter(tmp_path) == []


def test_a_temporary_of_a_live_writer_is_kept_until_it_dies(tmp_path: Path) -> None:
    target = tmp_path / "a.pth"
    cm.save(target, big_sd(), schema="toy", version="1.0.0")
    with live_child() as pid:
        token = atomic.WriterIdentity.of(pid).token
        live = tmp_path / f"a.pth{atomic.TEMP_MARKER}{token}-0123abcd"
        live.write_bytes(b"being written")
        upgrade_in_place(target, toy_schema(), to="3.0.0", backup=False)
        assert live.exists()
    assert atomic.remove_stale_temps(target) == [live]  # it died: the same name goes
