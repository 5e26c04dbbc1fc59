"""What a load into a live model would say: missing, unexpected, misshapen keys, dtype casts."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import LoadMismatchError
from .layout import is_tensor_like


def signature(value: Any) -> tuple[tuple[int, ...], str]:
    """(shape, dtype name) of a tensor or a metadata stub."""
    return tuple(int(d) for d in value.shape), str(value.dtype).removeprefix("torch.")


@dataclass
class LoadReport:
    """The differences between a checkpoint's state_dict and a model's."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape_mismatched: list[dict[str, Any]] = field(default_factory=list)
    dtype_casts: list[dict[str, Any]] = field(default_factory=list)

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
    return report


def load_report(model: Any, checkpoint_sd: Mapping[str, Any]) -> LoadReport:
    """What ``model.load_state_dict(checkpoint_sd)`` would find, before it runs."""
    return compare_state_dicts(checkpoint_sd, model.state_dict())
