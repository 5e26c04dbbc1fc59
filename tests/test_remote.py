"""Checkpoints behind fsspec URLs (issue 17 item 1): info, diff, scan, check, cm.load and the
metadata reader read ``s3://`` and ``https://`` objects, metadata by range reads.

Every test talks to a real server on 127.0.0.1, started and stopped here: moto's S3 API and a
plain HTTP server with Range support (``object_stores``). Both count the requests they answer
and the body bytes they send; the bounds below are those counts.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "moto.server", reason="the remote tests need moto[server] (pip install -e .[dev])"
)
pytest.importorskip("s3fs", reason="the remote tests need s3fs (pip install -e .[dev])")

import torch.distributed.checkpoint as dcp  # noqa: E402
from object_stores import SECRET_KEY, range_server, s3_server  # noqa: E402
from processes import one_error_line, run  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from set_files import make_set  # noqa: E402

import ckptmigrate as cm  # noqa: E402
from ckptmigrate.errors import RemoteStorageError  # noqa: E402
from ckptmigrate.io.files import read_metadata  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
BUCKET = "ckpts"
#: The issue's goal for a metadata command, per file: at most this many requests and bytes.
MAX_REQUESTS, MAX_BYTES = 6, 1 << 20
#: A tensor big enough that a whole download would show in the byte counts (4 MiB).
BIG = 1 << 20


def _weights(prefix: str = "blocks") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        f"{prefix}.0.weight": torch.randn(BIG),
        f"{prefix}.0.bias": torch.randn(8),
        "head.weight": torch.randn(4, 8).half(),
    }


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint of each kind the readers know, on the local disk."""
    root = tmp_path_factory.mktemp("remote") / "tree"
    root.mkdir()
    cm.save(root / "a.pth", _weights(), schema="net", version="1.0.0", hparams={"width": 8})
    cm.save(root / "b.pth", _weights("layers"), schema="net", version="2.0.0")
    save_file(_weights(), str(root / "model.safetensors"))
    make_set(root / "set", "safetensors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # one process, no process group
        dcp.save({"model": _weights(), "epoch": 3}, checkpoint_id=root / "dcp")
    return root


@pytest.fixture(scope="module")
def s3(tree: Path):
    with s3_server() as server:
        server.bucket(BUCKET)
        server.upload(tree, f"{BUCKET}/tree")
        yield server


@pytest.fixture(scope="module")
def web(tree: Path):
    with range_server(tree) as server:
        yield server


@pytest.fixture(autouse=True)
def fresh_counts(request: pytest.FixtureRequest) -> None:
    for name in ("s3", "web"):
        if name in request.fixturenames:
            request.getfixturevalue(name).reset()


def _url(server, name: str) -> str:
    return f"s3://{BUCKET}/tree/{name}" if hasattr(server, "bucket") else f"{server.base}/{name}"


def _json(proc) -> object:
    assert proc.returncode in (0, 1), proc.stderr
    assert "Traceback" not in proc.stderr
    return json.loads(proc.stdout)


def _object_requests(server, name: str):
    """The requests for the objects of the checkpoint ``name`` (its file, or those under it)."""
    return server.to(f"/tree/{name}" if hasattr(server, "bucket") else f"/{name}")


def _assert_ranged(server, name: str, size: int) -> None:
    """Every GET of ``name``'s objects asked for a range, and all of them sent a fraction of
    the ``size`` bytes the checkpoint holds."""
    requests = _object_requests(server, name)
    gets = [r for r in requests if r.method == "GET" and not r.query]
    assert gets and all(r.range for r in gets), gets
    sent = sum(r.sent for r in requests)
    assert sent <= MAX_BYTES and sent < size / 4, (sent, size, requests)


# -- info -----------------------------------------------------------------------------------

KINDS = {
    "torch zip": "a.pth",
    "safetensors": "model.safetensors",
    "sharded set by its index": "set/model.safetensors.index.json",
    "sharded set by its folder": "set",
    "DCP folder": "dcp",
}


def _local_size(path: Path) -> int:
    return sum(p.stat().st_size for p in [path, *path.rglob("*")] if p.is_file())


def _assert_same_info(tree: Path, server, name: str) -> None:
    """``info --json`` of ``name`` behind ``server`` is its local record, but for the path."""
    remote = _json(run(tree, "info", _url(server, name), "--json"))
    local = _json(run(tree, "info", str(tree / name), "--json"))
    assert remote.pop("path") == _url(server, name)
    local.pop("path")
    assert remote == local


@pytest.mark.parametrize("kind", KINDS)
def test_info_of_an_s3_object_is_the_local_info_read_by_range(tree, s3, kind):
    name = KINDS[kind]
    _assert_same_info(tree, s3, name)
    requests = _object_requests(s3, name)
    per_object: dict[str, int] = {}
    for r in requests:
        per_object[r.path] = per_object.get(r.path, 0) + 1
    assert max(per_object.values()) <= MAX_REQUESTS, requests
    listings = [r for r in s3.requests if r.path == f"/{BUCKET}"]
    assert len(listings) <= 4, listings  # a folder: is it one, and what it holds
    if kind in ("torch zip", "safetensors"):
        assert len(requests) <= 3, requests  # HEAD, the first block, the tail
        _assert_ranged(s3, name, _local_size(tree / name))


@pytest.mark.parametrize("kind", ["torch zip", "safetensors", "sharded set by its index"])
def test_info_over_https_is_the_local_info_read_by_range(tree, web, kind):
    name = KINDS[kind]
    _assert_same_info(tree, web, name)
    for path in {r.path for r in web.requests}:
        assert len(web.to(path)) <= MAX_REQUESTS, web.requests
    if kind != "sharded set by its index":
        _assert_ranged(web, name, (tree / name).stat().st_size)


def test_a_file_url_is_the_local_path(tree):
    remote = _json(run(tree, "info", (tree / "a.pth").as_uri(), "--json"))
    local = _json(run(tree, "info", str(tree / "a.pth"), "--json"))
    assert {**remote, "path": None} == {**local, "path": None}


def test_a_url_is_one_path_whichever_location_call_made_it():
    import copy

    from ckptmigrate.formats.remote import location

    a, b = location("s3://models/ckpt/a.pth"), location("s3://models/ckpt/a.pth")
    assert a.store is not b.store  # each call reads through a store of its own
    assert a == b and hash(a) == hash(b) and {a: 1}[b] == 1
    assert a != location("s3://models/ckpt/b.pth") and a != location("s3a://models/ckpt/a.pth")
    assert (a.parent / "a.pth") == a and copy.copy(a) == a
    assert repr(a) == "RemotePath('s3://models/ckpt/a.pth')" and str(a) == "s3://models/ckpt/a.pth"
    with pytest.raises(AttributeError):
        a.key = "models/other.pth"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del a.key
    assert a.key == "models/ckpt/a.pth"


# -- diff -----------------------------------------------------------------------------------


def _drift(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in ("a", "b")}


def test_diff_of_two_s3_objects_is_the_local_diff_in_few_requests_and_bytes(tree, s3):
    proc = run(tree, "diff", _url(s3, "a.pth"), _url(s3, "b.pth"), "--json")
    local = run(tree, "diff", str(tree / "a.pth"), str(tree / "b.pth"), "--json")
    assert proc.returncode == local.returncode == 1  # drift, as diff(1)
    assert _drift(_json(proc)) == _drift(_json(local))
    assert {r.path for r in s3.requests} == {f"/{BUCKET}/tree/a.pth", f"/{BUCKET}/tree/b.pth"}
    for name in ("a.pth", "b.pth"):
        assert len(_object_requests(s3, name)) <= MAX_REQUESTS
        _assert_ranged(s3, name, (tree / name).stat().st_size)


def test_diff_of_an_https_object_against_a_local_file(tree, web):
    proc = run(tree, "diff", _url(web, "a.pth"), str(tree / "b.pth"), "--json")
    local = run(tree, "diff", str(tree / "a.pth"), str(tree / "b.pth"), "--json")
    assert proc.returncode == local.returncode == 1
    assert _drift(_json(proc)) == _drift(_json(local))
    assert _json(proc)["a"] == _url(web, "a.pth")
    _assert_ranged(web, "a.pth", (tree / "a.pth").stat().st_size)


def test_diff_of_dcp_folders_in_s3_and_on_disk_finds_no_drift(tree, s3):
    proc = run(tree, "diff", _url(s3, "dcp"), str(tree / "dcp"))
    assert proc.returncode == 0, proc.stderr
    assert "no drift" in proc.stdout
    gets = [r for r in _object_requests(s3, "dcp") if r.method == "GET"]
    assert [r.path for r in gets] == [f"/{BUCKET}/tree/dcp/.metadata"]  # no rank file read


# -- scan -----------------------------------------------------------------------------------


def test_scan_of_a_bucket_prefix_finds_what_a_local_scan_finds(tree, s3):
    remote = _json(run(tree, "scan", f"s3://{BUCKET}/tree", "--json"))
    local = _json(run(tree, "scan", str(tree), "--json"))
    for row in remote:
        assert row.pop("path").startswith(f"s3://{BUCKET}/tree/")
    paths = [row.pop("path") for row in local]
    assert [p.split("/tree/")[1] for p in paths] == [
        "a.pth",
        "b.pth",
        "dcp",
        "model.safetensors",
        "set",
    ]
    assert remote == local
    listings = [r for r in s3.requests if r.path == f"/{BUCKET}"]
    assert len(listings) <= 3, listings  # one listing of everything under the prefix
    for name in ("a.pth", "b.pth", "model.safetensors"):
        assert len(_object_requests(s3, name)) <= 2  # the listing said its size: no HEAD
        _assert_ranged(s3, name, (tree / name).stat().st_size)


# -- check ----------------------------------------------------------------------------------


def test_check_runs_the_fixtures_in_a_bucket_as_it_runs_them_on_disk(tree, s3, tmp_path):
    local_root = REPO / "fixtures" / "tinylm"
    s3.upload(local_root, f"{BUCKET}/fixtures/tinylm")
    migrations = str(REPO / "migrations")
    url = f"s3://{BUCKET}/fixtures/tinylm"
    private = tmp_path  # a shared /tmp holds other runs' folders
    remote = _json(
        run(tree, "check", url, "--migrations", migrations, "--json", TMPDIR=str(private))
    )
    local = _json(run(tree, "check", str(local_root), "--migrations", migrations, "--json"))
    assert remote["root"] == url and remote["failed"] == local["failed"] == 0
    assert len(remote["fixtures"]) == len(local["fixtures"]) > 0
    for got, want in zip(remote["fixtures"], local["fixtures"], strict=True):
        assert got["path"] == url + "/" + Path(want["path"]).name
        assert (got["ok"], got["steps_applied"]) == (want["ok"], want["steps_applied"])
        assert got["max_abs_error"] == pytest.approx(want["max_abs_error"], abs=1e-6)
    assert not list(private.glob("ckptmigrate-remote-*"))  # its copies removed


# -- cm.load and the metadata reader --------------------------------------------------------


@pytest.mark.parametrize("where", ["s3", "web"])
@pytest.mark.parametrize("name", ["a.pth", "model.safetensors", "set", "dcp"])
def test_cm_load_of_a_url_holds_the_local_files_tensors(
    tree, where, name, request, monkeypatch, tmp_path
):
    server = request.getfixturevalue(where)
    private = tmp_path  # a shared /tmp holds other runs' folders
    monkeypatch.setattr(tempfile, "tempdir", str(private))
    if where == "web" and name in ("set", "dcp"):
        name = {"set": "set/model.safetensors.index.json", "dcp": None}[name]
        if name is None:
            pytest.skip("a DCP folder over https needs a folder listing (s3://, gs://)")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = cm.load(_url(server, name), upgrade=False)
        want = cm.load(tree / name, upgrade=False)
    assert sorted(got.state_dict) == sorted(want.state_dict)
    for key, value in want.state_dict.items():
        if isinstance(value, torch.Tensor):  # tolerance 0: the same bytes decode the same
            torch.testing.assert_close(got.state_dict[key], value, rtol=0, atol=0)
    assert (got.schema, got.version, got.hparams) == (want.schema, want.version, want.hparams)
    assert not list(private.glob("ckptmigrate-remote-*"))  # its copies removed


@pytest.mark.parametrize("name", ["a.pth", "model.safetensors", "set", "dcp"])
def test_the_metadata_reader_reads_a_url_by_range(tree, s3, name):
    got = read_metadata(_url(s3, name))
    want = read_metadata(tree / name)
    shapes = {k: (tuple(v.shape), str(v.dtype)) for k, v in want.state_dict.items()}
    assert {k: (tuple(v.shape), str(v.dtype)) for k, v in got.state_dict.items()} == shapes
    assert sum(r.sent for r in _object_requests(s3, name)) <= MAX_BYTES


# -- a store that fails -------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["error", "slow", "short", "huge", "no-range"])
def test_an_https_server_that_fails_is_one_error_line(tree, web, fault):
    web.faults["a.pth"] = fault
    start = time.monotonic()
    proc = run(tree, "info", _url(web, "a.pth"), CKPTMIGRATE_REMOTE_TIMEOUT="1", timeout=60)
    line = one_error_line(proc)
    assert _url(web, "a.pth") in line
    assert "cannot read it from its store" in line, line
    assert time.monotonic() - start < 30  # a stalled server does not stall the command
    with pytest.raises(RemoteStorageError):
        os.environ["CKPTMIGRATE_REMOTE_TIMEOUT"] = "1"
        try:
            read_metadata(_url(web, "a.pth"))
        finally:
            del os.environ["CKPTMIGRATE_REMOTE_TIMEOUT"]


@pytest.mark.parametrize("fault", ["error", "slow"])
def test_an_s3_server_that_fails_is_one_error_line(tree, s3, fault):
    s3.faults["a.pth"] = fault
    start = time.monotonic()
    proc = run(
        tree,
        "diff",
        _url(s3, "a.pth"),
        _url(s3, "b.pth"),
        CKPTMIGRATE_REMOTE_TIMEOUT="1",
        timeout=120,
    )
    line = one_error_line(proc)
    assert "cannot read it from its store" in line and _url(s3, "a.pth") in line, line
    assert time.monotonic() - start < 60


def test_a_missing_object_and_a_missing_bucket_say_so(tree, s3):
    for url in (_url(s3, "nothing.pth"), "s3://no-such-bucket/model.pth"):
        line = one_error_line(run(tree, "info", url))
        assert line == f"ckptmigrate: error: {url}: no such object"


def test_credentials_never_reach_the_output(tree, s3, web):
    assert os.environ["AWS_SECRET_ACCESS_KEY"] == SECRET_KEY  # the marker the s3 server set
    marker = "MARKER-secret-0xC0FFEE"
    s3.faults["a.pth"] = "error"
    web.faults["a.pth"] = "error"
    runs = [
        run(tree, "info", _url(s3, "a.pth")),
        run(tree, "info", _url(s3, "a.pth"), "--debug"),
        run(tree, "diff", _url(s3, "nothing.pth"), _url(s3, "b.pth")),
        run(tree, "scan", f"s3://{BUCKET}/tree", "--json"),
        run(tree, "info", _url(s3, "b.pth"), "--json"),
        run(tree, "info", web.base.replace("//", f"//user:{marker}@") + "/a.pth"),
        run(tree, "info", web.base.replace("//", f"//user:{marker}@") + "/b.pth"),
        run(tree, "info", f"{web.base}/b.pth?X-Amz-Signature={marker}"),
        run(tree, "info", f"{web.base}/missing.pth?X-Amz-Signature={marker}"),
    ]
    for proc in runs:
        for text in (proc.stdout, proc.stderr):
            assert SECRET_KEY not in text and marker not in text, text
    assert runs[5].returncode == 2 and runs[6].returncode == 0  # user info still sent


# -- the optional packages ------------------------------------------------------------------


@pytest.mark.parametrize("package", ["fsspec", "s3fs"])
def test_a_missing_optional_package_names_the_extra_that_installs_it(tree, tmp_path, package):
    blocker = tmp_path / "blocker"
    (blocker / package).mkdir(parents=True)
    (blocker / package / "__init__.py").write_text(
        f'raise ImportError("No module named {package!r}")\n'
    )
    path = os.pathsep.join([str(blocker), *filter(None, [os.environ.get("PYTHONPATH")])])
    line = one_error_line(run(tree, "info", f"s3://{BUCKET}/tree/a.pth", PYTHONPATH=path))
    assert "pip install 'ckptmigrate[remote]'" in line, line
    assert f"s3://{BUCKET}/tree/a.pth" in line


def test_an_object_named_outside_its_folder_is_refused_before_any_copy(tree, s3):
    name = f"escaped-{os.getpid()}.golden.pt"
    client = s3.client()
    client.put_object(Bucket=BUCKET, Key=f"hostile/fx/../../{name}", Body=b"not a record")
    client.put_object(Bucket=BUCKET, Key="hostile/fx/a.golden.pt", Body=b"not a record")
    line = one_error_line(run(tree, "check", f"s3://{BUCKET}/hostile/fx", timeout=120))
    assert "is not a plain name under" in line and "refused" in line, line
    assert not (Path(tempfile.gettempdir()) / name).exists()  # where ../.. of a copy lands
    assert not [r for r in s3.requests if r.method == "GET" and "golden" in r.path]
