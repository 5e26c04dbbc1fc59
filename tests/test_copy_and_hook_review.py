"""Cases an adversarial review found in the import hook that attaches the CLI's log handler
(base/on_import.py) and in the byte copy (formats/byte_copy.py, formats/sink.py); each
comment says what the code did then ("Wrong") and what is right."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from processes import run

import ckptmigrate as cm

# -- diffspeed: base/on_import.py ---------------------------------------------------------------

FIND_SPEC_FIRST = textwrap.dedent("""
    import importlib.util, sys
    from ckptmigrate.base.on_import import when_imported

    assert "logging" not in sys.modules
    seen = []
    with when_imported("logging", seen.append):
        importlib.util.find_spec("logging")  # asks where it is: imports nothing
        import logging  # the first import inside the block
    print(len(seen))
    """)


def test_a_find_spec_before_the_first_import_does_not_cancel_the_hook() -> None:
    # Wrong: _FirstImport.find_spec removes the finder the first time anyone *looks for* the
    # module, so importlib.util.find_spec("logging") (a probe for an optional module, common in
    # libraries) consumes the hook and the real `import logging` that follows never calls
    # `then`. Right: the hook is spent by the import that runs the module (when_imported's
    # docstring: "right after its first import inside the block").
    out = subprocess.run([sys.executable, "-c", FIND_SPEC_FIRST], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


FLAKY = """
import os
mark = os.path.join(os.path.dirname(__file__), "imported_once")
if not os.path.exists(mark):
    open(mark, "w").close()
    raise ImportError("the first import fails")
"""

FAILED_FIRST = textwrap.dedent("""
    import sys
    from ckptmigrate.base.on_import import when_imported

    seen = []
    with when_imported("review4_flaky", seen.append):
        try:
            import review4_flaky
        except ImportError:
            pass
        import review4_flaky  # succeeds this time, inside the block
    print(len(seen))
    """)


def test_a_failed_first_import_does_not_cancel_the_hook(tmp_path: Path) -> None:
    # Wrong: an import whose module raises (a Ctrl-C or an error while `logging` runs, or any
    # module given to when_imported) has already removed the finder in find_spec, so the
    # import that then succeeds inside the block is never reported. Right: `then` runs after
    # the first import that succeeds inside the block.
    (tmp_path / "review4_flaky.py").write_text(FLAKY)
    out = subprocess.run(
        [sys.executable, "-c", FAILED_FIRST],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": f"{tmp_path}:{Path.cwd()}"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "1"


PROBES_THEN_LOGS = """
import importlib.util
import sys
FIRST = "logging" not in sys.modules
importlib.util.find_spec("logging")  # a library checking what is installed
import logging
logging.getLogger("mine").warning("probed  then logged: %s", FIRST)
"""


def test_a_migration_that_probes_for_logging_still_gets_one_line_warnings(files: Path) -> None:
    # The CLI-level effect of the first test: a migration module that probes for logging
    # before importing it logs through logging's last-resort handler (the raw message, double
    # space and all), not as the CLI's `ckptmigrate: warning:` line. Right: one line, as
    # test_cli_display's test_a_log_record_from_code_that_imports_logging_mid_command_is_one_line.
    (files / "probemig").mkdir()
    (files / "probemig" / "logs.py").write_text(PROBES_THEN_LOGS)
    proc = run(files, "history", "--migrations", "probemig")
    assert proc.returncode == 0, proc.stderr
    assert "ckptmigrate: warning: probed then logged: True" in proc.stderr.splitlines()


# -- safespeed: sources that change under the copy ---------------------------------------------


def test_a_local_source_rewritten_during_the_copy_is_refused_not_written_with_bad_crcs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wrong: CopySource.check_unchanged checks only objects (ETag); a local source rewritten
    # in place while its records are copied (direct or kernel copy alike) gives a .pth whose
    # copied record holds the new bytes under the old CRC: upgrade_file succeeds, the result
    # fails zipfile's testzip (torch.load then raises). Right: a local source's identity and
    # mtime/ctime/size taken when opened and checked again before the rename (as the ETag is
    # for objects); a change is a clear error and nothing replaces dst.
    from ckptmigrate.formats import sink

    src, dst = tmp_path / "old.pth", tmp_path / "new.pth"
    torch.save({f"l.{i}.weight": torch.randn(512, 1024) for i in range(3)}, src)
    schema = cm.Schema("net", current="2.0.0")

    @schema.migration("1.0.0", "2.0.0")
    def rename(ckpt: cm.Checkpoint) -> None:
        ckpt.state_dict = {"m." + k: v for k, v in ckpt.state_dict.items()}

    real = sink.copy_range
    meddled: list[int] = []

    def copy_range(src_fd: int, src_offset: int, *rest: Any) -> int:
        if not meddled:  # another process writes into the source as the first copy starts
            fd = os.open(src, os.O_WRONLY)
            try:
                os.pwrite(fd, b"\xff" * 4096, src_offset)
            finally:
                os.close(fd)
            meddled.append(src_offset)
        return real(src_fd, src_offset, *rest)

    monkeypatch.setattr(sink, "copy_range", copy_range)
    try:
        cm.upgrade_file(src, dst, schema, from_version="1.0.0")
    except cm.errors.CkptMigrateError:
        pass
    assert meddled
    if dst.exists():
        with zipfile.ZipFile(dst) as z:
            assert z.testzip() is None, "written with a copied record whose CRC is wrong"


# -- sinkclean: RemotePath as a FrozenRecord ---------------------------------------------------


def test_a_copy_shorter_than_its_head_copies_only_its_own_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Wrong (latent: unreachable while DIRECT_LEAST >= BLOCK, but DIRECT_LEAST is public and
    # nothing says so): copy_range's direct split takes head = -dst_offset % BLOCK without
    # capping it at count, so a range shorter than the way to the next block edge copies the
    # whole head (4000 bytes for a 100-byte record: the next record's bytes too, or "source
    # ends early" at the end of a file), and whole goes negative. Right: head = min(head,
    # count); exactly count bytes land.
    from ckptmigrate.formats import byte_copy
    from ckptmigrate.formats.atomic import Writeback, atomic_fd

    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        kind = byte_copy.file_system_type(fd)
    finally:
        os.close(fd)
    if kind is None or not hasattr(os, "O_DIRECT"):
        pytest.skip("no statfs or O_DIRECT here")
    monkeypatch.setattr(byte_copy, "PAGE_COPYING_FILE_SYSTEMS", frozenset({kind}))
    monkeypatch.setattr(byte_copy, "DIRECT_LEAST", 0)
    src, dst = tmp_path / "src.bin", tmp_path / "dst.bin"
    data = os.urandom(3 * byte_copy.BLOCK)
    src.write_bytes(data)
    with open(src, "rb") as f, atomic_fd(dst) as out:
        os.pwrite(out, b"h" * 96, 0)
        byte_copy.copy_range(f.fileno(), 96, out, 96, 100, Writeback(out))
        os.pwrite(out, b"end", 196)
    assert dst.read_bytes() == b"h" * 96 + data[96:196] + b"end"
