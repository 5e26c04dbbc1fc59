"""Fuzzing the readers: mutated torch zips, data.pkl bytes, legacy files, safetensors headers,
DCP ``.metadata`` pickles and ``ckptmigrate.json``, sharded indexes, stamps and Lightning dicts
raise nothing but our own errors, from the metadata-only reader and from the full loader.

Byte mutations break containers; structure-aware ones decode a real file's tree (JSON, the
stamp dict, DCP's Metadata objects), replace a node by another type, nest it deeper, duplicate
or drop it, and write it back, so the mutation gets past the parser to the validating layer.

Brief in CI; for a long run by hand: ``CKPTMIGRATE_FUZZ_EXAMPLES=3000 pytest tests/test_fuzz.py``.
With ``CKPTMIGRATE_FUZZ_LOG=FILE`` each escape is appended to FILE (and the run goes on) and
each example is counted there, per test, so that one long run reports every escape it finds.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import pickle
import shutil
import struct
import tempfile
import traceback
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from hostile import data_pkl, no_hang, replace_member, stamp, toy_sd
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st

import ckptmigrate as cm
from ckptmigrate.errors import CkptMigrateError
from ckptmigrate.io.files import read_checkpoint, read_metadata

EXAMPLES = int(os.environ.get("CKPTMIGRATE_FUZZ_EXAMPLES", "200"))
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


LOG = os.environ.get("CKPTMIGRATE_FUZZ_LOG")
#: An example that takes longer than this is a hang (the readers take milliseconds).
HANG_SECONDS = 30


def only_our_errors(path: Path, *, mmap: bool = False) -> None:
    """Both readers either read the file or raise a CkptMigrateError; nothing else escapes,
    and no read hangs."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split("::")[-1].split(" ")[0]
    reads: list[tuple[str, Callable[[], object]]] = [
        ("read_metadata", lambda: read_metadata(path)),
        ("read_checkpoint", lambda: read_checkpoint(path)),
    ]
    if mmap:
        reads.append(("read_checkpoint mmap", lambda: read_checkpoint(path, mmap=True)))
    for name, read in reads:
        try:
            with no_hang(HANG_SECONDS), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read()
        except CkptMigrateError:
            pass
        except BaseException as exc:  # an escape, a crash or a hang
            if LOG is None or isinstance(exc, KeyboardInterrupt):
                raise
            where = traceback.extract_tb(exc.__traceback__)[-1]
            with open(LOG, "a") as log:
                log.write(
                    json.dumps(
                        {
                            "test": test,
                            "reader": name,
                            "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                            "at": f"{Path(where.filename).name}:{where.lineno}",
                        }
                    )
                    + "\n"
                )


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


# ----------------------------------------------------------------------------- tree mutations

#: Stands for a tensor in a tree that is torch.saved: any node may become one.
TENSOR = "\x00tensor"
_values = _json | st.just(TENSOR)
_tree_edit = st.tuples(
    st.sampled_from(["replace", "deepen", "duplicate", "drop", "add", "retype"]),
    st.floats(0, 1, exclude_max=True),
    _values,
    st.sampled_from([1, 2, 50, 199, 201, 400]),
)


def _children(node: Any) -> list[Any]:
    """The keys (dict keys, list indices, dataclass fields) of a mutable view of ``node``."""
    if isinstance(node, dict):
        return list(node)
    if isinstance(node, (list, tuple)):
        return list(range(len(node)))
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return [f.name for f in dataclasses.fields(node)]
    return []


def _get(node: Any, key: Any) -> Any:
    if isinstance(node, (dict, list, tuple)):
        return node[key]
    return getattr(node, key)


def _paths(root: Any, limit: int = 400) -> list[tuple[Any, ...]]:
    """Every node's path from the root (breadth first, the first ``limit``)."""
    found: list[tuple[Any, ...]] = [()]
    queue = [((), root)]
    while queue and len(found) < limit:
        path, node = queue.pop(0)
        for key in _children(node):
            child = _get(node, key)
            found.append((*path, key))
            queue.append(((*path, key), child))
    return found


def _with(node: Any, key: Any, value: Any) -> Any:
    """A copy of ``node`` with ``key`` set to ``value`` (tuples and frozen dataclasses too)."""
    if isinstance(node, dict):
        out = copy.copy(node)
        out[key] = value
        return out
    if isinstance(node, list):
        return [value if i == key else v for i, v in enumerate(node)]
    if isinstance(node, tuple):
        items = [value if i == key else v for i, v in enumerate(node)]
        try:
            return type(node)(items)  # torch.Size, a plain tuple
        except TypeError:
            return tuple(items)
    out = copy.copy(node)
    object.__setattr__(out, key, value)
    return out


