"""The allow-list: every global ``torch.load(weights_only=True)`` accepts, mapped to the guarded
stand-in it decodes to here (tensor rebuilds make :class:`~ckptmigrate.values.tensorinfo.TensorStub` records),
plus the names a caller allows (:class:`~.placeholders.OpaqueObject` placeholders).

>>> allowed = allowed_map(["argparse.Namespace"])
>>> check_global("os.system", allowed, "model.pth")  # doctest: +SKIP
Traceback (most recent call last):
UnsafeCheckpointError: ...
"""

from __future__ import annotations

import _compat_pickle
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from math import prod
from types import FunctionType
from typing import Any

from ...base.readable import bounded_repr
from ...errors import CheckpointFormatError, RedirectError, UnsafeCheckpointError, UsageError
from ...values.tensorinfo import DTYPE_SIZES, MAX_DIM, TensorInfo, TensorStub
from ..bounds import charge_decode
from .guards import GuardedCall, GuardedType
from .placeholders import TorchConstant, opaque_global
from .storages import STORAGE_DTYPES, StorageRef, StorageType

# Modules torch never lets a pickle reach, even when a caller allows a name in them.
_BLOCKED_MODULES = frozenset({"sys", "os", "posix", "nt"})


_TENSOR_TYPES = ["Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char", "Byte"]
_QSCHEMES = [
    "per_tensor_affine",
    "per_tensor_symmetric",
    "per_channel_affine",
    "per_channel_symmetric",
    "per_channel_affine_float_qparams",
]


class _TensorType(metaclass=GuardedType):
    """``torch.Tensor``: accepted as a sub-type marker, never constructed."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        raise CheckpointFormatError(
            "the pickle constructs torch.Tensor directly (a pre-1.0 layout), which the metadata "
            "reader does not support"
        )


class _ParameterType(metaclass=GuardedType):
    """``torch.nn.parameter.Parameter``: NEWOBJ on it wraps a stub as a parameter."""

    def __new__(cls, data: Any = None, requires_grad: bool = True) -> Any:  # type: ignore[misc]
        stub = _expect_stub(data, "Parameter")
        return TensorStub(stub.info, requires_grad=requires_grad, is_parameter=True)


class _SizeType(metaclass=GuardedType):
    """``torch.Size``: decodes to a plain tuple of ints."""

    def __new__(cls, dims: Any = ()) -> Any:  # type: ignore[misc]
        return _expect_dims(dims, "torch.Size")


class _DeviceType(metaclass=GuardedType):
    """``torch.device``: decodes to its string form, e.g. ``"cuda:0"``."""

    def __new__(cls, kind: Any, index: Any = None) -> Any:  # type: ignore[misc]
        if not isinstance(kind, str) or not (index is None or type(index) is int):
            raise CheckpointFormatError(
                f"torch.device({bounded_repr(kind, 80)}, {bounded_repr(index)}) is malformed"
            )
        charge_decode(len(kind) + 64)
        return kind if index is None or ":" in kind else f"{kind}:{index}"


def _charge_copy(args: tuple[Any, ...], per_item: int) -> None:
    """Charge the decode budget for a stand-in that copies its first argument's items."""
    if args and hasattr(args[0], "__len__"):
        charge_decode(per_item * len(args[0]) + 256)


class _CounterType(metaclass=GuardedType):
    """``collections.Counter``: builds a real Counter, but BUILD cannot patch the class."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 128)  # each item may become a new key
        return Counter(*args, **kwargs)


class _OrderedDictType(metaclass=GuardedType):
    """``collections.OrderedDict``: a real OrderedDict, its copied items charged first."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 160)
        return OrderedDict(*args, **kwargs)


