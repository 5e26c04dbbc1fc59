"""What a load into a live model would say: missing, unexpected, misshapen keys, dtype casts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LoadMismatchError
from ..formats.layout import is_tensor_like
from ..values.tensorinfo import signature as signature


@dataclass
class LoadReport:
    """The differences between a checkpoint's state_dict and a model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[dict[str, Any]] = field(default_factory=list)
    dtype_casts: list[dict[str, Any]] = field(default_factory=list)
    #: unexpected keys that are the model's non-persistent buffers (old files saved them)
    non_persistent: list[str] = field(default_factory=list)
    #: a wrapper prefix every checkpoint key carries and no model key does (``module.``)
    wrapper_prefix: str | None = None
    #: wrapper prefixes ``load_into`` stripped before loading
    stripped_prefixes: list[str] = field(default_factory=list)

    @property
    def shape_mismatched_keys(self) -> set[str]:
        return {m["key"] for m in self.shape_mismatched}

    @property
    def clean_for_strict(self) -> bool:
        """Whether ``load_state_dict(strict=True)`` would succeed."""
        return not (self.missing or self.unexpected or self.shape_mismatched)

    def summary(self) -> str:
        parts = []
        for label, items in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", sorted(self.shape_mismatched_keys)),
            ("dtype cast", [c["key"] for c in self.dtype_casts]),
        ):
            if items:
                shown = ", ".join(items[:5]) + (
                    f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                )
                parts.append(f"{len(items)} {label}: {shown}")
        if self.non_persistent:
            parts.append(
                f"{len(self.non_persistent)} of the unexpected keys are non-persistent buffers of "
                f"the model ({', '.join(self.non_persistent[:3])}): older code saved them; drop "
                "them in a migration with cm.ops.DropKeys"
            )
        if self.wrapper_prefix:
            parts.append(
                f"every checkpoint key starts with {self.wrapper_prefix!r} (a DataParallel or "
                "torch.compile wrapper): strip it with cm.ops.StripPrefix"
                f"({self.wrapper_prefix!r}) or cm.load_into"
            )
        if self.stripped_prefixes:
            parts.append(f"stripped wrapper prefix {', '.join(map(repr, self.stripped_prefixes))}")
        return "; ".join(parts) or "no differences"

    def raise_for_strict(self) -> None:
        if not self.clean_for_strict:
            raise LoadMismatchError(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "missing": self.missing,
            "unexpected": self.unexpected,
            "shape_mismatched": self.shape_mismatched,
            "dtype_casts": self.dtype_casts,
            "non_persistent": self.non_persistent,
            "wrapper_prefix": self.wrapper_prefix,
            "stripped_prefixes": self.stripped_prefixes,
            "clean_for_strict": self.clean_for_strict,
        }


def compare_state_dicts(
    checkpoint_sd: Mapping[str, Any], model_sd: Mapping[str, Any]
) -> LoadReport:
    """Compare a checkpoint's entries with what a model expects (tensors or stubs)."""
    report = LoadReport()
    for key, expected in model_sd.items():
        if key not in checkpoint_sd:
            report.missing.append(key)
            continue
        got = checkpoint_sd[key]
        if not (is_tensor_like(got) and is_tensor_like(expected)):
            continue
        (gshape, gdtype), (eshape, edtype) = signature(got), signature(expected)
        if gshape != eshape:
            report.shape_mismatched.append({"key": key, "checkpoint": gshape, "model": eshape})
        elif gdtype != edtype:
            report.dtype_casts.append({"key": key, "checkpoint": gdtype, "model": edtype})
    report.unexpected = [k for k in checkpoint_sd if k not in model_sd]
    if report.missing and checkpoint_sd:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in checkpoint_sd) and not any(
                k.startswith(prefix) for k in model_sd
            ):
                report.wrapper_prefix = prefix
                break
    return report


#: What ``DataParallel``/DDP and ``torch.compile`` put in front of every state_dict key.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def non_persistent_buffers(model: Any) -> list[str]:
    """The model's buffers that ``state_dict()`` leaves out (``persistent=False``)."""
    saved = set(model.state_dict())
    return [name for name, _ in model.named_buffers() if name not in saved]


def load_report(
    model: Any,
    checkpoint_sd: Mapping[str, Any],
    module_metadata: Mapping[str, Any] | None = None,
) -> LoadReport:
    """What ``model.load_state_dict(checkpoint_sd)`` would find, before it runs.

    ``module_metadata`` (torch's ``state_dict._metadata``, default: the dict's own) gives the
    per-module versions: a BatchNorm saved before version 2 had no ``num_batches_tracked``,
    which BatchNorm fills in itself, so it is not reported missing.

    >>> load_report(model, ckpt.state_dict, ckpt.module_metadata).summary()
    '1 unexpected: position_ids; 1 of the unexpected keys are non-persistent buffers ...'
    """
    import torch

    if module_metadata is None:
        module_metadata = getattr(checkpoint_sd, "_metadata", None) or {}
    report = compare_state_dicts(checkpoint_sd, model.state_dict())
    hidden = set(non_persistent_buffers(model))
    report.non_persistent = [k for k in report.unexpected if k in hidden]
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            key = f"{name}.num_batches_tracked" if name else "num_batches_tracked"
            version = (module_metadata.get(name) or {}).get("version")
            if key in report.missing and (version is None or version < 2):
                report.missing.remove(key)  # _BatchNorm._load_from_state_dict adds it
    return report
