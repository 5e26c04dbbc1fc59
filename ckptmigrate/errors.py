"""The one hierarchy of errors ckptmigrate raises.

Every error carries its facts as attributes and builds its message from them, so a caller can
act on the data and a person can read the sentence: what was expected, what was found, what to
do next. The remedy is said for whoever reads it: ``str(exc)`` names Python arguments
(``from_version=``), ``exc.render(cli=True)`` the command-line flags (``--from-version``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base.readable import path_text, url_without_secrets

__all__ = [
    "AdapterFollowError",
    "AlreadyStampedError",
    "AmbiguousMigrationPathError",
    "AmbiguousVersionError",
    "BackupExistsError",
    "BreakingMigrationError",
    "BudgetExceededError",
    "CatalogError",
    "CheckpointFormatError",
    "CheckpointWriteError",
    "CkptMigrateError",
    "CkptMigrateWarning",
    "CommandLineError",
    "DuplicateSchemaError",
    "FileTooLargeError",
    "FixtureCheckError",
    "FixtureNotFoundError",
    "FutureVersionError",
    "HistoryEditedWarning",
    "HashingBudgetExceededError",
    "InPlaceWriteError",
    "InternalError",
    "LayoutNameError",
    "LoadMismatchError",
    "LockError",
    "LockTimeoutError",
    "MigrationError",
    "MigrationGraphError",
    "MigrationPathError",
    "ModelBuildError",
    "MountError",
    "NoMigrationPathError",
    "NoRecordedInverseError",
    "NotReplayableError",
    "NothingMatched",
    "OpDataError",
    "OpError",
    "OpMatchedNothingError",
    "OptimizerStateMergedWarning",
    "OutputOccupiedError",
    "ParamNamesUnknown",
    "ParamNamesUnknownError",
    "PathNotFoundError",
    "RecordedInverseError",
    "RedirectError",
    "RemoteStorageError",
    "RemoteWriteError",
    "SchemaMismatchError",
    "TargetPastCurrentError",
    "UnknownFormatError",
    "UnknownLayoutError",
    "UnknownSchemaError",
    "UnknownWeightsError",
    "UnsafeCheckpointError",
    "UnversionedCheckpointError",
    "UsageError",
    "VersionConflictError",
    "WeightsDownloadError",
    "WeightsError",
    "WeightsHashMismatchError",
]


class CkptMigrateError(Exception):
    """Base class of every error ckptmigrate raises on purpose."""

    def render(self, *, cli: bool = False) -> str:
        """The message, its remedy phrased for Python (default) or as command-line flags.

        >>> exc.render(cli=True)
        "a.pth carries no ckptmigrate stamp, ... pass --from-version X.Y.Z ..."
        """
        return str(self)


class UsageError(CkptMigrateError, TypeError, ValueError):
    """A call the API (or the command line) does not accept: an argument missing, of the wrong
    type or value, or contradicting another. The caller's mistake, not a problem with a file;
    it is a ``TypeError`` and a ``ValueError`` too, as Python's own argument errors are."""


class CommandLineError(UsageError):
    """A usage problem a command finds (not argparse): printed as one line, exit 2."""


class InternalError(CkptMigrateError, AssertionError):
    """An invariant of ckptmigrate itself failed: a bug, never a property of the file. Report
    it with the message."""


class CheckpointWriteError(CkptMigrateError, ValueError):
    """The checkpoint cannot be written as asked: the format cannot hold what it carries
    (optimizer state in a ``.safetensors`` file, hparams that are not JSON in an index), or
    an entry clashes with the layout's own keys. Nothing was written."""


class CheckpointFormatError(CkptMigrateError, ValueError):
    """The file is not a checkpoint we can read: truncated, corrupt, foreign or malformed."""

    def __init__(self, message: str, *, path: object = None) -> None:
        self.path = None if path is None else path_text(path)
        prefix = f"{self.path}: " if self.path else ""
        super().__init__(prefix + message)


class BudgetExceededError(CheckpointFormatError):
    """Reading the file would take more memory than its size allows (a decode budget).

    ``what`` names the part read (``"the pickle"``, ``"the safetensors header"``), ``needed``
    the estimated bytes, ``budget`` the bound and ``rule`` how the bound is set.
    """

    def __init__(
        self, what: str, needed: int, budget: int, rule: str, *, path: object = None
    ) -> None:
        self.what, self.needed, self.budget, self.rule = what, needed, budget, rule
        super().__init__(self._sentence(), path=path)

    def _sentence(self) -> str:
        return (
            f"{self.what} would take about {self.needed >> 20} MiB to read, over its budget of "
            f"{self.budget >> 20} MiB ({self.rule}); a file this dense is not one torch or "
            "safetensors wrote"
        )


