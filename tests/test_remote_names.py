"""Object-store upgrades at the edges of a name: an output that names a folder (a trailing
'/'), a key holding '#' (found in review). moto's S3 server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ckptmigrate as cm

MIGRATIONS = """
import ckptmigrate as cm

schema = cm.Schema("net", current="2.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])
"""
BUCKET = "review2"


@pytest.fixture(scope="module")
def s3():
    pytest.importorskip("moto.server", reason="the remote tests need moto[server]")
    pytest.importorskip("s3fs", reason="the remote tests need s3fs")
    from object_stores import s3_server

    with s3_server() as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture()
def project(tmp_path: Path) -> Path:
    (tmp_path / "migrations").mkdir()
    (tmp_path / "migrations" / "net.py").write_text(MIGRATIONS)
    cm.save(tmp_path / "a.pth", {"blocks.0.b": torch.ones(3)}, schema="net", version="1.0.0")
    return tmp_path


def _keys(s3) -> list[str]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET).get("Contents", [])
    return sorted(o["Key"] for o in listed)


def test_an_output_prefix_ending_in_a_slash_is_not_written_as_an_object(s3, project):
    # WRONG: `upgrade SRC -o s3://bucket/dir/` (dir/ already holds objects: a "folder")
    # succeeds and writes the checkpoint as an object named `dir` (location() strips the
    # slash), next to the prefix `dir/`: s3://bucket/dir now names both a file and a folder.
    # Locally the same command is refused ("... is a folder: pass a file name to write to").
    # RIGHT: refused with one error line (or written as dir/a.pth), and no object `dir`.
    from processes import run

    src = s3.upload(project / "a.pth", f"{BUCKET}/slash/src/a.pth")
    s3.upload(project / "a.pth", f"{BUCKET}/slash/dir/other.pth")
    dst = f"s3://{BUCKET}/slash/dir/"
    migrations = ("--migrations", str(project / "migrations"))
    proc = run(project, "upgrade", src, "-o", dst, *migrations, **s3.env)
    assert "slash/dir" not in _keys(s3), (proc.returncode, proc.stdout)
    assert proc.returncode == 2 and "names a folder" in proc.stderr, proc.stderr
    local_dir = project / "dir"
    local_dir.mkdir()
    local = run(project, "upgrade", str(project / "a.pth"), "-o", f"{local_dir}/", *migrations)
    assert local.returncode != 0 and "is a folder" in local.stderr  # what local does


def test_the_result_names_the_object_written_when_its_key_holds_a_hash(s3, project):
    # WRONG: an S3 key may hold '#' (and '?'); the upload goes to the right key
    # (other/x#1.pth) but result.written is "s3://review2/hash/out/x": RemotePath's str
    # goes through path_text, which strips a URL's fragment and query as if they were
    # secrets. The name reported (and printed by the CLI as "wrote ...") is a different
    # object, which here exists and holds another checkpoint: cm.load(result.written) reads
    # the wrong one. RIGHT: result.written is the key written, s3://review2/hash/out/x#1.pth.
    from ckptmigrate.engine.rewrite import upgrade_file

    schema_ns: dict = {}
    exec(MIGRATIONS, schema_ns)
    schema = schema_ns["schema"]
    cm.save(project / "other.pth", {"blocks.0.b": torch.zeros(3)}, schema="net", version="2.0.0")
    s3.upload(project / "other.pth", f"{BUCKET}/hash/out/x")  # another object, named x
    src = s3.upload(project / "a.pth", f"{BUCKET}/hash/src/a.pth")
    dst = f"s3://{BUCKET}/hash/out/x#1.pth"
    result = upgrade_file(src, dst, schema)
    assert "hash/out/x#1.pth" in _keys(s3)  # passes: written under the right key
    assert result.written == dst, result.written  # fails: "s3://review2/hash/out/x"
