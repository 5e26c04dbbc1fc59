"""The in-memory checkpoint: tensors, hyper-parameters, metadata and the stamp, as values."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from packaging.version import Version

from ..base.version import parse_version

if TYPE_CHECKING:
    from .stamp import Mount


@dataclass
class Checkpoint:
    """A checkpoint as ckptmigrate sees it, whatever layout the file had.

    ``state_dict`` maps names to tensors (``*._extra_state`` entries may hold other values);
    ``module_metadata`` is torch's ``state_dict._metadata`` (per-module versions read by
    ``_load_from_state_dict``), kept apart so that a migration rebuilding the dict keeps it.
    ``layout`` says how the file stored it, so it is written back the same way.
    ``schema``/``version``/``history`` are the mount at ``""``; ``mounts`` places other schemas
    at key prefixes (see :mod:`ckptmigrate.engine.mounts`).

    >>> ckpt = Checkpoint({"w": torch.zeros(2)}, hparams={"d": 2}, schema="m", version="1.0")
    """

    state_dict: dict[str, Any]
    hparams: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    schema: str | None = None
    version: Version | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    optimizer: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    module_metadata: dict[str, dict[str, Any]] | None = None
    layout: str = "ckptmigrate"
    report: Any = None
    mounts: list[Mount] = field(default_factory=list)

    def __post_init__(self) -> None:
        if isinstance(self.version, str):
            self.version = parse_version(self.version)

    @property
    def stamped(self) -> bool:
        """Whether the checkpoint knows its schema and version."""
        return self.schema is not None and self.version is not None

    def copy(self) -> Checkpoint:
        """A copy whose containers are new and whose tensors are shared."""
        return replace(
            self,
            state_dict=dict(self.state_dict),
            hparams=copy_containers(self.hparams),
            meta=copy_containers(self.meta),
            history=[dict(h) for h in self.history],
            optimizer=copy_containers(self.optimizer),
            extra=copy_containers(self.extra),
            module_metadata=copy_module_metadata(self.module_metadata),
            mounts=[replace(m, history=[dict(h) for h in m.history]) for m in self.mounts],
        )

    def state_dict_for_torch(self) -> OrderedDict[str, Any]:
        """The state_dict as ``model.load_state_dict`` wants it, with ``_metadata`` attached."""
        sd: OrderedDict[str, Any] = OrderedDict(self.state_dict)
        if self.module_metadata is not None:
            sd._metadata = copy_module_metadata(self.module_metadata)  # type: ignore[attr-defined]
        return sd


def copy_module_metadata(
    metadata: dict[str, dict[str, Any]] | None,
) -> dict[str, dict[str, Any]] | None:
    """A copy of torch's per-module metadata (prefix -> small dict), one level deep."""
    if metadata is None:
        return None
    return type(metadata)((k, dict(v) if isinstance(v, dict) else v) for k, v in metadata.items())


def copy_containers(value: Any) -> Any:
    """Copy dicts, lists and tuples recursively; share everything else (tensors included)."""
    if isinstance(value, OrderedDict):
        out: Any = OrderedDict((k, copy_containers(v)) for k, v in value.items())
        if hasattr(value, "_metadata"):
            out._metadata = copy_module_metadata(value._metadata)
        return out
    if isinstance(value, dict):
        return {k: copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_containers(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(copy_containers(v) for v in value)
    return value