class HashingBudgetExceededError(BudgetExceededError):
    """Decoding would hash more items than the file's size allows: a tuple that shares its
    items (``t = (t, t)``), hashed as a tree where it is a dict key or a set item, or many keys
    of one hash (ints congruent modulo 2**61 - 1), each probing all the others.

    ``needed`` and ``budget`` count items visited, not bytes.
    """

    def _sentence(self) -> str:
        return (
            f"{self.what} would hash about {self.needed} items to read (tuples sharing their "
            "items, hashed as trees, or big int keys that may share one hash), over its budget "
            f"of {self.budget} ({self.rule}); no file torch wrote needs that"
        )


class FileTooLargeError(BudgetExceededError):
    """A file read whole (a set's index, a journal, ``ckptmigrate.json``, DCP ``.metadata``) is
    larger than its cap: refused before it is read.

    ``needed`` is the bytes found (at least that many: a file may still be growing), ``budget``
    the cap and ``rule`` what the cap is for.
    """

    def _sentence(self) -> str:
        return (
            f"{self.what} holds {self.needed} bytes or more, over the {self.budget >> 20} MiB "
            f"cap on {self.rule}: refused without reading it; no file ckptmigrate, torch or "
            "Hugging Face writes is that large"
        )


class NotReplayableError(CheckpointFormatError):
    """The file's pickle holds something the byte-copying writer cannot reproduce faithfully,
    so it is rewritten from the decoded objects instead (or, where it must be copied, refused)."""