class _SetType(metaclass=GuardedType):
    """``builtins.set``: a real set, its copied items charged first."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        _charge_copy(args, 64)
        return set(*args)


class _DictType(metaclass=GuardedType):
    """``builtins.dict`` as a redirect target: the empty dict SETITEMS fills, or a copy.

    Each redirect to it gets its own subclass (:func:`dict_redirect`), whose empty dict is a
    :class:`RedirectedDict` that takes the redirected object's BUILD state as its items."""

    holder: type[RedirectedDict] | None = None  # set on each redirect's own subclass

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        if len(args) > 1 or (args and not isinstance(args[0], (dict, list, tuple))):
            if cls.holder is not None:
                rebuilt = f"arguments ({bounded_repr(args, 120)}) it is rebuilt from"
                raise RedirectError(**cls.holder.refusal(rebuilt))
            raise CheckpointFormatError("dict(...) with unexpected arguments in the pickle")
        _charge_copy(args, 160)
        if cls.holder is not None and not args:
            return cls.holder()
        return dict(*args)


class RedirectedDict(dict):
    """An object of a class redirected to ``builtins.dict`` while its pickle is read: a dict
    whose ``__setstate__`` takes the object's BUILD state, a dict of attributes (a
    ``(dict, slots)`` pair merged), as its items, and refuses any other state, or list items,
    saying that a dict cannot hold them. Readers turn it into a plain dict before returning
    (:func:`plain_dicts`). Only these methods run, on data: nothing the file names is called.
    """

    __slots__ = ()
    origin = ""  # the redirected name, set on each redirect's own subclass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            items = state
        elif (
            isinstance(state, tuple)
            and len(state) == 2
            and all(part is None or isinstance(part, dict) for part in state)
        ):
            items = {**(state[0] or {}), **(state[1] or {})}
        else:
            raise RedirectError(**self.refusal(f"{type(state).__name__} state (its __getstate__)"))
        charge_decode(160 * len(items) + 64)
        self.update(items)

    def append(self, item: Any) -> None:
        raise RedirectError(**self.refusal("list items (a list subclass)"))

    def extend(self, items: Any) -> None:
        raise RedirectError(**self.refusal("list items (a list subclass)"))

    @classmethod
    def refusal(cls, what: str) -> dict[str, str]:
        """The :class:`~ckptmigrate.errors.RedirectError` fields for an object holding ``what``."""
        return {
            "old": cls.origin,
            "new": "builtins.dict",
            "problem": f"the file's {cls.origin} object holds {what}, which builtins.dict cannot "
            "hold (a dict holds an object's attributes by name, as its __dict__ or __slots__ "
            "state)",
            "remedy": "redirect it to an allowed class that can hold it, or allow the class "
            "itself (safe_globals=) if you trust it",
        }


def dict_redirect(old: str) -> type:
    """The class ``old`` redirected to ``builtins.dict`` resolves to in our reader: its
    objects are :class:`RedirectedDict` objects that name ``old`` when they cannot hold it."""
    holder = type(old.rpartition(".")[2], (RedirectedDict,), {"__slots__": (), "origin": old})
    return GuardedType(holder.__name__, (_DictType,), {"holder": holder})


class TorchDictRedirects:
    """What torch's weights-only loader gets for the names redirected to ``builtins.dict``.

    That loader lets SETITEMS fill only a dict, OrderedDict or Counter, and BUILD give
    attributes (a ``(dict, slots)`` pair too) only to an allowed class without
    ``__setstate__``: of these, a Counter takes both. So each redirected name resolves to a
    class whose objects are Counters, remembered here, and :meth:`plain` makes each a plain
    dict of its items and attributes. Our reader has read the file first and refused any
    other state (:class:`RedirectedDict`); nothing the file names is imported or called.
    """

    def __init__(self) -> None:
        self.made: list[Counter[Any]] = []

    def target(self, old: str) -> type:
        """The class ``old`` resolves to: calling it (or NEWOBJ) makes a remembered Counter."""
        made = self.made

        def new(cls: type, *args: Any) -> Counter[Any]:
            holder: Counter[Any] = Counter()
            dict.update(holder, *args)  # a copy, as dict(...) makes; Counter(...) would count
            made.append(holder)
            return holder

        return type(old.rpartition(".")[2], (), {"__new__": new, "__module__": __name__})

    def plain(self, obj: Any) -> Any:
        """``obj`` with each object made here a plain dict (see :func:`plain_dicts`)."""
        return plain_dicts(obj, {id(o) for o in self.made}) if self.made else obj


