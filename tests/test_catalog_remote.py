"""The catalog of a fleet in an object store (issue 17 item 3, remote roots): ``scan
s3://bucket/prefix --catalog DB`` lists the prefix once (size and ETag of every object, no HEAD
per object), reads by range only what is new or changed, several objects at once, and a rescan
with nothing changed makes no read at all: only the listing.

Every test talks to moto's S3 server (or the plain HTTP server) on 127.0.0.1, which counts the
requests it answers; the bounds below are those counts. Catalogs are SQLite files and databases
on a real PostgreSQL server on loopback (``catalog_dbs``).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "moto.server", reason="the remote tests need moto[server] (pip install -e .[dev])"
)
pytest.importorskip("s3fs", reason="the remote tests need s3fs (pip install -e .[dev])")

from object_stores import range_server, s3_server  # noqa: E402
from set_files import make_set  # noqa: E402
from toy import TOY_MIGRATIONS, toy_sd  # noqa: E402

import ckptmigrate as cm  # noqa: E402
from ckptmigrate.cli import main  # noqa: E402
from ckptmigrate.inspection import catalog as catalog_module  # noqa: E402
from ckptmigrate.inspection import scan as scan_module  # noqa: E402
from ckptmigrate.schema.registry import find_schemas  # noqa: E402

BUCKET = "fleet"


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        server.bucket(BUCKET)
        yield server


@pytest.fixture
def fleet(tmp_path: Path) -> dict:
    """20 small objects on disk: toy checkpoints at 1.0.0 (torch zips with metrics) and 3.0.0
    (torch zips and safetensors), unstamped ``torch.save`` files, and a sharded set (an index
    and two shards: one checkpoint). 18 checkpoints in all."""
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "toy.py").write_text(TOY_MIGRATIONS)
    root = tmp_path / "registry"
    for run in ("a", "b"):
        (root / "runs" / run).mkdir(parents=True)
    for i in range(6):
        cm.save(
            root / "runs" / "a" / f"epoch{i}.pth",
            toy_sd(),
            schema="toy",
            version="1.0.0",
            meta={"val_loss": 1.0 - i / 10},
        )
        cm.save(
            root / "runs" / "b" / f"epoch{i}.pth",
            toy_sd("layers"),
            schema="toy",
            version="3.0.0",
            hparams={"width": 4},
            meta={"val_loss": 0.5 - i / 20},
        )
    (root / "st").mkdir()
    for i in range(3):
        cm.save(root / "st" / f"m{i}.safetensors", toy_sd("layers"), schema="toy", version="3.0.0")
    for i in range(2):
        torch.save(toy_sd(), root / f"raw{i}.pt")
    make_set(root / "set", "safetensors")
    return {"root": root, "migrations": str(migrations)}


@pytest.fixture
def bucket(s3, fleet) -> dict:
    """The fleet uploaded under a prefix of its own; the server's counts start after it."""
    prefix = f"{BUCKET}/{uuid.uuid4().hex[:8]}"
    s3.upload(fleet["root"], prefix)
    s3.reset()
    return {**fleet, "url": f"s3://{prefix}", "prefix": prefix}


def scan_to(db: str, url: str, fleet: dict, capsys, *flags: str) -> str:
    code = main(["scan", url, "--catalog", db, "--migrations", fleet["migrations"], *flags])
    assert code == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def catalog_json(db: str, fleet: dict, capsys, *flags: str) -> list[dict]:
    assert main(["catalog", db, "--json", "--migrations", fleet["migrations"], *flags]) == 0
    return json.loads(capsys.readouterr().out)


def object_gets(s3, prefix: str) -> dict[str, int]:
    """The GETs of object bytes under ``prefix``, by key below it; each asked for a range."""
    gets: dict[str, int] = {}
    for r in s3.requests:
        if r.method == "GET" and not r.query and r.path.startswith(f"/{prefix}/"):
            assert r.range, r
            key = r.path[len(prefix) + 2 :]
            gets[key] = gets.get(key, 0) + 1
    return gets


