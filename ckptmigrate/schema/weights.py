"""Named weights: the trained checkpoints that exist for a schema, each pinned by its sha256.

As torchvision's ``WeightsEnum`` lists ``ResNet50_Weights.IMAGENET1K_V2`` with its URL, its
transforms and its metrics, a schema lists its weights: a name, where the file is (a URL or a
path), the sha256 it must have, the schema version it was saved at, what is known about it
(``meta``: dataset, metrics, classes) and the input transforms it needs, *by reference*. A
weights entry is code the schema's author wrote, never data read from a file: the reference
names a function of the author's package, imported only when :meth:`Weights.get_transforms`
asks for it.

>>> schema.add_weights("stripes_v1", url="https://example.com/tinyconv-3f2a.pth",
...                    sha256="3f2a...", version="1.0.0", meta={"val_acc": 0.93})
>>> ckpt = cm.load_weights(schema, "stripes_v1")   # downloaded, verified, upgraded
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from packaging.version import Version

from ..base.version import parse_version
from ..errors import UsageError

__all__ = ["Weights"]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]{0,127}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")


@dataclass(frozen=True)
class Weights:
    """One trained checkpoint of a schema. ``url`` is an ``http(s)://`` or ``file://`` URL or a
    path; ``golden`` (with ``golden_sha256``) optionally names a golden record of the outputs
    the weights gave when published, for ``ckptmigrate check --weights``."""

    name: str
    url: str
    sha256: str
    version: Version
    meta: Mapping[str, Any] = field(default_factory=dict)
    #: ``"package.module:function"`` (or the callable itself): the input transforms
    transforms: str | Callable[..., Any] | None = None
    golden: str | None = None
    golden_sha256: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.fullmatch(self.name):
            raise UsageError(
                f"a weights name is letters, digits, '_', '.' and '-' (up to 128, not starting "
                f"with a digit), got {self.name!r}"
            )
        if not isinstance(self.url, str) or not self.url:
            raise UsageError(f"weights {self.name}: url must be a non-empty string")
        for what, digest in (("sha256", self.sha256), ("golden_sha256", self.golden_sha256)):
            if digest is not None and not (
                isinstance(digest, str) and _SHA256.fullmatch(digest.lower())
            ):
                raise UsageError(
                    f"weights {self.name}: {what} must be 64 hex digits (hashlib.sha256(data)"
                    f".hexdigest()), got {digest!r}"
                )
        object.__setattr__(self, "sha256", self.sha256.lower())
        object.__setattr__(self, "version", parse_version(self.version, what="weights version"))
        object.__setattr__(self, "meta", dict(self.meta))
        if (self.golden is None) != (self.golden_sha256 is None):
            raise UsageError(f"weights {self.name}: golden and golden_sha256 go together")
        if self.golden_sha256 is not None:
            object.__setattr__(self, "golden_sha256", self.golden_sha256.lower())
        if isinstance(self.transforms, str) and not _REFERENCE.fullmatch(self.transforms):
            raise UsageError(
                f"weights {self.name}: transforms is 'package.module:function' or a callable, "
                f"got {self.transforms!r}"
            )

    def get_transforms(self) -> Callable[..., Any] | None:
        """The transforms function, imported from its reference now (None when none is set)."""
        if self.transforms is None or callable(self.transforms):
            return self.transforms
        import importlib

        module, _, attr = self.transforms.partition(":")
        try:
            value: Any = importlib.import_module(module)
            for part in attr.split("."):
                value = getattr(value, part)
        except (ImportError, AttributeError) as exc:
            raise UsageError(
                f"weights {self.name}: cannot import transforms {self.transforms!r}: {exc}"
            ) from None
        if not callable(value):
            raise UsageError(f"weights {self.name}: transforms {self.transforms!r} is not callable")
        return value

    def to_dict(self) -> dict[str, Any]:
        """What ``ckptmigrate weights --json`` prints of this entry."""
        transforms = self.transforms
        if callable(transforms):
            transforms = f"{transforms.__module__}:{transforms.__qualname__}"
        return {
            "name": self.name,
            "url": self.url,
            "sha256": self.sha256,
            "version": str(self.version),
            "meta": self.meta,
            "transforms": transforms,
            "golden": self.golden,
            "golden_sha256": self.golden_sha256,
        }