def plain_dicts(obj: Any, made: set[int] = frozenset()) -> Any:  # type: ignore[assignment]
    """``obj`` with each :class:`RedirectedDict` in it (and each object whose id is in
    ``made``) a plain dict of its items and attributes; one object shared stays shared. Lists,
    dicts and an OrderedDict's attributes are changed in place, a tuple holding one rebuilt."""
    done: dict[int, Any] = {}

    def plain(value: Any) -> Any:
        key = id(value)
        if key in done:
            return done[key]
        if isinstance(value, RedirectedDict) or key in made:
            out: dict[Any, Any] = {}
            done[key] = out
            attributes = getattr(value, "__dict__", {})
            for k, v in [*dict.items(value), *attributes.items()]:
                out[k] = plain(v)
            return out
        kind = type(value)
        if kind is list:
            done[key] = value
            value[:] = [plain(v) for v in value]
        elif kind is dict or kind is OrderedDict:
            done[key] = value
            for k, v in value.items():
                value[k] = plain(v)
            if kind is OrderedDict and vars(value):
                plain(vars(value))  # ``_metadata``, which BUILD set
        elif kind is tuple:
            items = [plain(v) for v in value]
            done[key] = tuple(items) if any(a is not b for a, b in zip(items, value)) else value
        else:
            done[key] = value
        return done[key]

    return plain(obj)


def holds_dict_redirects(allowed: dict[str, Any]) -> bool:
    """Whether ``allowed`` (:func:`allowed_map`) redirects a class to ``builtins.dict``."""
    return any(getattr(v, "holder", None) is not None for v in allowed.values())


class _SafeBytearray(metaclass=GuardedType):
    """``builtins.bytearray`` from data only: an int argument would allocate that many bytes."""

    def __new__(cls, *args: Any) -> Any:  # type: ignore[misc]
        if not args:
            return bytearray()
        if len(args) == 1 and isinstance(args[0], (bytes, bytearray, list)):
            charge_decode(len(args[0]) + 64)  # a memoised value copied again and again
            return bytearray(args[0])
        if len(args) == 2 and isinstance(args[0], str) and args[1] in ("latin1", "latin-1"):
            charge_decode(len(args[0]) + 64)
            return bytearray(args[0], "latin-1")
        raise CheckpointFormatError("bytearray(...) with unexpected arguments in the pickle")


