"""Schemas mounted at key prefixes: one file, several schemas, each upgraded on its own keys.

A LightningModule holds the user's module under an attribute (``net.encoder.w``), a task model
its backbone under ``bert.``; a migration written for the module sees ``encoder.w``. A mount
says so in the stamp (:class:`~ckptmigrate.stamp.Mount`), and :func:`upgrade_mount` runs the
mount's schema over a view of the checkpoint with the prefix taken off, then puts it back::

    >>> ckpt = mount(ckpt, "net.", "net", "1.0.0")          # stamp the keys under net.
    >>> ckpt = upgrade_mount(ckpt, net_schema, prefix="net.")

The view holds the keys under the prefix, their modules' ``_metadata`` entries, the mount's
hparams (its named entry, else the whole hparams), the file's meta and extra entries, and the
optimizer state of the mount's parameters, by name; keys outside the mount are untouched. The
mount at ``""`` (the stamp's root fields) owns the keys outside every other mount.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from .checkpoint import Checkpoint
from .errors import MountError, SchemaMismatchError, UnversionedCheckpointError
from .stamp import Mount, check_prefixes
from .version import parse_version

if TYPE_CHECKING:
    from .graph import PlannedStep
    from .schema import Schema

__all__ = [
    "all_mounts",
    "mount",
    "mount_plan",
    "mount_view",
    "model_view",
    "mounts_of_schema",
    "owner_of",
    "upgrade_every_mount",
    "upgrade_mount",
    "upgrade_mounts_of",
]


def all_mounts(ckpt: Checkpoint) -> list[Mount]:
    """Every mount of ``ckpt``: the root one at ``""`` first (when stamped), then the others."""
    root = []
    if ckpt.stamped:
        assert ckpt.schema is not None and ckpt.version is not None
        root = [Mount("", ckpt.schema, ckpt.version, ckpt.history)]
    return root + list(ckpt.mounts)


def mount(
    ckpt: Checkpoint,
    prefix: str,
    schema: str,
    version: str | Version,
    *,
    hparams: str | None = None,
) -> Checkpoint:
    """A copy of ``ckpt`` with ``schema`` at ``version`` mounted at ``prefix`` (``""``: the root).

    Some key must start with ``prefix``; a mount already there, or one overlapping it, is a
    :class:`MountError`.
    """
    out = ckpt.copy()
    parsed = parse_version(version)
    if prefix == "":
        if hparams is not None:
            raise MountError("the mount at '' sees the whole hparams: hparams= needs a prefix")
        out.schema, out.version, out.history = schema, parsed, []
        return out
    if any(m.prefix == prefix for m in ckpt.mounts):
        raise MountError(
            f"the checkpoint already has a mount at {prefix!r}: upgrade it instead of stamping it"
        )
    check_prefixes([prefix] + [m.prefix for m in ckpt.mounts], error=MountError)
    if not any(k.startswith(prefix) for k in ckpt.state_dict):
        starts = sorted({k.partition(".")[0] + "." for k in ckpt.state_dict})[:5]
        raise MountError(
            f"no key starts with the prefix {prefix!r} to mount {schema!r} at; keys start "
            f"with {', '.join(repr(s) for s in starts) or 'nothing (no keys)'}: pick one of "
            "those (with its '.')"
        )
    if hparams is not None and not isinstance(ckpt.hparams.get(hparams, {}), dict):
        raise MountError(f"hparams entry {hparams!r} is not a dict, so it cannot be a mount's")
    out.mounts.append(Mount(prefix, schema, parsed, [], hparams))
    return out


def mounts_of_schema(ckpt: Checkpoint, schema: Schema, *, path: object = None) -> list[Mount]:
    """The mounts of ``ckpt`` that hold ``schema``; none is a :class:`SchemaMismatchError`."""
    found = all_mounts(ckpt)
    mine = [m for m in found if m.schema == schema.name]
    if mine:
        return mine
    if not found:
        raise UnversionedCheckpointError(path=path, schema=schema.name)
    held = ", ".join(f"{m.schema} at {m.prefix!r}" for m in found)
    raise SchemaMismatchError(schema.name, held, path=path)


def mount_plan(
    ckpt: Checkpoint, schema: Schema, prefix: str, to: str | Version | None = None
) -> list[PlannedStep]:
    """The checked plan that takes the mount at ``prefix`` to ``to`` (default: current)."""
    found = _find(ckpt, prefix)
    if found.schema != schema.name:
        raise SchemaMismatchError(schema.name, found.schema)
    return schema.plan(found.version, to)


def upgrade_mount(
    ckpt: Checkpoint,
    schema: Schema,
    *,
    prefix: str,
    to: str | Version | None = None,
    param_names: Sequence[str] | None = None,
    plan: Sequence[PlannedStep] | None = None,
) -> Checkpoint:
    """``ckpt`` with its mount at ``prefix`` migrated to ``to``; the input is untouched.

    >>> new = upgrade_mount(ckpt, net_schema, prefix="net.")
    """
    from .upgrade import run_plan

    steps = list(plan) if plan is not None else mount_plan(ckpt, schema, prefix, to)
    if not steps:
        return ckpt.copy()
    view, named = _view(ckpt, prefix, param_names)
    done = run_plan(view, steps, schema)
    return _put_back(ckpt, prefix, done, named)


def upgrade_mounts_of(
    ckpt: Checkpoint,
    schema: Schema,
    to: str | Version | None = None,
    *,
    param_names: Sequence[str] | None = None,
) -> Checkpoint:
    """``ckpt`` with every mount that holds ``schema`` migrated to ``to`` (what cm.upgrade does
    for a checkpoint with mounts); each plan is checked before any mount runs."""
    mine = mounts_of_schema(ckpt, schema)
    plans = [(m.prefix, mount_plan(ckpt, schema, m.prefix, to)) for m in mine]
    out = ckpt
    for prefix, plan in plans:
        out = upgrade_mount(out, schema, prefix=prefix, param_names=param_names, plan=plan)
    return out if out is not ckpt else ckpt.copy()


def mount_view(ckpt: Checkpoint, prefix: str) -> Checkpoint:
    """What the model of the mount at ``prefix`` sees: its keys without the prefix, their
    modules' metadata, its hparams (its named entry, else the whole hparams), its stamp.

    >>> model.load_state_dict(mount_view(ckpt, "net.").state_dict_for_torch(), strict=True)
    """
    return _view(ckpt, prefix, None)[0]


def model_view(ckpt: Checkpoint, schema: str, prefix: str | None = None) -> Checkpoint:
    """What the model ``schema`` builds loads from ``ckpt``: the whole checkpoint when it has
    no mounts, else the view of its mount of ``schema`` (at ``prefix``, needed when several
    mounts hold it).

    >>> view = model_view(ckpt, "net")   # the keys under net., without the prefix
    """
    if not ckpt.mounts and not prefix:
        return ckpt
    mine = [m.prefix for m in all_mounts(ckpt) if m.schema == schema]
    if prefix is not None:
        if prefix not in mine:
            raise MountError(
                f"the checkpoint has no mount of {schema!r} at {prefix!r}; it has " f"{_held(ckpt)}"
            )
        return mount_view(ckpt, prefix)
    if len(mine) != 1:
        found = "no mount" if not mine else f"{len(mine)} mounts ({', '.join(map(repr, mine))})"
        raise MountError(
            f"the model of {schema!r} loads one mount, but the checkpoint has {found} of it "
            f"({_held(ckpt)}): name the mount's prefix"
        )
    return mount_view(ckpt, mine[0])


def _held(ckpt: Checkpoint) -> str:
    return ", ".join(f"{m.schema} at {m.prefix!r}" for m in all_mounts(ckpt)) or "no mounts"


def upgrade_every_mount(ckpt: Checkpoint, schemas: Mapping[str, Schema]) -> Checkpoint:
    """``ckpt`` with every mount migrated to its schema's current version (the schemas found
    by name in ``schemas``; a mount of another one is an :class:`UnknownSchemaError`); each
    plan is checked before any mount runs.

    >>> ckpt = upgrade_every_mount(ckpt, find_schemas(["migrations"]))
    """
    from .errors import UnknownSchemaError

    plans = []
    for m in all_mounts(ckpt):
        if m.schema not in schemas:
            raise UnknownSchemaError(m.schema, list(schemas))
        schema = schemas[m.schema]
        plans.append((m.prefix, schema, mount_plan(ckpt, schema, m.prefix)))
    out = ckpt
    for prefix, schema, plan in plans:
        out = upgrade_mount(out, schema, prefix=prefix, plan=plan)
    return out if out is not ckpt else ckpt.copy()


def _find(ckpt: Checkpoint, prefix: str) -> Mount:
    for m in all_mounts(ckpt):
        if m.prefix == prefix:
            return m
    held = ", ".join(repr(m.prefix) for m in all_mounts(ckpt)) or "none"
    raise MountError(f"the checkpoint has no mount at {prefix!r}; its mounts are at {held}")


def owner_of(ckpt: Checkpoint) -> Any:
    """A function from a key to the prefix of the mount that owns it (``""``: the root)."""
    prefixes = [m.prefix for m in ckpt.mounts]

    def owner(key: str) -> str:
        return next((p for p in prefixes if key.startswith(p)), "")

    return owner


def _owns(ckpt: Checkpoint, prefix: str) -> Any:
    """Whether a key (or a module's dotted prefix) belongs to the mount at ``prefix``."""
    if prefix:
        return lambda key: key.startswith(prefix)
    others = tuple(m.prefix for m in ckpt.mounts)
    return lambda key: not key.startswith(others)


def _view(
    ckpt: Checkpoint, prefix: str, param_names: Sequence[str] | None
) -> tuple[Checkpoint, list[Any]]:
    found = _find(ckpt, prefix)
    owns = _owns(ckpt, prefix)
    cut = len(prefix)
    modules = None
    if ckpt.module_metadata is not None:  # torch names modules without the trailing "."
        modules = type(ckpt.module_metadata)(
            ((key + ".")[cut:-1], dict(value))
            for key, value in ckpt.module_metadata.items()
            if owns(key + ".")
        )
    hparams = ckpt.hparams
    if found.hparams is not None:
        hparams = ckpt.hparams.get(found.hparams, {})
    named = _named_optimizers(ckpt, param_names)
    view = replace(
        ckpt.copy(),
        state_dict={k[cut:]: v for k, v in ckpt.state_dict.items() if owns(k)},
        module_metadata=modules,
        schema=found.schema,
        version=found.version,
        history=[dict(h) for h in found.history],
        mounts=[],
        optimizer=_sub_optimizers(named, owns, cut) if named else None,
    )
    view.hparams = dict(hparams)
    return view, named


def _put_back(ckpt: Checkpoint, prefix: str, done: Checkpoint, named: list[Any]) -> Checkpoint:
    out = ckpt.copy()
    owns = _owns(ckpt, prefix)
    moved = {prefix + k: v for k, v in done.state_dict.items()}
    strays = [k for k in moved if not owns(k)]
    if strays:
        raise MountError(
            f"the migration of the mount at {prefix!r} made key {strays[0]!r}, which belongs "
            "to another mount: a mount's migrations may only rename keys within it"
        )
    state_dict: dict[str, Any] = {}
    for key, value in ckpt.state_dict.items():
        if not owns(key):
            state_dict[key] = value
        elif not state_dict.keys() >= moved.keys():
            state_dict.update(moved)  # the mount's keys where its first key was
    state_dict.update(moved)
    out.state_dict = state_dict
    if ckpt.module_metadata is not None or done.module_metadata:
        kept = {k: v for k, v in (ckpt.module_metadata or {}).items() if not owns(k + ".")}
        mine = {
            (prefix + k if k else prefix[:-1]): v for k, v in (done.module_metadata or {}).items()
        }
        out.module_metadata = type(ckpt.module_metadata or {})({**kept, **mine})
    found = _find(ckpt, prefix)
    if found.hparams is not None:
        out.hparams = {**ckpt.hparams, found.hparams: done.hparams}
    else:
        out.hparams = done.hparams
    out.meta, out.extra = done.meta, done.extra
    if named:
        out.optimizer = _merge_optimizers(ckpt, named, done, owns, prefix)
    elif ckpt.optimizer is not None:
        _check_positions_hold(ckpt, done, prefix, owns)
    if prefix:
        out.mounts = [
            replace(m, version=done.version, history=done.history) if m.prefix == prefix else m
            for m in ckpt.mounts
        ]
    else:
        out.version, out.history = done.version, done.history
    return out


def _named_optimizers(ckpt: Checkpoint, param_names: Sequence[str] | None) -> list[Any]:
    """``(where, NamedOptimizer)`` for each optimizer state, when all of them carry names."""
    from .optimizer import ParamNamesUnknown, to_named
    from .upgrade import _optimizer_states

    out = []
    for where, opt_sd in _optimizer_states(ckpt.optimizer):
        try:
            out.append((where, to_named(opt_sd, param_names)))
        except ParamNamesUnknown:
            return []
    return out


def _sub_optimizers(named: list[Any], owns: Any, cut: int) -> list[Any]:
    """The mount's part of each optimizer, by its own (prefix-less) names, as torch state."""
    from .optimizer import NamedOptimizer, from_named

    subs = []
    for _, full in named:
        groups = [{**g, "names": [n[cut:] for n in g["names"] if owns(n)]} for g in full.groups]
        states = {n[cut:]: st for n, st in full.states.items() if owns(n)}
        sub = NamedOptimizer(states, groups, True, dict(full.extra))
        subs.append(from_named(sub))
    return subs


def _merge_optimizers(
    ckpt: Checkpoint, named: list[Any], done: Checkpoint, owns: Any, prefix: str
) -> Any:
    """Each optimizer with the mount's state replaced by what its migration made of it."""
    from .optimizer import from_named, to_named
    from .upgrade import _put

    optimizer = ckpt.copy().optimizer
    for (where, full), sub_sd in zip(named, done.optimizer):
        sub = to_named(sub_sd, None)
        for group, sub_group in zip(full.groups, sub.groups):
            names = [n for n in group["names"] if not owns(n)]
            group["names"] = names + [prefix + n for n in sub_group["names"]]
        full.states = {n: st for n, st in full.states.items() if not owns(n)}
        full.states.update({prefix + n: st for n, st in sub.states.items()})
        optimizer = _put(optimizer, where, from_named(full))
    return optimizer


def _check_positions_hold(ckpt: Checkpoint, done: Checkpoint, prefix: str, owns: Any) -> None:
    """Optimizer state keyed by position only survives a plan that keeps the mount's tensors
    (their number, order and shapes): renames, hparam changes."""
    from .optimizer import ParamNamesUnknown
    from .upgrade import _optimizer_states

    if not _optimizer_states(ckpt.optimizer):
        return
    before = [_shape(v) for k, v in ckpt.state_dict.items() if owns(k)]
    after = [_shape(v) for v in done.state_dict.values()]
    if before != after:
        raise ParamNamesUnknown(
            f"the migration of the mount at {prefix!r} changes its parameters (not only their "
            "names)"
        )


def _shape(value: Any) -> Any:
    return tuple(value.shape) if hasattr(value, "shape") else None
