"""Memory budgets: a file may not make its reader allocate more than a multiple of its bytes.

Each hostile file below is small on disk and, before the budgets, took hundreds of MiB to
decode; each is refused with a BudgetExceededError naming the budget, before the allocation.
Real files of realistic size still load.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import pytest
import torch
from hostile import no_hang, replace_member, safetensors_bytes, save_torch, write_set
from processes import one_error_line, run

import ckptmigrate as cm
from ckptmigrate.errors import BudgetExceededError, CheckpointFormatError
from ckptmigrate.formats.safetensors_header import read_safetensors_header
from ckptmigrate.formats.torch import MAX_PICKLE_BYTES, read_torch_metadata


def _zip_with_pickle(tmp_path: Path, pkl: bytes, name: str = "bomb.pth") -> Path:
    good = save_torch({"w": torch.zeros(2)}, tmp_path / "good.pth")
    return replace_member(good, tmp_path / name, "/data.pkl", pkl)


def _empty_sets(n: int) -> bytes:
    return b"\x80\x04](" + b"\x8f" * n + b"e."  # MARK, n x EMPTY_SET, APPENDS


def _empty_dicts(n: int) -> bytes:
    return b"\x80\x02](" + b"}" * n + b"e."


def _tuples(n: int) -> bytes:
    return b"\x80\x02](" + b"N\x85" * n + b"e."  # NONE, TUPLE1


def _bytearray_copies(n: int, size: int = 1 << 20) -> bytes:
    """One memoised 1 MiB bytes, copied by ``bytearray(...)`` n times (6 bytes a copy)."""
    head = b"\x80\x03cbuiltins\nbytearray\nq\x00B" + struct.pack("<I", size) + bytes(size)
    return head + b"q\x01](" + b"h\x00h\x01\x85R" * n + b"e."


def _size_copies(n: int, items: int = 100_000) -> bytes:
    """One memoised list of 100k dims, turned into a new torch.Size n times."""
    head = b"\x80\x02ctorch\nSize\nq\x00](" + b"K\x01" * items + b"eq\x01"
    return head + b"](" + b"h\x00h\x01\x85R" * n + b"e."


HOSTILE_PICKLES = {
    "two million empty sets": lambda: _empty_sets(2_000_000),
    "two million empty dicts": lambda: _empty_dicts(2_000_000),
    "a million one-tuples": lambda: _tuples(1_000_000),
    "a memoised bytes copied by bytearray": lambda: _bytearray_copies(200),
    "a memoised size list copied by torch.Size": lambda: _size_copies(200),
}


@pytest.mark.parametrize("name", sorted(HOSTILE_PICKLES))
def test_dense_pickle_is_refused_before_decoding(tmp_path, name):
    path = _zip_with_pickle(tmp_path, HOSTILE_PICKLES[name]())
    with pytest.raises(BudgetExceededError) as info:
        read_torch_metadata(path)
    assert info.value.what == "the pickle"
    assert info.value.needed > info.value.budget
    assert "times its" in str(info.value) and "MiB" in str(info.value)
    with pytest.raises(BudgetExceededError):
        cm.load(path, upgrade=False)


def test_dense_legacy_pickle_is_refused(tmp_path):
    from hostile import legacy_with_main_pickle

    good = save_torch({"w": torch.zeros(2)}, tmp_path / "good.pt", legacy=True)
    path = tmp_path / "bomb.pt"
    path.write_bytes(legacy_with_main_pickle(good, _empty_sets(2_000_000)))
    with pytest.raises(BudgetExceededError):
        read_torch_metadata(path)


def test_budget_error_is_a_format_error_and_exits_2(tmp_path):
    path = _zip_with_pickle(tmp_path, _empty_dicts(2_000_000))
    with pytest.raises(CheckpointFormatError):
        read_torch_metadata(path)
    run = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "info", str(path)], capture_output=True, text=True
    )
    assert run.returncode == 2
    assert run.stderr.startswith("ckptmigrate: error:") and "budget" in run.stderr


_PEAK = """
import resource, sys
from ckptmigrate.formats.torch import MAX_PICKLE_BYTES, read_torch_metadata
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    read_torch_metadata(sys.argv[1])
except Exception as exc:
    print(type(exc).__name__)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
