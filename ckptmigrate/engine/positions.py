"""Position-keyed optimizer state: which steps keep its positions, and where names come from.

Most optimizers are built from ``model.parameters()``, so their state is keyed by position:
``state[i]`` belongs to the i-th parameter in the order the model lists them. A step that only
renames (each key after it comes from exactly one key before it, and the renamed keys, listed
as a module lists them, keep their order) moves no position, and such state passes through it
untouched. Any other step (split, merge, drop, add, reshape, a function that replaces or
reorders tensors) needs each position's name: from the caller's ``param_names`` (the CLI's
``--param-names FILE``), else from the file's own parameter order, used only once verified.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ParamNamesUnknownError
from ..values.checkpoint import Checkpoint
from .optimizer import NamedOptimizer, module_order, to_named

__all__ = [
    "PositionalState",
    "deduce_param_names",
    "keeps_positions",
    "read_param_names",
    "verify_param_names",
]


def keeps_positions(keys: Sequence[str], trace: Mapping[str, Sequence[str]]) -> bool:
    """Whether a step mapping ``keys`` to ``trace`` (key after -> its sources) only renames.

    It must be a bijection that maps modules to modules (a module's entries stay together,
    apart from other modules' entries: the order inside a module is the model's), and listing the keys before it in module order and renaming them
    must give the keys after it in module order: ``encoder.`` -> ``backbone.`` keeps every
    position, swapping ``layers.0`` and ``layers.1`` or moving a tensor into another module
    does not.
    """
    after_of: dict[str, str] = {}
    for after, sources in trace.items():
        if len(sources) != 1 or sources[0] in after_of:
            return False
        after_of[sources[0]] = after
    if set(after_of) != set(keys):
        return False
    # modules map to modules: a module's entries stay together, and apart from the others'
    parent_of: dict[str, str] = {}
    for before, after in after_of.items():
        if parent_of.setdefault(_parent(before), _parent(after)) != _parent(after):
            return False
    if len(set(parent_of.values())) != len(parent_of):
        return False
    renamed = [after_of[k] for k in module_order(keys)]
    return renamed == module_order([after_of[k] for k in keys])


def _parent(key: str) -> str:
    return key.rpartition(".")[0]


def read_param_names(path: str) -> list[str]:
    """Parameter names from a text file, one a line (blank lines and ``#`` comments skipped)."""
    with open(path, encoding="utf-8") as file:
        lines = [line.strip() for line in file]
    return [line for line in lines if line and not line.startswith("#")]


def _is_float(value: Any) -> bool:
    dtype = getattr(value, "dtype", None)  # a tensor's torch.dtype, or a stub's dtype name
    return dtype is not None and str(dtype).removeprefix("torch.").startswith(
        ("float", "bfloat", "complex")
    )


def verify_param_names(
    opt_sd: Mapping[str, Any], names: Sequence[str], state_dict: Mapping, what: str
) -> None:
    """Refuse ``names`` for the optimizer's positions unless every state tensor fits its name."""
    positions = [p for g in opt_sd["param_groups"] for p in g["params"]]
    if len(names) != len(positions):
        raise ParamNamesUnknownError(
            f"{what}: {len(names)} names, but the optimizer holds {len(positions)} parameters"
        )
    for position, name in zip(positions, names):
        if name not in state_dict:
            raise ParamNamesUnknownError(f"{what}: {name!r} is not a key of the state_dict")
        shape = tuple(getattr(state_dict[name], "shape", ()))
        for fld, value in opt_sd["state"].get(position, {}).items():
            got = tuple(getattr(value, "shape", ()))
            if got and got != shape:  # 0-d entries (Adam's step) fit any parameter
                raise ParamNamesUnknownError(
                    f"{what}: position {position} would be {name!r} of shape "
                    f"{list(shape)}, but its state {fld!r} has shape {list(got)}"
                )


def deduce_param_names(
    opt_sd: Mapping[str, Any], state_dict: Mapping[str, Any], buffers: set[str] | None
) -> list[str]:
    """The file's parameters in its own order, as the optimizer's names, once verified.

    Parameters are the floating-point entries that are not ``buffers`` (told by building the
    model; without it every floating-point tensor counts, so a float buffer such as
    ``running_mean`` makes the count differ and the deduction is refused). Verified: one param
    group (``Optimizer(model.parameters())``, Lightning's default: several groups split the
    parameters in an order the file does not record), as many parameters as the optimizer
    holds, and every state tensor shaped like its parameter.
    """
    groups = opt_sd["param_groups"]
    if len(groups) > 1:
        # model.parameters() lists them in the file's order; param groups split them by
        # choice (a head at another lr, listed first): nothing in the file says how
        raise ParamNamesUnknownError(
            f"the optimizer has {len(groups)} param groups, and the file's order cannot tell "
            "which parameters went into which group"
        )
    candidates = [
        k
        for k, v in state_dict.items()
        if _is_float(v) and not str(k).endswith("_extra_state") and k not in (buffers or ())
    ]
    total = sum(len(g["params"]) for g in opt_sd["param_groups"])
    if len(candidates) != total:
        how = (
            "once the schema's build= told its buffers apart"
            if buffers is not None
            else "(buffers too: the schema has no build= to tell them apart)"
        )
        raise ParamNamesUnknownError(
            f"the file's state_dict holds {len(candidates)} floating-point tensors {how}, but "
            f"its optimizer holds {total} parameters, so the file's order cannot name them"
        )
    verify_param_names(opt_sd, candidates, state_dict, "the file's parameter order")
    return candidates


@dataclass
class PositionalState:
    """Position-keyed optimizer state, untouched while the steps keep its positions.

    ``origin`` is the checkpoint as the plan found it; ``renamed`` maps each of its keys to its
    name now; ``buffers()`` says which of ``origin``'s keys are buffers (None: unknown).
    """

    opt_sd: Mapping[str, Any]
    origin: Checkpoint
    given: Sequence[str] | None = None
    buffers: Callable[[], set[str] | None] = lambda: None
    renamed: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.renamed = {k: k for k in self.origin.state_dict}

    def follow_renames(self, trace: Mapping[str, Sequence[str]]) -> None:
        """Note a step that kept positions (see :func:`keeps_positions`)."""
        after_of = {sources[0]: after for after, sources in trace.items()}
        self.renamed = {k: after_of.get(now, now) for k, now in self.renamed.items()}

    def named(self, step: str | None) -> NamedOptimizer:
        """Key the state by the names it has now, or raise :class:`ParamNamesUnknownError`."""
        sd = self.origin.state_dict
        try:
            if self.given is not None:
                names = list(self.given)
                verify_param_names(self.opt_sd, names, sd, "the names given")
            else:
                names = deduce_param_names(self.opt_sd, sd, self.buffers())
        except ParamNamesUnknownError as exc:
            raise ParamNamesUnknownError(exc.reason, step=step) from None
        return to_named(self.opt_sd, [self.renamed[n] for n in names])
