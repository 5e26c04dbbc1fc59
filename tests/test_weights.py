"""Named weights (issue 17 item 4): listed by a schema, downloaded from a real HTTP server on
loopback into torch.hub's cache, verified by sha256 on every load, upgraded on the way in,
listed by ``ckptmigrate weights`` and checked against golden records by ``check --weights``.

The weights are the toy model's 1.0.0 code's (``blocks.N``), and their golden output is what
that old code computed; today's schema renames the blocks and pins an hparam.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from torch import nn
from toy import TOY_MIGRATIONS_WITH_MODEL, toy_schema, write_fixture

import ckptmigrate as cm
from ckptmigrate.cli import main

HERE = Path(__file__).parent


class OldToy(nn.Module):
    """The toy model as version 1.0.0 of its code wrote it: ``blocks.N``."""

    def __init__(self, width: int = 4, layers: int = 2) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.blocks = nn.ModuleList(nn.Linear(width, width) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class Files(ThreadingHTTPServer):
    """An HTTP server on loopback serving ``files`` by path, counting requests per path.

    ``behaviour[path]``: ``"stall"`` sends half the body and then waits (a dead connection),
    ``"short"`` promises the whole length and closes after half, ``"other"`` serves other bytes
    of the same length."""

    daemon_threads = True

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.behaviour: dict[str, str] = {}
        self.requests: dict[str, int] = {}
        self.release = threading.Event()
        self.sent_half = threading.Event()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: Files

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        self.server.requests[path] = self.server.requests.get(path, 0) + 1
        body = self.server.files.get(path)
        if body is None:
            self.send_error(404, "Not Found")
            return
        how = self.server.behaviour.get(path)
        if how == "other":
            body = bytes(255 - b for b in body)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if how in ("stall", "short"):
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.server.sent_half.set()
            if how == "stall":
                self.server.release.wait(30)
            return
        self.wfile.write(body)


@pytest.fixture
def server():
    files = Files()
    thread = threading.Thread(target=files.serve_forever, daemon=True)
    thread.start()
    yield files
    files.release.set()
    files.shutdown()
    files.server_close()


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """torch.hub's cache in a folder of the test's own (``$TORCH_HOME``, as a user sets it)."""
    home = tmp_path / "torch-home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    return home / "hub" / "checkpoints"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def published(tmp_path, server) -> dict:
    """The old code's weights (toy 1.0.0) and golden record, served as a release would be."""
    weights = write_fixture(tmp_path / "release", OldToy(), "1.0.0", {"layers": 2})
    golden = weights.with_name("1.0.0.golden.pt")
    server.files["/w/toy-1.0.0-a1.pth"] = weights.read_bytes()
    server.files["/w/toy-1.0.0-a1.golden.pt"] = golden.read_bytes()
    return {
        "path": weights,
        "url": f"{server.url}/w/toy-1.0.0-a1.pth",
        "sha256": sha256(weights),
        "golden": f"{server.url}/w/toy-1.0.0-a1.golden.pt",
        "golden_sha256": sha256(golden),
        "state_dict": torch.load(weights, weights_only=True)["state_dict"],
    }


def listed(published: dict, **changes: str) -> cm.Schema:
    schema = toy_schema()
    entry = {k: published[k] for k in ("url", "sha256")} | changes
    schema.add_weights(
        "stripes_v1", version="1.0.0", meta={"val_loss": 0.25, "dataset": "stripes"}, **entry
    )
    return schema


