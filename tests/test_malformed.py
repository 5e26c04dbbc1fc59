"""Well-formed containers holding malformed structure: every reader and command refuses each
one with our typed error (the CLI: exit 2, one ``ckptmigrate: error:`` line), never with an
AttributeError, TypeError, RecursionError or RuntimeError from deep inside.

Where ``test_bad_inputs.py`` breaks bytes, these files decode fine and lie one level up: a
safetensors alias that is a list, a DCP chunk of negative size, a sharded index whose
``weight_map`` is a list, a stamp whose version is not a string, a zip member marked encrypted.
Each is built by code from a real ``torch.save`` / safetensors / DCP / index file, then one
node of its decoded tree is replaced. ``TOLERATED`` holds odd files a reader may accept: they
read, or are refused with our error, but nothing else escapes.
"""

from __future__ import annotations

import json
import pickle
import shutil
import struct
import subprocess
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hostile import TOY_MIGRATIONS, our_layout, save_torch, stamp, toy_sd, write_set

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.errors import CheckpointFormatError, CkptMigrateError
from ckptmigrate.io.files import read_checkpoint, read_metadata

Maker = Callable[[Path, Path], Path]  # (case folder, reference folder) -> the malformed path
REFUSED: dict[str, Maker] = {}
TOLERATED: dict[str, Maker] = {}

DEEP_LIST = "[" * 300 + "]" * 300
DEEP_DICT = '{"a":' * 300 + "1" + "}" * 300
DEEPER_LIST = "[" * 5000 + "]" * 5000  # past json's own recursion limit
LONG_INT = 10**4999  # 5,000 digits: past Python's int->str limit (4,300), so str() raises
LONG_INT_TEXT = "1" * 5000  # the same length in a JSON text, where json.loads raises


def _register(table: dict[str, Maker], name: str, make: Maker) -> None:
    assert name not in REFUSED and name not in TOLERATED, name
    table[name] = make


# ----------------------------------------------------------------------------- safetensors


def _safetensors_with(name: str, change: Callable[[dict[str, Any]], None], table=REFUSED) -> None:
    """The reference safetensors file with its decoded header changed by ``change``."""

    def make(folder: Path, ref: Path) -> Path:
        raw = (ref / "good.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        change(header)
        text = json.dumps(header).encode()
        out = folder / "bad.safetensors"
        out.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + length :])
        return out

    _register(table, name, make)


def _entry(key: str, value: str, table=REFUSED) -> Callable[[dict[str, Any]], None]:
    return lambda header: header["__metadata__"].__setitem__(key, value)


