"""The migration graph of one schema: versions as nodes, steps as forward edges.

It knows nothing about files or tensors: it validates steps as they are registered and plans
the one path between two versions, or says why there is none, before anything runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..base.version import parse_version
from ..errors import (
    AmbiguousMigrationPathError,
    FutureVersionError,
    MigrationGraphError,
    NoMigrationPathError,
    OpDataError,
    TargetPastCurrentError,
)
from .ops.data import op_data
from .provenance import function_digest, ops_digest

if TYPE_CHECKING:
    from .ops import Op


@dataclass(frozen=True)
class FunctionStep:
    """A step written as a function (``@schema.migration``): it mutates the checkpoint it gets
    or returns a new one; ``inverse`` is the function that undoes it, for downgrades."""

    fn: Callable[[Any], Any]
    inverse: Callable[[Any], Any] | None = None
    #: maps optimizer state onto parameters whose tensor the step replaced (``optimizer_state=``)
    optimizer_state: Callable[..., Any] | None = None

    def function(self, downgrade: bool) -> Callable[[Any], Any]:
        """The function to run: ``fn``, or ``inverse`` for a downgrade."""
        fn = self.inverse if downgrade else self.fn
        if fn is None:  # the graph plans downgrades through reversible steps only
            raise MigrationGraphError(f"step {self.fn!r} has no inverse to downgrade with")
        return fn

    def digest(self, downgrade: bool) -> dict[str, str]:
        """The digest of the code that runs (:mod:`.provenance`): the function and its
        optimizer-state hook, or the inverse for a downgrade."""
        if downgrade:
            return function_digest(self.inverse)
        if self.optimizer_state is None:
            return function_digest(self.fn)
        return function_digest(self.fn, self.optimizer_state)


@dataclass(frozen=True)
class OpsStep:
    """A step written as declarative ops (``schema.add_migration``); each op knows its inverse
    and what it acts on (:attr:`ckptmigrate.ops.Op.acts_on`)."""

    ops: tuple[Op, ...]
    #: the ops that undo the step, in the order they run, when they came as data (a step
    #: rebuilt from a file's history); else each op's inverse, in reverse order
    undo: tuple[Op, ...] | None = None

    def run(self, downgrade: bool) -> list[Op]:
        """The ops in the order they run: as given, or each one's inverse in reverse order."""
        if not downgrade:
            return list(self.ops)
        if self.undo is not None:
            return list(self.undo)
        inverses = [op.inverse() for op in reversed(self.ops)]
        if any(op is None for op in inverses):
            raise MigrationGraphError(f"step {self.ops!r} holds an op with no inverse")
        return inverses  # type: ignore[return-value]

    def digest(self, downgrade: bool) -> dict[str, str]:
        """The digest of the ops that run (:mod:`.provenance`)."""
        return ops_digest(self.run(downgrade))


@dataclass(frozen=True)
class Step:
    """One registered migration from ``source`` to ``target`` (always forward)."""

    source: Version
    target: Version
    name: str
    action: FunctionStep | OpsStep = field(compare=False, repr=False)
    breaking: bool = False
    preferred: bool = False
    reversible: bool = False


@dataclass(frozen=True)
class PlannedStep:
    """A step as it will run: forward, or backward through its inverse (``downgrade``)."""

    step: Step
    downgrade: bool = False

    @property
    def source(self) -> Version:
        return self.step.target if self.downgrade else self.step.source

    @property
    def target(self) -> Version:
        return self.step.source if self.downgrade else self.step.target

    @property
    def name(self) -> str:
        return f"inverse of {self.step.name}" if self.downgrade else self.step.name

    @property
    def ops(self) -> list[Op] | None:
        """The ops this step runs, in order (inverses for a downgrade); None for a function."""
        action = self.step.action
        return action.run(self.downgrade) if isinstance(action, OpsStep) else None

    def record(self) -> dict[str, Any]:
        """The step as JSON-able data (a plan listing; history entries add when and by whom)."""
        return {
            "from": str(self.source),
            "to": str(self.target),
            "step": self.name,
            "breaking": self.step.breaking,
            "downgrade": self.downgrade,
        }

    def provenance(self) -> dict[str, Any]:
        """What a history entry records of the code this step runs: ``digest``, and for a
        reversible step of ops run forward, ``inverse``: the ops that undo it, as data
        (:func:`~ckptmigrate.schema.ops.data.op_data`), so that code which does not know the
        step can still downgrade the file. A function step records no inverse."""
        action = self.step.action
        out: dict[str, Any] = {"digest": action.digest(self.downgrade)}
        if isinstance(action, OpsStep) and self.step.reversible and not self.downgrade:
            try:
                out["inverse"] = [op_data(op) for op in action.run(True)]
            except (OpDataError, MigrationGraphError):
                pass  # an op that is not data (a tensor default, a function): no inverse
        return out


