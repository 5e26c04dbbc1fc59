"""Upgrades to and from object storage (issue 17 item 2): ``upgrade s3://a -o s3://b``, local
to S3 and S3 to local stream through a multipart upload; unchanged records on the same store
are copied by the server (``UploadPartCopy``), the result appears only once complete, and an
error or a kill leaves the old object and no new one.

Every test talks to moto's S3 server on 127.0.0.1 (``object_stores``), which counts the
requests it answers, the bytes it sends and receives, and each server-side copy's source.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "moto.server", reason="the remote tests need moto[server] (pip install -e .[dev])"
)
pytest.importorskip("s3fs", reason="the remote tests need s3fs (pip install -e .[dev])")

from object_stores import ACCESS_KEY, SECRET_KEY, s3_server  # noqa: E402
from processes import one_error_line, run  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import ckptmigrate as cm  # noqa: E402
from ckptmigrate.engine.inplace import upgrade_in_place  # noqa: E402
from ckptmigrate.engine.rewrite import upgrade_file  # noqa: E402
from ckptmigrate.errors import CheckpointWriteError, RemoteWriteError  # noqa: E402
from ckptmigrate.formats import atomic, sink  # noqa: E402

BUCKET = "upgrades"
MiB = 1 << 20
#: Two big tensors of 6 MiB each: each alone is too short for a part of S3's least size (5
#: MiB) topped up from its head and a server-side copy of the rest, so only when the two
#: records (back to back in the source) are copied as one run does the server copy any.
BIG = 3 * MiB // 2  # float32 elements

MIGRATIONS = """
import torch
import ckptmigrate as cm

schema = cm.Schema("net", current="3.0.0")
schema.add_migration("1.0.0", "2.0.0", [cm.ops.RenamePrefix("blocks.", "layers.")])


@schema.migration("2.0.0", "3.0.0")
def scale_bias(ckpt):
    ckpt.state_dict["layers.0.bias"] = ckpt.state_dict["layers.0.bias"] * 2
"""


def _schema() -> cm.Schema:
    namespace: dict = {}
    exec(MIGRATIONS, namespace)  # the same steps the CLI runs discover
    return namespace["schema"]


def _weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "blocks.0.weight": torch.randn(BIG, generator=gen),
        "blocks.1.weight": torch.randn(BIG, generator=gen),
        "blocks.0.bias": torch.randn(8, generator=gen),
        "head.weight": torch.randn(4, 8, generator=gen).half(),
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("rupgrade")
    cm.save(root / "a.pth", _weights(), schema="net", version="1.0.0", hparams={"width": 8})
    cm.save(root / "small.pth", {"blocks.0.bias": torch.ones(8)}, schema="net", version="1.0.0")
    cm.save(root / "a.safetensors", _weights(), schema="net", version="1.0.0")
    (root / "migrations").mkdir()
    (root / "migrations" / "net.py").write_text(MIGRATIONS)
    return root


@pytest.fixture(scope="module")
def s3(files: Path):
    with s3_server() as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture
def src(s3, files: Path, request: pytest.FixtureRequest) -> str:
    """A fresh copy of ``a.pth`` in the bucket, under a name of this test's own."""
    name = request.node.name.replace("[", "-").replace("]", "")
    s3.reset()  # no fault an earlier test left
    url = s3.upload(files / "a.pth", f"{BUCKET}/{name}/a.pth")
    s3.reset()
    return url


@pytest.fixture
def small_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of S3's least size, so ~12 MiB files take several."""
    monkeypatch.setattr(sink, "PART_BYTES", sink.MIN_PART_BYTES)


def _key(url: str) -> str:
    return url.removeprefix(f"s3://{BUCKET}/")


def _get(s3, url: str, to: Path) -> Path:
    s3.client().download_file(BUCKET, _key(url), str(to))
    return to


def _exists(s3, url: str) -> bool:
    found = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=_key(url))
    return any(o["Key"] == _key(url) for o in found.get("Contents", []))


