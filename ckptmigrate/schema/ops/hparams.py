"""Ops on hyper-parameters: set (pinning an old default), rename, drop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...errors import OpError
from ...values.checkpoint import Checkpoint
from .base import ABSENT, HPARAMS, UNKNOWN, Op

__all__ = ["DropHparam", "RenameHparam", "SetHparam"]


@dataclass
class SetHparam(Op):
    """Set hparam ``name``; ``previous`` (a value, or ``ABSENT``) makes it invertible.

    With ``overwrite=False`` it only fills a missing value, the usual way to pin an old
    default: ``SetHparam("norm_eps", 1e-5, overwrite=False, previous=ABSENT)``.
    """

    acts_on = frozenset({HPARAMS})
    follows_adapter = True  # an adapter holds no hparams
    name: str
    value: Any
    previous: Any = UNKNOWN
    overwrite: bool = True

    def apply(self, ckpt: Checkpoint) -> None:
        if self.overwrite or self.name not in ckpt.hparams:
            ckpt.hparams[self.name] = self.value

    def inverse(self) -> Op | None:
        if self.previous is UNKNOWN:
            return None
        if self.previous is ABSENT:
            return DropHparam(self.name, default=self.value)
        return SetHparam(self.name, self.previous, previous=self.value)

    def describe(self) -> str:
        return f"set hparam {self.name}={self.value!r}"


@dataclass
class RenameHparam(Op):
    """Rename hparam ``old`` to ``new`` (missing: an error unless ``missing_ok``; both: an error)."""

    acts_on = frozenset({HPARAMS})
    follows_adapter = True  # an adapter holds no hparams
    old: str
    new: str
    missing_ok: bool = field(default=False, kw_only=True)

    def apply(self, ckpt: Checkpoint) -> None:
        if self.old not in ckpt.hparams:
            self.found_nothing(list(ckpt.hparams), noun="hparam", needle=self.old)
            return
        if self.new in ckpt.hparams:
            raise OpError(f"{self.describe()}: hparam {self.new!r} already exists")
        ckpt.hparams = {(self.new if k == self.old else k): v for k, v in ckpt.hparams.items()}

    def inverse(self) -> Op:
        return RenameHparam(self.new, self.old, missing_ok=self.missing_ok)

    def describe(self) -> str:
        return f"rename hparam {self.old} -> {self.new}"


@dataclass
class DropHparam(Op):
    """Drop hparam ``name`` (missing: an error unless ``missing_ok``); ``default`` (what to
    restore) makes it invertible."""

    acts_on = frozenset({HPARAMS})
    follows_adapter = True  # an adapter holds no hparams
    name: str
    default: Any = UNKNOWN
    missing_ok: bool = field(default=False, kw_only=True)

    def apply(self, ckpt: Checkpoint) -> None:
        if self.name not in ckpt.hparams:
            self.found_nothing(list(ckpt.hparams), noun="hparam", needle=self.name)
        ckpt.hparams.pop(self.name, None)

    def inverse(self) -> Op | None:
        if self.default is UNKNOWN:
            return None
        return SetHparam(self.name, self.default, previous=ABSENT)

    def describe(self) -> str:
        return f"drop hparam {self.name}"