class MigrationGraph:
    """The steps of one schema, validated on registration and planned on demand."""

    def __init__(self, schema: str, current: Version) -> None:
        self.schema = schema
        self.current = current
        self._steps: dict[tuple[Version, Version], Step] = {}

    @property
    def steps(self) -> list[Step]:
        """Every step, oldest first."""
        return sorted(self._steps.values(), key=lambda s: (s.source, s.target))

    @property
    def versions(self) -> list[Version]:
        """Every version that a step or ``current`` names, oldest first."""
        found = {self.current}
        for step in self._steps.values():
            found.update((step.source, step.target))
        return sorted(found)

    def add(self, step: Step) -> Step:
        """Register ``step``; a backward, duplicate or beyond-current step is refused."""
        if step.target <= step.source:
            raise MigrationGraphError(
                f"schema {self.schema!r}: step {step.name} goes from {step.source} to "
                f"{step.target}, which is not forward; steps go from an older to a newer version "
                "(downgrades come from reversible ops)"
            )
        if step.target > self.current:
            raise MigrationGraphError(
                f"schema {self.schema!r}: step {step.name} leads to {step.target}, beyond the "
                f"current version {self.current}: raise current= or fix the step's versions"
            )
        existing = self._steps.get((step.source, step.target))
        if existing is not None:
            raise MigrationGraphError(
                f"schema {self.schema!r}: a second step from {step.source} to {step.target} "
                f"({step.name}); {existing.name} is already registered there"
            )
        self._steps[(step.source, step.target)] = step
        return step

    def plan(self, start: Version | str, target: Version | str | None = None) -> list[PlannedStep]:
        """The steps from ``start`` to ``target`` (default: current), in the order they run.

        Forward when ``target`` is newer, through reversible steps backwards when older.
        Raises :class:`FutureVersionError`, :class:`NoMigrationPathError` or
        :class:`AmbiguousMigrationPathError` before anything runs.
        """
        start = parse_version(start)
        target = self.current if target is None else parse_version(target, what="target version")
        if start > self.current:
            raise FutureVersionError(self.schema, start, self.current)
        if target > self.current:
            raise TargetPastCurrentError(self.schema, target, self.current)
        if start == target:
            return []
        downgrade = target < start
        path = self._search(start, target, downgrade)
        return [PlannedStep(step, downgrade) for step in path]

    def _edges(self, node: Version, target: Version, downgrade: bool) -> list[Step]:
        if downgrade:
            return [
                s
                for s in self._steps.values()
                if s.target == node and s.source >= target and s.reversible
            ]
        return [s for s in self._steps.values() if s.source == node and s.target <= target]

    def _reaches(self, node: Version, target: Version, downgrade: bool, memo: dict) -> bool:
        if node == target:
            return True
        if node not in memo:
            memo[node] = any(
                self._reaches(s.source if downgrade else s.target, target, downgrade, memo)
                for s in self._edges(node, target, downgrade)
            )
        return memo[node]

    def _search(self, start: Version, target: Version, downgrade: bool) -> list[Step]:
        memo: dict[Version, bool] = {}
        if not self._reaches(start, target, downgrade, memo):
            reason = self._gap_reason(start, target, downgrade)
            raise NoMigrationPathError(self.schema, start, target, reason=reason)
        path: list[Step] = []
        node = start
        while node != target:
            candidates = [
                s
                for s in self._edges(node, target, downgrade)
                if self._reaches(s.source if downgrade else s.target, target, downgrade, memo)
            ]
            if len(candidates) > 1:
                preferred = [s for s in candidates if s.preferred]
                if len(preferred) != 1:
                    ambiguous = preferred or candidates
                    raise AmbiguousMigrationPathError(
                        self.schema,
                        start,
                        target,
                        paths=[
                            [str(v) for v in self._path_through(path, s, target, downgrade)]
                            for s in ambiguous
                        ],
                    )
                candidates = preferred
            step = candidates[0]
            path.append(step)
            node = step.source if downgrade else step.target
        return path

    def _path_through(
        self, head: list[Step], step: Step, target: Version, downgrade: bool
    ) -> list[Version]:
        """One full path (as versions) that goes through ``step``, for error messages."""
        versions = [head[0].target if downgrade else head[0].source] if head else []
        for s in head:
            versions.append(s.source if downgrade else s.target)
        if not versions:
            versions.append(step.target if downgrade else step.source)
        node = step.source if downgrade else step.target
        versions.append(node)
        memo: dict[Version, bool] = {}
        while node != target:
            nxt = next(
                s
                for s in self._edges(node, target, downgrade)
                if self._reaches(s.source if downgrade else s.target, target, downgrade, memo)
            )
            node = nxt.source if downgrade else nxt.target
            versions.append(node)
        return versions

    def _gap_reason(self, start: Version, target: Version, downgrade: bool) -> str:
        if downgrade:
            return (
                "downgrades need reversible steps all the way, and one is missing or irreversible"
            )
        known = self.versions
        if start not in known:
            return f"no step starts at {start} (known versions: {', '.join(map(str, known))})"
        return "a step is missing between them"