def test_weights_download_once_into_torch_hubs_cache_and_arrive_upgraded(
    published, server, torch_home
):
    schema = listed(published)
    ckpt = cm.load_weights(schema, "stripes_v1")
    cached = torch_home / "toy-1.0.0-a1.pth"
    assert cached.is_file() and sha256(cached) == published["sha256"]
    assert str(ckpt.version) == "3.0.0" and ckpt.hparams["width"] == 4  # the pinning step ran
    for key, value in published["state_dict"].items():
        torch.testing.assert_close(ckpt.state_dict[key.replace("blocks.", "layers.")], value)
    assert [h["to"] for h in ckpt.history] == ["2.0.0", "3.0.0"]
    again = cm.load_weights(schema, "stripes_v1", to="2.0.0")
    assert str(again.version) == "2.0.0"
    assert server.requests == {"/w/toy-1.0.0-a1.pth": 1}  # the second load read the cache
    assert sorted(p.name for p in torch_home.iterdir()) == ["toy-1.0.0-a1.pth"]


def test_a_cached_file_that_no_longer_matches_is_fetched_again(published, server, torch_home):
    schema = listed(published)
    cm.load_weights(schema, "stripes_v1")
    cached = torch_home / "toy-1.0.0-a1.pth"
    cached.write_bytes(cached.read_bytes()[:-10] + b"\0" * 10)  # a disk or a person changed it
    ckpt = cm.load_weights(schema, "stripes_v1")
    assert server.requests["/w/toy-1.0.0-a1.pth"] == 2
    assert sha256(cached) == published["sha256"] and str(ckpt.version) == "3.0.0"


def test_bytes_that_do_not_match_the_listed_sha256_are_refused_and_not_kept(
    published, server, torch_home
):
    server.behaviour["/w/toy-1.0.0-a1.pth"] = "other"
    with pytest.raises(cm.WeightsHashMismatchError) as caught:
        cm.load_weights(listed(published), "stripes_v1")
    assert caught.value.expected == published["sha256"] and caught.value.got != published["sha256"]
    assert published["sha256"] in str(caught.value)
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


@pytest.mark.parametrize("how", ["missing", "short", "stall"])
def test_a_download_that_fails_is_a_clear_error_leaving_nothing(published, server, torch_home, how):
    url = published["url"]
    if how == "missing":
        url = url.replace("toy-1.0.0-a1.pth", "gone.pth")
    else:
        server.behaviour["/w/toy-1.0.0-a1.pth"] = how
    schema = listed(published, url=url)
    start = time.monotonic()
    with pytest.raises(cm.WeightsDownloadError) as caught:
        cm.load_weights(schema, "stripes_v1", timeout=1.0)
    assert time.monotonic() - start < 20
    said = {"missing": "404", "short": "closed after", "stall": "timed out"}[how]
    assert said in str(caught.value), str(caught.value)
    assert not torch_home.exists() or list(torch_home.iterdir()) == []


def test_a_url_s_credentials_never_reach_a_message(published, server, torch_home):
    host = server.url.removeprefix("http://")
    url = f"http://user:s3cr3t-pw@{host}/w/gone.pth?X-Amz-Signature=s3cr3t-sig"
    with pytest.raises(cm.WeightsDownloadError) as caught:
        cm.load_weights(listed(published, url=url), "stripes_v1")
    assert "s3cr3t" not in str(caught.value) and caught.value.url == url
    assert f"http://{host}/w/gone.pth" in str(caught.value)


def test_a_killed_download_leaves_no_file_under_its_name(published, server, torch_home, tmp_path):
    server.behaviour["/w/toy-1.0.0-a1.pth"] = "stall"
    script = tmp_path / "fetch.py"
    script.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(HERE)!r})\n"
        "import ckptmigrate as cm\n"
        "from toy import toy_schema\n"
        "schema = toy_schema()\n"
        f"schema.add_weights('w', url={published['url']!r}, sha256={published['sha256']!r}, "
        "version='1.0.0')\n"
        "cm.load_weights(schema, 'w')\n"
    )
    child = subprocess.Popen([sys.executable, str(script)], env=os.environ.copy())
    assert server.sent_half.wait(60)  # the child is mid-way through the body
    deadline = time.monotonic() + 30
    while not list(torch_home.glob("*.partial")) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(list(torch_home.glob("*.partial"))) == 1
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (torch_home / "toy-1.0.0-a1.pth").exists()
    server.behaviour.clear()
    ckpt = cm.load_weights(listed(published), "stripes_v1")
    assert str(ckpt.version) == "3.0.0"
    assert sorted(p.name for p in torch_home.iterdir()) == ["toy-1.0.0-a1.pth"]  # partial gone