"""


def test_refused_pickle_stays_small_in_memory(tmp_path):
    # 2 MB of EMPTY_SET decoded to 800 MiB before the budget
    path = _zip_with_pickle(tmp_path, _empty_sets(2_000_000))
    run = subprocess.run(
        [sys.executable, "-c", _PEAK, str(path)], capture_output=True, text=True, check=True
    )
    error, grown_mib = run.stdout.split()
    assert error == "BudgetExceededError"
    assert int(grown_mib) < 100


def test_state_dict_of_20k_tiny_tensors_loads(tmp_path):
    sd = OrderedDict((f"layers.{i}.weight", torch.full((1,), float(i))) for i in range(20_000))
    path = save_torch(sd, tmp_path / "many.pth")
    meta = read_torch_metadata(path)
    assert len(meta) == 20_000
    assert meta["layers.19999.weight"].shape == (1,)


def test_dense_but_real_pickles_load(tmp_path):
    # what real files hold densely: 20k empty dicts, int lists, scalars, Counter and set
    obj = {
        "dicts": [{} for _ in range(20_000)],
        "ints": [list(range(100)) for _ in range(200)],
        "scalars": {f"p{i}": torch.zeros(()) for i in range(5_000)},
        "counts": __import__("collections").Counter("abracadabra"),
        "tags": {"a", "b"},
    }
    path = save_torch(obj, tmp_path / "dense.pth")
    meta = read_torch_metadata(path)
    assert len(meta["dicts"]) == 20_000 and meta["counts"]["a"] == 5
    assert meta["tags"] == {"a", "b"}


def test_device_tensor_with_a_list_for_device_is_refused():
    from ckptmigrate.formats.torch import TorchConstant, allowlist

    stub = allowlist._rebuild_meta_tensor_no_storage(
        TorchConstant("torch.float32"), (2,), (1,), False
    )
    with pytest.raises(CheckpointFormatError, match="not a device"):
        allowlist._rebuild_device_tensor_from_cpu_tensor(
            stub, TorchConstant("torch.float32"), [[0] * 10] * 10, False
        )


# --------------------------------------------------------------------------- safetensors


def _header_file(tmp_path: Path, raw: bytes, data: bytes = b"") -> Path:
    path = tmp_path / "h.safetensors"
    path.write_bytes(safetensors_bytes(None, data, raw_header=raw))
    return path


@pytest.mark.parametrize(
    "shape",
    [
        "empty objects",  # 40 MB of "aN": {} took 1.08 GiB to parse
        "empty lists",
    ],
)
def test_dense_safetensors_header_is_refused_before_parsing(tmp_path, shape):
    if shape == "empty objects":
        raw = ("{" + ",".join(f'"a{i}":{{}}' for i in range(500_000)) + "}").encode()
    else:
        raw = ('{"a":[' + ",".join(["[]"] * 2_000_000) + "]}").encode()
    path = _header_file(tmp_path, raw)
    with pytest.raises(BudgetExceededError) as info:
        read_safetensors_header(path)
    assert info.value.what == "the safetensors header"
    assert "16 times its" in str(info.value)


def test_safetensors_file_with_20k_tensors_reads(tmp_path):
    from safetensors.torch import save_file

    tensors = {f"layers.{i}.weight": torch.zeros(1) for i in range(20_000)}
    path = tmp_path / "many.safetensors"
    save_file(tensors, str(path), metadata={"ckptmigrate.hparams": json.dumps({"n": 1})})
    found, metadata = read_safetensors_header(path)
    assert len(found) == 20_000 and "ckptmigrate.hparams" in metadata


def test_dense_dcp_metadata_is_refused(tmp_path):
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(_empty_sets(2_000_000))
    from ckptmigrate.formats.dcp import read_dcp_metadata

    with pytest.raises(BudgetExceededError):
        read_dcp_metadata(folder)


# --------------------------------------------------------------------------- copies and hashing
# Work the C unpickler does in proportion to what objects hold, not to opcode bytes; no code of
# ours runs during it, so the opcode walk's stack model refuses it before decoding.


def _build_copies(n: int, items: int = 100_000) -> bytes:
    """A memoised dict of 100k entries copied by BUILD into n OrderedDicts' ``__dict__``
    (7 bytes a copy: 1.2 MB took 750 MiB to decode)."""
    head = b"\x80\x02ccollections\nOrderedDict\nq\x00}q\x01("
    head += b"".join(b"J" + struct.pack("<i", i) + b"N" for i in range(items)) + b"u"
    return head + b"](" + b"h\x00)Rh\x01b" * n + b"e."


def _shared_tuple_key(levels: int, fetch: bytes = b"h\x00h\x00") -> bytes:
    """``t = (t, t)`` ``levels`` deep through the memo, then a dict key: hashed as a tree."""
    return b"\x80\x02)q\x00" + (fetch + b"\x86q\x00") * levels + b"}h\x00Ns."


def test_build_copying_a_memoised_dict_is_refused_before_decoding(tmp_path):
    path = _zip_with_pickle(tmp_path, _build_copies(200))
    with pytest.raises(BudgetExceededError) as info:
        read_torch_metadata(path)
    assert "MiB" in str(info.value) and info.value.needed > info.value.budget


@pytest.mark.parametrize(
    "fetch", [b"h\x00h\x00", b"h\x002"], ids=["memo-get", "dup"]  # BINGET twice; BINGET, DUP
)
def test_hashing_a_shared_tuple_tree_is_refused_before_decoding(tmp_path, fetch):
    # 27 levels took 1.2 s inside the C unpickler (doubling per level; 40 levels: hours)
    import time

    from ckptmigrate.errors import HashingBudgetExceededError

    path = _zip_with_pickle(tmp_path, _shared_tuple_key(27, fetch))
    started = time.perf_counter()
    with pytest.raises(HashingBudgetExceededError) as info:
        read_torch_metadata(path)
    assert time.perf_counter() - started < 0.5
    assert isinstance(info.value, BudgetExceededError) and "hash" in str(info.value)


def test_hashing_a_shared_tuple_in_a_set_is_refused(tmp_path):
    # the same tree as an item of EMPTY_SET + ADDITEMS, in a DCP .metadata (protocol 4)
    levels = b"".join(b"h%ch%c\x86\x94" % (i, i) for i in range(27))  # MEMOIZE numbers up
    pkl = b"\x80\x04)\x94" + levels + b"\x8f(h\x1b\x90."
    from ckptmigrate.formats.dcp import read_dcp_metadata

    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pkl)
    with pytest.raises(BudgetExceededError):
        read_dcp_metadata(folder)


def test_a_corrupt_tail_does_not_escape_the_budget(tmp_path):
    # the opcodes before a bad one still run: two million EMPTY_SETs, then an unknown opcode,
    # decoded to 450 MiB before the unpickler met the bad byte
    path = _zip_with_pickle(tmp_path, _empty_sets(2_000_000)[:-2] + b"\xff")
    with pytest.raises(BudgetExceededError):
        read_torch_metadata(path)


def test_state_dict_with_metadata_and_tied_weights_loads(tmp_path):
    # torch.save's own BUILD (the state_dict's _metadata) and a tensor fetched twice from the
    # memo (tied weights) take the stack model's path and still load
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    sd = model.state_dict()
    sd["tied.weight"] = sd["0.weight"]
    assert hasattr(sd, "_metadata")
    path = save_torch(
        {"model": sd, "shape_keys": {(1, 2): "a", (1, (2, 3)): "b"}}, tmp_path / "m.pth"
    )
    meta = read_torch_metadata(path)
    assert meta["model"]["tied.weight"].shape == (4, 4)
    assert meta["shape_keys"][(1, (2, 3))] == "b"
    assert cm.load(path, upgrade=False) is not None


def _int_keys(keys: list[int]) -> bytes:
    """A dict of ``keys`` (to None), in SETITEMS batches of 1000 as pickle writes them, built
    without hashing them here (a Python dict of them costs what the decode costs)."""
    import pickle

    def long1(k: int) -> bytes:
        body = pickle.encode_long(k)
        return b"\x8a" + bytes([len(body)]) + body

    out = [b"\x80\x02}q\x00"]
    for at in range(0, len(keys), 1000):
        out.append(b"(" + b"".join(long1(k) + b"N" for k in keys[at : at + 1000]) + b"u")
    return b"".join(out) + b"."


def test_int_keys_of_one_hash_are_refused_before_decoding(tmp_path):
    # k * (2**61 - 1) all hash to 0: 20k such keys (260 KB) took 2.6 s of n**2 / 2 probes in
    # the C unpickler (2.6 MB: minutes); the walk counts them as keys that may all collide
    path = _zip_with_pickle(tmp_path, _int_keys([k * (2**61 - 1) for k in range(1, 20_001)]))
    code = (
        "import sys; import ckptmigrate as cm\n"
        "from ckptmigrate.errors import HashingBudgetExceededError as E\n"
        "from ckptmigrate.formats.torch import read_torch_metadata\n"
        "for read in (read_torch_metadata, lambda p: cm.load(p, upgrade=False)):\n"
        "    try:\n"
        "        read(sys.argv[1])\n"
        "    except E as exc:\n"
        "        assert 'hash' in str(exc)\n"
        "    else:\n"
        "        sys.exit('not refused')\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr[-2000:]


def test_a_few_hundred_big_int_keys_still_load(tmp_path):
    import random

    rng = random.Random(7)
    keys = {rng.getrandbits(64) | 1 << 63: i for i in range(300)}
    keys.update({k * (2**61 - 1): "one hash" for k in range(1, 200)})  # few: 20k probes
    path = save_torch({"model": {"w": torch.zeros(2)}, "ids": keys}, tmp_path / "ids.pth")
    assert read_torch_metadata(path)["ids"] == keys
    assert cm.load(path, upgrade=False) is not None
    # a list of big ints (no keys) past the walk's threshold runs the model and loads too
    many = save_torch({"w": torch.zeros(2), "seeds": list(keys) * 10}, tmp_path / "many.pth")
    assert len(read_torch_metadata(many)["seeds"]) == 10 * len(keys)


def _time_ns_keys(n: int) -> dict[int, float]:
    import time

    start = time.time_ns()  # 64-bit ints (about 2**60.6): each hashes to itself
    return {start + i * 997: float(i) for i in range(n)}


def _random_keys(n: int) -> dict[int, int]:
    import random

    rng = random.Random(11)
    return {rng.getrandbits(64) | 1 << 63: i for i in range(n)}  # hashes modulo 2**61 - 1


ORDINARY_INT_KEYS = {
    "2k time_ns keys": lambda: _time_ns_keys(2_000),
    "20k time_ns keys": lambda: _time_ns_keys(20_000),
    "20k random 64-bit keys": lambda: _random_keys(20_000),
}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", sorted(ORDINARY_INT_KEYS))
def test_many_ordinary_big_int_keys_load(tmp_path, name, legacy):
    # only keys of one hash probe each other: distinct 64-bit ids cost no more than strings
    keys = ORDINARY_INT_KEYS[name]()
    hparams = {"ids": keys}
    obj = {"model": {"w": torch.zeros(2)}, "hparams": hparams}
    path = save_torch(obj, tmp_path / "ids.pt", legacy=legacy)
    assert read_torch_metadata(path)["hparams"] == hparams
    assert cm.load(path, upgrade=False) is not None


def test_random_big_ints_in_every_hashed_container_load(tmp_path):
    from processes import run

    keys = list(_random_keys(20_000))
    obj = {
        "model": {"w": torch.zeros(2)},
        "set": set(keys),  # builtins.set given a list
        "ordered": OrderedDict((k, 1) for k in keys),  # SETITEMS on a REDUCE's result
        "pairs": {(k, k + 1): 1 for k in keys},  # a tuple's hash, made of its items'
    }
    path = save_torch(obj, tmp_path / "keys.pth")
    meta = read_torch_metadata(path)
    assert meta["set"] == obj["set"] and meta["pairs"] == obj["pairs"]
    assert cm.load(path, upgrade=False) is not None
    proc = run(tmp_path, "info", str(path), timeout=60)
    assert proc.returncode == 0, proc.stderr


def _colliding_tuples(n: int) -> list[tuple[int, int]]:
    """``n`` pairs of long ints whose first items' hashes all differ and whose tuple hashes
    are all one (CPython's tuple hash solved for the second item)."""
    import random

    mask, rng = (1 << 64) - 1, random.Random(3)
    prime1, prime2, prime5 = 11400714785074694791, 14029467366897019727, 2870177450012600261

    def lane(acc: int, item_hash: int) -> int:
        acc = (acc + (item_hash & mask) * prime2) & mask
        acc = ((acc << 31) | (acc >> 33)) & mask
        return acc * prime1 & mask

    target = lane(lane(prime5, 1 << 62), 1 << 62)  # after two lanes; the length adds alike
    pairs = []
    while len(pairs) < n:
        first = rng.getrandbits(61) | 1 << 60
        # undo the last lane: the second item's hash that brings the tuple to the target
        acc = target * pow(prime1, -1, 1 << 64) & mask
        acc = ((acc >> 31) | (acc << 33)) & mask
        second = (acc - lane(prime5, first)) * pow(prime2, -1, 1 << 64) & mask
        second -= (second >> 63) << 64
        if 1 << 60 < abs(second) < 2**61 - 1:  # a long int that hashes to itself
            pairs.append((first, second))
    return pairs


def _keys_pickle(keys: list[bytes]) -> bytes:
    """A dict of pickled ``keys`` (to None), in SETITEMS batches of 1000."""
    out = [b"\x80\x02}q\x00"]
    for at in range(0, len(keys), 1000):
        out.append(b"(" + b"N".join(keys[at : at + 1000]) + b"Nu")
    return b"".join(out) + b"."


def _long1(k: int) -> bytes:
    import pickle

    body = pickle.encode_long(k)
    return b"\x8a" + bytes([len(body)]) + body


_ONE_HASH = [k * (2**61 - 1) for k in range(1, 20_001)]
INT_FLOODS = {
    "frozenset of one hash": lambda: b"\x80\x04(" + b"".join(map(_long1, _ONE_HASH)) + b"\x91.",
    "set() of a list": lambda: (
        b"\x80\x02c__builtin__\nset\n](" + b"".join(map(_long1, _ONE_HASH)) + b"e\x85R."
    ),
    "set() of a tuple": lambda: (
        b"\x80\x02c__builtin__\nset\n(" + b"".join(map(_long1, _ONE_HASH)) + b"t\x85R."
    ),
    "pairs of one tuple hash": lambda: _keys_pickle(
        [_long1(a) + _long1(b) + b"\x86" for a, b in _colliding_tuples(20_000)]
    ),
    "20k random keys and 5k of one hash": lambda: _keys_pickle(
        list(map(_long1, [*_random_keys(20_000), *_ONE_HASH[:5_000]]))
    ),
}


@pytest.mark.parametrize("name", sorted(INT_FLOODS))
def test_int_floods_in_any_hashed_container_are_refused(tmp_path, name):
    from ckptmigrate.errors import HashingBudgetExceededError

    path = _zip_with_pickle(tmp_path, INT_FLOODS[name]())
    with pytest.raises(HashingBudgetExceededError):
        read_torch_metadata(path)


def test_a_few_hundred_keys_of_one_hash_among_many_random_ones_load(tmp_path):
    keys = {**_random_keys(20_000), **{k: "one hash" for k in _ONE_HASH[:300]}}  # 45k probes
    path = save_torch({"model": {"w": torch.zeros(2)}, "ids": keys}, tmp_path / "mixed.pth")
    assert read_torch_metadata(path)["ids"] == keys


# --------------------------------------------------------------------------- DCP transforms


def _zstd_dcp(folder: Path, **values: object) -> dict:
    """A DCP folder torch writes with its zstd stream transform on every chunk (``values``:
    more entries it stores as bytes)."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint._extension import ZStandard

    torch.manual_seed(0)
    model = {"blocks.0.weight": torch.randn(32, 32), "blocks.0.rotary": torch.randn(3)}
    state = {"model": {**model, "head.bias": torch.arange(5)}, "epoch": 7, **values}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save(state, storage_writer=FileSystemWriter(folder, _extensions=[ZStandard()]))
    return state


def test_zstd_dcp_checkpoint_loads_and_upgrades(tmp_path):
    pytest.importorskip("zstandard")
    from folder_schema import rename_drop_schema

    from ckptmigrate.engine.rewrite import upgrade_file
    from ckptmigrate.io.files import read_checkpoint

    state = _zstd_dcp(tmp_path / "z")
    md = pickle_load_metadata(tmp_path / "z")
    assert all(info.transform_descriptors for info in md.storage_data.values())
    ckpt = read_checkpoint(tmp_path / "z")
    weight = state["model"]["blocks.0.weight"]
    assert torch.equal(ckpt.state_dict["blocks.0.weight"], weight) and ckpt.extra["epoch"] == 7
    upgrade_file(tmp_path / "z", tmp_path / "out", rename_drop_schema(), from_version="1.0.0")
    upgraded = read_checkpoint(tmp_path / "out")
    assert torch.equal(upgraded.state_dict["layers.0.weight"], weight)
    assert upgraded.extra["epoch"] == 7


def pickle_load_metadata(folder: Path):
    import pickle

    return pickle.loads((folder / ".metadata").read_bytes())  # our own test file: trusted


def _inflating_chunk(folder: Path, fqn: str, inflated: int) -> None:
    """Point ``fqn``'s chunk at a zstd frame of ``inflated`` zero bytes (a few KB on disk)."""
    _chunk_of(folder, fqn, (bytes(1 << 20) for _ in range(inflated >> 20)))


def _chunk_of(folder: Path, fqn: str, pieces: Iterable[bytes], *, zstd: bool = True) -> None:
    """Point ``fqn``'s chunk at a zstd frame of ``pieces`` (or at ``pieces`` as they are),
    appended to its data file."""
    import dataclasses
    import pickle

    import zstandard

    md = pickle_load_metadata(folder)
    index = next(i for i in md.storage_data if i.fqn == fqn)
    info = md.storage_data[index]
    if zstd:
        compressor = zstandard.ZstdCompressor().compressobj()
        frame = b"".join(compressor.compress(piece) for piece in pieces) + compressor.flush()
    else:
        frame = b"".join(pieces)
    with open(folder / info.relative_path, "ab") as f:
        offset = f.tell()
        f.write(frame)
    transforms = info.transform_descriptors if zstd else None
    md.storage_data[index] = dataclasses.replace(
        info, offset=offset, length=len(frame), transform_descriptors=transforms
    )
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def test_zstd_chunk_inflating_past_its_declared_size_is_refused(tmp_path):
    # the tensor declares 4 KiB; its chunk inflates to 256 MiB (torch read it whole first)
    pytest.importorskip("zstandard")
    from ckptmigrate.io.files import read_checkpoint

    fqn = "model.blocks.0.weight"
    _zstd_dcp(tmp_path / "z")
    _inflating_chunk(tmp_path / "z", fqn, 256 << 20)
    assert (tmp_path / "z" / "__0_0.distcp").stat().st_size < 200_000
    with pytest.raises(BudgetExceededError) as info:
        read_checkpoint(tmp_path / "z")
    assert repr(fqn) in info.value.what and "stream.zstd" in info.value.what
    assert info.value.budget < (80 << 20)


def test_zstd_value_inflating_past_the_pickle_cap_is_refused(tmp_path):
    # a value stored as bytes declares no size: it may inflate to the 1 GiB cap of a data.pkl
    pytest.importorskip("zstandard")
    from ckptmigrate.io.files import read_checkpoint

    _zstd_dcp(tmp_path / "z")
    _inflating_chunk(tmp_path / "z", "epoch", MAX_PICKLE_BYTES + (2 << 20))
    with pytest.raises(BudgetExceededError) as info:
        read_checkpoint(tmp_path / "z")
    assert info.value.what.startswith("value 'epoch' in __0_0.distcp, inflated by stream.zstd")
    assert info.value.budget == MAX_PICKLE_BYTES and "None" not in str(info.value)


def test_zstd_value_compressed_far_below_its_size_loads(tmp_path):
    # 80 MB of text zstd keeps in a few KB: the bound on its stored bytes (64 MiB) refused it
    pytest.importorskip("zstandard")
    from ckptmigrate.io.files import read_checkpoint

    log = "step ok\n" * 10_000_000
    _zstd_dcp(tmp_path / "z", log=log)
    assert (tmp_path / "z" / "__0_0.distcp").stat().st_size < 100_000
    assert read_checkpoint(tmp_path / "z").extra["log"] == log
    assert cm.load(tmp_path / "z", upgrade=False).extra["log"] == log


@pytest.mark.parametrize("zstd", [True, False], ids=["zstd", "plain"])
def test_dcp_value_of_a_dense_pickle_is_refused_before_torch_decodes_it(tmp_path, zstd):
    # 2 MB of EMPTY_SET in a torch zip (zstd: a few KB): torch's loader took 800 MiB for it
    pytest.importorskip("zstandard")
    from ckptmigrate.io.files import read_checkpoint

    _zstd_dcp(tmp_path / "z")
    bomb = _zip_with_pickle(tmp_path, _empty_sets(2_000_000)).read_bytes()
    _chunk_of(tmp_path / "z", "epoch", [bomb], zstd=zstd)
    with pytest.raises(BudgetExceededError) as info:
        read_checkpoint(tmp_path / "z")
    assert info.value.what == "value 'epoch'" and info.value.path == str(tmp_path / "z")


# --------------------------------------------------------------------------- files read whole


def _read_whole(tmp_path: Path, kind: str) -> tuple[Path, Path, int]:
    """A real checkpoint whose ``kind`` of file ckptmigrate reads whole: (what to read, that
    file, its cap)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from ckptmigrate.engine.inplace import stamp_in_place
    from ckptmigrate.formats.bounds import MAX_JSON_FILE_BYTES
    from ckptmigrate.formats.dcp import METADATA_FILE, STAMP_FILE

    if kind == "index":
        index = write_set(tmp_path / "set", {"model-00001-of-00001.safetensors": _TENSORS})
        return index, index, MAX_JSON_FILE_BYTES
    folder = tmp_path / "dcp"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": dict(_TENSORS), "epoch": 7}, checkpoint_id=folder)
    stamp_in_place(folder, "toy", "1.0.0")  # its ckptmigrate.json
    if kind == "dcp-metadata":
        return folder, folder / METADATA_FILE, MAX_PICKLE_BYTES
    return folder, folder / STAMP_FILE, MAX_JSON_FILE_BYTES


_TENSORS = {"blocks.0.weight": torch.ones(2)}
WHOLE_FILES = ["index", "dcp-metadata", "dcp-stamp"]


def _reader_of(kind: str):
    """The function that reads that kind of file whole."""
    from ckptmigrate.formats import dcp, sharded

    return {
        "index": sharded.read_index,
        "dcp-metadata": dcp.read_dcp_metadata,
        "dcp-stamp": dcp.read_stamp_file,
    }[kind]


@pytest.mark.parametrize("kind", WHOLE_FILES)
def test_a_file_read_whole_past_its_cap_is_refused_before_it_is_read(tmp_path, kind):
    # a 20 GB sparse model.safetensors.index.json made `info` read 20 GB into memory
    from ckptmigrate.errors import FileTooLargeError
    from ckptmigrate.io.files import read_metadata

    path, whole, cap = _read_whole(tmp_path, kind)
    assert read_metadata(path).state_dict.keys() == _TENSORS.keys()  # as written: it loads
    with open(whole, "r+b") as f:
        f.truncate(cap + 1)  # sparse: made at once, read whole it is cap + 1 bytes
    for read in (_reader_of(kind), read_metadata, lambda p: cm.load(p, upgrade=False)):
        with pytest.raises(FileTooLargeError) as info:
            read(path)
        assert info.value.budget == cap and info.value.path == str(whole)
    with open(whole, "r+b") as f:
        f.truncate(20 << 30)
    # a real process, where reading 20 GB could only fail: refused at once, one line
    line = one_error_line(run(tmp_path, "info", str(path), timeout=60, address_space=3 << 30))
    assert f"holds {20 << 30} bytes or more, over the {cap >> 20} MiB cap" in line


@pytest.mark.parametrize("kind", WHOLE_FILES)
def test_a_fifo_named_as_a_file_read_whole_is_refused_without_blocking(tmp_path, kind):
    from ckptmigrate.io.files import read_metadata

    path, whole, _ = _read_whole(tmp_path, kind)
    whole.unlink()
    os.mkfifo(whole)
    with no_hang():
        with pytest.raises(CheckpointFormatError, match="not a regular file"):
            _reader_of(kind)(path)
        with pytest.raises(CheckpointFormatError):
            read_metadata(path)
    one_error_line(run(tmp_path, "info", str(path), timeout=60))


@pytest.mark.parametrize("journal", ["sparse-20-gb", "fifo"])
def test_a_journal_too_large_or_not_a_file_is_kept_and_the_set_upgrades(tmp_path, journal):
    # every journal in the folder is read before a set is rewritten; one that cannot be read
    # is not ours: kept, and the upgrade goes on
    from toy import TOY_MIGRATIONS

    from ckptmigrate.io.files import read_metadata

    index = write_set(
        tmp_path / "set", {"model-00001-of-00001.safetensors": _TENSORS}, version="1.0.0"
    )
    pending = index.parent / "other.safetensors.index.json.ckptmigrate-pending"
    if journal == "fifo":
        os.mkfifo(pending)
    else:
        with open(pending, "wb") as f:
            f.truncate(20 << 30)
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "toy_migrations.py").write_text(TOY_MIGRATIONS)
    mig = ["--migrations", str(tmp_path / "mig")]
    done = run(
        tmp_path,
        "upgrade",
        str(index),
        "--in-place",
        "--to",
        "2.0.0",
        *mig,
        timeout=60,
        address_space=3 << 30,
    )
    assert done.returncode == 0, done.stderr
    assert str(read_metadata(index).version) == "2.0.0"
    assert pending.is_fifo() if journal == "fifo" else pending.stat().st_size == 20 << 30


def test_a_file_that_grows_while_it_is_read_is_refused(tmp_path, monkeypatch):
    # the size was checked on the descriptor; what is read past it counts too
    from ckptmigrate.errors import FileTooLargeError
    from ckptmigrate.formats.detect import read_bounded

    path = tmp_path / "model.safetensors.index.json"
    path.write_bytes(b"{}" + b" " * 98)
    real_fstat = os.fstat

    def fstat_before_growth(fd: int) -> os.stat_result:
        st = real_fstat(fd)
        return os.stat_result((*st[:6], 2, *st[7:10]))  # it held 2 bytes when looked at

    monkeypatch.setattr(os, "fstat", fstat_before_growth)
    with pytest.raises(FileTooLargeError) as info:
        read_bounded(path, 50, "the index JSON", "a JSON file read whole")
    assert info.value.needed == 51 and info.value.budget == 50
