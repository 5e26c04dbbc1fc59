"""Several processes rewriting one file in place: the lock beside it makes each migration step
run exactly once; the others find the file current or fail with a clear error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from crash_points import NOT_US, dead_pid, live_child, our_pid_but
from toy import toy_sd

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.engine.inplace import stamp_in_place, upgrade_in_place
from ckptmigrate.errors import AlreadyStampedError, LockTimeoutError
from ckptmigrate.formats import atomic
from ckptmigrate.formats.lock import FileLock, file_lock, lock_path_for, read_lock_holder

SLOW_MIGRATIONS = """
import os, time
import ckptmigrate as cm

LOG = os.environ["CKPTMIGRATE_TEST_LOG"]
schema = cm.Schema("toy", current="3.0.0")


def _applied(name):
    with open(LOG, "a") as f:
        f.write(f"{name} {os.getpid()}\\n")


@schema.migration("1.0.0", "2.0.0")
def rename_blocks(ckpt):
    _applied("1.0.0->2.0.0")
    time.sleep(1.5)  # long enough for the other process to arrive while this one works
    ckpt.state_dict = {k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()}


@schema.migration("2.0.0", "3.0.0")
def pin_width(ckpt):
    _applied("2.0.0->3.0.0")
    ckpt.hparams.setdefault("width", 4)