def _pending_uploads(s3) -> list[dict]:
    return s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def _expected(files: Path, to: str = "3.0.0") -> cm.Checkpoint:
    return cm.load(files / "a.pth", schema=_schema(), to=to)


def _assert_upgraded(path: Path, files: Path, to: str = "3.0.0") -> None:
    """``path`` loads with plain torch.load and with cm.load, its tensors the upgraded ones."""
    want = _expected(files, to)
    raw = torch.load(path, weights_only=True)
    assert set(raw["state_dict"]) == set(want.state_dict)
    for key, value in want.state_dict.items():
        assert torch.equal(raw["state_dict"][key], value), key
    got = cm.load(path, schema=_schema(), upgrade=False)
    assert str(got.version) == to and got.hparams == want.hparams


def _copies(s3, src_url: str) -> list:
    """The server-side copies (UploadPartCopy, CopyObject) read from ``src_url``'s object."""
    return [r for r in s3.requests if r.copy_source and _key(src_url) in r.copy_source]


def _gets(s3, url: str) -> list:
    return [r for r in s3.requests if r.method == "GET" and r.path == f"/{BUCKET}/{_key(url)}"]


# -- s3 -> s3, local -> s3, s3 -> local -----------------------------------------------------


def test_a_rename_in_one_bucket_copies_the_big_record_on_the_server(s3, src, files, small_parts):
    dst = src.replace("/a.pth", "/b.pth")
    result = upgrade_file(src, dst, _schema(), to="2.0.0")
    assert result.written == dst and result.streamed
    copies = _copies(s3, src)
    assert copies and all(r.copy_range for r in copies), s3.requests
    copied = sum(r.received for r in s3.requests if r.method == "PUT" and not r.copy_source)
    fetched = sum(r.sent for r in _gets(s3, src))
    size = (files / "a.pth").stat().st_size
    # the server copied what no part of S3's least size had to carry: 12 MiB less one part
    assert fetched < sink.MIN_PART_BYTES + 256 * 1024, fetched
    assert copied < sink.MIN_PART_BYTES + 256 * 1024, copied
    assert result.bytes_copied > 8 * BIG - 16, result
    assert (
        sum(
            int(r.copy_range.split("-")[1]) - int(r.copy_range.split("=")[1].split("-")[0]) + 1
            for r in copies
        )
        >= 8 * BIG - sink.MIN_PART_BYTES
    )
    print(
        f"s3->s3 rename of {size} bytes: {len(s3.requests)} requests, {fetched} bytes GET, "
        f"{copied} bytes uploaded, {len(copies)} part copies"
    )
    _assert_upgraded(_get(s3, dst, files.parent / "b-rename.pth"), files, "2.0.0")
    assert not _pending_uploads(s3)


def test_a_tensor_run_in_one_bucket_copies_its_unchanged_record_on_the_server(
    s3, src, files, small_parts
):
    dst = src.replace("/a.pth", "/b.pth")
    result = upgrade_file(src, dst, _schema())  # the function step needs the tensors
    assert not result.streamed
    assert _copies(s3, src), s3.requests  # the unchanged 12 MiB record: server-side
    uploaded = sum(r.received for r in s3.requests if r.method == "PUT" and not r.copy_source)
    assert uploaded < sink.MIN_PART_BYTES + 256 * 1024, uploaded
    _assert_upgraded(_get(s3, dst, files.parent / "b-tensors.pth"), files)
    cm_loaded = cm.load(dst, schema=_schema())
    assert torch.equal(cm_loaded.state_dict["layers.0.weight"], _weights()["blocks.0.weight"])