def _set_at(root: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    return _with(root, path[0], _set_at(_get(root, path[0]), path[1:], value))


def _edit_node(node: Any, kind: str, value: Any, depth: int) -> Any:
    if kind == "replace":
        return value
    if kind == "deepen":
        for i in range(depth):
            node = [node] if i % 2 else {"k": node}
        return node
    if kind == "duplicate":
        return [node, node] if depth % 2 else {"a": node, "b": copy.deepcopy(node)}
    if kind == "drop":
        if isinstance(node, dict) and node:
            return {k: v for i, (k, v) in enumerate(node.items()) if i != depth % len(node)}
        if isinstance(node, (list, tuple)) and node:
            return list(node)[:-1]
        return None
    if kind == "add":
        if isinstance(node, dict):
            return {**node, f"x{depth}": value}
        if isinstance(node, (list, tuple)):
            return [*node, value]
        return [node, value]
    # retype: the same content in a container of another kind
    if isinstance(node, dict):
        return list(node.items())
    if isinstance(node, (list, tuple)):
        return {str(i): v for i, v in enumerate(node)}
    return str(node) if not isinstance(node, str) else [node]


def mutate_tree(root: Any, edits: list[tuple[str, float, Any, int]]) -> Any:
    """``root`` with each edit applied to one node picked from its current tree; deepening
    adds at most 600 levels in all (past the readers' 200, short of what torch.save, json and
    this harness can themselves nest)."""
    budget = 600
    for kind, where, value, depth in edits:
        if kind == "deepen":
            depth = min(depth, budget)
            budget -= depth
        paths = _paths(root)
        path = paths[int(where * len(paths))]
        node = root
        for key in path:
            node = _get(node, key)
        root = _set_at(root, path, _edit_node(node, kind, value, depth))
    return root


def _tensors_in(tree: Any) -> Any:
    """The tree with each TENSOR marker a real tensor (for torch.save)."""
    if isinstance(tree, str) and tree == TENSOR:
        return torch.ones(2)
    if isinstance(tree, dict):
        return {k: _tensors_in(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_tensors_in(v) for v in tree]
    return tree


def _json_safe(tree: Any) -> Any:
    return json.loads(json.dumps(tree, default=str))


_tree_edits = st.lists(_tree_edit, min_size=1, max_size=4)

# ----------------------------------------------------------------------------- stamps, Lightning

_STAMP = stamp("1.0.0")
_MOUNTED = stamp(
    "1.0.0",
    format=2,
    mounts=[{"prefix": "blocks.", "schema": "net", "version": "2.0.0", "history": []}],
)


@FUZZ
@given(edits=_tree_edits, mounted=st.booleans(), legacy=st.booleans())
def test_mutated_stamps_in_torch_files_raise_only_our_errors(
    edits: list, mounted: bool, legacy: bool
) -> None:
    tree = {
        "__ckptmigrate__": _MOUNTED if mounted else _STAMP,
        "hparams": {"width": 4, "layers": [1, 2]},
        "meta": {"note": "x"},
    }
    parts = _tensors_in(mutate_tree(tree, edits))
    obj = {
        "state_dict": toy_sd(),
        **(parts if isinstance(parts, dict) else {"__ckptmigrate__": parts}),
    }
    path = _WORK / "stamp.pth"
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    only_our_errors(path, mmap=True)


@FUZZ
@given(edits=_tree_edits)
def test_mutated_flat_metadata_raises_only_our_errors(edits: list) -> None:
    tree = {"": {"version": 1, "__ckptmigrate__": {**_STAMP, "hparams": {}, "meta": {}}}}
    sd = OrderedDict(toy_sd())
    mutated = _tensors_in(mutate_tree(tree, edits))
    sd._metadata = OrderedDict(mutated) if isinstance(mutated, dict) else mutated  # type: ignore[attr-defined]
    path = _WORK / "flat.pth"
    torch.save(sd, path)
    only_our_errors(path, mmap=True)


_LIGHTNING = {
    "epoch": 3,
    "global_step": 30,
    "pytorch-lightning_version": "2.4.0",
    "state_dict": {"net.w": TENSOR, "net.b": TENSOR},
    "hyper_parameters": {"lr": 0.1, "dims": [4, 4]},
    "optimizer_states": [
        {
            "state": {0: {"step": TENSOR, "exp_avg": TENSOR}},
            "param_groups": [{"lr": 0.1, "params": [0, 1]}],
        }
    ],
    "lr_schedulers": [{"last_epoch": 3}],
    "callbacks": {"ModelCheckpoint": {"best": 0.5}},
}


@FUZZ
@given(edits=_tree_edits)
def test_mutated_lightning_dicts_raise_only_our_errors(edits: list) -> None:
    path = _WORK / "lightning.ckpt"
    torch.save(_tensors_in(mutate_tree(_LIGHTNING, edits)), path)
    only_our_errors(path, mmap=True)


# ----------------------------------------------------------------------------- safetensors JSON


@FUZZ
@given(edits=_tree_edits, as_string=st.booleans())
def test_mutated_safetensors_header_trees_raise_only_our_errors(
    edits: list, as_string: bool
) -> None:
    """Our header entries decoded to one tree with the tensor records, mutated, re-encoded."""
    header = json.loads(json.dumps(ST_HEADER))
    meta = header["__metadata__"]
    meta["ckptmigrate.aliases"] = json.dumps({"tied": sorted(k for k in header if k[0] != "_")[0]})
    tree = {
        **{k: v for k, v in header.items() if k != "__metadata__"},
        "__metadata__": {
            k: json.loads(v) if k.startswith("ckptmigrate.") else v for k, v in meta.items()
        },
    }
    mutated = _json_safe(mutate_tree(tree, edits))
    if isinstance(mutated, dict) and isinstance(mutated.get("__metadata__"), dict) and as_string:
        mutated["__metadata__"] = {
            k: json.dumps(v) if str(k).startswith("ckptmigrate.") else v
            for k, v in mutated["__metadata__"].items()
        }
    text = json.dumps(mutated).encode()
    only_our_errors(_write("tree.safetensors", struct.pack("<Q", len(text)) + text + ST_DATA))


# ----------------------------------------------------------------------------- sharded indexes


def _make_set() -> Path:
    from safetensors.torch import save_file

    folder = _WORK / "set-seed"
    folder.mkdir()
    tensors = toy_sd()
    keys = list(tensors)
    weight_map = {}
    for i, part in enumerate((keys[:2], keys[2:]), 1):
        name = f"model-{i:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in part}, str(folder / name), metadata={"format": "pt"})
        weight_map.update((k, name) for k in part)
    index = {
        "metadata": {
            "total_size": 96,
            "ckptmigrate.stamp": _STAMP,
            "ckptmigrate.hparams": {"width": 4},
            "ckptmigrate.meta": {},
        },
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


SET_SEED = _make_set()
SET_INDEX = json.loads((SET_SEED / "model.safetensors.index.json").read_text())


def _set_with_index(text: str | bytes) -> Path:
    folder = _WORK / "set"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(SET_SEED, folder)
    index = folder / "model.safetensors.index.json"
    index.write_bytes(text if isinstance(text, bytes) else text.encode())
    return folder


@FUZZ
@given(edits=_tree_edits)
def test_mutated_sharded_index_trees_raise_only_our_errors(edits: list) -> None:
    only_our_errors(_set_with_index(json.dumps(_json_safe(mutate_tree(SET_INDEX, edits)))))


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_sharded_index_bytes_raise_only_our_errors(edits: list) -> None:
    raw = (SET_SEED / "model.safetensors.index.json").read_bytes()
    only_our_errors(_set_with_index(mutate(raw, edits)))


# ----------------------------------------------------------------------------- DCP folders


def _make_dcp() -> Path:
    import torch.distributed.checkpoint as dcp

    folder = _WORK / "dcp-seed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": toy_sd(), "epoch": 7, "opt": {"lr": [0.1]}}, checkpoint_id=folder)
    (folder / "ckptmigrate.json").write_text(
        json.dumps({"stamp": _STAMP, "hparams": {"width": 4}, "meta": {}})
    )
    return folder


DCP_SEED = _make_dcp()
DCP_METADATA = (DCP_SEED / ".metadata").read_bytes()
DCP_STAMP = json.loads((DCP_SEED / "ckptmigrate.json").read_text())


def _dcp_with(metadata: bytes | None = None, stamp_file: str | bytes | None = None) -> Path:
    folder = _WORK / "dcp"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(DCP_SEED, folder)
    if metadata is not None:
        (folder / ".metadata").write_bytes(metadata)
    if stamp_file is not None:
        data = stamp_file if isinstance(stamp_file, bytes) else stamp_file.encode()
        (folder / "ckptmigrate.json").write_bytes(data)
    return folder


def _dcp_values() -> st.SearchStrategy[Any]:
    from torch.distributed.checkpoint import metadata as md

    dims = st.lists(st.integers(-2, 10), max_size=3)
    return (
        _json
        | dims.map(torch.Size)
        | st.sampled_from([torch.float32, torch.int64, torch.bool, torch.strided])
        | st.builds(
            md.ChunkStorageMetadata, offsets=dims.map(torch.Size), sizes=dims.map(torch.Size)
        )
        | st.just(md.BytesStorageMetadata())
        | st.builds(lambda: md.TensorProperties(dtype=torch.float32))
    )


@FUZZ
@given(edits=st.lists(_edit, min_size=1, max_size=4))
def test_mutated_dcp_metadata_bytes_raise_only_our_errors(edits: list) -> None:
    only_our_errors(_dcp_with(metadata=mutate(DCP_METADATA, edits)))


@FUZZ
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["replace", "deepen", "duplicate", "drop", "add", "retype"]),
            st.floats(0, 1, exclude_max=True),
            _dcp_values(),
            st.sampled_from([1, 2, 50, 199, 201]),
        ),
        min_size=1,
        max_size=4,
    )
)
def test_mutated_dcp_metadata_objects_raise_only_our_errors(edits: list) -> None:
    """DCP's own Metadata, decoded with torch's classes, one node replaced, pickled again."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        md = pickle.loads(DCP_METADATA)  # our own seed, written by dcp.save above
    try:
        data = pickle.dumps(mutate_tree(md, edits))
    except (RuntimeError, TypeError, ValueError, AttributeError, pickle.PicklingError):
        reject()  # torch's own __getstate__ refused the mutation: nothing to write
    only_our_errors(_dcp_with(metadata=data))


@FUZZ
@given(edits=_tree_edits, raw=st.lists(_edit, max_size=2))
def test_mutated_dcp_stamp_files_raise_only_our_errors(edits: list, raw: list) -> None:
    text = json.dumps(_json_safe(mutate_tree(DCP_STAMP, edits))).encode()
    only_our_errors(_dcp_with(stamp_file=mutate(text, raw) if raw else text))


# ----------------------------------------------------------------------------- recorded history

_NEW_TOY = cm.Schema("toy", current="2.0.0")
_NEW_TOY.add_migration(
    "1.0.0",
    "2.0.0",
    [
        cm.ops.RenamePrefix("blocks.", "layers."),
        cm.ops.Transpose("layers.0.weight"),
        cm.ops.SetHparam("width", 4, previous=cm.ops.ABSENT),
    ],
)
_OLD_TOY = cm.Schema("toy", current="1.0.0")  # knows none of the newer steps
_UPGRADED = cm.upgrade(cm.Checkpoint(toy_sd(), schema="toy", version="1.0.0"), _NEW_TOY)


@FUZZ
@given(edits=_tree_edits)
def test_mutated_recorded_history_raises_only_our_errors(edits: list) -> None:
    """A history whose digests and recorded inverses are mutated: older code downgrading
    through it, and today's code judging it for edited steps, raise only our errors."""
    history = _tensors_in(mutate_tree(copy.deepcopy(_UPGRADED.history), edits))
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        reject()  # the stamp's parser refuses it before any of this (test_malformed)
    ckpt = dataclasses.replace(_UPGRADED, history=history)
    for schema, to in ((_OLD_TOY, "1.0.0"), (_NEW_TOY, None), (_NEW_TOY, "1.0.0")):
        try:
            with no_hang(HANG_SECONDS), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cm.upgrade(ckpt, schema, to=to)
        except CkptMigrateError:
            pass