"""


def _slow_schema(counter: list[str], delay: float = 0.3) -> cm.Schema:
    schema = cm.Schema("toy", current="3.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def rename_blocks(ckpt):
        counter.append("1.0.0->2.0.0")
        time.sleep(delay)
        ckpt.state_dict = {k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()}

    @schema.migration("2.0.0", "3.0.0")
    def pin_width(ckpt):
        counter.append("2.0.0->3.0.0")
        ckpt.hparams.setdefault("width", 4)

    return schema


def _history(path: Path) -> list[tuple[str, str]]:
    return [(h["from"], h["to"]) for h in cm.load(path, upgrade=False).history]


# ----------------------------------------------------------------------------- real processes


def test_two_processes_upgrading_one_file_apply_each_step_once(tmp_path: Path) -> None:
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "slow.py").write_text(SLOW_MIGRATIONS)
    target = tmp_path / "model.pth"
    cm.save(target, toy_sd(), schema="toy", version="1.0.0")
    log = tmp_path / "applied.log"
    env = {**os.environ, "CKPTMIGRATE_TEST_LOG": str(log)}
    command = [sys.executable, "-m", "ckptmigrate", "upgrade", str(target), "--in-place"]
    command += ["--migrations", str(tmp_path / "mig")]
    procs = [
        subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    applied = log.read_text().splitlines()
    assert sorted(line.split()[0] for line in applied) == ["1.0.0->2.0.0", "2.0.0->3.0.0"]
    assert len({line.split()[1] for line in applied}) == 1  # both steps in the same process
    assert _history(target) == [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0")]
    assert sum("2 step(s)" in out for out in outs) == 1
    assert sum("already at 3.0.0" in out for out in outs) == 1
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["applied.log", "mig", "model.pth", "model.pth.1.0.0.bak"]


# ----------------------------------------------------------------------------- threads


def test_four_concurrent_in_place_upgrades_run_each_step_once(tmp_path: Path) -> None:
    applied: list[str] = []
    schema = _slow_schema(applied)
    target = tmp_path / "model.pth"
    cm.save(target, toy_sd(), schema="toy", version="1.0.0")
    outcomes: list[object] = []
    start = threading.Barrier(4)

    def run() -> None:
        start.wait()
        outcomes.append(upgrade_in_place(target, schema, lock_timeout=30))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(applied) == ["1.0.0->2.0.0", "2.0.0->3.0.0"]
    assert sorted(len(o.plan) for o in outcomes) == [0, 0, 0, 2]  # type: ignore[attr-defined]
    assert _history(target) == [("1.0.0", "2.0.0"), ("2.0.0", "3.0.0")]
    assert not lock_path_for(target).exists()


def test_concurrent_stamps_stamp_once_and_the_others_get_a_clear_error(tmp_path: Path) -> None:
    import torch

    target = tmp_path / "raw.pth"
    torch.save(toy_sd(), target)
    results: list[object] = []
    start = threading.Barrier(3)

    def run() -> None:
        start.wait()
        try:
            results.append(stamp_in_place(target, "toy", "1.0.0", lock_timeout=30))
        except AlreadyStampedError as exc:
            results.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    errors = [r for r in results if isinstance(r, AlreadyStampedError)]
    assert len(results) == 3 and len(errors) == 2
    assert all("already stamped as toy 1.0.0" in str(e) for e in errors)
    assert str(cm.load(target, upgrade=False).version) == "1.0.0"


# ----------------------------------------------------------------------------- the lock


def test_the_lock_file_names_its_holder_and_goes_away_on_release(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    with file_lock(target) as lock:
        holder = read_lock_holder(lock.lock_path)
        assert holder is not None
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        assert lock.lock_path == tmp_path / "model.pth.ckptmigrate.lock"
    assert list(tmp_path.iterdir()) == []


def test_the_lock_is_released_when_the_body_raises(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    with pytest.raises(RuntimeError), file_lock(target):
        raise RuntimeError("boom")
    with file_lock(target, timeout=0):
        pass


@pytest.mark.parametrize("mode", ["flock", "exclusive"])
def test_a_waiter_gives_up_after_its_timeout_naming_the_holder(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "model.pth"
    with file_lock(target, mode=mode):
        started = time.monotonic()
        with pytest.raises(LockTimeoutError) as info:
            FileLock(target, timeout=0.3, mode=mode).acquire()
        assert time.monotonic() - started >= 0.3
    assert f"'pid': {os.getpid()}" in str(info.value) and info.value.holder["pid"] == os.getpid()
    assert "if no such process is running, remove" in str(info.value)


@pytest.mark.parametrize(
    "held, wanted", [("folder", "index"), ("index", "folder"), ("link", "index")]
)
def test_a_set_named_by_its_folder_by_its_index_or_through_a_link_takes_one_lock(
    tmp_path: Path, held: str, wanted: str
) -> None:
    # two names took two lock files: two in-place upgrades of one set ran at once, and one
    # failed on a shard the other had deleted
    folder = tmp_path / "llama"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {}}')
    (tmp_path / "link").symlink_to(folder)
    names = {
        "folder": folder,
        "index": folder / "model.safetensors.index.json",
        "link": tmp_path / "link",
    }
    assert (
        lock_path_for(names[held])
        == lock_path_for(names[wanted])
        == tmp_path / ("llama" + ".ckptmigrate.lock")
    )
    with file_lock(names[held]):
        with pytest.raises(LockTimeoutError):
            FileLock(names[wanted], timeout=0.2).acquire()


@pytest.mark.parametrize("mode", ["flock", "exclusive"])
def test_a_lock_file_left_by_a_dead_process_is_taken_over(tmp_path: Path, mode: str) -> None:
    target = tmp_path / "model.pth"
    record = {"pid": dead_pid(), "host": socket.gethostname(), "time": "2020-01-01T00:00:00"}
    lock_path_for(target).write_text(json.dumps(record))
    with file_lock(target, timeout=2, mode=mode) as lock:
        assert read_lock_holder(lock.lock_path)["pid"] == os.getpid()  # type: ignore[index]
    assert not lock_path_for(target).exists()


@pytest.mark.parametrize("writer", ["another start", "another boot"])
def test_an_exclusive_lock_of_another_process_with_our_pid_is_taken_over(
    tmp_path: Path, writer: str
) -> None:
    target = tmp_path / "model.pth"
    record = {**our_pid_but(NOT_US[writer]).record(), "time": "2020-01-01T00:00:00"}
    lock_path_for(target).write_text(json.dumps(record))
    with file_lock(target, timeout=2, mode="exclusive") as lock:
        holder = read_lock_holder(lock.lock_path) or {}
        assert {k: holder[k] for k in record if k != "time"} == atomic.this_writer().record()


def test_an_exclusive_lock_of_a_live_process_is_waited_for(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    with live_child() as pid:
        record = {**atomic.WriterIdentity.of(pid).record(), "time": "2020-01-01T00:00:00"}
        lock_path_for(target).write_text(json.dumps(record))
        with pytest.raises(LockTimeoutError):
            FileLock(target, timeout=0.2, mode="exclusive").acquire()
    with file_lock(target, timeout=2, mode="exclusive"):  # it died: taken over
        pass


def test_an_exclusive_lock_not_refreshed_for_too_long_is_stale(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    record = {"pid": 1, "host": "another-host", "time": "2020-01-01T00:00:00"}
    lock_path_for(target).write_text(json.dumps(record))
    with pytest.raises(LockTimeoutError):  # another host's live-looking lock: wait
        FileLock(target, timeout=0.2, mode="exclusive").acquire()
    old = time.time() - 3600
    os.utime(lock_path_for(target), (old, old))
    with file_lock(target, timeout=2, mode="exclusive", stale_after=600):
        pass


def test_an_exclusive_lock_holder_refreshes_its_file(tmp_path: Path) -> None:
    target = tmp_path / "model.pth"
    with file_lock(target, mode="exclusive", stale_after=0.4) as lock:
        old = time.time() - 3600
        os.utime(lock.lock_path, (old, old))
        time.sleep(0.3)
        assert time.time() - lock.lock_path.stat().st_mtime < 5
        assert not FileLock(target, mode="exclusive", stale_after=0.4).is_stale()


def test_an_upgrade_waits_for_the_lock_then_fails_clearly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "model.pth"
    cm.save(target, toy_sd(), schema="toy", version="1.0.0")
    before = target.read_bytes()
    with file_lock(target):
        with pytest.raises(LockTimeoutError, match="is being rewritten by another process"):
            upgrade_in_place(target, _slow_schema([]), lock_timeout=0.2)
        with pytest.raises(LockTimeoutError):
            stamp_in_place(target, "toy", "1.0.0", lock_timeout=0.2)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pth"]


def test_the_cli_reports_a_held_lock_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    target = tmp_path / "raw.pth"
    torch.save(toy_sd(), target)
    with file_lock(target):
        args = ["stamp", str(target), "--schema", "toy", "--version", "1.0.0", "--in-place"]
        code = _main_with_timeout(args, monkeypatch)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "being rewritten by another process" in err[0], err


def _main_with_timeout(args: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    import ckptmigrate.engine.inplace as inplace

    real = inplace.file_lock
    monkeypatch.setattr(inplace, "file_lock", lambda path, **kw: real(path, timeout=0.2))
    return cli.main(args)


@pytest.mark.parametrize("mode", ["auto", "exclusive"])
def test_a_fifo_planted_at_the_lock_name_is_refused_or_broken_never_waited_on(tmp_path, mode):
    """Neither opening nor reading the lock may block on a FIFO. flock refuses it with a typed
    error (it is no lock of ours); the exclusive mode reads no holder from it and, the FIFO
    being no live writer's, breaks it as stale or times out."""
    from hostile import no_hang

    target = tmp_path / "model.pth"
    target.write_bytes(b"x")
    os.mkfifo(lock_path_for(target))
    with no_hang(20):
        assert read_lock_holder(lock_path_for(target)) is None
        if mode == "auto":
            with pytest.raises(cm.errors.LockError, match="not a regular file"):
                with file_lock(target, timeout=0.5, mode=mode):
                    pass
        else:
            try:
                with file_lock(target, timeout=0.5, mode=mode):
                    pass
            except LockTimeoutError:
                pass