def test_local_to_s3_uploads_parts_and_never_reads_the_target(s3, files, small_parts):
    dst = f"s3://{BUCKET}/from-local/b.pth"
    s3.reset()
    upgrade_file(files / "a.pth", dst, _schema(), to="2.0.0")
    parts = [r for r in s3.requests if r.method == "PUT" and "partNumber" in r.query]
    assert len(parts) >= 3 and all(r.received <= sink.MIN_PART_BYTES for r in parts)
    assert not [r for r in s3.requests if r.method == "GET"]
    size = s3.client().head_object(Bucket=BUCKET, Key=_key(dst))["ContentLength"]
    assert sum(r.received for r in parts) == size  # every byte went up once, in parts
    _assert_upgraded(_get(s3, dst, files.parent / "b-local.pth"), files, "2.0.0")


def test_the_cli_upgrades_s3_to_local_by_ranged_reads(s3, src, files, tmp_path):
    out = tmp_path / "b.pth"
    migrations = ("--migrations", str(files / "migrations"))
    proc = run(files, "upgrade", src, "-o", str(out), "--to", "2.0.0", *migrations)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout
    gets = _gets(s3, src)
    size = (files / "a.pth").stat().st_size
    assert gets and all(r.range for r in gets), gets
    # each byte once, and the metadata: a block at each end and at each local header read
    assert sum(r.sent for r in gets) <= size + 4 * (64 << 10)
    _assert_upgraded(out, files, "2.0.0")


def test_a_tensor_run_from_s3_reads_one_private_copy(s3, src, files, tmp_path):
    out = tmp_path / "b.pth"
    proc = run(files, "upgrade", src, "-o", str(out), "--migrations", str(files / "migrations"))
    assert proc.returncode == 0, proc.stderr
    size = (files / "a.pth").stat().st_size
    # the metadata, then one streamed GET to a private file the run maps; records copied
    # from that copy, not fetched again
    assert sum(r.sent for r in _gets(s3, src)) <= size + 4 * (64 << 10)
    _assert_upgraded(out, files)


def test_the_cli_upgrades_local_to_s3_and_s3_to_s3(s3, src, files):
    dst = f"s3://{BUCKET}/cli/b.pth"
    migrations = ("--migrations", str(files / "migrations"))
    proc = run(files, "upgrade", str(files / "a.pth"), "-o", dst, *migrations)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {dst}" in proc.stdout
    _assert_upgraded(_get(s3, dst, files.parent / "b-cli.pth"), files)
    proc = run(
        files, "upgrade", src, "-o", f"s3://{BUCKET}/cli/c.pth", "--to", "2.0.0", *migrations
    )
    assert proc.returncode == 0, proc.stderr
    _assert_upgraded(
        _get(s3, f"s3://{BUCKET}/cli/c.pth", files.parent / "c-cli.pth"), files, "2.0.0"
    )
    assert _copies(s3, src)


def test_a_result_smaller_than_a_part_is_one_put(s3, files):
    dst = f"s3://{BUCKET}/small/b.pth"
    s3.reset()
    upgrade_file(files / "small.pth", dst, _schema(), to="2.0.0")
    writes = [r for r in s3.requests if r.method in ("PUT", "POST")]
    assert len(writes) == 1 and not writes[0].query, writes  # no multipart upload at all
    assert (
        cm.load(dst, schema=_schema(), upgrade=False).version
        == cm.Schema("x", current="2.0.0").current
    )


def test_a_safetensors_rename_in_one_bucket_copies_on_the_server(s3, files, small_parts):
    src = s3.upload(files / "a.safetensors", f"{BUCKET}/st/a.safetensors")
    dst = f"s3://{BUCKET}/st/b.safetensors"
    s3.reset()
    upgrade_file(src, dst, _schema(), to="2.0.0")
    assert _copies(s3, src)
    out = load_file(str(_get(s3, dst, files.parent / "b.safetensors")))
    assert torch.equal(out["layers.0.weight"], _weights()["blocks.0.weight"])
    assert cm.load(dst, schema=_schema(), upgrade=False).version.public == "2.0.0"


