"""Schemas mounted at key prefixes: one file, several schemas, each upgraded on its own keys.

A LightningModule holds the user's module under an attribute (``net.encoder.w``), a task model
its backbone under ``bert.``; a migration written for the module sees ``encoder.w``. A mount
says so in the stamp (:class:`~ckptmigrate.stamp.Mount`), and :func:`upgrade_mount` runs the
mount's schema over a view of the checkpoint with the prefix taken off, then puts it back::

    >>> ckpt = mount(ckpt, "net.", "net", "1.0.0")          # stamp the keys under net.
    >>> ckpt = upgrade_mount(ckpt, net_schema, prefix="net.")

The view holds the keys under the prefix, their modules' ``_metadata`` entries, the mount's
hparams (its named entry, else the whole hparams), the file's meta and extra entries; keys
outside the mount are untouched, and the mount's keys stay where they were in the file. The
mount at ``""`` (the stamp's root fields) owns the keys outside every other mount.

The file's optimizer state follows the mount's parameters by the root's rules: state that
carries names follows each op; position-keyed state stays as it is through steps that keep the
mount's positions, other steps need the names of the whole optimizer's positions:
``param_names`` (``--param-names FILE``), the file's full keys *with* the mount's prefix (what
a LightningModule's ``self.parameters()`` lists: ``net.encoder.w``), else the file's own
parameter order, used only once verified.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..base.version import parse_version
from ..errors import (
    MountError,
    ParamNamesUnknownError,
    SchemaMismatchError,
    UnversionedCheckpointError,
)
from ..values.checkpoint import Checkpoint
from ..values.stamp import Mount, check_prefixes
from .followers import put
from .optimizer import NamedOptimizer, carries_names, from_named, to_named
from .positions import PositionalState, deduce_param_names, verify_param_names

if TYPE_CHECKING:
    from ..schema.graph import PlannedStep
    from ..schema.schema import Schema

__all__ = [
    "all_mounts",
    "chosen_mounts",
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


def chosen_mounts(
    ckpt: Checkpoint, schemas: Mapping[str, Schema], name: str | None = None, *, path: object = None
) -> list[Mount]:
    """The mounts of ``ckpt`` an upgrade or a diff takes: those of schema ``name`` when given
    (a name no schema has is the first thing wrong), else all; none is a
    :class:`SchemaMismatchError`."""
    from ..schema.registry import get_schema

    if name is not None:
        get_schema(name, schemas)
    chosen = [m for m in all_mounts(ckpt) if name is None or m.schema == name]
    if not chosen:
        held = ", ".join(f"{m.schema} at {m.prefix!r}" for m in all_mounts(ckpt))
        raise SchemaMismatchError(str(name), held, path=path)
    return chosen


def mount_plan(
    ckpt: Checkpoint,
    schema: Schema,
    prefix: str,
    to: str | Version | None = None,
    *,
    origin: object = None,
) -> list[PlannedStep]:
    """The checked plan that takes the mount at ``prefix`` to ``to`` (default: current), its
    history's recorded inverses included; warns when a step its history says ran has been
    edited since (``origin``: the file, named in the warning)."""
    from .upgrade import warn_if_edited

    found = _find(ckpt, prefix)
    if found.schema != schema.name:
        raise SchemaMismatchError(schema.name, found.schema)
    plan = schema.plan(found.version, to, history=found.history)
    warn_if_edited(found.history, schema, origin=origin, prefix=prefix)
    return plan


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

    Optimizer state follows the mount's parameters by the root's rules (see
    :func:`ckptmigrate.upgrade`): state keyed by name follows each op; position-keyed state
    stays as it is through steps that keep the mount's positions, other steps need each
    position's name: ``param_names`` (the optimizer's names, the file's full keys with the
    mount's prefix, e.g. ``net.encoder.w`` for a LightningModule's ``self.parameters()``),
    else the file's own parameter order, once verified.

    >>> new = upgrade_mount(ckpt, net_schema, prefix="net.")
    """
    from .followers import OptimizerFollowers
    from .upgrade import buffer_keys, run_plan

    steps = list(plan) if plan is not None else mount_plan(ckpt, schema, prefix, to)
    if not steps:
        return ckpt.copy()
    view = _view(ckpt, prefix)
    slots = _mount_optimizers(
        ckpt, view, prefix, param_names, lambda: buffer_keys(view, steps, schema)
    )
    followers = OptimizerFollowers([(where, slot) for where, slot, _ in slots])
    done = run_plan(view, steps, schema, followers=followers)
    out = _put_back(ckpt, prefix, done)
    owns = _owns(ckpt, prefix)
    for (where, first, whole), (_, now) in zip(slots, followers.slots):
        if isinstance(now, NamedOptimizer):  # named (from the start, or once a step needed it)
            if whole is None:
                assert isinstance(first, _MountPositional) and first.rest is not None
                whole = first.rest
            merged = _merge_named(whole, now, owns, prefix)
            out.optimizer = put(out.optimizer, where, from_named(merged))
        # else: position-keyed state the mount's steps kept, as it was
    return out