class RemoteStorageError(CheckpointFormatError):
    """A checkpoint behind a URL that could not be read: no file system for its protocol (or
    its package not installed), or the store refused, failed, timed out or sent other bytes
    than asked. ``url`` is the URL as printed (no credentials, no query string), ``reason``
    what the store or fsspec said, with what to do next."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = path_text(url), reason
        super().__init__(f"cannot read it from its store: {reason}", path=self.url)


class RemoteWriteError(CheckpointWriteError):
    """A checkpoint could not be written to its object store: the store refused, failed or
    timed out, or the object it was copied from changed meanwhile. Nothing appeared under
    the name (a multipart upload is aborted; the old object, if any, is as it was). ``url``
    is the URL as printed (no credentials, no query string), ``reason`` what the store said."""

    def __init__(self, url: str, reason: str) -> None:
        self.url, self.reason = path_text(url), reason
        super().__init__(f"{self.url}: cannot write it to its store: {reason}")


class UnknownFormatError(CheckpointFormatError):
    """A path that no registered checkpoint format claims: a file whose first bytes are no
    format's, or a folder holding none of a DCP checkpoint, a sharded set or a model folder.
    ``found`` is what was found there (the file's first bytes, ``"a directory"``)."""

    def __init__(self, message: str, *, found: object, path: object = None) -> None:
        self.found = found
        super().__init__(message, path=path)


class UnknownLayoutError(CheckpointFormatError):
    """A checkpoint dict in none of the known layouts: no state_dict where one is looked for."""

    def __init__(self, keys: list[str], *, path: object = None) -> None:
        self.keys = keys
        shown = ", ".join(repr(k) for k in keys[:8])
        super().__init__(
            "found no state_dict: expected a dict of tensors, or a dict with 'state_dict', "
            "'model_state_dict', 'model' or 'model_state'; top-level keys are "
            f"{shown}. If the file keeps its parts elsewhere, name them in your migrations "
            'module: layout = cm.Layout("mine", state_dict="net", hparams="cfg", '
            'optimizer="opt"), then pass --migrations PATH',
            path=path,
        )


class LayoutNameError(CkptMigrateError):
    """A declared :class:`~ckptmigrate.layout.Layout` takes a name another layout has."""

    def __init__(self, name: str, *, builtin: bool) -> None:
        self.name = name
        self.builtin = builtin
        owner = "a built-in layout" if builtin else "another declared layout"
        super().__init__(
            f"the layout name {name!r} is taken by {owner} with other keys: give your "
            "cm.Layout another name"
        )


class PathNotFoundError(CkptMigrateError, FileNotFoundError):
    """A folder or file the caller named does not exist (a typo must not pass as "nothing")."""

    def __init__(self, path: object, what: str, expected: str) -> None:
        self.path = path_text(path)
        self.what = what
        self.expected = expected
        super().__init__(f"no {what} at {self.path}: pass {expected}")


class UnsafeCheckpointError(CkptMigrateError):
    """The file's pickle asks for a global that the safe loader does not allow."""

    def __init__(self, global_name: str, *, path: object = None, detail: str = "") -> None:
        self.global_name = global_name
        self.path = None if path is None else path_text(path)
        self.detail = detail
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        prefix = f"{self.path}: " if self.path else ""
        extra = f" ({self.detail})" if self.detail else ""
        name = self.global_name
        remedy = (
            f"pass --allow-global {name}"
            if cli
            else f"safe_globals=[{name!r}] in Python, or --allow-global {name} on the command line"
        )
        redirect = (
            f"--redirect-global {name}=NEW.module.Name"
            if cli
            else f"cm.Schema(..., redirects={{{name!r}: 'new.module.Name'}}), or "
            f"--redirect-global {name}=NEW.module.Name on the command line"
        )
        return (
            f"{prefix}refusing to load: the pickle asks for {name!r}{extra}, which the safe "
            "loader does not allow, and loading it could run code from the file. If you trust "
            f"this file, allow it by name: {remedy}. If it names a class that has moved, map "
            f"it to an allowed one instead: {redirect}."
        )


class RedirectError(UsageError):
    """A global redirect (``OLD=NEW``) that cannot be used: malformed, or pointing to a global
    that is not allowed, so that it would make something new reachable."""

    def __init__(self, old: str, new: str, problem: str, *, remedy: str = "") -> None:
        self.old = old
        self.new = new
        self.problem = problem
        self.remedy = remedy
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        tail = f"; {self.remedy}" if self.remedy else ""
        rule = f"{self.old}={self.new}"
        if not (rule.isascii() and rule.isprintable()) or len(rule) > 300:
            rule = ascii(rule) if len(rule) <= 300 else ascii(rule[:300]) + "..."
        return f"refusing the global redirect {rule}: {self.problem}{tail}"


class UnversionedCheckpointError(CkptMigrateError):
    """The checkpoint carries no stamp and no ``from_version`` was given."""

    def __init__(self, *, path: object = None, schema: str | None = None) -> None:
        self.path = None if path is None else path_text(path)
        self.schema = schema
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        where = self.path or "this checkpoint"
        name = self.schema or "SCHEMA"
        if cli:
            which = "" if self.schema else "--schema SCHEMA "
            remedy = (
                f"{which}--from-version X.Y.Z (or --from-version auto to guess it from its keys)"
            )
        else:
            remedy = "from_version='X.Y.Z' (or from_version='auto' to guess it from its keys)"
        return (
            f"{where} carries no ckptmigrate stamp, so its version is unknown. Pass {remedy}, "
            f"or stamp the file once: ckptmigrate stamp {self.path or 'CKPT'} --schema {name} "
            "--version X.Y.Z --in-place"
        )


class SchemaMismatchError(CkptMigrateError):
    """The checkpoint belongs to another schema than the one asked for."""

    def __init__(self, expected: str, found: str | None, *, path: object = None) -> None:
        self.expected = expected
        self.found = found
        self.path = None if path is None else path_text(path)
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        where = f"{self.path} " if self.path else "the checkpoint "
        return (
            f"{where}was written for schema {self.found!r}, not {self.expected!r}: load it with "
            f"the {self.found!r} schema, or check that you picked the right file."
        )


class UnknownSchemaError(SchemaMismatchError, LookupError):
    """A schema was asked for by name, but no discovered migration module defines it.

    The one error of every lookup by name (:func:`ckptmigrate.schema.registry.get_schema`): ``known``
    lists the names there are, ``nearest`` the closest one (None when none is close).
    """

    def __init__(self, name: str, known: Sequence[str]) -> None:
        from .base.nearest import nearest

        self.known = sorted(known)
        close = nearest(name, self.known, n=1) if name else []
        self.nearest = close[0] if close else None
        super().__init__(name, None)

    def render(self, *, cli: bool = False) -> str:
        found = ", ".join(self.known) or "none"
        guess = f"; did you mean {self.nearest!r}?" if self.nearest else ""
        remedy = (
            "pass --migrations PATH (its folder or module)" if cli else "pass the Schema object"
        )
        return (
            f"no schema named {self.expected!r} was discovered (found: {found}{guess}): "
            f"{remedy}, or list its module in [tool.ckptmigrate] migrations in pyproject.toml "
            "or in a ckptmigrate.migrations entry point."
        )


class FutureVersionError(CkptMigrateError):
    """The stored version is newer than the code's current version (or the target)."""

    def __init__(
        self, schema: str, stored: object, current: object, *, recorded_to: object = None
    ) -> None:
        self.schema = schema
        self.stored = stored
        self.current = current
        #: the version the inverses in the file's history reach (None: they do not reach one
        #: this code knows)
        self.recorded_to = recorded_to
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        message = (
            f"checkpoint of schema {self.schema!r} is at version {self.stored}, newer than "
            f"{self.current}, the newest this code knows: upgrade the code (or its migrations), "
            "or downgrade the file with code that knows its version."
        )
        if self.recorded_to is not None:
            given = f"--to {self.recorded_to}" if cli else f"to={str(self.recorded_to)!r}"
            message += (
                f" Its history records how to undo the newer steps down to {self.recorded_to}: "
                f"pass {given} to write it back with them."
            )
        return message


class TargetPastCurrentError(FutureVersionError):
    """The target version asked for is newer than the schema's current version."""

    def __init__(self, schema: str, target: object, current: object) -> None:
        self.target = target
        super().__init__(schema, target, current)

    def render(self, *, cli: bool = False) -> str:
        given = f"--to {self.target}" if cli else f"to={str(self.target)!r}"
        remedy = (
            f"Pass --to {self.current} or older, or drop --to to upgrade to the current version"
            if cli
            else f"Pass to= at most {str(self.current)!r}, or leave it out for the current version"
        )
        return (
            f"{given} is newer than {self.current}, the current version of schema "
            f"{self.schema!r}: no migration leads past it. {remedy}, or register the newer steps."
        )


class VersionConflictError(CkptMigrateError, ValueError):
    """``from_version`` was given for a file whose stamp says another version."""

    def __init__(self, stamped: object, given: object, *, path: object = None) -> None:
        self.stamped = stamped
        self.given = given
        self.path = None if path is None else path_text(path)
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        where = self.path or "the checkpoint"
        flag = "--from-version" if cli else "from_version"
        given = f"--from-version {self.given}" if cli else f"from_version={str(self.given)!r}"
        return (
            f"{where} is stamped as version {self.stamped}, but {given} was given: drop {flag} "
            "(the stamp wins), or fix the stamp with ckptmigrate stamp."
        )


class MigrationPathError(CkptMigrateError):
    """No plan can be made from the stored version to the target (see the two subclasses)."""

    def __init__(self, schema: str, start: object, target: object, message: str) -> None:
        self.schema = schema
        self.start = start
        self.target = target
        super().__init__(message)


class NoMigrationPathError(MigrationPathError):
    """No path of registered steps leads from the stored version to the target: a gap."""

    def __init__(
        self,
        schema: str,
        start: object,
        target: object,
        *,
        reason: str = "",
        remedy: str = "Register the missing step(s) with @schema.migration(from, to).",
    ) -> None:
        self.reason = reason
        super().__init__(
            schema,
            start,
            target,
            f"schema {schema!r}: no migration path leads from {start} to {target}"
            f"{': ' + reason if reason else ''}. {remedy}",
        )


class NoRecordedInverseError(NoMigrationPathError):
    """A downgrade past the versions this code knows needs the inverse a file's history
    records for ``step``, and it recorded none: a function step (it keeps no inverse as data),
    or a step of ops that cannot be inverted."""

    def __init__(
        self, schema: str, start: object, target: object, *, step: str, function: bool
    ) -> None:
        self.step = step
        self.function = function
        what = (
            "is a function; it stored no inverse"
            if function
            else "stored no inverse (it is not reversible, or was applied before ckptmigrate "
            "recorded inverses)"
        )
        super().__init__(
            schema,
            start,
            target,
            reason=f"this code does not know the versions above it, and step {step} {what}",
            remedy="Downgrade the file with code that knows the step.",
        )


class AmbiguousMigrationPathError(MigrationPathError):
    """More than one path leads to the target and none is preferred (alembic's multiple
    heads). ``paths`` lists each path as its version strings."""

    def __init__(
        self, schema: str, start: object, target: object, *, paths: Sequence[Sequence[str]]
    ) -> None:
        self.paths = [list(p) for p in paths]
        shown = "; ".join(" -> ".join(p) for p in self.paths)
        super().__init__(
            schema,
            start,
            target,
            f"schema {schema!r}: more than one migration path leads from {start} to {target} "
            f"({shown}) and none is preferred: mark one step preferred=True.",
        )


class MigrationGraphError(CkptMigrateError, ValueError):
    """A step was registered that the graph cannot hold (backwards, duplicate, bad version)."""


class DuplicateSchemaError(CkptMigrateError):
    """Two different schemas with the same name were found while discovering migrations."""

    def __init__(self, name: str, first: str, second: str) -> None:
        self.name = name
        self.first = first
        self.second = second
        super().__init__(
            f"two different schemas are named {name!r}: one in {first}, one in {second}. "
            "Rename one of them, or load only one of the two migration sources."
        )


class MigrationError(CkptMigrateError):
    """A migration step failed; nothing the caller holds was changed. ``__cause__`` is why."""

    def __init__(
        self, schema: str, from_version: object, to_version: object, step: str, problem: str
    ) -> None:
        self.schema = schema
        self.from_version = from_version
        self.to_version = to_version
        self.step = step
        self.problem = problem
        super().__init__(
            f"migration {schema} {from_version} -> {to_version} ({step}) failed: {problem}"
        )


class AdapterFollowError(CkptMigrateError, ValueError):
    """A LoRA adapter cannot follow a step of its base's plan: nothing was written.

    ``step`` names the step (``"tinylm 1.0.0 -> 2.0.0 (fuse_qkv)"``), ``op`` the op in it (or
    the function), ``reason`` why the adapter's low-rank factors cannot follow it.
    """

    def __init__(self, step: str, op: str, reason: str) -> None:
        self.step = step
        self.op = op
        self.reason = reason
        super().__init__(
            f"the adapter cannot follow {op} of step {step}: {reason}. Merge the adapter into "
            "its base (PEFT's merge_and_unload) and upgrade the merged checkpoint, or write "
            "that step as ops an adapter follows (renames, Split, Merge, PermuteForRope, Pad, "
            "Slice)"
        )


class InPlaceWriteError(CkptMigrateError, RuntimeError):
    """A function step wrote into an input tensor in place; :func:`ckptmigrate.upgrade`
    reports it as the step's :class:`MigrationError`, before the write where it can."""


class OpMatchedNothingError(MigrationError):
    """A declarative op of a step found no key (or hparam) to act on.

    ``op`` names the op (``RenamePrefix('encoder.', 'enc.')``), ``noun`` what it looked for
    (``"key"`` or ``"hparam"``), ``starts`` the leading key components the checkpoint has
    (``['net.']``), ``nearest`` the keys (or hparams) closest to what the op looked for, and
    ``prefix`` the key prefix under which the op would match, when there is one.
    """

    def __init__(
        self,
        schema: str,
        from_version: object,
        to_version: object,
        step: str,
        *,
        op: str,
        noun: str,
        starts: Sequence[str],
        nearest: Sequence[str],
        prefix: str | None,
    ) -> None:
        self.op = op
        self.noun = noun
        self.starts = list(starts)
        self.nearest = list(nearest)
        self.prefix = prefix
        found = []
        if self.starts:
            found.append(f"{noun}s start with {', '.join(repr(s) for s in self.starts)}")
        if self.nearest:
            found.append(f"nearest: {', '.join(repr(k) for k in self.nearest)}")
        seen = "; ".join(found) if found else f"the checkpoint has no {noun}s"
        if prefix:
            advice = (
                f"the schema looks mounted at {prefix!r}: stamp the file with "
                f"`ckptmigrate stamp --prefix {prefix}` (or cm.save(..., prefix={prefix!r}))"
            )
        else:
            advice = "check that the step fits this file's layout"
        super().__init__(
            schema,
            from_version,
            to_version,
            step,
            f"{op} matched no {noun}; {seen}. {advice}, or give the op missing_ok=True if "
            "what it acts on is optional",
        )


class OpError(CkptMigrateError, ValueError):
    """An op cannot apply to this checkpoint (a collision, a missing key, a bad shape).

    Raised by an op itself; the step that ran it turns it into a :class:`MigrationError`."""


class OpDataError(CkptMigrateError, ValueError):
    """An op cannot be written as data (it holds a function or a tensor), or data read back is
    not an op this ckptmigrate knows (an unknown name, a field the op lacks, a value of the
    wrong type, nested or sized past the bounds). ``problem`` says which."""

    def __init__(self, problem: str) -> None:
        self.problem = problem
        super().__init__(problem)


class RecordedInverseError(CheckpointFormatError):
    """The inverse a file's history records for a step is not one this code can run (see
    :class:`OpDataError`, the ``__cause__``); nothing was run."""

    def __init__(
        self, schema: str, source: object, target: object, step: str, problem: str
    ) -> None:
        self.schema = schema
        self.source = source
        self.target = target
        self.step = step
        self.problem = problem
        super().__init__(
            f"the inverse that the history records for schema {schema!r} step {source} -> "
            f"{target} ({step}) cannot be used: {problem}. Nothing was run: downgrade with code "
            "that knows the step, or with the ckptmigrate that wrote the file"
        )


class NothingMatched(OpError):
    """An op found no key (or hparam) to act on and was not given ``missing_ok=True``.

    Raised before the op changes anything. ``names`` are the keys (or hparams) it searched;
    ``head`` the literal text every match starts with, ``needle`` the text to find near
    names by. ``apply_step`` turns it into :class:`OpMatchedNothingError`.
    """

    def __init__(
        self, op: Any, names: Sequence[str], *, noun: str = "key", head: str = "", needle: str = ""
    ) -> None:
        self.op = op
        self.names = names
        self.noun = noun
        self.head = head
        self.needle = needle or head
        super().__init__(f"{op.label()} matched no {noun}")

    def details(self) -> dict[str, Any]:
        """``starts``, ``nearest`` and ``prefix``, as :class:`OpMatchedNothingError` takes them."""
        from .base.nearest import leading_components, mount_prefix, nearest

        names = list(self.names)
        close = nearest(self.needle, names)
        keys = self.noun == "key"
        return {
            "op": self.op.label(),
            "noun": self.noun,
            "starts": leading_components(names) if keys else [],
            "nearest": close,
            "prefix": mount_prefix(self.head, close) if keys else None,
        }


class MountError(CkptMigrateError, ValueError):
    """A schema cannot be mounted (or found) at that key prefix: none of the keys start with it,
    it overlaps another mount, or a mount's migration reached into another mount's keys."""


class BreakingMigrationError(MigrationError):
    """A plan needs a BC-breaking step where only non-breaking ones may run (``attach``)."""


def describe(value: Any) -> str:
    """A short description of a value for error messages."""
    return f"{type(value).__name__} {value!r}"[:120]


class LoadMismatchError(CkptMigrateError, RuntimeError):
    """A strict load would fail: keys missing, unexpected, or of another shape."""

    def __init__(self, report: Any) -> None:
        self.report = report
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        remedy = (
            "see every key with `ckptmigrate diff CKPT --model SCHEMA`"
            if cli
            else "pass strict=False and read ckpt.report"
        )
        return (
            f"the checkpoint does not fit the model strictly: {self.report.summary()}. Check "
            "that the model was built from the migrated hparams, that a migration covers these "
            f"keys, or {remedy}"
        )


class AmbiguousVersionError(UnversionedCheckpointError):
    """An unstamped file's signature matches no version, or several equally well."""

    def __init__(
        self,
        schema: str,
        candidates: Sequence[tuple[str, float]],
        *,
        tied: bool = True,
        path: object = None,
    ) -> None:
        self.candidates = list(candidates)
        self.tied = tied
        super().__init__(path=path, schema=schema)

    def render(self, *, cli: bool = False) -> str:
        where = self.path or "the checkpoint"
        shown = ", ".join(f"{v} ({score:.0%})" for v, score in self.candidates)
        if self.tied:
            what = f"match several versions of {self.schema!r} equally well: {shown}"
        else:
            closest = f" (closest: {shown})" if shown else ""
            what = f"match no recorded version of {self.schema!r}{closest}"
        remedy = "--from-version X.Y.Z" if cli else "from_version='X.Y.Z'"
        return (
            f"{where} carries no stamp and its keys {what}. Pass {remedy} explicitly, or stamp "
            f"it: ckptmigrate stamp {self.path or 'CKPT'} --schema {self.schema} --version X.Y.Z"
        )


class AlreadyStampedError(CkptMigrateError):
    """``stamp`` was asked to stamp a file that already carries a stamp."""

    def __init__(
        self, schema: object, version: object, *, path: object = None, prefix: str = ""
    ) -> None:
        self.schema = schema
        self.version = version
        self.path = None if path is None else path_text(path)
        self.prefix = prefix
        where = self.path or "the checkpoint"
        at = f" at prefix {prefix!r}" if prefix else ""
        super().__init__(
            f"{where} is already stamped as {schema} {version}{at}: stamping again would rewrite its "
            f"history; use `ckptmigrate upgrade {self.path or 'CKPT'}` to move it to another version"
        )


class LockError(CkptMigrateError):
    """The lock beside a file could not be taken or released."""


class LockTimeoutError(LockError):
    """Another process held the lock beside the file for longer than we waited."""

    def __init__(self, path: object, lock_path: object, holder: object, timeout: float) -> None:
        self.path = path_text(path)
        self.lock_path = str(lock_path)
        self.holder = holder
        self.timeout = timeout
        held = f" by {holder}" if holder else ""
        super().__init__(
            f"{self.path} is being rewritten by another process: its lock {self.lock_path} is "
            f"held{held} and was not released within {timeout:g} s. Wait and retry; if no such "
            f"process is running, remove {self.lock_path}"
        )


class BackupExistsError(CkptMigrateError):
    """An in-place upgrade would overwrite a different backup left by an earlier one."""

    def __init__(self, backup: object, *, link: bool = False) -> None:
        self.backup = str(backup)
        self.link = link  # a symbolic link: it would follow the file to its new version
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        remedy = "--no-backup" if cli else "backup=False"
        found = (
            "is a symbolic link, which would show the new version, not keep the old one"
            if self.link
            else "already exists and differs from the file"
        )
        return (
            f"backup {self.backup} {found}: move it away, or pass {remedy} to upgrade without one"
        )


class OutputOccupiedError(CkptMigrateError):
    """An output path (``-o``) holds files ckptmigrate did not write, which the write would
    replace or delete: nothing is written.

    ``path`` is the output, ``found`` the names there that are not ours to replace (empty: the
    path is a file or a link where a folder would go), ``kind`` what the output would be
    (``"a DCP checkpoint folder"``).
    """

    def __init__(self, path: object, found: Sequence[str], kind: str) -> None:
        self.path = path_text(path)
        self.found = list(found)
        self.kind = kind
        more = f" and {len(self.found) - 3} more" if len(self.found) > 3 else ""
        held = (
            f"holds {', '.join(self.found[:3])}{more}"
            if self.found
            else "is a file or a link, not a folder"
        )
        super().__init__(
            f"{self.path} {held}, which writing {kind} there would replace or delete: nothing "
            "was written; pass a new or empty folder, or move those files away"
        )


class ModelBuildError(CkptMigrateError):
    """``schema.build(hparams)`` failed, so there is no model to compare a checkpoint with."""

    def __init__(self, schema: str, cause: BaseException, *, path: object = None) -> None:
        self.schema = schema
        self.path = None if path is None else path_text(path)
        self.cause = cause
        where = f"the hparams of {self.path}" if self.path else "the checkpoint's hparams"
        super().__init__(
            f"schema {schema!r} could not build today's model from {where}: "
            f"{type(cause).__name__}: {cause}; if the model now takes other hparams, compare "
            "with a file the new code saved instead (--to-file NEW)"
        )


class FixtureCheckError(CkptMigrateError):
    """A legacy fixture no longer upgrades, loads strictly or reproduces its golden outputs;
    the message is the one-line reason."""


class FixtureNotFoundError(CkptMigrateError, LookupError):
    """A path was asked for as a fixture, but no golden record beside it names it."""

    def __init__(self, path: object) -> None:
        self.path = path_text(path)
        super().__init__(f"no golden record beside {self.path} names it as its fixture")


class ParamNamesUnknownError(CkptMigrateError, ValueError):
    """Optimizer state keyed by position meets a step that needs each position's name.

    ``reason`` says why the names could not be found (the file's own parameter order did not
    verify, or a given list did not fit); ``step`` names the step that needs them, when known.
    """

    def __init__(self, reason: str, *, step: str | None = None) -> None:
        self.reason = reason
        self.step = step
        super().__init__(self.render())

    def render(self, *, cli: bool = False) -> str:
        needs = f"step {self.step} " if self.step else "the migration "
        remedy = (
            "pass --param-names FILE (one parameter name a line, in the order the optimizer "
            "got them)"
            if cli
            else "pass param_names=[...] (the names of model.named_parameters(), in the order "
            "the optimizer got them)"
        )
        return (
            f"the optimizer state is keyed by position only, and {needs}splits, merges, drops, "
            f"reshapes or reorders parameters, so each position's name must be known: "
            f"{self.reason}. {remedy}; or save the optimizer from "
            "torch.optim.X(model.named_parameters()) so that its state_dict carries param_names"
        )


#: The old name of :class:`ParamNamesUnknownError`, kept so existing ``except`` clauses match.
ParamNamesUnknown = ParamNamesUnknownError


class WeightsError(CkptMigrateError):
    """Named weights could not be had: unknown, unreachable, or not the bytes they claim."""


class UnknownWeightsError(WeightsError, LookupError):
    """A schema lists no weights of that name; ``known`` holds the names it does list."""

    def __init__(self, schema: str, name: str, known: Sequence[str]) -> None:
        self.schema = schema
        self.name = name
        self.known = list(known)
        listed = ", ".join(self.known) if self.known else "none"
        super().__init__(f"schema {schema} lists no weights named {name!r} (it lists: {listed})")


class WeightsDownloadError(WeightsError, OSError):
    """Named weights could not be fetched from their URL; nothing was left in the cache.

    ``url`` is kept as given; the message shows it without user, password and query, which
    may hold credentials (a presigned URL's signature)."""

    def __init__(self, url: str, problem: str) -> None:
        self.url = url
        self.problem = problem
        super().__init__(f"cannot fetch {url_without_secrets(url)}: {problem}")


class WeightsHashMismatchError(WeightsError):
    """A weights file's sha256 is not the one its schema lists: it was refused, not used (a
    download that does not match is deleted; a local file is left where it is)."""

    def __init__(self, url: str, expected: str, got: str, *, path: object = None) -> None:
        self.url = url
        self.expected = expected
        self.got = got
        self.path = None if path is None else str(path)
        where = f" ({self.path})" if self.path and self.path != url else ""
        super().__init__(
            f"{url_without_secrets(url)}{where} has sha256 {got}, but its schema lists {expected}: "
            "refused (a changed or corrupted file, or a wrong sha256 in the schema)"
        )


class CatalogError(CkptMigrateError):
    """The catalog database could not be opened, read or written; ``where`` names it (a
    PostgreSQL URL without its password). A scan that fails writes nothing to it."""

    def __init__(self, where: str, problem: str) -> None:
        self.where = where
        self.problem = problem
        super().__init__(f"catalog {where}: {problem}")


class CkptMigrateWarning(UserWarning):
    """Base class of every warning ckptmigrate gives (``warnings.simplefilter("error",
    cm.CkptMigrateWarning)`` turns them all into errors)."""


class HistoryEditedWarning(CkptMigrateWarning):
    """Steps a checkpoint's history says were applied to it have changed since: the digest of
    the code (or ops) that ran differs from today's step's. The file may not be what today's
    chain would make of its source. ``steps`` lists each as ``{"from", "to", "step"}``."""

    def __init__(
        self, schema: str, steps: Sequence[dict[str, Any]], *, path: object = None, prefix: str = ""
    ) -> None:
        self.schema = schema
        self.steps = [dict(s) for s in steps]
        self.path = None if path is None else str(path)
        self.prefix = prefix
        where = self.path or "the checkpoint"
        mount = f" (its mount at {prefix!r})" if prefix else ""
        shown = ", ".join(f"{s['from']} -> {s['to']} ({s['step']})" for s in self.steps)
        super().__init__(
            f"{where}{mount}: schema {schema!r} step(s) {shown} changed since they were applied "
            "to it (the history records a different digest of their code): the file may differ "
            "from what today's migrations would make of its source. Restore the step's old code "
            "and put the new behaviour in a new step, or re-create the file from its source"
        )


class OptimizerStateMergedWarning(CkptMigrateWarning):
    """A step merged several parameters whose optimizer state differs into one (experts
    stacked, q/k/v fused): parts without state (an expert the router never picked) got zero
    rows, fresh state; a number such as Adam's ``step``, one per parameter, kept the largest,
    so the parts that had another see a different bias correction from now on. ``merges``
    lists each merged parameter as ``{"key", "fresh", "differing": {field: {part: value}},
    "kept": {field: value}}`` (``kept`` None: its state could not be merged and starts fresh),
    as the step's history entry records under ``optimizer_state_merged``."""

    def __init__(
        self, schema: str, source: str, target: str, step: str, merges: Sequence[dict[str, Any]]
    ) -> None:
        self.schema = schema
        self.source = source
        self.target = target
        self.step = step
        self.merges = [dict(m) for m in merges]
        said = []
        for merge in self.merges[:3]:
            parts = []
            if merge["fresh"]:
                parts.append(f"{', '.join(merge['fresh'])} had no state (never stepped): zero rows")
            if merge["kept"] is None:
                parts.append("its other state could not be merged: it starts fresh")
            for field, values in merge["differing"].items():
                kept = merge["kept"][field]
                behind = [f"{k} had {v:g}" for k, v in values.items() if v != kept]
                behind += [f"{k} had none" for k in merge["fresh"]]
                parts.append(
                    f"one {field} for all, the largest ({kept:g}), where {', '.join(behind)}: "
                    "their rows' bias correction changes"
                )
            said.append(f"{merge['key']}: {'; '.join(parts)}")
        more = f" (and {len(self.merges) - 3} more)" if len(self.merges) > 3 else ""
        super().__init__(
            f"migration {schema} {source} -> {target} ({step}) merged parameters whose "
            f"optimizer state differs: {' | '.join(said)}{more}. Recorded in the history as "
            "optimizer_state_merged (the largest step is the one the merged parameter would "
            "count had it been trained merged from the start)"
        )
