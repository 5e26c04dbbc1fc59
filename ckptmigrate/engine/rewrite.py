"""The one rewrite pipeline: upgrade or stamp a checkpoint file, read once, planned once, run once.

Every rewrite of a checkpoint (``cm.upgrade_file``, ``cm.upgrade_in_place``,
``cm.stamp_in_place``, ``ckptmigrate upgrade`` and ``stamp``) is :func:`rewrite`:

1. :func:`open_source` sniffs the format once and reads the metadata (tensors are stubs).
2. A planner (:func:`upgrade_plan`, :func:`stamp_plan`) plans once, mounts included; a stamp
   is a plan of no steps that gives the file its new stamp.
3. :meth:`Plan.run` runs the plan once: on the stubs when every step is metadata-only
   (:attr:`~ckptmigrate.ops.Op.metadata_only`), or Merges and Splits along dim 0 whose
   results are runs of stored bytes (:attr:`~ckptmigrate.ops.Op.runs_on_stubs`), and the
   output's writer copies stored bytes,
   else on the tensors mapped from the file (``mmap``), where each tensor's bytes lie in the
   file recorded before any step runs (:class:`~.unchanged.InputBytes`).
4. :func:`write` picks the writer of the output's format: the stubs a run kept are copied as
   stored (:mod:`.streaming`); of the tensors a run produced, those that are an input's own,
   unchanged (the read-only guard refuses a step writing into one), are copied as stored and
   only the new ones are written (:func:`write_tensors`). Copied records keep their offset
   modulo a block, so a file system that clones shares them.
5. One :class:`Rewrite` says what was planned and written.

Locking and backups wrap this in :mod:`.inplace`.

>>> result = cm.upgrade_file("big.pth", "big-v2.pth", schema)
>>> result.streamed, result.bytes_copied
(True, 1207959552)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..base.readable import path_text
from ..errors import (
    AlreadyStampedError,
    CheckpointWriteError,
    MigrationError,
    MountError,
    NotReplayableError,
    VersionConflictError,
)
from ..formats.atomic import permissions_from
from ..formats.detect import detect_format
from ..formats.remote import RemotePath, downloaded, is_remote, location
from ..formats.torch import with_redirects
from ..schema.registry import get_schema, pick_schema, schema_table
from ..values.checkpoint import Checkpoint
from .streaming import Copied, metadata_only, runs_on_stubs
from .unchanged import InputBytes

if TYPE_CHECKING:
    from packaging.version import Version

    from ..schema.graph import PlannedStep
    from ..schema.schema import Schema

__all__ = [
    "FileUpgrade",
    "Mapped",
    "Plan",
    "Rewrite",
    "Source",
    "open_source",
    "refuse_restamp",
    "write_tensors",
    "rewrite",
    "stamp_file",
    "stamp_plan",
    "upgrade_file",
    "upgrade_plan",
    "with_stamp",
    "write",
]


@dataclass
class Rewrite:
    """What a rewrite planned and wrote (nothing written on a dry run or a current file)."""

    schema: str
    source_version: str | None  # None: the file had no stamp (stamping it)
    target_version: str
    plan: list[dict[str, Any]] = field(default_factory=list)
    written: str | None = None
    backup: str | None = None
    #: the key prefix of the mount this result is about ("" for the stamp's root)
    prefix: str = ""
    #: for a file with mounts: one result per mount upgraded (each passed to ``on_plan``)
    mounts: list[Rewrite] = field(default_factory=list)
    src: Path | None = None
    dst: Path | None = None  # for a set, its folder
    format: str = ""
    layout: str = ""  # the layout the output was written in
    streamed: bool = False  # True: run on stubs, bytes copied; False: run on the mapped tensors
    #: bytes copied as stored (on a tensor run: the records it left unchanged)
    bytes_copied: int = 0
    bytes_through_python: int = 0
    removed: list[str] = field(default_factory=list)  # old shards deleted after the swap

    @property
    def steps(self) -> list[str]:
        """The names of the steps planned, in order."""
        return [record["step"] for record in self.plan]


@dataclass
class Source:
    """A checkpoint opened once: its format, its metadata (tensors as stubs), and what its
    byte-copying writer needs (the zip's rebuild recipes, the set's index)."""

    path: Path  # what was read: a model folder's weights file
    format: str
    stubs: Checkpoint
    safe_globals: list[Any]
    graph: Any = None  # torch-zip: the pickle with each tensor's rebuild recipe
    sset: Any = None  # sharded: the parsed index, where each stub's bytes lie
    folder: Path | None = None  # the model folder the weights file lies in
    #: the object ``path`` is a private local copy of (its records copied server-side)
    origin: Any = None

    def tensors(self) -> Checkpoint:
        """The checkpoint with its tensors, memory-mapped where the format allows."""
        if self.format == "sharded":
            from ..formats.sharded import read_sharded

            return read_sharded(self.path, mmap=True)
        from ..io.files import read_checkpoint

        return read_checkpoint(self.path, mmap=True, safe_globals=self.safe_globals)

    def mapped(self) -> Mapped:
        """The checkpoint with its tensors mapped, and where each one's bytes lie in the file
        (recorded before any step runs)."""
        tensors = self.tensors()
        return Mapped(tensors, InputBytes.of(self, tensors))


@dataclass
class Mapped:
    """An input's mapped tensors (kept alive while the writer copies their bytes) and where
    their bytes lie in its files."""

    tensors: Checkpoint
    inputs: InputBytes


#: The formats an upgrade reads from, or writes to, an object store: single files (a legacy
#: torch file is read from a private copy and written whole, then uploaded).
_REMOTE_FORMATS = ("torch-zip", "torch-legacy", "safetensors")


def _names(safe_globals: Iterable[Any]) -> list[Any]:
    from ..formats.torch import allowed_names

    return allowed_names(safe_globals)


def open_source(path: str | os.PathLike[str], safe_globals: Iterable[Any] = ()) -> Source:
    """Sniff ``path`` once and read its metadata: no tensor data is read.

    >>> open_source("llama/").stubs.state_dict["lm_head.weight"].shape
    (32000, 4096)
    """
    path, allowed = location(path), list(safe_globals)
    fmt = detect_format(path)
    if isinstance(path, RemotePath) and fmt not in _REMOTE_FORMATS:
        raise CheckpointWriteError(
            f"{path} is a {fmt} checkpoint: upgrading one in object storage is not supported "
            "yet (torch.save and safetensors files are): copy it to a local folder, upgrade "
            "it there, and upload the result"
        )
    if fmt == "sharded":
        from ..formats.sharded import read_sharded_metadata

        stubs, sset = read_sharded_metadata(path, allowed_globals=_names(allowed))
        return Source(path, fmt, stubs, allowed, sset=sset)
    if fmt == "dcp":
        from ..formats.dcp_rewrite import read_dcp_stubs

        return Source(path, fmt, read_dcp_stubs(path), allowed)
    if path.is_dir():  # a model folder: its weights file
        from ..formats.model_folder import resolve

        inner = open_source(resolve(path), allowed)
        inner.folder = path
        return inner
    if fmt == "torch-zip":
        from ..formats.layout import split
        from ..formats.torch import read_zip_graph

        graph = read_zip_graph(path, allowed_globals=_names(allowed))
        return Source(path, fmt, split(graph.obj, path=path), allowed, graph=graph)
    from ..io.files import read_metadata

    return Source(path, fmt, read_metadata(path, allowed_globals=_names(allowed)), allowed)


@dataclass
class Plan:
    """What a rewrite runs: each part's checked steps (its key prefix, schema and steps: one
    part at ``""`` for a root-stamped file, none for a stamp) on ``start``, the stubs as they
    are to be upgraded (their version given, or their new stamp)."""

    parts: list[tuple[str, Schema, list[PlannedStep]]]
    start: Checkpoint
    result: Rewrite
    mounted: bool = False
    #: written even with no steps (a version given to an unstamped file, a new stamp)
    restamps: bool = False
    #: what an in-place upgrade's backup is named after (its version, or its mounts')
    backup_label: str = ""
    param_names: Sequence[str] | None = None

    @property
    def steps(self) -> list[PlannedStep]:
        return [planned for _, _, plan in self.parts for planned in plan]

    def run(
        self, tensors: Checkpoint | None = None, progress: Callable[..., Any] | None = None
    ) -> Checkpoint:
        """The planned result: from the stubs, or from ``tensors`` (read from the same file,
        given the stamp planned on the stubs, so a guessed version is guessed once)."""
        ckpt = self.start if tensors is None else _stamped_like(tensors, self.start)
        if not self.mounted:
            if not self.parts:
                return ckpt.copy()
            from .upgrade import run_plan

            ((_, schema, plan),) = self.parts
            return run_plan(ckpt, plan, schema, progress=progress, param_names=self.param_names)
        from .mounts import upgrade_mount

        out = ckpt.copy()
        for prefix, schema, plan in self.parts:
            out = upgrade_mount(out, schema, prefix=prefix, plan=plan, param_names=self.param_names)
        return out


def _stamped_like(ckpt: Checkpoint, like: Checkpoint) -> Checkpoint:
    out = ckpt.copy()
    out.schema, out.version, out.history = like.schema, like.version, list(like.history)
    out.mounts = list(like.mounts)
    return out


def upgrade_plan(
    schemas: Schema | Mapping[str, Schema],
    *,
    name: str | None = None,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    param_names: Sequence[str] | None = None,
    what: str = "from_version",
    path: object = None,
) -> Callable[[Checkpoint], Plan]:
    """The planner of an upgrade to ``to`` (default: current) by the schema the file's stamp
    names (``name``: for an unstamped file, or the mounts of that schema).

    ``from_version`` gives an unstamped file its version (``"auto"``: guessed, once)."""
    table = schema_table(schemas)

    def plan_for(ckpt: Checkpoint) -> Plan:
        if ckpt.mounts:
            if from_version is not None:
                raise VersionConflictError(ckpt.mounts[0].version, from_version, path=path)
            return _mounts_plan(ckpt, table, name, to, param_names, path)
        from .guess import apply_from_version
        from .upgrade import plan_upgrade

        found = pick_schema(ckpt, table, name, path=path)
        restamps = ckpt.version is None and from_version is not None
        ckpt = apply_from_version(ckpt, found, from_version, what=what, path=path)
        plan = plan_upgrade(ckpt, found, to, path=path)
        version = ckpt.version
        result = Rewrite(
            schema=found.name,
            source_version=str(version),
            target_version=str(plan[-1].target if plan else version),
            plan=[p.record() for p in plan],
        )
        parts = [("", found, plan)]
        return Plan(parts, ckpt, result, False, restamps, str(version), param_names)

    return plan_for


def _mounts_plan(
    ckpt: Checkpoint,
    schemas: dict[str, Schema],
    name: str | None,
    to: Any,
    param_names: Sequence[str] | None,
    path: object,
) -> Plan:
    """Each mount of ``ckpt`` (those of schema ``name`` when given) planned by its schema.

    ``param_names`` are the optimizer's names: the file's full keys, mount prefixes included.
    """
    from .mounts import all_mounts, chosen_mounts, mount_plan

    chosen = chosen_mounts(ckpt, schemas, name, path=path)
    if to is not None and len({m.schema for m in chosen}) > 1:
        raise MountError(
            f"--to {to} is one schema's version, but {path} mounts several schemas: pass "
            "--schema S too"
        )
    found = {m.schema: get_schema(m.schema, schemas) for m in chosen}
    parts, results = [], []
    for m in chosen:
        plan = mount_plan(ckpt, found[m.schema], m.prefix, to, origin=path)
        parts.append((m.prefix, found[m.schema], plan))
        results.append(
            Rewrite(
                schema=m.schema,
                source_version=str(m.version),
                target_version=str(plan[-1].target if plan else m.version),
                plan=[p.record() for p in plan],
                prefix=m.prefix,
            )
        )
    total = Rewrite(
        schema="+".join(r.schema for r in results),
        source_version="+".join(str(r.source_version) for r in results),
        target_version="+".join(r.target_version for r in results),
        plan=[step for r in results for step in r.plan],
        mounts=results,
    )
    label = "+".join(f"{m.schema}-{m.version}" for m in all_mounts(ckpt))
    return Plan(parts, ckpt, total, True, False, label, param_names)


def stamp_plan(
    schema: str,
    version: str | Version | Callable[[Checkpoint], Any],
    *,
    prefix: str = "",
    what: str = "version",
    path: object = None,
) -> Callable[[Checkpoint], Plan]:
    """The planner of a stamp: no steps, the file stamped as ``schema`` ``version`` (a
    function of the read checkpoint, to guess it) at the root or mounted at ``prefix``; a
    stamp already there is an :class:`AlreadyStampedError`."""
    from ..base.version import parse_version

    given = None if callable(version) else parse_version(version, what=what)

    def plan_for(ckpt: Checkpoint) -> Plan:
        refuse_restamp(ckpt, prefix, path=path)
        if given is None:
            return stamp_plan(schema, version(ckpt), prefix=prefix, path=path)(ckpt)  # type: ignore[operator]
        stamped = with_stamp(ckpt, schema, given, prefix)
        result = Rewrite(schema, None, str(given), prefix=prefix, layout=stamped.layout)
        return Plan([], stamped, result, restamps=True)

    return plan_for


def refuse_restamp(ckpt: Checkpoint, prefix: str, *, path: object = None) -> None:
    """A stamp (or a mount at ``prefix``) already there is an :class:`AlreadyStampedError`."""
    held = [m for m in ckpt.mounts if m.prefix == prefix]
    if prefix == "" and ckpt.schema is not None:
        raise AlreadyStampedError(ckpt.schema, ckpt.version, path=path)
    if held:
        raise AlreadyStampedError(held[0].schema, held[0].version, path=path, prefix=prefix)


def with_stamp(ckpt: Checkpoint, schema: str, version: Version, prefix: str = "") -> Checkpoint:
    """A copy of ``ckpt`` stamped as ``schema`` ``version`` at the root, or mounted at ``prefix``."""
    from .mounts import mount

    return mount(ckpt, prefix, schema, version)


def rewrite(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str] | None,
    plan_for: Callable[[Checkpoint], Plan],
    *,
    safe_globals: Iterable[Any] = (),
    dry_run: bool = False,
    on_plan: Callable[[Rewrite], Any] | None = None,
    progress: Callable[..., Any] | None = None,
    before_write: Callable[[Plan], Path | None] | None = None,
) -> Rewrite:
    """Read ``src`` once, plan it with ``plan_for``, run the plan once and write the result to
    ``dst`` in ``src``'s format (``None``: over ``src``, where a file already current is left
    alone). ``on_plan`` sees each part's plan before anything runs; ``before_write(plan)``
    runs after the plan and before the write (an in-place backup: its path is the result's).

    >>> rewrite("model.pth", "model-v3.pth", upgrade_plan(schema, path="model.pth"))
    """
    src = location(src)
    source = open_source(src, safe_globals)
    plan = plan_for(source.stubs)
    result = plan.result
    if on_plan is not None:
        for announced in result.mounts or [result]:
            on_plan(announced)
    if dry_run or (dst is None and not plan.steps and not plan.restamps):
        return result
    if dst is not None and is_remote(dst) and str(dst).endswith("/"):
        raise CheckpointWriteError(  # as a local folder is: an object needs its own name
            f"{path_text(dst)} names a folder (it ends in '/'): pass an object's name to write to"
        )
    target = src if dst is None else location(dst)
    remote = isinstance(src, RemotePath)
    with contextlib.ExitStack() as held:
        if not remote:
            held.enter_context(permissions_from(src))  # a private source gives a private copy
        _check_output(source, target)
        on_stubs = metadata_only(plan.steps) and _copies(source, target, plan)
        new = _run_on_bytes(source, target, plan, progress) if not on_stubs else None
        on_stubs = on_stubs or new is not None
        deferred = None if on_stubs else _run_deferred(source, target, plan, progress)
        on_stubs = on_stubs or deferred is not None  # DCP: tensors read as they are written
        if remote and not on_stubs:  # the tensors are needed: read a private copy, on disk
            local = held.enter_context(downloaded(src, [src]))  # type: ignore[arg-type]
            source = open_source(local, safe_globals)
            source.origin = src
            if source.graph is not None:
                source.graph.origin = src
        inputs = None if on_stubs else source.mapped()
        if deferred is not None:
            new = deferred
        elif new is None:
            new = plan.run(None if inputs is None else inputs.tensors, progress)
        if _runs_user_code(plan):
            _check_picklable(new)  # before a backup is made or a byte written
        if before_write is not None:
            kept = before_write(plan)
            result.backup = None if kept is None else str(kept)
        opened = source

        def redo() -> tuple[Checkpoint, Mapped]:  # metadata-only ops, run again on the tensors
            mapped = opened.mapped()
            return plan.run(mapped.tensors), mapped

        write(source, new, target, result, on_stubs=on_stubs, redo=redo, inputs=inputs)
        del inputs  # the mapped input stays alive until its bytes are copied
    result.written = str(target)
    if remote:
        result.src = src  # type: ignore[assignment]
    return result


def _runs_user_code(plan: Plan) -> bool:
    return any(p.ops is None or any(op.runs_user_code for op in p.ops) for p in plan.steps)


class _Discard:
    def write(self, data: bytes) -> int:
        return len(data)


def _check_picklable(ckpt: Checkpoint) -> None:
    """Refuse a value a step put into ``ckpt`` that no writer can store (a lambda, a
    generator, an open file), with the error a writer would give deep inside, as a
    :class:`CheckpointWriteError`. Tensors and the pipeline's own records are not pickled."""
    import pickle
    import sys

    torch = sys.modules.get("torch")  # a plan with user code imported it
    tensor = torch.Tensor if torch is not None else ()

    class Check(pickle.Pickler):
        def persistent_id(self, obj: Any) -> Any:
            own = type(obj).__module__.startswith("ckptmigrate.")
            return 1 if own or isinstance(obj, tensor) else None

    parts = (
        {k: v for k, v in ckpt.state_dict.items() if k.endswith("_extra_state")},
        ckpt.optimizer,
        ckpt.extra,
        ckpt.meta,
    )
    try:
        Check(_Discard(), protocol=pickle.HIGHEST_PROTOCOL).dump(parts)
    except (pickle.PicklingError, AttributeError, TypeError, RecursionError) as exc:
        raise CheckpointWriteError(
            f"a value of the result cannot be saved ({type(exc).__name__}: {exc}): a migration "
            "must leave only tensors and plain values (numbers, strings, lists, dicts) in the "
            "checkpoint"
        ) from None


def _run_on_bytes(
    source: Source, dst: Path, plan: Plan, progress: Callable[..., Any] | None
) -> Checkpoint | None:
    """A plan of metadata-only ops and Merges and Splits along dim 0 (:func:`runs_on_stubs`)
    run on the stubs of a torch zip, a safetensors file or a set: a merged or split tensor is
    runs of its inputs' stored bytes (:mod:`~ckptmigrate.values.pieces`), which the writer
    copies; torch is not imported. None when the plan needs the tensors (parts of other
    dtypes, a parameter...): it then runs on them."""
    if source.format not in ("torch-zip", "safetensors", "sharded"):
        return None
    if not runs_on_stubs(plan.steps) or not _copies(source, dst, plan):
        return None
    try:
        return plan.run(None, progress)
    except MigrationError as exc:
        if isinstance(exc.__cause__, NotReplayableError):
            return None
        raise


def _run_deferred(
    source: Source, dst: Path, plan: Plan, progress: Callable[..., Any] | None
) -> Checkpoint | None:
    """A DCP folder's plan run without loading the folder: our own ops on deferred tensors
    (:mod:`.deferred`: new tensors computed when written); any other plan (a function step,
    an op the deferral cannot run) on tensors read when it first uses them (:mod:`.ontouch`).
    The result's kept tensors are the folder's stubs. None when the folder must be loaded (a
    tensor size torch cannot hold: loading it says what is wrong)."""
    from ..errors import MigrationError
    from ..formats.dcp_rewrite import stubs_complete
    from .deferred import defer_dcp, deferrable

    if source.format != "dcp":
        return None
    if deferrable(plan.steps) and stubs_complete(source.stubs):
        try:
            ckpt, settle = defer_dcp(source.path, source.stubs)
            return settle(plan.run(ckpt, progress))
        except NotReplayableError:  # a size torch cannot hold: ontouch says so too
            return None
        except MigrationError as exc:
            if not isinstance(exc.__cause__, NotReplayableError):
                raise
    return _run_on_touch(source, plan, progress)


def _run_on_touch(
    source: Source, plan: Plan, progress: Callable[..., Any] | None
) -> Checkpoint | None:
    from ..errors import MigrationError
    from .ontouch import ReadFailed, TouchedFolder

    try:
        folder = TouchedFolder(source.path, source.stubs)
    except NotReplayableError:
        return None
    try:
        return folder.settle(plan.run(folder.ckpt, progress))
    except ReadFailed as failed:  # the folder's error, not the step's
        raise failed.error from None
    except NotReplayableError:  # it ran on what was not read: the loaded path
        return None
    except Exception as exc:
        folder.check()  # a step that caught a failed read and raised its own error
        if isinstance(exc, MigrationError) and "meta" in str(exc):
            return None  # a call torch runs below torch functions (torch.func) met meta data
        raise


def _dcp_safetensors(source: Source, dst: Path) -> bool:
    """Whether a DCP folder is written out as safetensors: one file, or a sharded set (``dst``
    its index, ``model.safetensors.index.json``)."""
    return source.format == "dcp" and (
        dst.suffix == ".safetensors" or dst.name.endswith(".safetensors.index.json")
    )


def _output_file(source: Source, dst: Path) -> Path:
    """The file a single-file writer writes: a model folder's weights file lands in place, at
    the file ``dst`` names, or under its own name in the folder ``dst``."""
    if source.folder is None:
        return dst
    if dst.exists() and dst.resolve() == source.folder.resolve():
        return source.path
    if dst.suffix and not dst.is_dir():
        return dst
    return dst / source.path.name


def _copies(source: Source, dst: Path, plan: Plan) -> bool:
    """Whether the output's writer copies the bytes of tensors a stub run keeps."""
    if source.format == "sharded":
        return True
    if _dcp_safetensors(source, dst):
        return False  # read tensor by tensor (_run_deferred), not linked
    if source.format == "dcp":
        from ..formats.dcp_rewrite import stubs_complete

        return stubs_complete(source.stubs)  # a new .metadata, the rank files linked
    out = _output_file(source, dst)
    if source.format == "torch-zip":
        # optimizer state is rewritten, not copied: the loaded path follows it
        return out.suffix != ".safetensors" and source.stubs.optimizer is None
    return source.format == "safetensors" and out.suffix == ".safetensors"


def _check_output(source: Source, dst: Path) -> None:
    """Refuse an output that cannot be written before any step runs."""
    if isinstance(dst, RemotePath) and (source.format not in _REMOTE_FORMATS or source.folder):
        what = "a model folder" if source.folder else f"a {source.format} checkpoint"
        raise CheckpointWriteError(
            f"{source.path} is {what}: writing one to object storage ({dst}) is not "
            "supported yet (torch.save and safetensors files are): write it to a local "
            "folder and upload that"
        )
    if source.sset is not None:
        from ..formats import sharded

        sharded.check_output(source.sset, sharded.output_for(source.sset, dst))
    elif source.folder is not None:
        from ..formats.model_folder import check_folder_output

        check_folder_output(source.folder, dst)


def write(
    source: Source,
    new: Checkpoint,
    dst: Path,
    result: Rewrite,
    *,
    on_stubs: bool,
    redo: Callable[[], tuple[Checkpoint, Mapped]],
    inputs: Mapped | None = None,
) -> None:
    """Write ``new`` (the planned result: stubs of ``source`` when ``on_stubs``, else tensors
    run from ``inputs``, the source mapped) to ``dst`` in ``source``'s format, filling in
    ``result``.

    Stubs are written by copying their stored bytes; a copier that cannot reproduce the file
    (:class:`NotReplayableError`, nothing left behind) gets the tensors ``redo()`` returns.
    Tensors are written by :func:`write_tensors`: those the plan left unchanged copied as
    stored, the others saved.
    """
    result.src, result.dst, result.format = source.path, dst, source.format
    result.layout = new.layout
    if _dcp_safetensors(source, dst):
        # loaded tensors (a function step ran on them) are written as the streamed ones are
        _write_dcp_safetensors(source, new if on_stubs else _as_new(new), dst, result, redo)
        result.streamed = result.streamed and on_stubs
        return
    if source.format == "dcp":
        _write_dcp(source, new, dst, result, redo if on_stubs else None)
        return
    if source.sset is not None:
        from ..formats.sharded import output_for
        from .streaming import copy_set, write_set

        result.dst = output_for(source.sset, dst).folder
        done = None
        if on_stubs:
            try:
                done = copy_set(source.sset, source.stubs, new, dst)
            except NotReplayableError:
                new, inputs = redo()
        if done is None:
            done = write_set(
                source.sset,
                new,
                dst,
                None if inputs is None else inputs.inputs,
                None if inputs is None else inputs.tensors,
            )
            on_stubs = False
        _copied(result, done, streamed=on_stubs)
        return

    def one_file(target: Path) -> None:
        from .streaming import copy_safetensors, copy_torch_zip

        planned, mapped = new, inputs
        if on_stubs:
            try:
                if source.format == "torch-zip":
                    done = copy_torch_zip(source.graph, new, target)
                else:
                    done = copy_safetensors(source.path, source.stubs, new, target)
            except NotReplayableError:
                planned, mapped = redo()
            else:
                _copied(result, done, streamed=True)
                return
        write_tensors(source, planned, mapped, target, result)

    if source.folder is None:
        one_file(dst)
        return
    from ..formats.model_folder import write_folder

    def into(weights: Path, target: Path) -> None:
        one_file(target)
        if target not in (weights, dst):  # into the folder dst: the result names the folders
            result.src, result.dst = source.folder, dst
        else:
            result.dst = target

    write_folder(source.folder, dst, into)


def _write_dcp(
    source: Source,
    new: Checkpoint,
    dst: Path,
    result: Rewrite,
    redo: Callable[[], tuple[Checkpoint, Mapped]] | None,
) -> None:
    """A DCP folder: a metadata-only result (``redo`` given: how to get the tensors if it
    cannot be replayed) gets a new ``.metadata`` over the linked rank files
    (:mod:`~.formats.dcp_rewrite`); loaded tensors are saved through DCP's writer."""
    from ..formats import dcp
    from ..formats.dcp_rewrite import rewrite_dcp_metadata

    if redo is not None:
        try:
            done = rewrite_dcp_metadata(source.path, new, dst)
        except NotReplayableError:
            new, _ = redo()
        else:
            result.streamed = True
            result.bytes_copied = done.bytes_linked + done.bytes_copied
            result.bytes_through_python = done.bytes_written
            return
    dcp.write_dcp(dst, new)


def write_tensors(
    source: Source, new: Checkpoint, mapped: Mapped | None, target: Path, result: Rewrite
) -> None:
    """Write ``new`` (tensors run from ``mapped``, ``source`` mapped) to the single file
    ``target``: a torch zip from a torch zip, or a safetensors file from either, copies each
    tensor the plan left unchanged as stored and writes the others; any other output (a
    legacy file, a format changed) is saved whole."""
    from ..formats.registry import output_format
    from ..io.files import write_checkpoint
    from .streaming import save_safetensors, save_torch_zip

    kind = output_format(target).name
    if mapped is not None and len(mapped.inputs):
        done = None
        if kind == "safetensors" and new.optimizer is None:
            origins = {source.path: source.origin} if source.origin is not None else None
            done = save_safetensors(mapped.inputs, new, target, origins=origins)
        elif kind == "torch-zip" and source.graph is not None and new.layout != "safetensors":
            try:
                done = save_torch_zip(source.graph, mapped.inputs, new, target)
            except NotReplayableError:
                done = None
        if done is not None:
            _copied(result, done, streamed=False)  # the plan ran on the tensors
            return
    if isinstance(target, RemotePath):  # saved whole: into a private file, then uploaded
        import tempfile

        from ..formats.sink import upload_file

        with tempfile.TemporaryDirectory(prefix="ckptmigrate-upload-") as tmp:
            staged = Path(tmp) / target.name
            write_checkpoint(staged, new)
            upload_file(staged, target)
        return
    write_checkpoint(target, new)


def _as_new(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` with each tensor of its state dict a :class:`~.formats.dcp_tensors.NewTensor`
    giving it back (a tie stays one tensor), for the writers of DCP results."""
    import torch

    from ..formats.dcp_tensors import NewTensor

    made: dict[int, NewTensor] = {}

    def new(value: Any) -> Any:
        if not isinstance(value, torch.Tensor):
            return value
        if id(value) not in made:
            dtype = str(value.dtype).removeprefix("torch.")
            made[id(value)] = NewTensor(tuple(value.shape), dtype, lambda: value)
        return made[id(value)]

    out = ckpt.copy()
    out.state_dict = {k: new(v) for k, v in ckpt.state_dict.items()}
    return out


def _write_dcp_safetensors(
    source: Source,
    new: Checkpoint,
    dst: Path,
    result: Rewrite,
    redo: Callable[[], tuple[Checkpoint, Mapped]],
) -> None:
    """A DCP folder's result (stubs and new tensors) streamed into a safetensors file, or a
    sharded set when ``dst`` is an index; loaded and saved when a chunk cannot be streamed."""
    from ..formats import dcp_tensors

    one_file = dst.suffix == ".safetensors"
    try:
        if one_file:
            result.bytes_through_python = dcp_tensors.write_dcp_safetensors(source.path, new, dst)
        else:
            result.bytes_through_python, result.removed = dcp_tensors.write_dcp_sharded(
                source.path, new, dst
            )
            result.dst = dst.parent
    except NotReplayableError:  # a chunk stored compressed: loaded, then saved
        if not one_file:
            raise
        from ..io.files import write_checkpoint

        write_checkpoint(dst, redo()[0])
    else:
        result.format, result.streamed = "safetensors" if one_file else "sharded", True


def _copied(result: Rewrite, done: Copied, *, streamed: bool) -> None:
    result.streamed = streamed
    result.bytes_copied, result.bytes_through_python = done.bytes_copied, done.bytes_through_python
    result.removed = list(done.removed or [])


def upgrade_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    schema: Schema,
    *,
    to: str | Version | None = None,
    from_version: str | Version | None = None,
    safe_globals: Iterable[Any] = (),
    param_names: Sequence[str] | None = None,
) -> Rewrite:
    """Upgrade the checkpoint at ``src`` to ``to`` (default: current) and write it to ``dst``.

    ``src`` may be a torch.save file, a safetensors file, a sharded set (its folder or index
    JSON), a DCP folder or a model folder of one weights file (to a folder ``dst``: that file
    under its name, the config and tokenizer files beside it); ``dst`` gets the same format
    (``dst == src`` upgrades in place, atomically, unlocked; for a set, ``X.index.json`` names
    the new index, anything else a folder: :func:`~.formats.sharded.output_for`). Nothing
    ckptmigrate did not write is replaced (:class:`~ckptmigrate.errors.OutputOccupiedError`).
    Rename/drop/hparam plans copy tensor bytes as stored (see :mod:`.streaming`); other plans
    run on the tensors mapped (``mmap=True``) and copy the ones they leave unchanged. ``from_version`` stamps an unversioned file on
    the way. Raises before writing anything if the plan is invalid. ``param_names`` names
    position-keyed optimizer state for steps that need its names (see
    :func:`ckptmigrate.upgrade`).

    ``src`` and ``dst`` may be ``s3://`` URLs (torch.save and safetensors files): the result
    is one multipart upload, unchanged records on the same store copied by the server, and it
    appears only once complete (:mod:`~ckptmigrate.formats.sink`).

    >>> cm.upgrade_file("model.pth", "model-v3.pth", schema)
    >>> cm.upgrade_file("llama/", "llama/", schema)          # sharded set, in place
    >>> cm.upgrade_file("s3://models/a.pth", "s3://models/a-v3.pth", schema)
    """
    planner = upgrade_plan(
        schema,
        name=schema.name,
        to=to,
        from_version=from_version,
        param_names=param_names,
        path=Path(src),
    )
    allowed = with_redirects(safe_globals, schema.redirects)  # refused before reading
    return rewrite(src, dst, planner, safe_globals=allowed)


def stamp_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    schema: str,
    version: str | Version | Callable[[Checkpoint], Any],
    *,
    prefix: str = "",
    safe_globals: Iterable[Any] = (),
    what: str = "version",
) -> Rewrite:
    """Write the unstamped checkpoint ``src`` to ``dst`` stamped as ``schema`` ``version``,
    in ``src``'s format and layout (tensor bytes copied where its writer can). A DCP folder
    gets ``ckptmigrate.json`` (its data files kept as they are); a set's index and every
    safetensors shard header get the stamp. Unlocked: :func:`~.inplace.stamp_in_place`
    rewrites a file in place.

    >>> stamp_file("legacy.pth", "stamped.pth", "tinylm", "1.0.0")
    """
    planner = stamp_plan(schema, version, prefix=prefix, what=what, path=src)
    return rewrite(src, dst, planner, safe_globals=safe_globals)


#: The name :func:`upgrade_file`'s result had before there was one result type.
FileUpgrade = Rewrite