def listings_of(s3, prefix: str) -> list:
    """The ListObjectsV2 requests of everything under ``prefix`` (no delimiter)."""
    folder = prefix.partition("/")[2]
    return [
        r
        for r in s3.requests
        if r.path == f"/{BUCKET}" and f"prefix={folder}%2F&delimiter=&" in r.query
    ]


SINGLE_FILES = [f"runs/{run}/epoch{i}.pth" for run in "ab" for i in range(6)] + [
    "raw0.pt",
    "raw1.pt",
    "st/m0.safetensors",
    "st/m1.safetensors",
    "st/m2.safetensors",
]


def test_a_scan_of_a_prefix_lists_once_and_reads_each_object_by_one_range(db, bucket, s3, capsys):
    err = scan_to(db, bucket["url"], bucket, capsys, "--jobs", "8")
    assert "18 read, 0 unchanged (not read), 0 removed" in err
    assert len(listings_of(s3, bucket["prefix"])) == 1
    gets = object_gets(s3, bucket["prefix"])
    for name in SINGLE_FILES:  # the listing said its size and ETag: no HEAD, one ranged GET
        assert gets[name] == 1, (name, gets)
        assert not [r for r in s3.to(f"/{bucket['prefix']}/{name}") if r.method != "GET"]
    assert gets["set/model.safetensors.index.json"] == 1
    rows = {r["path"]: r for r in catalog_json(db, bucket, capsys)}
    assert all(p.startswith(f"{bucket['url']}/") for p in rows)
    old = rows[f"{bucket['url']}/runs/a/epoch2.pth"]
    assert (old["version"], old["current"], old["behind"]) == ("1.0.0", "3.0.0", True)
    assert old["meta"] == {"val_loss": pytest.approx(0.8)} and old["tensors"] == 4
    assert rows[f"{bucket['url']}/set"]["format"] is not None
    assert rows[f"{bucket['url']}/raw0.pt"]["error"] == "no ckptmigrate stamp"


def test_the_rows_of_a_remote_scan_are_those_of_a_local_one(db, bucket, tmp_path, capsys):
    scan_to(db, bucket["url"], bucket, capsys)
    local_db = str(tmp_path / "local.sqlite")
    scan_to(local_db, str(bucket["root"]), bucket, capsys)
    remote = catalog_json(db, bucket, capsys)
    local = catalog_json(local_db, bucket, capsys)
    for rows, base in ((remote, bucket["url"]), (local, str(bucket["root"]))):
        for row in rows:
            assert row["path"].startswith(base + "/")
            row["path"] = row["path"][len(base) :]
    assert remote == local and len(remote) == 18


def test_a_rescan_with_nothing_changed_makes_only_the_listing(db, bucket, s3, capsys):
    scan_to(db, bucket["url"], bucket, capsys)
    s3.reset()
    assert "0 read, 18 unchanged (not read), 0 removed" in scan_to(
        db, bucket["url"], bucket, capsys
    )
    assert s3.by_kind() == {"LIST": 1}  # no HEAD, no GET of any object
    assert len(listings_of(s3, bucket["prefix"])) == 1
    assert len(catalog_json(db, bucket, capsys)) == 18


def test_a_changed_etag_is_read_again_a_new_object_read_and_a_deleted_one_removed(
    db, bucket, s3, capsys, tmp_path
):
    scan_to(db, bucket["url"], bucket, capsys)
    changed = tmp_path / "epoch0.pth"
    cm.save(changed, toy_sd(), schema="toy", version="2.0.0", meta={"val_loss": 1.0})
    old = bucket["root"] / "runs" / "a" / "epoch0.pth"
    assert changed.stat().st_size == old.stat().st_size  # same size: only the ETag tells
    s3.upload(changed, f"{bucket['prefix']}/runs/a/epoch0.pth")
    s3.upload(old, f"{bucket['prefix']}/runs/c/new.pth")
    client = s3.client()
    client.delete_object(Bucket=BUCKET, Key=f"{bucket['prefix'].partition('/')[2]}/raw1.pt")
    s3.reset()
    err = scan_to(db, bucket["url"], bucket, capsys)
    assert "2 read, 16 unchanged (not read), 1 removed" in err
    assert object_gets(s3, bucket["prefix"]) == {"runs/a/epoch0.pth": 1, "runs/c/new.pth": 1}
    rows = {r["path"][len(bucket["url"]) + 1 :]: r for r in catalog_json(db, bucket, capsys)}
    assert "raw1.pt" not in rows and rows["runs/c/new.pth"]["version"] == "1.0.0"
    assert rows["runs/a/epoch0.pth"]["version"] == "2.0.0"
    assert len(rows["runs/a/epoch0.pth"]["steps"]) == 1


