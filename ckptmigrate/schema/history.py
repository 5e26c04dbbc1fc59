"""A checkpoint's history read against a migration graph: the steps edited since they ran, and
the downgrades the history carries for versions the graph does not know.

Each history entry that ckptmigrate writes records the digest of the code that ran
(:mod:`.provenance`) and, for a reversible step of ops, the ops that undo it as data
(:mod:`.ops.data`). So:

- :func:`edited_steps` names each applied step whose code differs today (entries written
  before digests were recorded, or by a step the graph does not hold, are not judged);
- :func:`recorded_downgrade` plans a downgrade from a version newer than the graph's current
  one through those recorded inverses, newest first, down to a version the graph knows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from packaging.version import InvalidVersion, Version

from ..errors import (
    MigrationGraphError,
    NoMigrationPathError,
    NoRecordedInverseError,
    OpDataError,
    RecordedInverseError,
)
from .graph import MigrationGraph, OpsStep, PlannedStep, Step
from .ops.data import ops_from_data
from .provenance import same_code

__all__ = ["EditedStep", "edited_steps", "entries_into", "recorded_downgrade", "recorded_floor"]


@dataclass(frozen=True)
class EditedStep:
    """A step the history says ran, whose code differs from the graph's step today."""

    index: int  # its position in the history
    source: str
    target: str
    step: str
    downgrade: bool
    recorded: dict[str, Any]
    today: dict[str, Any]

    def record(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "from": self.source,
            "to": self.target,
            "step": self.step,
            "downgrade": self.downgrade,
            "recorded": dict(self.recorded),
            "today": dict(self.today),
        }


def _version(raw: Any) -> Version | None:
    if not isinstance(raw, str):
        return None
    try:
        return Version(raw)
    except (InvalidVersion, ValueError):
        return None


def edited_steps(graph: MigrationGraph, history: Sequence[Any]) -> list[EditedStep]:
    """The entries of ``history`` whose recorded digest differs from the graph's step's today.

    >>> [e.step for e in edited_steps(schema.graph, ckpt.history)]
    ['rename_blocks']
    """
    known = {(s.source, s.target): s for s in graph.steps}
    found = []
    for index, entry in enumerate(history):
        if not isinstance(entry, dict) or "digest" not in entry:
            continue  # written before digests, or not ours
        source, target = _version(entry.get("from")), _version(entry.get("to"))
        if source is None or target is None or source == target:
            continue
        downgrade = entry.get("downgrade") is True
        step = known.get((min(source, target), max(source, target)))
        if step is None or (target < source) != downgrade:
            continue
        try:
            today = step.action.digest(downgrade)
        except MigrationGraphError:  # no inverse today: it cannot have run backwards
            continue
        if same_code(entry["digest"], today) is False:
            name = entry.get("step")
            found.append(
                EditedStep(
                    index,
                    str(source),
                    str(target),
                    name[:200] if isinstance(name, str) else step.name,
                    downgrade,
                    dict(entry["digest"]),
                    today,
                )
            )
    return found


def _knows(graph: MigrationGraph, version: Version) -> bool:
    return version <= graph.current and version in graph.versions


def entries_into(history: Sequence[Any]) -> dict[Version, tuple[dict[str, Any], Version]]:
    """Each version an upgrade entry of ``history`` led to -> the newest such entry, with where
    it came from: one pass, so walking a long history down costs one lookup a version."""
    found: dict[Version, tuple[dict[str, Any], Version]] = {}
    for entry in history:
        if not isinstance(entry, dict) or entry.get("downgrade") is True:
            continue
        source, target = _version(entry.get("from")), _version(entry.get("to"))
        if target is not None and source is not None and source < target:
            found[target] = (entry, source)  # a later entry is newer: it wins
    return found


def recorded_floor(graph: MigrationGraph, start: Version, history: Sequence[Any]) -> Version | None:
    """The version the recorded inverses take a file at ``start`` down to, the first one the
    graph knows; None when they stop before one (a function step, a gap)."""
    into = entries_into(history)
    node = start
    while not _knows(graph, node):
        found = into.get(node)
        if found is None or not isinstance(found[0].get("inverse"), list):
            return None
        node = found[1]
    return node if node != start else None


def recorded_downgrade(
    graph: MigrationGraph, start: Version, target: Version, history: Sequence[Any]
) -> list[PlannedStep]:
    """The steps that take a file at ``start`` (newer than the graph knows) down towards
    ``target``, from the inverses its history records, newest first; they stop at ``target``
    or at the first version the graph knows, from where the graph plans the rest.

    A step in the way that recorded no inverse is a :class:`NoRecordedInverseError`, one whose
    inverse is not data this code runs a :class:`RecordedInverseError`, both before anything
    runs.
    """
    steps: list[PlannedStep] = []
    into = entries_into(history)
    node = start
    while node != target and not _knows(graph, node):
        found = into.get(node)
        if found is None:
            raise NoMigrationPathError(
                graph.schema,
                start,
                target,
                reason=(
                    f"this code does not know {node}, and the file's history records no step "
                    "into it"
                ),
                remedy="Downgrade the file with code that knows its version.",
            )
        entry, source = found
        if source < target:
            raise NoMigrationPathError(
                graph.schema,
                start,
                target,
                reason=(
                    f"the file's history went from {source} to {node} in one step, past {target}"
                ),
                remedy="Pick a version the history went through, or downgrade with code that "
                "knows the step.",
            )
        # the name is the file's text: bounded, since messages and the new entry repeat it
        name = entry.get("step") if isinstance(entry.get("step"), str) else f"{source} -> {node}"
        name = name[:200]
        inverse = entry.get("inverse")
        if inverse is None:
            digest = entry.get("digest")
            function = isinstance(digest, dict) and digest.get("of") in ("source", "bytecode")
            raise NoRecordedInverseError(graph.schema, start, target, step=name, function=function)
        try:
            undo = ops_from_data(inverse)
        except OpDataError as exc:
            raise RecordedInverseError(graph.schema, source, node, name, exc.problem) from exc
        rebuilt = Step(
            source=source,
            target=node,
            name=name,
            action=OpsStep((), undo=tuple(undo)),
            breaking=entry.get("breaking") is True,
            reversible=True,
        )
        steps.append(PlannedStep(rebuilt, downgrade=True))
        node = source
    return steps