def upgrade_mounts_of(
    ckpt: Checkpoint,
    schema: Schema,
    to: str | Version | None = None,
    *,
    param_names: Sequence[str] | None = None,
    origin: object = None,
) -> Checkpoint:
    """``ckpt`` with every mount that holds ``schema`` migrated to ``to`` (what cm.upgrade does
    for a checkpoint with mounts); each plan is checked before any mount runs."""
    mine = mounts_of_schema(ckpt, schema)
    plans = [(m.prefix, mount_plan(ckpt, schema, m.prefix, to, origin=origin)) for m in mine]
    out = ckpt
    for prefix, plan in plans:
        out = upgrade_mount(out, schema, prefix=prefix, param_names=param_names, plan=plan)
    return out if out is not ckpt else ckpt.copy()


def mount_view(ckpt: Checkpoint, prefix: str) -> Checkpoint:
    """What the model of the mount at ``prefix`` sees: its keys without the prefix, their
    modules' metadata, its hparams (its named entry, else the whole hparams), its stamp.

    >>> model.load_state_dict(mount_view(ckpt, "net.").state_dict_for_torch(), strict=True)
    """
    return _view(ckpt, prefix)


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


def upgrade_every_mount(
    ckpt: Checkpoint, schemas: Mapping[str, Schema], *, origin: object = None
) -> Checkpoint:
    """``ckpt`` with every mount migrated to its schema's current version (the schemas found
    by name in ``schemas``; a mount of another one is an :class:`UnknownSchemaError`); each
    plan is checked before any mount runs.

    >>> ckpt = upgrade_every_mount(ckpt, find_schemas(["migrations"]))
    """
    from ..schema.registry import get_schema

    plans = []
    for m in all_mounts(ckpt):
        schema = get_schema(m.schema, schemas)
        plans.append((m.prefix, schema, mount_plan(ckpt, schema, m.prefix, origin=origin)))
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


def _view(ckpt: Checkpoint, prefix: str) -> Checkpoint:
    """The mount's own checkpoint: its keys without the prefix, its modules, hparams, stamp.

    It holds no optimizer: the file's optimizer state follows the mount's parameters through
    the followers :func:`upgrade_mount` hands the plan (see :func:`_mount_optimizers`).
    """
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
    view = replace(
        ckpt.copy(),
        state_dict={k[cut:]: v for k, v in ckpt.state_dict.items() if owns(k)},
        module_metadata=modules,
        schema=found.schema,
        version=found.version,
        history=[dict(h) for h in found.history],
        mounts=[],
        optimizer=None,
    )
    view.hparams = dict(hparams)
    return view


def _put_back(ckpt: Checkpoint, prefix: str, done: Checkpoint) -> Checkpoint:
    out = ckpt.copy()
    owns = _owns(ckpt, prefix)
    moved = {prefix + k: v for k, v in done.state_dict.items()}
    strays = [k for k in moved if not owns(k)]
    if strays:
        raise MountError(
            f"the migration of the mount at {prefix!r} made key {strays[0]!r}, which belongs "
            "to another mount: a mount's migrations may only rename keys within it"
        )
    order = _splice(list(ckpt.state_dict), owns, list(moved))  # each key where it was
    out.state_dict = {k: moved[k] if k in moved else ckpt.state_dict[k] for k in order}
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
    if prefix:
        out.mounts = [
            replace(m, version=done.version, history=done.history) if m.prefix == prefix else m
            for m in ckpt.mounts
        ]
    else:
        out.version, out.history = done.version, done.history
    return out