def _first_tensor(header: dict[str, Any]) -> str:
    return min((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def _alias_same_offsets(header: dict[str, Any]) -> None:
    header["alias.weight"] = dict(header[_first_tensor(header)])


for _name, _key, _value in [
    ("safetensors-aliases-a-list", "ckptmigrate.aliases", "[1, 2]"),
    ("safetensors-aliases-a-string", "ckptmigrate.aliases", '"blocks.0.weight"'),
    ("safetensors-alias-source-a-list", "ckptmigrate.aliases", '{"tied": ["blocks.0.weight"]}'),
    ("safetensors-alias-source-an-int", "ckptmigrate.aliases", '{"tied": 1}'),
    ("safetensors-alias-source-missing", "ckptmigrate.aliases", '{"tied": "no.such.key"}'),
    (
        "safetensors-alias-shadows-a-tensor",
        "ckptmigrate.aliases",
        '{"blocks.0.bias": "blocks.0.weight"}',
    ),
    ("safetensors-order-mixed-types", "ckptmigrate.order", '["blocks.0.weight", 1, null]'),
    ("safetensors-order-of-dicts", "ckptmigrate.order", "[{}, {}, {}, {}]"),
    ("safetensors-order-a-dict", "ckptmigrate.order", '{"a": 1}'),
    ("safetensors-order-deep", "ckptmigrate.order", DEEP_LIST),
    ("safetensors-stamp-deep-list", "ckptmigrate.stamp", DEEP_LIST),
    ("safetensors-stamp-deep-dict", "ckptmigrate.stamp", DEEP_DICT),
    ("safetensors-stamp-deeper-than-json", "ckptmigrate.stamp", DEEPER_LIST),
    ("safetensors-stamp-garbage", "ckptmigrate.stamp", "{nope"),
    ("safetensors-stamp-a-list", "ckptmigrate.stamp", '["toy", "1.0.0"]'),
    ("safetensors-stamp-version-not-a-string", "ckptmigrate.stamp", json.dumps(stamp(1.0))),
    (
        "safetensors-stamp-version-of-5000-digits",
        "ckptmigrate.stamp",
        json.dumps(stamp("1" * 5000)),
    ),
    (
        "safetensors-stamp-mounts-a-dict",
        "ckptmigrate.stamp",
        json.dumps(stamp(format=2, mounts={"a.": 1})),
    ),
    ("safetensors-hparams-deep", "ckptmigrate.hparams", DEEP_DICT),
    ("safetensors-hparams-a-list", "ckptmigrate.hparams", "[1]"),
    ("safetensors-meta-a-string", "ckptmigrate.meta", '"x"'),
    ("safetensors-module-metadata-a-list", "ckptmigrate.module_metadata", "[1]"),
    ("safetensors-module-metadata-root-an-int", "ckptmigrate.module_metadata", '{"": 5}'),
]:
    _safetensors_with(_name, _entry(_key, _value))

_safetensors_with("safetensors-two-names-same-offsets", _alias_same_offsets)
_safetensors_with(
    "safetensors-metadata-value-not-a-string",
    lambda h: h["__metadata__"].__setitem__("ckptmigrate.stamp", stamp()),
)
_safetensors_with(
    "safetensors-metadata-value-a-list", lambda h: h["__metadata__"].__setitem__("format", ["pt"])
)
_safetensors_with("safetensors-metadata-a-list", lambda h: h.__setitem__("__metadata__", ["x"]))


def _safetensors_text(name: str, old: str, new: str) -> None:
    """The reference safetensors file with ``old`` replaced by ``new`` in its header text
    (json.dumps cannot write a number past Python's int->str limit)."""

    def make(folder: Path, ref: Path) -> Path:
        raw = (ref / "good.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        text = raw[8 : 8 + length].decode()
        assert old in text, old
        changed = text.replace(old, new, 1).encode()
        out = folder / "bad.safetensors"
        out.write_bytes(struct.pack("<Q", len(changed)) + changed + raw[8 + length :])
        return out

    _register(REFUSED, name, make)


_safetensors_text("safetensors-shape-of-5000-digits", '"shape":[', f'"shape":[{LONG_INT_TEXT},')
_safetensors_text(
    "safetensors-offsets-of-5000-digits", '"data_offsets":[0,', f'"data_offsets":[0,{LONG_INT_TEXT}'
)


# ----------------------------------------------------------------------------- torch files


def _torch(name: str, build: Callable[[], object], *, legacy: bool = False, table=REFUSED) -> None:
    def make(folder: Path, ref: Path) -> Path:
        return save_torch(build(), folder / "bad.pth", legacy=legacy)

    _register(table, name, make)


def _flat(root: object, whole: object = None) -> Callable[[], object]:
    def build() -> object:
        sd = OrderedDict(toy_sd())
        sd._metadata = whole if whole is not None else OrderedDict({"": root})  # type: ignore[attr-defined]
        return sd

    return build


def _mount(**fields: object) -> dict[str, object]:
    return {"prefix": "blocks.", "schema": "net", "version": "1.0.0", **fields}


_DEEP_HISTORY = json.loads("[" * 250 + "]" * 250)
for _legacy in (False, True):
    _tag = "-legacy" if _legacy else ""
    _torch(f"stamp-a-list{_tag}", lambda: our_layout(["toy", "1.0.0"]), legacy=_legacy)
    _torch(f"stamp-version-not-a-string{_tag}", lambda: our_layout(stamp(3)), legacy=_legacy)
    _torch(f"stamp-version-invalid{_tag}", lambda: our_layout(stamp("x.y")), legacy=_legacy)
    _torch(f"stamp-schema-empty{_tag}", lambda: our_layout(stamp(schema="")), legacy=_legacy)
    _torch(
        f"stamp-nested-250-deep{_tag}",
        lambda: our_layout(stamp(history=[{"from": _DEEP_HISTORY}])),
        legacy=_legacy,
    )
    _torch(f"top-level-list{_tag}", lambda: [torch.ones(2)], legacy=_legacy)
    _torch(f"top-level-tensor{_tag}", lambda: torch.ones(2), legacy=_legacy)
    _torch(f"top-level-int{_tag}", lambda: 7, legacy=_legacy)
    _torch(f"flat-metadata-root-a-list{_tag}", _flat([1]), legacy=_legacy)
    _torch(f"flat-metadata-root-an-int{_tag}", _flat(5), legacy=_legacy)
    _torch(f"flat-metadata-root-a-string{_tag}", _flat("x"), legacy=_legacy)

_torch("stamp-version-of-5000-digits", lambda: our_layout(stamp("1" * 5000)))
_torch("stamp-a-tensor", lambda: our_layout(torch.ones(2)))
_torch("stamp-written-by-a-string", lambda: our_layout(stamp(written_by="me")))
_torch("stamp-format-a-bool", lambda: our_layout(stamp(format=True)))
_torch("stamp-mounts-a-dict", lambda: our_layout(stamp(format=2, mounts={"blocks.": "net"})))
_torch("stamp-mounts-empty", lambda: our_layout(stamp(format=2, mounts=[])))
_torch("stamp-mount-a-string", lambda: our_layout(stamp(format=2, mounts=["blocks."])))
_torch(
    "stamp-mount-prefix-a-list", lambda: our_layout(stamp(format=2, mounts=[_mount(prefix=["b"])]))
)
_torch(
    "stamp-mount-version-a-list", lambda: our_layout(stamp(format=2, mounts=[_mount(version=[1])]))
)
_torch("stamp-mount-schema-an-int", lambda: our_layout(stamp(format=2, mounts=[_mount(schema=1)])))
_torch(
    "stamp-mount-history-a-dict", lambda: our_layout(stamp(format=2, mounts=[_mount(history={})]))
)
_torch(
    "stamp-mount-hparams-an-int", lambda: our_layout(stamp(format=2, mounts=[_mount(hparams=3)]))
)
_torch("flat-stamp-hparams-a-list", _flat({"__ckptmigrate__": stamp(hparams=[1])}))
_torch("flat-stamp-version-invalid", _flat({"__ckptmigrate__": stamp("1..0")}))
_torch("hparams-a-tensor", lambda: our_layout(stamp(), hparams=torch.ones(2)))
_torch("stamp-format-of-5000-digits", lambda: our_layout(stamp(format=LONG_INT)))
_torch("state-dict-key-an-int-of-5000-digits", lambda: {**toy_sd(), LONG_INT: torch.ones(1)})
_torch(
    "stamp-state-dict-key-an-int-of-5000-digits",
    lambda: our_layout(stamp(), state_dict={**toy_sd(), LONG_INT: torch.ones(1)}),
)


class _SizedTensor:
    """Pickles as torch's ``_rebuild_tensor_v2`` of a real one-element storage, with ``size``."""

    def __init__(self, size: tuple[int, ...]) -> None:
        self.size = size

    def __reduce__(self) -> tuple[object, ...]:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated; torch.save takes it
            storage = torch.ones(1).storage()
        stride = (1,) * len(self.size)
        return torch._utils._rebuild_tensor_v2, (storage, 0, self.size, stride, False, {})


def _sized(size: tuple[int, ...]) -> Callable[[], object]:
    return lambda: {**toy_sd(), "odd": _SizedTensor(size)}


_torch("tensor-size-of-5000-digits", _sized((LONG_INT,)))
_torch("tensor-size-of-5000-digits-and-empty", _sized((LONG_INT, 0)))
_torch("tensor-size-past-int64-and-empty", _sized((2**64, 0)))
# values the reader keeps as stored: shown by their length, never str()'d whole
_torch(
    "hparam-of-5000-digits", lambda: our_layout(stamp(), hparams={"n": LONG_INT}), table=TOLERATED
)
_torch("meta-of-5000-digits", lambda: our_layout(stamp(), meta={"n": [LONG_INT]}), table=TOLERATED)
_torch(
    "stamp-history-of-5000-digits",
    lambda: our_layout(stamp(history=[{"from": LONG_INT, "to": "1.0.0", "step": "x"}])),
    table=TOLERATED,
)
_torch("flat-metadata-version-of-5000-digits", _flat({"version": LONG_INT}), table=TOLERATED)
_torch(
    "extra-key-an-int-of-5000-digits",
    lambda: {**our_layout(stamp()), LONG_INT: 1},
    table=TOLERATED,
)

_LIGHTNING = {"pytorch-lightning_version": "2.4.0", "epoch": 3, "global_step": 30}


def _lightning(**parts: object) -> Callable[[], object]:
    return lambda: {**_LIGHTNING, "state_dict": toy_sd(), "hyper_parameters": {}, **parts}


_torch("lightning-state-dict-a-list", _lightning(state_dict=[torch.ones(1)]))
_torch("lightning-state-dict-a-tensor", _lightning(state_dict=torch.ones(1)))
_torch("lightning-state-dict-none", _lightning(state_dict=None))
_torch("lightning-state-dict-of-strings", _lightning(state_dict={"w": "text"}))
_torch("lightning-hyper-parameters-a-list", _lightning(hyper_parameters=[1, 2]))
_torch("lightning-hyper-parameters-a-string", _lightning(hyper_parameters="lr=1"))
_torch("lightning-hyper-parameters-a-tensor", _lightning(hyper_parameters=torch.ones(1)))
# optimizer state the reader does not recognise is carried along as stored
_torch("lightning-optimizer-states-an-int", _lightning(optimizer_states=5), table=TOLERATED)
_torch("lightning-optimizer-states-strings", _lightning(optimizer_states=["x"]), table=TOLERATED)
_torch(
    "lightning-optimizer-state-of-wrong-types",
    _lightning(optimizer_states=[{"state": 5, "param_groups": "all"}]),
    table=TOLERATED,
)
_torch(
    "lightning-optimizer-param-groups-of-wrong-types",
    _lightning(optimizer_states=[{"state": {0: 1}, "param_groups": [{"params": "x"}]}]),
    table=TOLERATED,
)
_torch(
    "flat-metadata-other-entry-an-int", _flat(None, OrderedDict({"": {}, "x": 5})), table=TOLERATED
)


def _legacy_mutated(name: str, change: Callable[[bytes], bytes]) -> None:
    def make(folder: Path, ref: Path) -> Path:
        out = folder / "bad.pth"
        out.write_bytes(change((ref / "legacy.pth").read_bytes()))
        return out

    _register(REFUSED, name, make)


for _fraction in (0.05, 0.2, 0.4, 0.6, 0.8, 0.95):
    _legacy_mutated(f"legacy-truncated-{_fraction}", lambda b, f=_fraction: b[: int(len(b) * f)])
_legacy_mutated("legacy-storage-keys-dropped", lambda b: b[: b.rfind(b"\x80\x02]")] + b"\x80\x02].")


def _set_flag(member: str, bit: int) -> Maker:
    """The reference torch zip with a general-purpose flag bit set on one member."""

    def make(folder: Path, ref: Path) -> Path:
        src = ref / "good.pth"
        raw = bytearray(src.read_bytes())
        with zipfile.ZipFile(src) as zf:
            (info,) = [i for i in zf.infolist() if i.filename.endswith(member)]
        raw[info.header_offset + 6] |= bit  # local header: flags at byte 6
        at = raw.find(b"PK\x01\x02")
        while at >= 0:  # central directory: flags at byte 8, the name at byte 46
            name_len = struct.unpack_from("<H", raw, at + 28)[0]
            if raw[at + 46 : at + 46 + name_len] == info.filename.encode():
                raw[at + 8] |= bit
            at = raw.find(b"PK\x01\x02", at + 1)
        (folder / "bad.pth").write_bytes(bytes(raw))
        return folder / "bad.pth"

    return make


for _member in ("/data.pkl", "/data/0", "/version", "/byteorder", "/.data/serialization_id"):
    _register(REFUSED, f"zip-encrypted-flag-on{_member.replace('/', '-')}", _set_flag(_member, 1))
_register(REFUSED, "zip-strong-encryption-flag-on-data-0", _set_flag("/data/0", 0x40))


# ----------------------------------------------------------------------------- sharded sets


def _sharded(name: str, index: object = None, *, text: str | None = None, kind: str = "st") -> None:
    def make(folder: Path, ref: Path) -> Path:
        out = folder / "set"
        shutil.copytree(ref / f"set-{kind}", out)
        (index_path,) = out.glob("*.index.json")
        good = json.loads(index_path.read_text())
        value = index(good) if callable(index) else index
        index_path.write_text(text if text is not None else json.dumps(value))
        return out

    _register(REFUSED, name, make)


def _with(**parts: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda good: {**good, **parts}


def _shards_named(shard: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda good: {**good, "weight_map": {k: shard for k in good["weight_map"]}}


def _metadata_entry(key: str, value: object) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda good: {**good, "metadata": {**good.get("metadata", {}), key: value}}


_sharded("index-a-list", [1, 2])
_sharded("index-weight-map-a-list", _with(weight_map=["model-00001-of-00002.safetensors"]))
_sharded("index-weight-map-missing", _with(weight_map=None))
_sharded(
    "index-weight-map-values-ints", lambda g: {**g, "weight_map": {k: 1 for k in g["weight_map"]}}
)
_sharded(
    "index-weight-map-values-lists",
    lambda g: {**g, "weight_map": {k: [v] for k, v in g["weight_map"].items()}},
)
_sharded("index-metadata-a-list", _with(metadata=[1]))
_sharded("index-metadata-a-string", _with(metadata="x"))
_sharded("index-stamp-a-list", _metadata_entry("ckptmigrate.stamp", ["toy"]))
_sharded("index-stamp-version-invalid", _metadata_entry("ckptmigrate.stamp", stamp("q")))
_sharded(
    "index-stamp-version-of-5000-digits", _metadata_entry("ckptmigrate.stamp", stamp("1" * 5000))
)
_sharded("index-hparams-a-list", _metadata_entry("ckptmigrate.hparams", [1]))
_sharded("index-meta-an-int", _metadata_entry("ckptmigrate.meta", 5))
_sharded(
    "index-total-size-of-5000-digits",
    text='{"metadata": {"total_size": ' + LONG_INT_TEXT + '}, "weight_map": {}}',
)
_sharded("index-deep-weight-map", text='{"weight_map": ' + DEEP_LIST + "}")
_sharded("index-deeper-than-json", text='{"weight_map": ' + DEEPER_LIST + "}")
_sharded("index-deep-metadata", text='{"metadata": ' + DEEP_DICT + ', "weight_map": {}}')
_sharded("index-shard-name-with-slash", _shards_named("sub/model.safetensors"))
_sharded("index-shard-name-dotdot", _shards_named("../model.safetensors"))
_sharded("index-shard-name-absolute", _shards_named("/etc/passwd"))
_sharded("index-shard-name-backslash", _shards_named("..\\model.safetensors"))
_sharded("index-shard-name-nul", _shards_named("model\x00.safetensors"))
_sharded("index-shard-missing", _shards_named("nope.safetensors"))
_sharded(
    "index-names-a-key-no-shard-holds",
    lambda g: {**g, "weight_map": {**g["weight_map"], "x": next(iter(g["weight_map"].values()))}},
)


def _bin_shard_encrypted(folder: Path, ref: Path) -> Path:
    out = folder / "set"
    shutil.copytree(ref / "set-bin", out)
    shard = sorted(out.glob("*.bin"))[0]
    tmp = folder / "tmp"
    tmp.mkdir()
    shutil.copy(shard, tmp / "good.pth")
    shard.write_bytes(_set_flag("/data.pkl", 1)(tmp, tmp).read_bytes())
    shutil.rmtree(tmp)
    return out


_register(REFUSED, "index-bin-shard-with-encrypted-data-pkl", _bin_shard_encrypted)


# ----------------------------------------------------------------------------- DCP folders


def _dcp(
    name: str,
    change: Callable[[Any], Any] | None = None,
    *,
    stamp_file: str | None = None,
    raw: bytes | None = None,
    table=REFUSED,
) -> None:
    """The reference DCP folder with its ``.metadata`` (torch's own classes, pickled) changed
    by ``change`` (which may return a replacement), or its ``ckptmigrate.json`` replaced."""

    def make(folder: Path, ref: Path) -> Path:
        out = folder / "dcp"
        shutil.copytree(ref / "dcp", out)
        if change is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                md = pickle.loads((out / ".metadata").read_bytes())
            replaced = change(md)
            (out / ".metadata").write_bytes(pickle.dumps(md if replaced is None else replaced))
        if raw is not None:
            (out / ".metadata").write_bytes(raw)
        if stamp_file is not None:
            (out / "ckptmigrate.json").write_text(stamp_file)
        return out

    _register(table, name, make)


def _tensor_entry(md: Any) -> Any:
    return md.state_dict_metadata[next(k for k in md.state_dict_metadata if "0.weight" in k)]


def _setting(get: Callable[[Any], Any], field: str, value: object) -> Callable[[Any], None]:
    return lambda md: object.__setattr__(get(md), field, value)


def _chunk(md: Any) -> Any:
    return _tensor_entry(md).chunks[0]


_dcp("dcp-stamp-file-deep", stamp_file='{"stamp": ' + DEEP_LIST + "}")
_dcp("dcp-stamp-file-deeper-than-json", stamp_file='{"stamp": ' + DEEPER_LIST + "}")
_dcp("dcp-stamp-file-a-list", stamp_file="[1]")
_dcp("dcp-stamp-file-garbage", stamp_file='{"stamp": ')
_dcp("dcp-stamp-file-stamp-a-list", stamp_file='{"stamp": ["toy"]}')
_dcp("dcp-stamp-file-version-invalid", stamp_file=json.dumps({"stamp": stamp("x")}))
_dcp("dcp-stamp-file-version-of-5000-digits", stamp_file=json.dumps({"stamp": stamp("1" * 5000)}))
_dcp("dcp-stamp-file-hparams-a-list", stamp_file='{"stamp": null, "hparams": [1]}')
_dcp("dcp-stamp-file-meta-a-string", stamp_file='{"stamp": null, "meta": "x"}')
_dcp("dcp-state-dict-metadata-a-list", _setting(lambda md: md, "state_dict_metadata", [1]))
_dcp("dcp-state-dict-metadata-none", _setting(lambda md: md, "state_dict_metadata", None))
_dcp("dcp-metadata-a-list", lambda md: [md])
_dcp("dcp-metadata-a-dict", lambda md: {"state_dict_metadata": {}})
_dcp("dcp-entry-an-int", lambda md: md.state_dict_metadata.__setitem__("model.blocks.0.weight", 5))
_dcp(
    "dcp-entry-name-an-int",
    lambda md: md.state_dict_metadata.__setitem__(7, md.state_dict_metadata.pop("epoch")),
)
_dcp("dcp-size-none", _setting(_tensor_entry, "size", None))
_dcp("dcp-size-a-string", _setting(_tensor_entry, "size", "ab"))
_dcp("dcp-size-negative", _setting(_tensor_entry, "size", torch.Size([-4, 4])))
_dcp("dcp-size-of-floats", _setting(_tensor_entry, "size", (4.5, 4)))
_dcp("dcp-properties-none", _setting(_tensor_entry, "properties", None))
_dcp("dcp-properties-an-int", _setting(_tensor_entry, "properties", 5))
_dcp("dcp-dtype-a-string", _setting(lambda md: _tensor_entry(md).properties, "dtype", "float32"))
_dcp("dcp-chunks-none", _setting(_tensor_entry, "chunks", None))
_dcp("dcp-chunks-an-int", _setting(_tensor_entry, "chunks", 3))
_dcp("dcp-chunk-an-int", lambda md: _tensor_entry(md).chunks.__setitem__(0, 7))
_dcp("dcp-chunk-negative-sizes", _setting(_chunk, "sizes", torch.Size([-4, 4])))
_dcp("dcp-chunk-negative-offsets", _setting(_chunk, "offsets", torch.Size([-1, 0])))
_dcp("dcp-chunk-past-the-tensor", _setting(_chunk, "offsets", torch.Size([3, 0])))
_dcp("dcp-chunk-offsets-a-string", _setting(_chunk, "offsets", "xy"))
_dcp("dcp-chunk-of-another-rank", _setting(_chunk, "sizes", torch.Size([4])))
_dcp(
    "dcp-bytes-entry-as-a-tensor-without-size",
    lambda md: md.state_dict_metadata.__setitem__(
        "epoch", type(_tensor_entry(md))(properties=None, size=None, chunks=None)
    ),
)
_dcp("dcp-planner-data-an-int", _setting(lambda md: md, "planner_data", 5))
_dcp(
    "dcp-planner-routes-ints",
    lambda md: object.__setattr__(md, "planner_data", dict.fromkeys(md.state_dict_metadata, 5)),
)
_dcp(
    "dcp-planner-routes-of-lists",
    lambda md: object.__setattr__(
        md, "planner_data", dict.fromkeys(md.state_dict_metadata, ([1],))
    ),
)
_dcp(
    "dcp-planner-routes-of-ints",
    lambda md: object.__setattr__(
        md, "planner_data", dict.fromkeys(md.state_dict_metadata, (1, 2))
    ),
)
_dcp(
    "dcp-planner-route-inside-a-tensor",
    lambda md: object.__setattr__(
        md,
        "planner_data",
        {k: ("model",) if i == 0 else ("model", "x") for i, k in enumerate(md.state_dict_metadata)},
    ),
)
_dcp("dcp-storage-data-a-list", _setting(lambda md: md, "storage_data", [1]))
_dcp(
    "dcp-storage-data-values-ints",
    lambda md: object.__setattr__(md, "storage_data", dict.fromkeys(md.storage_data, 5)),
)
_dcp(
    "dcp-storage-path-an-int",
    lambda md: [object.__setattr__(v, "relative_path", 5) for v in md.storage_data.values()]
    and None,
)
_dcp(
    "dcp-storage-negative-offset",
    lambda md: [object.__setattr__(v, "offset", -1) for v in md.storage_data.values()] and None,
)
_dcp("dcp-size-of-5000-digits", _setting(_tensor_entry, "size", torch.Size([LONG_INT, 4])))
_dcp(
    "dcp-size-of-5000-digits-around-its-chunk",
    lambda md: [
        object.__setattr__(_tensor_entry(md), "size", torch.Size([LONG_INT, 4])),
        object.__setattr__(_chunk(md), "sizes", torch.Size([LONG_INT, 4])),
    ]
    and None,
)
_dcp("dcp-size-past-int64", _setting(_tensor_entry, "size", torch.Size([2**64, 4])))
_dcp("dcp-chunk-offsets-of-5000-digits", _setting(_chunk, "offsets", torch.Size([LONG_INT, 0])))
_dcp(
    "dcp-dtype-an-int-of-5000-digits",
    _setting(lambda md: _tensor_entry(md).properties, "dtype", LONG_INT),
)
_dcp(
    "dcp-entry-name-an-int-of-5000-digits",
    lambda md: md.state_dict_metadata.__setitem__(LONG_INT, md.state_dict_metadata.pop("epoch")),
)
_dcp(
    "dcp-storage-offset-of-5000-digits",
    lambda md: [object.__setattr__(v, "offset", LONG_INT) for v in md.storage_data.values()]
    and None,
)
_dcp(
    "dcp-storage-path-an-int-of-5000-digits",
    lambda md: [object.__setattr__(v, "relative_path", LONG_INT) for v in md.storage_data.values()]
    and None,
)
_dcp(
    "dcp-stamp-file-hparam-of-5000-digits",
    stamp_file='{"stamp": null, "hparams": {"n": ' + LONG_INT_TEXT + "}}",
)
_dcp(
    "dcp-planner-route-an-int-of-5000-digits",
    lambda md: object.__setattr__(md, "planner_data", {"epoch": (LONG_INT,)}),
    table=TOLERATED,
)
_dcp("dcp-metadata-truncated", raw=b"\x80\x04\x95")
_dcp("dcp-metadata-empty", raw=b"")
# parts the metadata-only reader never looks at: torch's loader refuses them, or reads around
_dcp("dcp-storage-meta-an-int", _setting(lambda md: md, "storage_meta", 5), table=TOLERATED)
_dcp("dcp-version-a-list", _setting(lambda md: md, "version", [1]), table=TOLERATED)
_dcp("dcp-storage-data-none", _setting(lambda md: md, "storage_data", None), table=TOLERATED)
_dcp(
    "dcp-storage-data-keys-ints",
    lambda md: object.__setattr__(md, "storage_data", dict(enumerate(md.storage_data.values()))),
    table=TOLERATED,
)
_dcp("dcp-size-huge", _setting(_tensor_entry, "size", torch.Size([2**40, 2**40])), table=TOLERATED)

# ----------------------------------------------------------------------------- fixtures

#: Found escaping before this file existed; each mark goes with the commit that fixes it.
ESCAPES: dict[str, str] = {}


@pytest.fixture(scope="module")
def ref(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """good.pth (toy 1.0.0), legacy.pth, good.safetensors, a DCP folder, two sharded sets
    (safetensors and .bin) and the toy migrations in mig/."""
    import torch.distributed.checkpoint as dcp

    root = tmp_path_factory.mktemp("ref")
    cm.save(root / "good.pth", toy_sd(), schema="toy", version="1.0.0")
    cm.save(root / "good.safetensors", toy_sd(), schema="toy", version="1.0.0")
    save_torch(toy_sd(), root / "legacy.pth", legacy=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": toy_sd(), "epoch": 7}, checkpoint_id=root / "dcp")
    tensors = toy_sd()
    keys = list(tensors)
    for kind, ext, base in (("st", ".safetensors", "model"), ("bin", ".bin", "pytorch_model")):
        parts = {
            f"{base}-{i:05d}-of-00002{ext}": {k: tensors[k] for k in part}
            for i, part in enumerate((keys[:2], keys[2:]), 1)
        }
        write_set(root / f"set-{kind}", parts, f"{base}{ext}.index.json")
    (root / "mig").mkdir()
    (root / "mig" / "toy_migrations.py").write_text(TOY_MIGRATIONS)
    return root


def _make(table: dict[str, Maker], name: str, tmp_path: Path, ref: Path) -> tuple[Path, Path]:
    folder = tmp_path / "case"
    folder.mkdir()
    return folder, table[name](folder, ref)


def _params(table: dict[str, Maker]) -> list[Any]:
    return [
        (
            pytest.param(name, marks=pytest.mark.xfail(strict=True, reason=ESCAPES[name]))
            if name in ESCAPES
            else name
        )
        for name in sorted(table)
    ]


def _readers(bad: Path) -> dict[str, Callable[[], object]]:
    return {
        "read_metadata": lambda: read_metadata(bad),
        "read_checkpoint": lambda: read_checkpoint(bad),
        "read_checkpoint mmap": lambda: read_checkpoint(bad, mmap=True),
        "cm.load": lambda: cm.load(bad, upgrade=False),
        "cm.load mmap": lambda: cm.load(bad, upgrade=False, mmap=True),
    }


def _commands(bad: Path, folder: Path, ref: Path) -> list[list[str]]:
    out = str(folder / ("out" if bad.is_dir() else f"out{bad.suffix}"))
    mig = ["--migrations", str(ref / "mig")]
    good = str(ref / "good.pth")
    return [
        ["info", str(bad)],
        ["info", str(bad), "--json"],
        ["diff", str(bad), good],
        ["diff", good, str(bad), "--json"],
        ["upgrade", str(bad), "-o", out, "--from-version", "1.0.0", *mig],
        ["stamp", str(bad), "--schema", "toy", "--version", "1.0.0", "-o", out + "-stamped"],
    ]


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = cli.main(args)
    return code, capsys.readouterr().err


def _one_error_line(stderr: str) -> bool:
    lines = stderr.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("ckptmigrate: error: ")


# ----------------------------------------------------------------------------- tests


def test_the_table_covers_every_reader() -> None:
    prefixes = ("safetensors-", "stamp-", "flat-", "lightning-", "legacy-", "top-level-")
    for prefix in (*prefixes, "zip-encrypted-", "index-", "dcp-stamp-file-", "dcp-chunk-"):
        assert sum(name.startswith(prefix) for name in REFUSED) >= 3, prefix
    assert len(REFUSED) >= 120


@pytest.mark.parametrize("name", _params(REFUSED))
def test_every_reader_refuses_it_with_our_error(name: str, tmp_path: Path, ref: Path) -> None:
    _, bad = _make(REFUSED, name, tmp_path, ref)
    for what, read in _readers(bad).items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with pytest.raises(CkptMigrateError) as info:
                read()
        assert isinstance(info.value, CheckpointFormatError), (what, info.value)
        assert str(info.value) and "\n" not in str(info.value).strip(), what


@pytest.mark.parametrize("name", _params(REFUSED))
def test_every_command_refuses_it_with_one_error_line_and_exit_2(
    name: str, tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = _make(REFUSED, name, tmp_path, ref)
    for args in _commands(bad, folder, ref):
        code, stderr = _cli(args, capsys)
        assert code == 2, (args, stderr)
        assert _one_error_line(stderr), (args, stderr)
        assert "internal error" not in stderr, (args, stderr)
        with pytest.raises(CkptMigrateError):  # --debug shows what the line came from
            _cli([*args, "--debug"], capsys)
    assert not any(p.name.startswith("out") for p in folder.iterdir())


@pytest.mark.parametrize("name", _params(TOLERATED))
def test_odd_but_harmless_files_read_or_raise_only_our_errors(
    name: str, tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder, bad = _make(TOLERATED, name, tmp_path, ref)
    for read in _readers(bad).values():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                read()
            except CkptMigrateError:
                pass
    for args in _commands(bad, folder, ref):
        code, stderr = _cli(args, capsys)
        assert code in (0, 1, 2), (args, stderr)
        if code == 2:
            assert _one_error_line(stderr) and "internal error" not in stderr, (args, stderr)
            with pytest.raises(CkptMigrateError):
                _cli([*args, "--debug"], capsys)


@pytest.mark.parametrize(
    "name",
    _params(
        {
            n: REFUSED[n]
            for n in ("safetensors-aliases-a-list", "flat-metadata-root-an-int", "dcp-size-none")
        }
    ),
)
def test_a_real_process_prints_one_line_and_exits_2(name: str, tmp_path: Path, ref: Path) -> None:
    folder, bad = _make(REFUSED, name, tmp_path, ref)
    proc = subprocess.run(
        [sys.executable, "-m", "ckptmigrate", "info", str(bad)],
        capture_output=True,
        text=True,
        cwd=folder,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert _one_error_line(proc.stderr), proc.stderr
    assert "Error" not in proc.stderr.split(":", 2)[2][:40], proc.stderr  # a sentence, not a type


def test_an_unexpected_exception_is_one_internal_error_line_that_points_to_debug(
    tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the last-resort guard at the CLI boundary; the readers' own checks are the fix
    import ckptmigrate.io.files

    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("'list' object has no attribute 'items'")

    monkeypatch.setattr(ckptmigrate.io.files, "read_metadata", broken)
    monkeypatch.setattr(cli, "read_metadata", broken, raising=False)
    code, stderr = _cli(["info", str(ref / "good.pth")], capsys)
    assert code == 2
    assert _one_error_line(stderr), stderr
    assert "internal error" in stderr and "AttributeError" in stderr and "--debug" in stderr
    with pytest.raises(AttributeError):
        _cli(["info", str(ref / "good.pth"), "--debug"], capsys)


def test_the_references_themselves_read(ref: Path) -> None:
    for name in ("good.pth", "legacy.pth", "good.safetensors", "dcp", "set-st", "set-bin"):
        for read in _readers(ref / name).values():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read()


def test_a_version_of_5000_digits_on_the_command_line_is_one_error_line(
    tmp_path: Path, ref: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_torch(toy_sd(), tmp_path / "plain.pth")
    args = ["stamp", str(tmp_path / "plain.pth"), "--schema", "toy", "--version", "1" * 5000]
    code, stderr = _cli([*args, "-o", str(tmp_path / "out.pth")], capsys)
    assert code == 2 and _one_error_line(stderr) and "internal error" not in stderr, stderr
    with pytest.raises(CkptMigrateError):
        _cli([*args, "-o", str(tmp_path / "out.pth"), "--debug"], capsys)
    assert not (tmp_path / "out.pth").exists()


def test_an_hparam_of_5000_digits_shows_as_its_length_and_info_exits_0(tmp_path: Path) -> None:
    from processes import run

    bad = save_torch(our_layout(stamp(), hparams={"n": LONG_INT}), tmp_path / "long.pth")
    plain = run(tmp_path, "info", str(bad), timeout=120)
    assert plain.returncode == 0, plain.stderr
    # the value as --json holds it: a string that says what the int was
    assert "hparam: n = '<int of 5000 digits>'" in plain.stdout.splitlines()
    as_json = run(tmp_path, "info", str(bad), "--json", timeout=120)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["hparams"] == {"n": "<int of 5000 digits>"}
    short = save_torch(our_layout(stamp(), hparams={"n": 1}), tmp_path / "short.pth")
    diff = run(tmp_path, "diff", str(short), str(bad), timeout=120)
    assert diff.returncode == 1, diff.stderr
    assert "n  1 -> '<int of 5000 digits>'" in diff.stdout