def _codecs_encode(value: Any, encoding: Any = "utf-8", errors: Any = "strict") -> bytes:
    # Protocol-2 pickles spell bytes as encode(str, "latin1"); no other codec is ever looked up.
    if not isinstance(value, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointFormatError("_codecs.encode(...) with an unexpected codec in the pickle")
    charge_decode(len(value) + 48)
    return value.encode("latin-1")


def _get_layout(name: Any) -> TorchConstant:
    if not isinstance(name, str) or not name.startswith("torch."):
        raise CheckpointFormatError(f"unknown tensor layout {bounded_repr(name)}")
    return TorchConstant(name)


# ---- tensor rebuild functions: same names and arguments as torch._utils, building stubs


def _expect_dims(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
        type(d) is int and 0 <= d <= MAX_DIM for d in value
    ):
        raise CheckpointFormatError(
            f"{what} is {bounded_repr(value, 200)}, expected a tuple of sizes below 2**63"
        )
    if type(value) is not tuple:
        charge_decode(8 * len(value) + 64)  # a memoised size list copied per tensor
    return tuple(value)


def _expect_stub(value: Any, what: str) -> TensorStub:
    if not isinstance(value, TensorStub):
        raise CheckpointFormatError(f"{what} wraps {type(value).__name__}, expected a tensor")
    return value


def _dtype_name(value: Any) -> str:
    if isinstance(value, TorchConstant) and value.name.startswith("torch."):
        name = value.name[len("torch.") :]
        if name in DTYPE_SIZES:
            return name
    raise CheckpointFormatError(f"{bounded_repr(value)} is not a torch dtype")


def _stub_from_storage(
    storage: Any,
    offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    dtype: str | None = None,
) -> TensorStub:
    if not isinstance(storage, StorageRef):
        raise CheckpointFormatError(f"tensor storage is {type(storage).__name__}, not a storage")
    shape = _expect_dims(size, "tensor size")
    if not isinstance(stride, (tuple, list)) or len(stride) != len(shape):
        raise CheckpointFormatError(
            f"tensor stride {bounded_repr(stride)} does not match size {bounded_repr(shape)}"
        )
    if not all(type(s) is int for s in stride) or type(offset) is not int or offset < 0:
        raise CheckpointFormatError(
            f"tensor stride {bounded_repr(stride)} or offset {bounded_repr(offset)} is malformed"
        )
    dtype = dtype or storage.dtype
    itemsize = DTYPE_SIZES[dtype]
    numel = prod(shape)
    # Highest element the tensor can touch: strides may skip (x[::2]) or repeat (expand).
    extent = 0 if numel == 0 else 1 + sum((n - 1) * abs(s) for n, s in zip(shape, stride))
    available = storage.numel * DTYPE_SIZES[storage.dtype]
    if (offset + extent) * itemsize > available:
        raise CheckpointFormatError(
            f"storage shorter than its tensor claims: storage {bounded_repr(storage.key)} holds "
            f"{available} bytes, a {dtype} tensor of shape {bounded_repr(shape)} at offset "
            f"{bounded_repr(offset)} needs {bounded_repr((offset + extent) * itemsize)}"
        )
    info = TensorInfo(
        shape=shape,
        dtype=dtype,
        nbytes=numel * itemsize,
        storage_key=storage.key,
        storage_offset=storage.view_offset + offset,
        device=storage.location,
    )
    return TensorStub(info, requires_grad=bool(requires_grad))


def _rebuild_tensor(storage: Any, storage_offset: Any, size: Any, stride: Any) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad)


def _rebuild_tensor_v3(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any,
    backward_hooks: Any,
    dtype: Any,
    metadata: Any = None,
) -> TensorStub:
    name = _dtype_name(dtype)
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad, name)


def _rebuild_qtensor(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    quantizer_params: Any,
    requires_grad: Any,
    backward_hooks: Any,
) -> TensorStub:
    return _stub_from_storage(storage, storage_offset, size, stride, requires_grad)


def _rebuild_parameter(data: Any, requires_grad: Any, backward_hooks: Any) -> TensorStub:
    stub = _expect_stub(data, "Parameter")
    return TensorStub(stub.info, requires_grad=bool(requires_grad), is_parameter=True)


def _rebuild_parameter_with_state(
    data: Any, requires_grad: Any, backward_hooks: Any, state: Any
) -> TensorStub:
    return _rebuild_parameter(data, requires_grad, backward_hooks)


def _rebuild_meta_tensor_no_storage(
    dtype: Any, size: Any, stride: Any, requires_grad: Any
) -> TensorStub:
    name = _dtype_name(dtype)
    shape = _expect_dims(size, "meta tensor size")
    info = TensorInfo(shape, name, prod(shape) * DTYPE_SIZES[name], device="meta")
    return TensorStub(info, requires_grad=bool(requires_grad))