def test_local_paths_and_file_urls_are_read_where_they_lie(published, torch_home):
    path = published["path"]
    for url in (str(path), path.as_uri()):
        ckpt = cm.load_weights(listed(published, url=url), "stripes_v1")
        assert str(ckpt.version) == "3.0.0"
    assert not torch_home.exists()  # nothing copied
    with pytest.raises(cm.WeightsHashMismatchError):
        cm.load_weights(listed(published, url=str(path), sha256="0" * 64), "stripes_v1")
    assert path.is_file()  # a local file that does not match is left alone


def test_an_unstamped_file_takes_the_listed_version_and_a_stamp_must_agree(tmp_path, torch_home):
    raw = tmp_path / "raw.pth"
    torch.save(OldToy().state_dict(), raw)
    schema = toy_schema()
    schema.add_weights("raw", url=str(raw), sha256=sha256(raw), version="1.0.0")
    assert sorted(cm.load_weights(schema, "raw").state_dict) == sorted(
        k.replace("blocks.", "layers.") for k in OldToy().state_dict()
    )
    stamped = tmp_path / "stamped.pth"
    cm.save(stamped, OldToy().state_dict(), schema="toy", version="2.0.0")
    schema.add_weights("liar", url=str(stamped), sha256=sha256(stamped), version="1.0.0")
    with pytest.raises(cm.VersionConflictError):
        cm.load_weights(schema, "liar")


def test_an_unknown_name_lists_the_known_ones(published):
    with pytest.raises(cm.UnknownWeightsError, match="stripes_v1"):
        cm.load_weights(listed(published), "stripes_v2")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"sha256": "abc"}, "64 hex digits"),
        ({"name": "../up"}, "weights name"),
        ({"version": "9.0.0"}, "past the current version"),
        ({"golden": "g.pt"}, "go together"),
        ({"transforms": "os.system; rm"}, "package.module:function"),
        ({"url": ""}, "non-empty"),
    ],
)
def test_a_malformed_entry_is_refused_when_the_schema_is_defined(change, said):
    entry = {"name": "w", "url": "w.pth", "sha256": "a" * 64, "version": "1.0.0"} | change
    with pytest.raises(cm.CkptMigrateError, match=said):
        toy_schema().add_weights(entry.pop("name"), **entry)


def test_transforms_are_imported_by_reference_only_when_asked():
    schema = toy_schema()
    ok = schema.add_weights(
        "a", url="a.pth", sha256="a" * 64, version="1.0.0", transforms="json:dumps"
    )
    assert ok.get_transforms() is json.dumps
    late = schema.add_weights(
        "b", url="b.pth", sha256="b" * 64, version="1.0.0", transforms="no_such_pkg.mod:f"
    )
    assert "no_such_pkg" not in sys.modules  # defining the entry imported nothing
    with pytest.raises(cm.UsageError, match="no_such_pkg"):
        late.get_transforms()


def write_migrations(root: Path, published: dict, golden_sha256: str | None = None) -> Path:
    folder = root / "migrations"
    folder.mkdir(parents=True, exist_ok=True)
    entry = (
        f"schema.add_weights('stripes_v1', url={published['url']!r}, "
        f"sha256={published['sha256']!r}, version='1.0.0', meta={{'val_loss': 0.25}}, "
        f"golden={published['golden']!r}, "
        f"golden_sha256={golden_sha256 or published['golden_sha256']!r})\n"
    )
    (folder / "toy.py").write_text(TOY_MIGRATIONS_WITH_MODEL + entry)
    return folder


