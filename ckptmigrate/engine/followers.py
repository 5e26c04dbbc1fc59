"""Optimizer state that follows its parameters while a plan runs.

Each torch optimizer state in a checkpoint is kept by parameter name (or by position until a
step needs names, :class:`~ckptmigrate.positions.PositionalState`); an op carries it along by
its trace, a function step by tensor identity, and the result goes back in the file's layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..errors import NothingMatched, OpError
from ..schema.ops import Op
from ..values.checkpoint import Checkpoint
from .optimizer import (
    NamedOptimizer,
    carries_names,
    fill_fresh_parts,
    follow_trace,
    from_named,
    is_optimizer_state,
    shaped_state_fields,
    to_named,
)
from .positions import PositionalState, keeps_positions

__all__ = ["OptimizerFollowers", "optimizer_states", "put"]


class OptimizerFollowers:
    """The optimizer states of one checkpoint while a plan runs: keyed by name, or kept by
    position (:class:`~ckptmigrate.positions.PositionalState`) until a step needs names."""

    def __init__(self, slots: list[tuple[Any, NamedOptimizer | PositionalState]]) -> None:
        self.slots = slots  # (where it lives in ckpt.optimizer, its state)
        self.step: str | None = None  # the step running, for the error that needs names
        #: what merging parts' state could not keep as it was (:func:`merged_state`), per op
        self.merged: list[dict[str, Any]] = []

    @classmethod
    def from_checkpoint(
        cls,
        ckpt: Checkpoint,
        param_names: Sequence[str] | None,
        buffers: Callable[[], set[str] | None] = lambda: None,
    ) -> OptimizerFollowers:
        slots: list[tuple[Any, NamedOptimizer | PositionalState]] = []
        for where, opt_sd in optimizer_states(ckpt.optimizer):
            if carries_names(opt_sd):
                slots.append((where, to_named(opt_sd, None)))
            else:
                slots.append((where, PositionalState(opt_sd, ckpt, param_names, buffers)))
        return cls(slots)

    def needs_names(
        self, keys: Sequence[str], trace: dict[str, list[str]], reshapes: bool = False
    ) -> bool:
        """Whether a step mapping ``keys`` by ``trace`` needs position-keyed state's names."""
        if not any(isinstance(slot, PositionalState) for _, slot in self.slots):
            return False
        return reshapes or not keeps_positions(keys, trace)

    def follow(
        self, keys: Sequence[str], trace: dict[str, list[str]], reshapes: bool = False
    ) -> list[NamedOptimizer]:
        """The states keyed by name that must follow this step (naming positional ones first
        when it needs their names); positional state it keeps only notes the renames."""
        needs = self.needs_names(keys, trace, reshapes)
        out = []
        for i, (where, slot) in enumerate(self.slots):
            if isinstance(slot, PositionalState):
                if not needs:
                    slot.follow_renames(trace)
                    continue
                slot = slot.named(self.step)
                self.slots[i] = (where, slot)
            out.append(slot)
        return out

    def through_op(self, op: Op, ckpt: Checkpoint) -> list[str]:
        """Apply ``op`` to ``ckpt`` and carry the optimizer state along."""
        keys = list(ckpt.state_dict)
        if not self.slots or not op.touches(keys):
            if op.runs_user_code and self.slots:
                before = ckpt.copy()
                op.apply(ckpt)
                return self.through_function(before, ckpt, None)
            op.apply(ckpt)
            return []
        trace = op.trace(keys) or {k: [k] for k in keys}
        named_opts = self.follow(keys, trace, reshapes=op.transforms_state)
        shapes = {k: tuple(v.shape) for k, v in ckpt.state_dict.items() if hasattr(v, "shape")}
        op.apply(ckpt)
        new_params = op.new_parameters(keys)
        for named in named_opts:
            transformed: dict[str, dict[str, Any]] = {}
            if op.transforms_state:
                state_op = op.for_state()
                fields = shaped_state_fields(named, shapes)
                fill_fresh_parts(named, trace, fields, shapes)
                for fld, tensors in fields.items():
                    pseudo = Checkpoint(dict(tensors))
                    try:
                        state_op.apply(pseudo)
                    except NothingMatched:
                        pass  # no state of this field for the op's keys: it stays as it is
                    except OpError:
                        continue  # e.g. a merge whose parts lack this field: state starts fresh
                    transformed[fld] = pseudo.state_dict
            self.merged.extend(follow_trace(named, trace, transformed, new_params))
        return []

    def take_merged(self) -> list[dict[str, Any]]:
        """The merge records since the last call (for the running step's history entry)."""
        merged, self.merged = self.merged, []
        return merged

    def through_function(self, before: Checkpoint, after: Checkpoint, hook: Any) -> list[str]:
        """Follow tensors a function moved unchanged; report parameters whose tensor it replaced.

        For position-keyed state, the function only renamed when its output holds exactly the
        input's tensors (by identity), each once, under names that keep their module order.
        """
        if not self.slots:
            return []
        self._adopt_group_options(before, after)
        self._adopt_states(before, after)
        now = dict(optimizer_states(after.optimizer))
        self.slots = [(w, slot) for w, slot in self.slots if w in now]  # dropped: stays so
        if not self.slots:
            return []
        where = {}
        for key, value in before.state_dict.items():
            where.setdefault(id(value), key)
        trace: dict[str, list[str]] = {}
        replaced = []
        for key, value in after.state_dict.items():
            if id(value) in where:
                trace[key] = [where[id(value)]]
            elif key in before.state_dict:  # same name, new tensor: stays in its group
                trace[key] = [key]
                replaced.append(key)
            else:
                trace[key] = []
        unchanged = len(trace) == len(before.state_dict) and all(s == [k] for k, s in trace.items())
        if unchanged and not replaced:
            return []
        followed = {s for sources in trace.values() for s in sources}
        renamed_and_replaced = any(not sources for sources in trace.values())
        reset = []
        for named in self.follow(list(before.state_dict), trace, reshapes=bool(replaced)):
            mapped = dict(hook(dict(named.states), before, after)) if hook else {}
            # parameters whose tensor left under a new name: the state cannot follow by identity
            vanished = [
                name
                for group in named.groups
                for name in group["names"]
                if name not in followed and name in named.states
            ]
            follow_trace(named, trace, {}, set(mapped))
            for key in replaced:
                if key in named.states and key not in mapped:
                    del named.states[key]
                    reset.append(key)
            if renamed_and_replaced and not mapped:
                reset += vanished
            named.states.update(mapped)
        return reset

    def _adopt_group_options(self, before: Checkpoint, after: Checkpoint) -> None:
        """The group options a function step changed in ``ckpt.optimizer`` (``lr`` scaled,
        ``weight_decay`` set), kept in the states followed by name: :meth:`write_back` puts
        those back, and the step's edit was lost."""
        was, now = dict(optimizer_states(before.optimizer)), dict(optimizer_states(after.optimizer))
        for where, slot in self.slots:
            if not isinstance(slot, NamedOptimizer) or where not in was or where not in now:
                continue
            old_groups, new_groups = was[where]["param_groups"], now[where]["param_groups"]
            if not len(old_groups) == len(new_groups) == len(slot.groups):
                continue  # groups added or removed: their parameters cannot be told apart
            for group, old, new in zip(slot.groups, old_groups, new_groups):
                for key in (set(old) | set(new)) - {"params", "param_names", "names"}:
                    if key not in new:
                        group.pop(key, None)
                    elif key not in old or _changed(old[key], new[key]):
                        group[key] = new[key]

    def _adopt_states(self, before: Checkpoint, after: Checkpoint) -> None:
        """Each parameter's state a function step edited in ``ckpt.optimizer`` (a new
        ``exp_avg``, a state dropped or added), kept in the states followed by name, as
        :meth:`_adopt_group_options` keeps the options: :meth:`write_back` put the old back."""
        was, now = dict(optimizer_states(before.optimizer)), dict(optimizer_states(after.optimizer))
        for where, slot in self.slots:
            if not isinstance(slot, NamedOptimizer) or where not in was or where not in now:
                continue
            old, new = was[where].get("state"), now[where].get("state")
            if not isinstance(old, dict) or not isinstance(new, dict) or old is new:
                continue
            if not set(old) <= set(slot.states):
                continue  # keyed otherwise than the states followed (by position)
            for key in set(old) | set(new):
                if key not in new:
                    slot.states.pop(key, None)
                elif key not in old or _state_changed(old[key], new[key]):
                    slot.states[key] = new[key]

    def write_back(self, ckpt: Checkpoint) -> None:
        """Put each state keyed by name back in the file's layout; positional state stays."""
        for where, named in self.slots:
            if isinstance(named, NamedOptimizer):
                ckpt.optimizer = put(ckpt.optimizer, where, from_named(named))


def _changed(old: Any, new: Any) -> bool:
    """Whether a group option differs (a tensor option: unless it is the very same one)."""
    if old is new:
        return False
    if type(old) is not type(new):  # 3 -> tensor(3), 3 -> 3.0: equal, and still an edit
        return True
    try:
        return bool(old != new)
    except Exception:  # a tensor of several values: compared by identity
        return True


def _state_changed(old: Any, new: Any) -> bool:
    """Whether a parameter's state differs: a field added, dropped or replaced (a tensor
    field: unless it is the very same tensor)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return old is not new
    return old.keys() != new.keys() or any(_changed(old[k], new[k]) for k in old)


def optimizer_states(optimizer: Any) -> list[tuple[Any, Any]]:
    """(where, state_dict) of each torch optimizer state found in ``ckpt.optimizer``."""
    if is_optimizer_state(optimizer):
        return [(None, optimizer)]
    if isinstance(optimizer, list):
        return [(i, o) for i, o in enumerate(optimizer) if is_optimizer_state(o)]
    if isinstance(optimizer, dict):
        return [(k, o) for k, o in optimizer.items() if is_optimizer_state(o)]
    return []


def put(container: Any, where: Any, value: Any) -> Any:
    if where is None:
        return value
    container[where] = value
    return container