def test_a_changed_shard_reads_its_set_again(db, bucket, s3, capsys, tmp_path):
    scan_to(db, bucket["url"], bucket, capsys)
    shard = bucket["root"] / "set" / "model-00002-of-00002.safetensors"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # one value's bytes: same size, another ETag
    (tmp_path / "shard").write_bytes(bytes(data))
    s3.upload(tmp_path / "shard", f"{bucket['prefix']}/set/{shard.name}")
    s3.reset()
    assert "1 read, 17 unchanged (not read), 0 removed" in scan_to(
        db, bucket["url"], bucket, capsys
    )
    assert set(object_gets(s3, bucket["prefix"])) <= {
        f"set/{p.name}" for p in shard.parent.iterdir()
    }


def test_concurrent_and_sequential_scans_record_the_same_rows_in_the_same_order(
    bucket, s3, capsys, tmp_path
):
    recorded = {}
    for jobs in ("1", "16"):
        db = str(tmp_path / f"jobs{jobs}.sqlite")
        assert main(["scan", bucket["url"], "--catalog", db, "--jobs", jobs, "--json",
                     "--migrations", bucket["migrations"]]) == 0  # fmt: skip
        printed = json.loads(capsys.readouterr().out)
        recorded[jobs] = (printed, catalog_json(db, bucket, capsys))
    assert recorded["1"] == recorded["16"]
    paths = [r["path"] for r in recorded["16"][0]]
    assert paths == sorted(paths) and len(paths) == 18


def test_a_read_the_store_failed_is_read_again_by_the_next_scan(db, bucket, s3, capsys):
    s3.faults["runs/b/epoch3.pth"] = "error"  # 500 on every request for it
    scan_to(db, bucket["url"], bucket, capsys)
    [row] = [r for r in catalog_json(db, bucket, capsys) if r["path"].endswith("b/epoch3.pth")]
    assert "cannot read it from its store" in row["error"] and row["schema"] is None
    s3.reset()  # the store recovers
    err = scan_to(db, bucket["url"], bucket, capsys)
    assert "1 read, 17 unchanged (not read), 0 removed" in err
    assert object_gets(s3, bucket["prefix"]) == {"runs/b/epoch3.pth": 1}
    [row] = [r for r in catalog_json(db, bucket, capsys) if r["path"].endswith("b/epoch3.pth")]
    assert row["error"] is None and row["version"] == "3.0.0"