def test_a_torch_file_upgraded_into_safetensors_copies_its_tensors_on_the_server(
    s3, files, tmp_path, small_parts
):
    # one 12 MiB tensor: a part topped up from its head, and the rest copied by the server
    weights = {"blocks.0.weight": torch.arange(3 * MiB, dtype=torch.float32)}
    cm.save(tmp_path / "big.pth", weights, schema="net", version="1.0.0")
    src = s3.upload(tmp_path / "big.pth", f"{BUCKET}/convert/big.pth")
    dst = f"s3://{BUCKET}/convert/big.safetensors"
    s3.reset()
    upgrade_file(src, dst, _schema(), to="2.0.0")
    assert _copies(s3, src)  # the tensor's bytes, from the .pth object into the new one
    out = load_file(str(_get(s3, dst, tmp_path / "converted.safetensors")))
    assert list(out) == ["layers.0.weight"]
    assert torch.equal(out["layers.0.weight"], weights["blocks.0.weight"])


def test_a_legacy_torch_file_goes_to_s3_and_back(s3, files, tmp_path):
    weights = _weights()
    torch.save(weights, tmp_path / "legacy.pth", _use_new_zipfile_serialization=False)
    dst = f"s3://{BUCKET}/legacy/new.pth"
    upgrade_file(tmp_path / "legacy.pth", dst, _schema(), from_version="1.0.0", to="2.0.0")
    back = tmp_path / "back.pth"
    upgrade_file(dst, back, _schema())  # an object read back, upgraded on to 3.0.0
    got = cm.load(back, schema=_schema(), upgrade=False)
    assert str(got.version) == "3.0.0"
    assert torch.equal(got.state_dict["layers.1.weight"], weights["blocks.1.weight"])
    assert torch.equal(got.state_dict["layers.0.bias"], weights["blocks.0.bias"] * 2)
    legacy = s3.upload(tmp_path / "legacy.pth", f"{BUCKET}/legacy/old.pth")  # read from S3
    upgrade_file(legacy, tmp_path / "from-legacy.pth", _schema(), from_version="1.0.0")
    got = cm.load(tmp_path / "from-legacy.pth", schema=_schema(), upgrade=False)
    assert str(got.version) == "3.0.0" and set(got.state_dict) == set(_expected(files).state_dict)


# -- atomicity --------------------------------------------------------------------------------


def test_a_reader_sees_no_object_while_the_upload_runs(s3, src, files, small_parts, monkeypatch):
    dst = src.replace("/a.pth", "/b.pth")
    seen: list[tuple[str, bool, int]] = []

    def look(event: str) -> None:  # after each part stored, before the completion
        if event in sink.REMOTE_CRASH_EVENTS:
            seen.append((event, _exists(s3, dst), len(_pending_uploads(s3))))

    monkeypatch.setattr(atomic, "crash_point", look)
    upgrade_file(src, dst, _schema(), to="2.0.0")
    assert [e for e, _, _ in seen].count("part") >= 2, seen
    assert all(not present for _, present, _ in seen), seen
    assert seen[0][2] == 1  # the upload was pending, invisible under the name
    assert _exists(s3, dst) and not _pending_uploads(s3)


def test_a_failing_part_aborts_the_upload_and_leaves_no_object(s3, src, files, small_parts):
    dst = src.replace("/a.pth", "/b.pth")
    s3.faults["partNumber=2"] = "error"
    with pytest.raises(RemoteWriteError) as caught:
        upgrade_file(src, dst, _schema(), to="2.0.0")
    assert dst in str(caught.value) and "cannot write it to its store" in str(caught.value)
    assert not _exists(s3, dst)
    assert not _pending_uploads(s3)
    assert any(r.method == "DELETE" and "uploadId" in r.query for r in s3.requests)


def test_ctrl_c_mid_upload_aborts_it(s3, src, files, small_parts, monkeypatch):
    dst = src.replace("/a.pth", "/b.pth")

    def interrupt(event: str) -> None:
        if event == "part":
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "crash_point", interrupt)
    with pytest.raises(KeyboardInterrupt):
        upgrade_file(src, dst, _schema(), to="2.0.0")
    assert not _exists(s3, dst) and not _pending_uploads(s3)