def _splice(items: list[str], owns: Any, new: list[str]) -> list[str]:
    """``items`` with the ones ``owns`` replaced by ``new``, the others where they were.

    Each run of owned items takes as many of ``new`` as it held (the last run the rest), so a
    mount's keys stay where they were, interleaved with the others' as before (the root
    mount's keys around ``net.``'s), and a rename moves no key: the file's order, which names
    position-keyed optimizer state, stays the model's.
    """
    runs: list[int] = []  # lengths of the runs of owned items
    previous = False
    for item in items:
        mine = bool(owns(item))
        if mine:
            runs[-1:] = [runs[-1] + 1] if previous else runs[-1:] + [1]
        previous = mine
    if not runs:
        return items + new
    takes = runs[:-1]
    fresh = iter(new)
    out: list[str] = []
    run, previous = 0, False
    for item in items:
        mine = bool(owns(item))
        if mine and not previous:
            count = takes[run] if run < len(takes) else len(new)
            out.extend(k for _, k in zip(range(count), fresh))
            run += 1
        if not mine:
            out.append(item)
        previous = mine
    out.extend(fresh)
    return out


@dataclass
class _MountPositional(PositionalState):
    """The file's position-keyed state, seen from the mount at ``prefix``.

    It stays as it is while the mount's steps keep positions (``renamed`` follows the mount's
    keys, without the prefix); a step that needs names names the whole state (the names
    given, full keys; else the file's own parameter order, verified) and hands the step the
    mount's part, keyed by its own names; ``rest`` keeps the whole, to merge back.
    """

    whole: Checkpoint | None = None
    prefix: str = ""
    rest: NamedOptimizer | None = None

    def named(self, step: str | None) -> NamedOptimizer:
        assert self.whole is not None
        sd = self.whole.state_dict
        owns, cut = _owns(self.whole, self.prefix), len(self.prefix)
        try:
            if self.given is not None:
                names = list(self.given)
                bare = [n for n in names if n not in sd and self.prefix + n in sd]
                if bare and self.prefix:
                    raise ParamNamesUnknownError(
                        f"the names given are the optimizer's, the file's full keys with the "
                        f"mount's prefix: {bare[0]!r} is {self.prefix + bare[0]!r} in this file"
                    )
                verify_param_names(
                    self.opt_sd, names, sd, "the names given (--param-names, param_names=)"
                )
            else:
                mine = self.buffers()
                buffers = None if mine is None else {self.prefix + b for b in mine}
                names = deduce_param_names(self.opt_sd, sd, buffers)
        except ParamNamesUnknownError as exc:
            raise ParamNamesUnknownError(exc.reason, step=step) from None
        now = [self.prefix + self.renamed[n[cut:]] if owns(n) else n for n in names]
        self.rest = to_named(self.opt_sd, now)
        return _mount_part(self.rest, owns, cut)


def _mount_optimizers(
    ckpt: Checkpoint,
    view: Checkpoint,
    prefix: str,
    param_names: Sequence[str] | None,
    buffers: Any,
) -> list[tuple[Any, NamedOptimizer | PositionalState, NamedOptimizer | None]]:
    """``(where, slot for the view's followers, the whole state by name or None)`` for each
    optimizer state of ``ckpt``: the mount's part by name when the state carries names, else
    the whole position-keyed state (see :class:`_MountPositional`)."""
    from .followers import optimizer_states

    owns, cut = _owns(ckpt, prefix), len(prefix)
    out: list[tuple[Any, NamedOptimizer | PositionalState, NamedOptimizer | None]] = []
    for where, opt_sd in optimizer_states(ckpt.optimizer):
        if carries_names(opt_sd):
            whole = to_named(opt_sd, None)
            out.append((where, _mount_part(whole, owns, cut), whole))
        else:
            slot = _MountPositional(opt_sd, view, param_names, buffers, whole=ckpt, prefix=prefix)
            out.append((where, slot, None))
    return out


def _mount_part(whole: NamedOptimizer, owns: Any, cut: int) -> NamedOptimizer:
    """The mount's parameters of ``whole``, by their names without the prefix."""
    groups = [{**g, "names": [n[cut:] for n in g["names"] if owns(n)]} for g in whole.groups]
    states = {n[cut:]: st for n, st in whole.states.items() if owns(n)}
    return NamedOptimizer(
        states, groups, whole.wrote_param_names, dict(whole.extra), whole.keyed_by_name
    )


def _merge_named(
    whole: NamedOptimizer, part: NamedOptimizer, owns: Any, prefix: str
) -> NamedOptimizer:
    """``whole`` with the mount's parameters replaced by what its migration made of ``part``;
    in each group the mount's names stay where its parameters were, in the optimizer's order."""
    groups = [
        {**group, "names": _splice(group["names"], owns, [prefix + n for n in mine["names"]])}
        for group, mine in zip(whole.groups, part.groups)
    ]
    states = {n: st for n, st in whole.states.items() if not owns(n)}
    states.update({prefix + n: st for n, st in part.states.items()})
    return replace(whole, states=states, groups=groups)