def test_the_weights_command_lists_each_entry(published, tmp_path, capsys):
    folder = write_migrations(tmp_path, published)
    assert main(["weights", "--migrations", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "toy:stripes_v1" in out and "saved at 1.0.0 (upgraded to 3.0.0)" in out
    assert published["sha256"][:12] in out and "val_loss: 0.25" in out
    assert main(["weights", "toy", "--json", "--migrations", str(folder)]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["sha256"] == published["sha256"] and row["meta"] == {"val_loss": 0.25}
    assert main(["weights", "toy:nope", "--migrations", str(folder)]) == 2
    assert "lists no weights named 'nope'" in capsys.readouterr().err


def test_check_weights_reproduces_the_published_outputs(published, tmp_path, torch_home, capsys):
    folder = write_migrations(tmp_path, published)
    assert main(["check", "--weights", "--migrations", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "toy  1.0.0  stripes_v1" in out and "1 of 1 fixtures ok" in out
    assert main(["check", "--weights", "toy:stripes_v1", "--migrations", str(folder)]) == 0


def test_check_weights_fails_when_the_migrated_weights_compute_something_else(
    published, server, tmp_path, torch_home, capsys
):
    record = torch.load(published["path"].with_name("1.0.0.golden.pt"), weights_only=True)
    record["output"] = record["output"] + 1e-3  # what another set of weights computed
    other = tmp_path / "other.golden.pt"
    torch.save(record, other)
    server.files["/w/toy-1.0.0-a1.golden.pt"] = other.read_bytes()
    folder = write_migrations(tmp_path, published, golden_sha256=sha256(other))
    assert main(["check", "--weights", "--migrations", str(folder)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_a_third_party_pack_publishes_weights_through_its_entry_point(published, tmp_path):
    """A pack installed as pip would (a dist-info with entry_points.txt on sys.path) lists its
    weights beside its migrations; ``ckptmigrate weights`` finds them with no configuration."""
    site = tmp_path / "site"
    (site / "toy_pack").mkdir(parents=True)
    (site / "toy_pack" / "__init__.py").write_text(
        TOY_MIGRATIONS_WITH_MODEL + f"schema.add_weights('stripes_v1', url={published['url']!r}, "
        f"sha256={published['sha256']!r}, version='1.0.0')\n"
    )
    info = site / "toy_pack-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-pack\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[ckptmigrate.migrations]\ntoy = toy_pack:schema\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "weights", "--json"],
        cwd=tmp_path,  # no pyproject.toml: installed packs are the source
        env=env,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    [row] = json.loads(done.stdout)
    assert (row["schema"], row["name"], row["url"]) == ("toy", "stripes_v1", published["url"])


def test_weights_in_an_object_store_download_once_by_ranged_reads(published, torch_home):
    """An ``s3://`` URL (moto's S3 server on loopback): fetched into the same cache, verified,
    upgraded; the second load reads the cache, not the bucket."""
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install ckptmigrate[remote])")
    from object_stores import s3_server

    with s3_server() as s3:
        s3.bucket("weights")
        url = s3.upload(published["path"], "weights/toy/toy-1.0.0-a1.pth")
        schema = listed(published, url=url)
        ckpt = cm.load_weights(schema, "stripes_v1")
        gets = len([r for r in s3.requests if r.method == "GET"])
        assert str(ckpt.version) == "3.0.0" and gets >= 1
        assert sha256(torch_home / "toy-1.0.0-a1.pth") == published["sha256"]
        cm.load_weights(schema, "stripes_v1")
        assert len([r for r in s3.requests if r.method == "GET"]) == gets  # the cache served
        with pytest.raises(cm.WeightsDownloadError, match="s3://weights/toy/gone.pth"):
            cm.load_weights(listed(published, url="s3://weights/toy/gone.pth"), "stripes_v1")