def test_a_source_replaced_during_the_upload_is_refused_not_mixed_in(
    s3, src, files, small_parts, monkeypatch
):
    """The server copies a range only of the object that was read (its ETag)."""
    dst = src.replace("/a.pth", "/b.pth")
    other = files.parent / "other.pth"
    cm.save(other, {"blocks.0.weight": torch.zeros(BIG)}, schema="net", version="1.0.0")

    def replace_source(event: str) -> None:
        if event == "part" and not replace_source.done:
            replace_source.done = True
            s3.client().upload_file(str(other), BUCKET, _key(src))

    replace_source.done = False
    monkeypatch.setattr(atomic, "crash_point", replace_source)
    with pytest.raises(RemoteWriteError):
        upgrade_file(src, dst, _schema(), to="2.0.0")
    assert not _exists(s3, dst) and not _pending_uploads(s3)


def test_a_kill_mid_upload_leaves_the_old_object_and_no_new_one(s3, src, files, tmp_path):
    before = _get(s3, src, files.parent / "before.pth").read_bytes()
    migrations = ("--migrations", str(files / "migrations"))
    # a killed tensor run leaves its private copy behind, as any killed process its temps
    env = {"TMPDIR": str(tmp_path)}
    for spec in ("part:1", "part:2", "complete:1"):
        proc = run(
            files, "upgrade", src, "--in-place", *migrations, CKPTMIGRATE_CRASH_AT=spec, **env
        )
        assert proc.returncode == -signal.SIGKILL, (spec, proc.stderr)
        assert _get(s3, src, files.parent / "after.pth").read_bytes() == before, spec
        dst = src.replace("/a.pth", "/killed.pth")
        proc = run(files, "upgrade", src, "-o", dst, *migrations, CKPTMIGRATE_CRASH_AT=spec, **env)
        assert proc.returncode == -signal.SIGKILL, (spec, proc.stderr)
        assert not _exists(s3, dst), spec
    # a SIGKILLed upload stays pending: invisible to readers, cleared by the bucket's
    # lifecycle rule for incomplete uploads (or ListMultipartUploads + Abort)
    assert _pending_uploads(s3)
    for upload in _pending_uploads(s3):
        s3.client().abort_multipart_upload(
            Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"]
        )


# -- in place -----------------------------------------------------------------------------


def test_in_place_keeps_a_server_side_backup_then_replaces_the_object(s3, src, files):
    before = _get(s3, src, files.parent / "in-place-before.pth").read_bytes()
    result = upgrade_in_place(src, _schema())
    backup = f"{src}.1.0.0.bak"
    assert result.backup == backup and result.written == src
    copy_object = [r for r in _copies(s3, src) if not r.query]
    assert len(copy_object) == 1 and copy_object[0].received == 0  # no byte went up for it
    assert _get(s3, backup, files.parent / "bak.pth").read_bytes() == before
    _assert_upgraded(_get(s3, src, files.parent / "in-place-after.pth"), files)
    again = upgrade_in_place(src, _schema())
    assert again.plan == [] and again.written is None


def test_a_different_backup_already_there_stops_the_in_place_upgrade(s3, src, files):
    s3.client().put_object(Bucket=BUCKET, Key=_key(src) + ".1.0.0.bak", Body=b"something else")
    proc = run(files, "upgrade", src, "--in-place", "--migrations", str(files / "migrations"))
    line = one_error_line(proc)
    assert "already exists and differs" in line, line
    assert _get(s3, src, files.parent / "kept.pth").read_bytes() == (files / "a.pth").read_bytes()


def test_output_onto_the_source_object_is_refused(s3, src, files):
    proc = run(files, "upgrade", src, "-o", src, "--migrations", str(files / "migrations"))
    assert "pass --in-place instead" in one_error_line(proc)