def _rebuild_device_tensor_from_cpu_tensor(
    data: Any, dtype: Any, device: Any, requires_grad: Any
) -> TensorStub:
    stub = _expect_stub(data, "device tensor")
    name = _dtype_name(dtype)
    if not isinstance(device, str):  # str() of a shared list would build its whole tree
        raise CheckpointFormatError(f"device tensor on {type(device).__name__}, not a device")
    info = TensorInfo(
        stub.shape,
        name,
        stub.info.numel * DTYPE_SIZES[name],
        storage_key=stub.info.storage_key,
        storage_offset=stub.info.storage_offset,
        device=str(device),
    )
    return TensorStub(info, requires_grad=bool(requires_grad))


def _unsupported_rebuild(what: str) -> Callable[..., Any]:
    def rebuild(*args: Any) -> Any:
        raise CheckpointFormatError(
            f"the file holds {what}, which the metadata reader does not decode; load it with "
            "torch.load(weights_only=True) instead"
        )

    return rebuild


def _rebuild_from_type_v2(func: Any, new_type: Any, args: Any, state: Any) -> Any:
    if not callable(func) or not isinstance(args, tuple):
        raise CheckpointFormatError("_rebuild_from_type_v2 with malformed arguments")
    result = func(*args)
    if new_type is _ParameterType and isinstance(result, TensorStub):
        return TensorStub(result.info, requires_grad=result.requires_grad, is_parameter=True)
    return result


