"""Fuzzing the readers: mutated torch zips, data.pkl bytes, legacy files and safetensors headers
raise nothing but our own errors, from the metadata-only reader and from the full loader.

Brief in CI; for a long run by hand: ``CKPTMIGRATE_FUZZ_EXAMPLES=5000 pytest tests/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from hostile import data_pkl, replace_member, toy_sd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ckptmigrate as cm
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.files import read_checkpoint, read_metadata

EXAMPLES = int(os.environ.get("CKPTMIGRATE_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize="CKPTMIGRATE_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=list(HealthCheck),
)

_WORK = Path(tempfile.mkdtemp(prefix="ckptmigrate-fuzz-"))


def _seed_files() -> dict[str, bytes]:
    sd = toy_sd()
    sd["extra.int"] = torch.arange(6, dtype=torch.int64).reshape(2, 3)
    sd["extra.view"] = sd["extra.int"][:, 1]  # a view sharing a storage
    cm.save(_WORK / "ours.pth", sd, schema="toy", version="1.0.0", hparams={"width": 4})
    torch.save(sd, _WORK / "legacy.pth", _use_new_zipfile_serialization=False)
    cm.save(_WORK / "st.safetensors", toy_sd(), schema="toy", version="1.0.0")
    return {name: (_WORK / name).read_bytes() for name in ("ours.pth", "legacy.pth")}


SEEDS = _seed_files()
ZIP_PKL = data_pkl(_WORK / "ours.pth")
ST_RAW = (_WORK / "st.safetensors").read_bytes()
(ST_HEADER_LEN,) = struct.unpack("<Q", ST_RAW[:8])
ST_HEADER = json.loads(ST_RAW[8 : 8 + ST_HEADER_LEN])
ST_DATA = ST_RAW[8 + ST_HEADER_LEN :]

# ----------------------------------------------------------------------------- mutations

_edit = st.tuples(
    st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(min_size=1, max_size=16),
)


def mutate(data: bytes, edits: list[tuple[str, float, bytes]]) -> bytes:
    out = bytearray(data)
    for kind, where, payload in edits:
        if not out:
            out += payload
            continue
        at = int(where * len(out))
        if kind == "flip":
            out[at] ^= payload[0] or 1
        elif kind == "set":
            out[at : at + len(payload)] = payload
        elif kind == "insert":
            out[at:at] = payload
        elif kind == "delete":
            del out[at : at + len(payload)]
        elif kind == "truncate":
            del out[at:]
        else:
            out[at:at] = out[at : at + 4 * len(payload)]
    return bytes(out)


def only_our_errors(path: Path) -> None:
    """Both readers either read the file or raise a CkptMigrateError; nothing else escapes."""
    for read in (lambda: read_metadata(path), lambda: read_checkpoint(path)):
        try:
            read()
        except CkptMigrateError:
            pass


def _write(name: str, data: bytes) -> Path:
    path = _WORK / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------- targets


@FUZZ
@given(seed=st.sampled_from(sorted(SEEDS)), edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_torch_files_raise_only_our_errors(seed: str, edits: list) -> None:
    only_our_errors(_write("mutated.pth", mutate(SEEDS[seed], edits)))


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_data_pkl_in_a_valid_zip_raises_only_our_errors(edits: list) -> None:
    path = replace_member(
        _WORK / "ours.pth", _WORK / "pkl.pth", "/data.pkl", mutate(ZIP_PKL, edits)
    )
    only_our_errors(path)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_entry = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from(["F32", "F16", "I64", "BOOL", "U8", "F8_E4M3", "X"]) | _json,
        "shape": st.lists(st.integers(-2, 2**40), max_size=3) | _json,
        "data_offsets": st.lists(st.integers(-8, 2**65), min_size=2, max_size=2) | _json,
    }
)
_header = st.dictionaries(
    st.text(max_size=6) | st.just("__metadata__"),
    _entry | _json,
    max_size=4,
)


@FUZZ
@given(header=_header, data_len=st.integers(0, 64))
def test_random_safetensors_headers_raise_only_our_errors(header: dict, data_len: int) -> None:
    text = json.dumps(header).encode()
    only_our_errors(
        _write("rand.safetensors", struct.pack("<Q", len(text)) + text + bytes(data_len))
    )


@FUZZ
@given(
    edits=st.lists(_edit, min_size=1, max_size=3),
    field_edit=st.sampled_from(["none", "drop", "swap"]),
    value=_json,
)
def test_mutated_safetensors_files_raise_only_our_errors(
    edits: list, field_edit: str, value: object
) -> None:
    header = json.loads(json.dumps(ST_HEADER))
    name = sorted(k for k in header if k != "__metadata__")[0]
    if field_edit == "drop":
        header[name].pop("shape")
    elif field_edit == "swap":
        header[name]["data_offsets"] = value
    text = json.dumps(header).encode()
    raw = struct.pack("<Q", len(text)) + text + ST_DATA
    mutated = mutate(raw, edits) if field_edit == "none" else raw
    only_our_errors(_write("mut.safetensors", mutated))


def test_the_fuzz_seeds_themselves_load() -> None:
    read: Callable[[Path], object]
    for read in (read_metadata, read_checkpoint):
        read(_WORK / "ours.pth")
        read(_WORK / "legacy.pth")
        read(_WORK / "st.safetensors")