def test_stamp_writes_an_object_in_place_and_to_another_object(s3, files, tmp_path):
    torch.save({"blocks.0.bias": torch.ones(8)}, tmp_path / "raw.pth")
    raw = s3.upload(tmp_path / "raw.pth", f"{BUCKET}/stamp/raw.pth")
    stamped = f"s3://{BUCKET}/stamp/stamped.pth"
    proc = run(files, "stamp", raw, "--schema", "net", "--version", "1.0.0", "-o", stamped)
    assert proc.returncode == 0 and f"stamped {stamped}" in proc.stdout, proc.stderr
    proc = run(files, "stamp", raw, "--schema", "net", "--version", "1.0.0", "--in-place")
    assert proc.returncode == 0, proc.stderr
    for url in (raw, stamped):
        got = cm.load(url, schema=_schema(), upgrade=False)
        assert (got.schema, str(got.version)) == ("net", "1.0.0")
        assert torch.equal(got.state_dict["blocks.0.bias"], torch.ones(8))


def test_a_missing_bucket_is_one_error_line_and_nothing_written(s3, src, files):
    dst = "s3://no-such-bucket-here/b.pth"
    proc = run(files, "upgrade", src, "-o", dst, "--migrations", str(files / "migrations"))
    line = one_error_line(proc)
    assert dst in line and "cannot write it to its store" in line, line


# -- what is not supported yet, credentials ---------------------------------------------------


def test_a_sharded_set_in_a_bucket_is_refused_with_a_clear_error(s3, files, tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    save_file({"w": torch.ones(2)}, str(folder / "model-00001-of-00001.safetensors"))
    (folder / "model.safetensors.index.json").write_text(
        '{"metadata": {}, "weight_map": {"w": "model-00001-of-00001.safetensors"}}'
    )
    url = s3.upload(folder, f"{BUCKET}/set")
    with pytest.raises(CheckpointWriteError, match="not supported yet"):
        upgrade_file(url, tmp_path / "out", _schema(), from_version="1.0.0")
    with pytest.raises(CheckpointWriteError, match="not supported yet"):  # and into a bucket
        upgrade_file(folder, f"s3://{BUCKET}/set-out", _schema(), from_version="1.0.0")
    assert not _exists(s3, f"s3://{BUCKET}/set-out")
    proc = run(
        files,
        "upgrade",
        url,
        "-o",
        str(tmp_path / "out"),
        "--from-version",
        "1.0.0",
        "--schema",
        "net",
        "--migrations",
        str(files / "migrations"),
    )
    assert "not supported yet" in one_error_line(proc)


def test_credentials_never_reach_the_output_of_an_upgrade(s3, src, files, tmp_path):
    assert os.environ["AWS_ACCESS_KEY_ID"] == ACCESS_KEY
    migrations = ("--migrations", str(files / "migrations"))
    dst = src.replace("/a.pth", "/b.pth")
    runs = [run(files, "upgrade", src, "-o", dst, "--debug", *migrations)]
    s3.faults["partNumber=2"] = "error"
    runs.append(run(files, "upgrade", src, "-o", dst.replace("b.pth", "c.pth"), *migrations))
    runs.append(
        run(files, "upgrade", src, "-o", dst.replace("b.pth", "d.pth"), "--debug", *migrations)
    )
    s3.faults.clear()  # (a read that fails: test_remote.py's credentials test)
    assert runs[0].returncode == 0, runs[0].stderr
    assert all(p.returncode != 0 for p in runs[1:]), [p.stderr[-3000:] for p in runs]
    assert "cannot write it to its store" in one_error_line(runs[1])
    for proc in runs:
        for text in (proc.stdout, proc.stderr):
            assert SECRET_KEY not in text and ACCESS_KEY not in text, text


# -- a Merge along dim 0 by bytes, into a bucket ----------------------------------------------

Q, K, V = (f"attn.{p}.weight" for p in "qkv")
MERGES = {
    # whole records: the merged record's CRC combined from the central directory's
    "merge": lambda: [cm.ops.Merge([Q, K, V], "attn.qkv.weight", sizes=[1536, 1536, 16])],
    # parts of records: their CRCs read (by range, from an object)
    "split-then-merge": lambda: [
        cm.ops.Split(Q, ["q.a", "q.b"], sizes=[1000, 536]),
        cm.ops.Merge(["q.b", K, "q.a"], "mixed", sizes=[536, 1536, 1000]),
    ],
}


def _merge_source(path: Path) -> None:
    """Two 12 MiB records (each long enough for a server-side part copy after a part's
    top-up), a short one and a bias, saved by torch or safetensors."""
    gen = torch.Generator().manual_seed(1)
    sd = {Q: torch.randn(1536, 2048, generator=gen), K: torch.randn(1536, 2048, generator=gen)}
    sd[V] = torch.randn(16, 2048, generator=gen)
    sd["head.bias"] = torch.randn(7, generator=gen)
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, path)