def test_the_fuzz_seeds_themselves_load() -> None:
    read: Callable[[Path], object]
    for read in (read_metadata, read_checkpoint):
        read(_WORK / "ours.pth")
        read(_WORK / "legacy.pth")
        read(_WORK / "st.safetensors")
        read(SET_SEED)
        read(DCP_SEED)


# ----------------------------------------------------------------------------- LoRA adapters


def _make_adapter() -> Path:
    from lora_files import factors, write_lora

    return write_lora(
        _WORK / "adapter-seed",
        {"attn.q": factors(4, 6, 2, 1), "attn.v": factors(2, 6, 2, 2)},
        rank_pattern={"v": 2},
        alpha_pattern={"v": 8},
    )


ADAPTER_SEED = _make_adapter()
ADAPTER_CONFIG = json.loads((ADAPTER_SEED / "adapter_config.json").read_text())
ADAPTER_SCHEMA = cm.Schema("toy", current="2.0.0")
ADAPTER_SCHEMA.add_migration("1.0.0", "2.0.0", [
    cm.ops.Merge(["{p}.q.{k}", "{p}.k.{k}", "{p}.v.{k}"], "{p}.qkv.{k}", 0, sizes=[4, 2, 2]),
])  # fmt: skip


@FUZZ
@given(edits=_tree_edits, raw=st.lists(_edit, max_size=2))
def test_mutated_adapter_configs_raise_only_our_errors(edits: list, raw: list) -> None:
    """An adapter's config, one node mutated: reading and following the base raise nothing
    but our errors."""
    folder = _WORK / "adapter"
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(ADAPTER_SEED, folder)
    text = json.dumps(_json_safe(mutate_tree(ADAPTER_CONFIG, edits))).encode()
    (folder / "adapter_config.json").write_bytes(mutate(text, raw) if raw else text)
    try:
        with no_hang(HANG_SECONDS), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cm.follow_base(cm.read_adapter(folder), ADAPTER_SCHEMA, from_version="1.0.0")
    except CkptMigrateError:
        pass