def _weights_only_globals() -> dict[str, Any]:
    """Every global torch's weights-only unpickler accepts, mapped to what we decode it to."""
    allowed: dict[str, Any] = {
        "collections.OrderedDict": _OrderedDictType,
        "collections.Counter": _CounterType,
        "torch.nn.parameter.Parameter": _ParameterType,
        "torch.serialization._get_layout": _get_layout,
        "torch.Size": _SizeType,
        "torch.Tensor": _TensorType,
        "torch.device": _DeviceType,
        "_codecs.encode": _codecs_encode,
        "builtins.bytearray": _SafeBytearray,
        "builtins.set": _SetType,
        "builtins.complex": complex,
        "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    }
    for dtype in DTYPE_SIZES:
        allowed[f"torch.{dtype}"] = TorchConstant(f"torch.{dtype}")
    for module in ("torch", "torch.cuda"):
        for kind in _TENSOR_TYPES + ["Bool"]:
            allowed[f"{module}.{kind}Tensor"] = TorchConstant(f"{module}.{kind}Tensor")
    for module in ("torch.sparse", "torch.cuda.sparse"):
        for kind in _TENSOR_TYPES:
            allowed[f"{module}.{kind}Tensor"] = TorchConstant(f"{module}.{kind}Tensor")
    for name, dtype in STORAGE_DTYPES.items():
        allowed[f"torch.{name}"] = StorageType(f"torch.{name}", dtype)
        if not name.startswith("Q"):  # no quantized storages on cuda
            allowed[f"torch.cuda.{name}"] = StorageType(f"torch.cuda.{name}", dtype)
    allowed["torch.storage.UntypedStorage"] = StorageType("torch.storage.UntypedStorage", "uint8")
    allowed["torch.storage.TypedStorage"] = StorageType("torch.storage.TypedStorage", None)
    for scheme in _QSCHEMES:
        allowed[f"torch.{scheme}"] = TorchConstant(f"torch.{scheme}")
    rebuilds: dict[str, Any] = {
        "_rebuild_tensor": _rebuild_tensor,
        "_rebuild_tensor_v2": _rebuild_tensor_v2,
        "_rebuild_tensor_v3": _rebuild_tensor_v3,
        "_rebuild_qtensor": _rebuild_qtensor,
        "_rebuild_parameter": _rebuild_parameter,
        "_rebuild_parameter_with_state": _rebuild_parameter_with_state,
        "_rebuild_meta_tensor_no_storage": _rebuild_meta_tensor_no_storage,
        "_rebuild_device_tensor_from_cpu_tensor": _rebuild_device_tensor_from_cpu_tensor,
        "_rebuild_sparse_tensor": _unsupported_rebuild("a sparse tensor"),
        "_rebuild_nested_tensor": _unsupported_rebuild("a nested tensor"),
        "_rebuild_wrapper_subclass": _unsupported_rebuild("a tensor wrapper subclass"),
        "_rebuild_device_tensor_from_numpy": _unsupported_rebuild("a numpy-backed tensor"),
    }
    for name, rebuild in rebuilds.items():
        allowed[f"torch._utils.{name}"] = rebuild
    return {
        name: GuardedCall(value, name) if isinstance(value, FunctionType) else value
        for name, value in allowed.items()
    }


_ALLOWED = _weights_only_globals()

#: The global names ``torch.load(weights_only=True)`` accepts; the only ones we decode.
WEIGHTS_ONLY_GLOBALS: frozenset[str] = frozenset(_ALLOWED)


#: Globals a redirect may point to beyond the allow-list: a class that moved may become a
#: plain dict, which the pickle fills exactly as it fills a dict it names no class for.
REDIRECT_ONLY_TARGETS: dict[str, Any] = {"builtins.dict": _DictType}

#: At most this many redirects in one read, and this many characters a name: a schema or a
#: command line that holds more is a mistake, refused before any file is read.
MAX_REDIRECTS = 4096
MAX_REDIRECT_NAME = 512


@dataclass(frozen=True)
class GlobalRedirect:
    """A global an old pickle names (``old``) read as an allowed global (``new``); both may end
    in ``.*`` (a prefix rule, applied to the allowed names only). It travels among the allowed
    globals (``safe_globals=[..., GlobalRedirect(...)]``) to every reader, and is refused
    before any file is read when ``new`` is not allowed there (:func:`redirect_map`).

    >>> GlobalRedirect.parse("pytorch_lightning.*=lightning.pytorch.*").is_prefix
    True
    """

    old: str
    new: str

    def __post_init__(self) -> None:
        for name in (self.old, self.new):
            if not _is_global_name(name):
                raise RedirectError(
                    str(self.old), str(self.new),
                    f"{bounded_repr(name, 80)} is not a dotted name of ASCII identifiers",
                    remedy="write OLD.module.Name=NEW.module.Name, or OLD.*=NEW.* for a prefix",
                )  # fmt: skip
        if self.old.endswith(".*") != self.new.endswith(".*"):
            raise RedirectError(
                self.old, self.new, "a prefix rule needs '.*' on both sides, or on neither"
            )
        for name in (self.old, self.new):
            if _blocked(name):
                raise RedirectError(
                    self.old, self.new, f"module {_blocked(name)!r} is never allowed, redirected "
                    "or not",
                )  # fmt: skip

    @classmethod
    def parse(cls, text: str) -> GlobalRedirect:
        """``"OLD=NEW"`` as given to ``--redirect-global``."""
        old, sep, new = text.partition("=")
        if not sep:
            raise RedirectError(text, "", "expected OLD=NEW", remedy="e.g. a.Name=builtins.dict")
        return cls(old.strip(), new.strip())

    @property
    def is_prefix(self) -> bool:
        """Whether it maps every allowed name under a module prefix."""
        return self.old.endswith(".*")


def _is_global_name(name: object) -> bool:
    """``module.Name`` (or ``module.*``): two or more ASCII identifiers joined by dots."""
    if not isinstance(name, str) or not 3 <= len(name) <= MAX_REDIRECT_NAME or not name.isascii():
        return False
    parts = name.removesuffix(".*").split(".")
    return (len(parts) >= 2 or name.endswith(".*")) and all(p.isidentifier() for p in parts)


def _blocked(name: str) -> str | None:
    module = name.partition(".")[0]
    return module if module in _BLOCKED_MODULES else None


def redirect_map(allowed_globals: Iterable[Any]) -> dict[str, str]:
    """The :class:`GlobalRedirect` items of ``allowed_globals`` as ``{old: new}`` names, prefix
    rules expanded over the allowed names; refuses one whose target is not allowed.

    Allowed means torch's weights-only allow-list, ``builtins.dict``, or a name among
    ``allowed_globals``: a redirect never makes a global reachable that was not already. An
    allowed name is never redirected, so a redirect never chains into another.

    >>> redirect_map(["a.New", GlobalRedirect("old.*", "a.*")])
    {'old.New': 'a.New'}
    """
    items = list(allowed_globals)
    rules = [item for item in items if isinstance(item, GlobalRedirect)]
    if not rules:
        return {}
    if len(rules) > MAX_REDIRECTS:
        first = rules[0]
        raise RedirectError(
            first.old, first.new, f"{len(rules)} redirects given, at most {MAX_REDIRECTS} are read"
        )
    caller = {item for item in items if isinstance(item, str) and not _blocked(item)}
    targets = set(_ALLOWED) | set(REDIRECT_ONLY_TARGETS) | caller
    found: dict[str, str] = {}
    for rule in sorted(rules, key=lambda r: r.is_prefix):  # exact rules first, then prefixes
        if rule.is_prefix:
            old, new = rule.old[:-1], rule.new[:-1]
            for target in sorted(t for t in targets if t.startswith(new)):
                name = old + target[len(new) :]
                if name not in targets:  # an allowed name stays itself
                    found.setdefault(name, target)
            continue
        if rule.old in targets:
            raise RedirectError(
                rule.old, rule.new, f"{rule.old} is allowed as itself, so it needs no redirect"
            )
        if rule.new not in targets:
            raise RedirectError(
                rule.old, rule.new, f"a redirect may only point to an allowed global, and "
                f"{rule.new} is neither in torch's weights-only allow-list nor among the allowed "
                "globals",
                remedy="point it to builtins.dict or another allowed global (a class you trust is "
                "allowed first: --allow-global module.Name, or safe_globals=)",
            )  # fmt: skip
        if found.get(rule.old, rule.new) != rule.new:
            raise RedirectError(
                rule.old, rule.new, f"{rule.old} is redirected to {found[rule.old]} as well"
            )
        found[rule.old] = rule.new
    return found


def allowed_map(allowed_globals: Iterable[Any]) -> dict[str, Any]:
    """The weights-only allow-list plus ``allowed_globals`` (``"module.Name"``), each decoding
    to an :class:`~.placeholders.OpaqueObject`, and the :class:`GlobalRedirect` items among
    them, an old name decoding as its allowed target does; the shared map is never changed."""
    items = list(allowed_globals)
    allowed = dict(_ALLOWED)
    for name in items:
        if isinstance(name, GlobalRedirect):
            continue
        if not isinstance(name, str) or "." not in name:
            raise UsageError(f"allowed_globals holds {name!r}, expected 'module.Name' strings")
        if name not in allowed:
            allowed[name] = opaque_global(name)
    for old, new in redirect_map(items).items():
        if new == "builtins.dict":
            allowed[old] = dict_redirect(old)
        else:
            allowed[old] = (
                REDIRECT_ONLY_TARGETS[new] if new in REDIRECT_ONLY_TARGETS else allowed[new]
            )
    return allowed


def check_global(name: str, allowed: dict[str, Any], path: object) -> None:
    """Refuse the global ``name`` unless ``allowed`` maps it; ``sys``, ``os``... never pass."""
    module = _blocked(name)
    if module is not None:
        raise UnsafeCheckpointError(name, path=path, detail=f"module {module!r} is never allowed")
    if name not in allowed:
        raise UnsafeCheckpointError(name, path=path)


def python3_name(module: str, name: str) -> str:
    """Python 2 names (``__builtin__.set``) as Python 3 spells them, as torch's loader maps them."""
    if (module, name) in _compat_pickle.NAME_MAPPING:
        module, name = _compat_pickle.NAME_MAPPING[(module, name)]
    elif module in _compat_pickle.IMPORT_MAPPING:
        module = _compat_pickle.IMPORT_MAPPING[module]
    return f"{module}.{name}"