def _tensors_of(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    import zipfile

    assert zipfile.ZipFile(path).testzip() is None  # every CRC valid, the merged one's too
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


@pytest.mark.parametrize("plan", sorted(MERGES))
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_dim0_merge_into_a_bucket_equals_the_local_byte_merge(
    s3, tmp_path, small_parts, suffix, plan
):
    """s3 -> s3 and local -> s3: the plan runs on the metadata (no private copy), the merged
    tensor's runs are copied from the source's ranges (on the server, from an object on the
    same store) and the result holds the very tensors the local byte merge writes."""
    schema = cm.Schema("net", current="2.0.0")
    schema.add_migration("1.0.0", "2.0.0", MERGES[plan]())
    local = tmp_path / f"old{suffix}"
    _merge_source(local)
    size = local.stat().st_size
    by_bytes = tmp_path / f"local{suffix}"
    done = upgrade_file(local, by_bytes, schema, from_version="1.0.0")
    assert done.streamed and done.bytes_through_python == 0, done
    want = _tensors_of(by_bytes)
    merged = "attn.qkv.weight" if plan == "merge" else "mixed"
    original = _tensors_of(local)
    if plan == "merge":
        parts = [original[Q], original[K], original[V]]
    else:
        parts = [original[Q][1000:], original[K], original[Q][:1000]]
    assert torch.equal(want[merged], torch.cat(parts))

    src = s3.upload(local, f"{BUCKET}/merge-{plan}/old{suffix}")
    for origin in (src, local):  # s3 -> s3, then local -> s3
        dst = f"s3://{BUCKET}/merge-{plan}/from-{'s3' if origin == src else 'local'}{suffix}"
        s3.reset()
        result = upgrade_file(origin, dst, schema, from_version="1.0.0")
        assert result.streamed and result.written == dst, result
        assert not _pending_uploads(s3)
        fetched = sum(r.sent for r in _gets(s3, src))
        if origin == src:
            copies = _copies(s3, src)
            assert copies and all(r.copy_range for r in copies), s3.requests
            # no private copy: the metadata and one part's top-up; a torch zip's split
            # parts' CRCs are read too (a part of a record has no CRC of its own)
            print(f"{suffix} {plan}: {fetched} of {size} bytes GET, {len(copies)} part copies")
            reads_crcs = suffix == ".pth" and plan != "merge"
            assert fetched < (size if reads_crcs else sink.MIN_PART_BYTES + MiB // 2), fetched
        else:
            assert fetched == 0 and not _copies(s3, src)  # every byte read locally, uploaded
        got = _tensors_of(_get(s3, dst, tmp_path / f"got-{len(s3.requests)}{suffix}"))
        assert list(got) == list(want)
        for key, value in want.items():
            assert torch.equal(got[key], value), (origin, key)
        back = cm.load(dst, schema=schema, upgrade=False)
        assert str(back.version) == "2.0.0"
