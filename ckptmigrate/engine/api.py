"""The top-level calls: save, load (upgrading on the way in), load_into and attach."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..base.version import parse_version
from ..errors import BreakingMigrationError, UnversionedCheckpointError, UsageError
from ..formats.torch import with_redirects
from ..io.files import read_checkpoint, write_checkpoint
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint
from .guess import apply_from_version
from .upgrade import check_belongs
from .upgrade import upgrade as upgrade_checkpoint

if TYPE_CHECKING:
    import torch


def _resolve_schema(schema: Schema | str | None) -> Schema | None:
    """A Schema as given; a name looked up in the discovered migrations (or raise)."""
    if schema is None:
        return None
    from ..schema.registry import get_schema

    return get_schema(schema)


def save(
    path: str | os.PathLike[str],
    obj: Checkpoint | Mapping[str, Any],
    *,
    schema: Schema | str | None = None,
    version: str | Version | None = None,
    hparams: Mapping[str, Any] | None = None,
    meta: Mapping[str, Any] | None = None,
    prefix: str = "",
    hparams_key: str | None = None,
) -> Checkpoint:
    """Write a stamped checkpoint atomically and return what was written.

    ``obj`` is a state_dict (then ``schema`` is required, and ``version`` too when the schema
    is given by name) or a :class:`Checkpoint`, written in the layout it was read in. A path
    ending in ``.safetensors`` writes safetensors; anything else an ordinary torch.save file.

    >>> cm.save("model.pth", model.state_dict(), schema=schema, hparams={"d_model": 64})
    >>> cm.save("old.pth", sd, schema="tinylm", version="1.0.0")

    ``prefix`` mounts the schema at a key prefix instead of the root: the keys under it are the
    schema's (``prefix="net."`` for a LightningModule's ``self.net``); saving a Checkpoint with
    a prefix adds (or replaces) that mount and keeps the others. ``hparams_key`` names the
    entry of ``hparams`` that is the mount's own dict (default: the mount sees all hparams).

    >>> cm.save("lit.ckpt", lit.state_dict(), schema=net_schema, prefix="net.")
    """
    if prefix:
        return _save_mounted(path, obj, schema, version, hparams, meta, prefix, hparams_key)
    if hparams_key is not None:
        raise UsageError("hparams_key= names a mount's hparams entry, so it needs prefix= too")
    if isinstance(obj, Checkpoint):
        ckpt = obj.copy()
        if schema is not None:
            ckpt.schema = schema.name if isinstance(schema, Schema) else schema
        if version is not None:
            ckpt.version = parse_version(version)
        if hparams is not None:
            ckpt.hparams = dict(hparams)
        if meta is not None:
            ckpt.meta = dict(meta)
    else:
        if not isinstance(obj, Mapping):
            raise UsageError(f"save takes a state_dict or a Checkpoint, got {type(obj).__name__}")
        if schema is None:
            raise UsageError("save(path, state_dict) needs schema= (a Schema or its name)")
        if version is None:
            if not isinstance(schema, Schema):
                raise UsageError(
                    f"schema {schema!r} is given by name, so pass version= as well "
                    "(with a Schema object it defaults to schema.current)"
                )
            version = schema.current
        module_metadata = getattr(obj, "_metadata", None)
        ckpt = Checkpoint(
            state_dict=dict(obj),
            hparams=dict(hparams or {}),
            meta=dict(meta or {}),
            schema=schema.name if isinstance(schema, Schema) else schema,
            version=parse_version(version),
            module_metadata=dict(module_metadata) if module_metadata is not None else None,
        )
        if ckpt.module_metadata and "" in ckpt.module_metadata:
            ckpt.module_metadata[""] = {
                k: v for k, v in ckpt.module_metadata[""].items() if k != "__ckptmigrate__"
            }
    write_checkpoint(path, ckpt)
    return ckpt


def _save_mounted(
    path: str | os.PathLike[str],
    obj: Checkpoint | Mapping[str, Any],
    schema: Schema | str | None,
    version: str | Version | None,
    hparams: Mapping[str, Any] | None,
    meta: Mapping[str, Any] | None,
    prefix: str,
    hparams_key: str | None,
) -> Checkpoint:
    from .mounts import mount

    if schema is None:
        raise UsageError("save(path, obj, prefix=...) needs schema= (a Schema or its name)")
    if version is None and not isinstance(schema, Schema):
        raise UsageError(f"schema {schema!r} is given by name, so pass version= as well")
    name = schema.name if isinstance(schema, Schema) else schema
    chosen = version if version is not None else schema.current  # type: ignore[union-attr]
    if isinstance(obj, Checkpoint):
        ckpt = obj.copy()
        ckpt.mounts = [m for m in ckpt.mounts if m.prefix != prefix]
    else:
        metadata = getattr(obj, "_metadata", None)
        ckpt = Checkpoint(
            state_dict=dict(obj),
            module_metadata=dict(metadata) if metadata is not None else None,
        )
    if hparams is not None:
        ckpt.hparams = dict(hparams)
    if meta is not None:
        ckpt.meta = dict(meta)
    ckpt = mount(ckpt, prefix, name, chosen, hparams=hparams_key)
    write_checkpoint(path, ckpt)
    return ckpt


def load(
    path: str | os.PathLike[str],
    *,
    schema: Schema | str | None = None,
    to: str | Version | None = None,
    upgrade: bool = True,
    from_version: str | Version | None = None,
    map_location: Any = "cpu",
    mmap: bool = False,
    safe_globals: Iterable[Any] = (),
    param_names: Sequence[str] | None = None,
) -> Checkpoint:
    """Read a checkpoint file and upgrade it to ``to`` (default: ``schema.current``).

    Reads our files, plain ``torch.save(model.state_dict())`` files, Lightning, nested
    ``{"model": ..., "optimizer": ...}`` and tutorial dicts, safetensors and legacy pre-zip
    files, with torch's weights-only loader: nothing in the file runs. Tensors land on the
    CPU unless ``map_location`` says otherwise. Never writes a file.

    ``upgrade=False`` returns the file as stored; ``from_version`` gives an unstamped file its
    version (``"auto"`` guesses it from the keys); ``safe_globals`` allows trusted classes.
    Optimizer state follows its parameters; ``param_names`` (the names in the order the
    optimizer got its parameters) is needed only when the file's optimizer state is keyed by
    position and carries no ``param_names`` of its own.

    >>> ckpt = cm.load("model.pth", schema=schema)
    >>> raw = cm.load("legacy.pt", schema=schema, from_version="1.0.0")
    """
    resolved = _resolve_schema(schema)
    safe_globals = with_redirects(safe_globals, resolved.redirects if resolved else ())
    ckpt = read_checkpoint(path, map_location=map_location, mmap=mmap, safe_globals=safe_globals)
    ckpt = apply_from_version(ckpt, resolved, from_version, path=path)
    if not upgrade or resolved is None:
        return ckpt
    if not ckpt.mounts:
        check_belongs(ckpt, resolved, path=path)
    return upgrade_checkpoint(ckpt, resolved, to=to, param_names=param_names, origin=path)


def load_into(
    model: torch.nn.Module,
    path: str | os.PathLike[str],
    *,
    schema: Schema | str,
    strict: bool = True,
    strip_wrappers: bool = True,
    **load_kwargs: Any,
) -> Checkpoint:
    """Load ``path``, upgrade it, and ``model.load_state_dict`` it; returns the Checkpoint.

    The model should be built from the migrated hparams (``schema.build(ckpt.hparams)``) when
    the chain has a BC-breaking step. ``ckpt.report`` (a :class:`~ckptmigrate.LoadReport`)
    lists missing, unexpected and shape-mismatched keys (with ``strict=False``), silent dtype
    casts, and unexpected keys that are non-persistent buffers of the model. A file saved from
    a ``DataParallel`` or ``torch.compile`` wrapper (every key under ``module.`` or
    ``_orig_mod.``, none of the model's) is unwrapped first, and the report says so
    (``strip_wrappers=False`` turns that off). ``load_kwargs`` go to :func:`load`.

    >>> ckpt = cm.load_into(model, "model.pth", schema=schema, strict=False)
    >>> ckpt.report.missing, ckpt.report.unexpected
    """
    from ..io.report import load_report
    from ..schema.ops import strip_wrappers as wrapper_ops

    ckpt = load(path, schema=schema, **load_kwargs)
    stripped: list[str] = []
    if strip_wrappers:
        model_keys = list(model.state_dict())
        ops = wrapper_ops()
        while ckpt.state_dict:  # compile(DataParallel(m)) nests both prefixes
            op = next((op for op in ops if op.wraps(ckpt.state_dict, model_keys)), None)
            if op is None:
                break
            ckpt = ckpt.copy()
            op.apply(ckpt)
            stripped.append(op.old)
    report = load_report(model, ckpt.state_dict, ckpt.module_metadata)
    report.stripped_prefixes = stripped
    if strict and not report.clean_for_strict:
        report.raise_for_strict()
    sd = ckpt.state_dict_for_torch()
    if not strict:
        sd = type(sd)((k, v) for k, v in sd.items() if k not in report.shape_mismatched_keys)
        if ckpt.module_metadata is not None:
            sd._metadata = ckpt.state_dict_for_torch()._metadata  # type: ignore[attr-defined]
    model.load_state_dict(sd, strict=strict)
    ckpt.report = report
    return ckpt


def attach(
    model: torch.nn.Module, schema: Schema | str, *, default_version: str | None = None
) -> Any:
    """Let plain ``model.load_state_dict(old_sd)`` upgrade ``old_sd`` first.

    The model is already built with today's hparams, so only non-breaking steps may run: a
    plan with a BC-breaking step raises :class:`BreakingMigrationError`, saying to use
    ``cm.load_into`` on a model built from the migrated hparams. The version comes from the
    stamp a flat file carries in ``_metadata``, or ``default_version`` for unstamped dicts.
    Returns the hook handle (``handle.remove()`` detaches). A schema given by name is looked
    up in the discovered migrations now, so an unknown name raises here, not at load time.

    >>> cm.attach(model, schema)          # or cm.attach(model, "tinylm")
    >>> model.load_state_dict(torch.load("old.pth", weights_only=True))
    """
    from ..formats.layout import split

    found = _resolve_schema(schema)
    assert found is not None  # a name resolves or raises UnknownSchemaError
    default = None if default_version is None else parse_version(default_version)

    def hook(module: Any, state_dict: Any, prefix: str, *args: Any) -> None:
        if prefix:
            return  # only the root module rewrites the whole dict
        ckpt = split(state_dict)
        if ckpt.version is None:
            if default is None:
                raise UnversionedCheckpointError(schema=found.name)
            ckpt = replace(ckpt, schema=found.name, version=default)
        check_belongs(ckpt, found)
        plan = found.plan(ckpt.version)  # type: ignore[arg-type]
        breaking = [p for p in plan if p.step.breaking]
        if breaking:
            p = breaking[0]
            raise BreakingMigrationError(
                found.name,
                p.source,
                p.target,
                p.name,
                "this step is BC-breaking, so a model built with today's hparams would not "
                "reproduce the old outputs: use cm.load_into(schema.build(ckpt.hparams), path, "
                "schema=schema) on a model built from the migrated hparams",
            )
        new = upgrade_checkpoint(ckpt, found)
        metadata = getattr(state_dict, "_metadata", None)
        state_dict.clear()
        state_dict.update(new.state_dict)
        if metadata is not None and new.module_metadata is not None:
            metadata.clear()
            metadata.update(new.module_metadata)

    return model.register_load_state_dict_pre_hook(hook)
