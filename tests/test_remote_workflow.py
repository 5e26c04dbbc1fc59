"""The README's remote workflow, end to end, on moto's S3 server on loopback: a fleet of
checkpoints in a bucket is catalogued (``scan s3://... --catalog``), the catalog says which are
behind, each is upgraded in the bucket (``upgrade s3://... --in-place``: a server-side backup,
the new object complete or absent), a rescan reads only the objects the upgrades changed, and the
catalog then finds none behind and the best run by a metric.

Every command is the real CLI in its own process, pointed at the server by the standard AWS
environment variables (``object_stores.s3_server`` sets them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip(
    "moto.server", reason="the remote tests need moto[server] (pip install -e .[dev])"
)
pytest.importorskip("s3fs", reason="the remote tests need s3fs (pip install -e .[dev])")

from object_stores import SECRET_KEY, s3_server  # noqa: E402
from toy import TOY_MIGRATIONS, toy_sd  # noqa: E402

import ckptmigrate as cm  # noqa: E402

BUCKET = "models"
LOSSES = {"run-a/epoch1.pth": 0.9, "run-a/epoch2.pth": 0.4, "run-b/epoch1.pth": 0.6}


def _cli(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    assert SECRET_KEY not in done.stdout + done.stderr  # credentials are never printed
    return done


def test_scan_a_bucket_upgrade_what_is_behind_rescan_and_query(tmp_path):
    migrations = tmp_path / "migrations"
    migrations.mkdir()
    (migrations / "toy.py").write_text(TOY_MIGRATIONS)
    local = tmp_path / "runs"
    for name, loss in LOSSES.items():
        (local / name).parent.mkdir(parents=True, exist_ok=True)
        version = "3.0.0" if name == "run-b/epoch1.pth" else "1.0.0"
        cm.save(local / name, toy_sd(), schema="toy", version=version, meta={"val_loss": loss})
    catalog = str(tmp_path / "fleet.sqlite")
    mig = ["--migrations", str(migrations)]
    with s3_server() as s3:
        s3.bucket(BUCKET)
        s3.upload(local, f"{BUCKET}/runs")
        root = f"s3://{BUCKET}/runs"

        done = _cli(tmp_path, "scan", root, "--catalog", catalog, *mig)
        assert done.returncode == 0, done.stderr
        assert "3 read, 0 unchanged" in done.stderr + done.stdout

        behind = _cli(tmp_path, "catalog", catalog, "--behind", "--json", *mig)
        assert behind.returncode == 0, behind.stderr
        urls = sorted(row["path"] for row in json.loads(behind.stdout))
        assert urls == [f"{root}/run-a/epoch1.pth", f"{root}/run-a/epoch2.pth"]

        s3.reset()
        for url in urls:
            up = _cli(tmp_path, "upgrade", url, "--in-place", *mig)
            assert up.returncode == 0, up.stderr
        listed = {o["Key"] for o in s3.client().list_objects_v2(Bucket=BUCKET)["Contents"]}
        for url in urls:  # the backup beside each, copied by the server
            key = url.removeprefix(f"s3://{BUCKET}/")
            assert key in listed and f"{key}.1.0.0.bak" in listed, listed
        assert not s3.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads")

        s3.reset()
        again = _cli(tmp_path, "scan", root, "--catalog", catalog, *mig)
        assert again.returncode == 0, again.stderr
        # the two upgraded objects are read (a .bak is no checkpoint); the third is not
        assert "2 read, 1 unchanged" in again.stderr + again.stdout
        gets = [r for r in s3.requests if r.method == "GET" and not r.query]
        assert not [r for r in gets if "run-b" in r.path]

        none_behind = _cli(tmp_path, "catalog", catalog, "--behind", "--json", *mig)
        assert json.loads(none_behind.stdout) == []
        best = _cli(
            tmp_path, "catalog", catalog, "--schema", "toy", "--best", "val_loss", "--min",
            "--json", *mig,
        )  # fmt: skip
        rows = json.loads(best.stdout)
        assert [r["path"] for r in rows] == [f"{root}/run-a/epoch2.pth"]
        assert rows[0]["version"] == "3.0.0" and rows[0]["meta"]["val_loss"] == 0.4

        got = cm.load(f"{root}/run-a/epoch2.pth", upgrade=False)
        assert str(got.version) == "3.0.0" and got.meta["val_loss"] == 0.4