def test_ctrl_c_while_objects_are_read_leaves_the_catalog_as_it_was(
    db, bucket, s3, capsys, tmp_path, monkeypatch
):
    scan_to(db, bucket["url"], bucket, capsys)
    before = catalog_json(db, bucket, capsys)
    s3.upload(bucket["root"] / "raw0.pt", f"{bucket['prefix']}/runs/c/late.pt")
    client = s3.client()
    client.delete_object(Bucket=BUCKET, Key=f"{bucket['prefix'].partition('/')[2]}/raw1.pt")
    real = scan_module.read_rows

    def interrupted(path, **kw):
        raise KeyboardInterrupt  # Ctrl-C while a thread reads the new object

    monkeypatch.setattr(scan_module, "read_rows", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with catalog_module.open_catalog(db) as catalog:
            catalog_module.scan_into(catalog, bucket["url"], find_schemas([bucket["migrations"]]))
    monkeypatch.setattr(scan_module, "read_rows", real)
    assert catalog_json(db, bucket, capsys) == before


def test_scans_of_two_prefixes_keep_each_other_s_rows(db, bucket, s3, capsys):
    sibling = bucket["prefix"] + "-b"  # shares the prefix's text, not its folder
    s3.upload(bucket["root"] / "runs" / "a", sibling)
    scan_to(db, bucket["url"], bucket, capsys)
    assert "6 read, 0 unchanged" in scan_to(db, f"s3://{sibling}", bucket, capsys)
    assert "0 read, 18 unchanged (not read), 0 removed" in scan_to(
        db, bucket["url"], bucket, capsys
    )
    assert len(catalog_json(db, bucket, capsys)) == 24
    assert main(["catalog", db, "--behind", "--migrations", bucket["migrations"]]) == 0
    out = capsys.readouterr().out
    assert f"s3://{sibling}/epoch0.pth  toy 1.0.0 -> 3.0.0: behind" in out
    assert f"{bucket['url']}/runs/a/epoch5.pth  toy 1.0.0 -> 3.0.0: behind" in out
    assert "12 checkpoint(s)" in out


def test_an_https_object_is_fingerprinted_by_its_etag(db, fleet, capsys):
    name = "runs/a/epoch1.pth"
    with range_server(fleet["root"], etags=True) as web:
        url = f"{web.base}/{name}"
        assert "1 read, 0 unchanged" in scan_to(db, url, fleet, capsys)
        web.reset()
        assert "0 read, 1 unchanged (not read), 0 removed" in scan_to(db, url, fleet, capsys)
        assert [r.method for r in web.requests] == ["HEAD"]  # its size and ETag, no byte
        cm.save(fleet["root"] / name, toy_sd(), schema="toy", version="2.0.0")
        assert "1 read, 0 unchanged" in scan_to(db, url, fleet, capsys)
    [row] = catalog_json(db, fleet, capsys)
    assert row["path"] == url and row["version"] == "2.0.0"


def test_an_https_object_without_etag_or_date_is_read_every_time(db, fleet, capsys):
    with range_server(fleet["root"]) as web:  # says neither: nothing shows a change
        url = f"{web.base}/raw0.pt"
        for _ in range(2):
            assert "1 read, 0 unchanged" in scan_to(db, url, fleet, capsys)


def test_a_file_url_root_is_the_local_folder(db, fleet, capsys):
    url = fleet["root"].as_uri()
    assert "18 read" in scan_to(db, url, fleet, capsys)
    assert "0 read, 18 unchanged" in scan_to(db, str(fleet["root"]), fleet, capsys)
    paths = [r["path"] for r in catalog_json(db, fleet, capsys)]
    assert all(p.startswith(str(fleet["root"]) + "/") for p in paths)


def test_ctrl_c_stops_the_reads_not_yet_started(bucket, s3, tmp_path, monkeypatch):
    real, started = scan_module.read_rows, []

    def first_interrupted(path, **kw):
        started.append(str(path))
        if len(started) == 1:
            raise KeyboardInterrupt
        return real(path, **kw)

    monkeypatch.setattr(scan_module, "read_rows", first_interrupted)
    with pytest.raises(KeyboardInterrupt):
        with catalog_module.open_catalog(tmp_path / "c.sqlite") as catalog:
            schemas = find_schemas([bucket["migrations"]])
            catalog_module.scan_into(catalog, bucket["url"], schemas, workers=2)
    assert len(started) < 18 // 2, started  # the queued reads were dropped, not run


def test_a_single_object_root_is_recorded_and_rescanned_without_a_read(db, bucket, s3, capsys):
    url = f"{bucket['url']}/runs/a/epoch3.pth"
    assert "1 read, 0 unchanged" in scan_to(db, url, bucket, capsys)
    s3.reset()
    assert "0 read, 1 unchanged (not read), 0 removed" in scan_to(db, url, bucket, capsys)
    assert "GET" not in s3.by_kind()  # the listing (nothing under it), then its HEAD
    [row] = catalog_json(db, bucket, capsys)
    assert row["path"] == url and row["behind"] is True
