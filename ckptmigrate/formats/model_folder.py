"""Model folders: what ``save_pretrained`` writes for a small model, read as its weights file.

A folder with no index and no DCP ``.metadata`` that holds exactly one weights file of a
known name (:data:`WEIGHTS_NAMES`: ``model.safetensors``, ``pytorch_model.bin``, a PEFT
adapter's or a diffusers model's) is that file wherever a path goes; the other files beside
it (``config.json``, generation and tokenizer files) are its :func:`side_files`, copied when
an upgrade writes a new folder. Two weights files and no index are refused: which one is
meant is the user's call.

>>> weights_file("tiny-gpt2/")  # doctest: +SKIP
PosixPath('tiny-gpt2/model.safetensors')
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from ..errors import CheckpointFormatError
from .atomic import TEMP_MARKER, atomic_path

__all__ = [
    "WEIGHTS_NAMES",
    "copy_side_files",
    "is_model_folder",
    "resolve",
    "side_files",
    "weights_file",
]

#: Weights files a model folder may hold, as transformers, PEFT and diffusers name them.
WEIGHTS_NAMES = (
    "model.safetensors",
    "pytorch_model.bin",
    "adapter_model.safetensors",
    "adapter_model.bin",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)


def weights_file(folder: str | os.PathLike[str]) -> Path | None:
    """The one weights file of a model folder, None if it holds none; several are an error.

    Call it on a folder that is neither a DCP checkpoint nor a sharded set (their checks
    come first: a set's folder may hold a stray ``model.safetensors`` too).
    """
    folder = Path(folder)
    found = [folder / name for name in WEIGHTS_NAMES if (folder / name).is_file()]
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise CheckpointFormatError(
            f"is a model folder with {len(found)} weights files and no *.index.json naming "
            f"them ({names}): pass the file you mean, e.g. {found[0]}",
            path=folder,
        )
    return found[0] if found else None


def is_model_folder(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a folder read as its one weights file (not DCP, not sharded)."""
    from .detect import detect_format

    return Path(path).is_dir() and detect_format(path) not in ("dcp", "sharded")


def resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the weights file when it names a model folder."""
    path = Path(path)
    if is_model_folder(path):
        found = weights_file(path)
        assert found is not None  # detect_format refused a folder without one
        return found
    return path


def side_files(folder: Path, own: Iterable[str]) -> list[Path]:
    """The top-level files of ``folder`` that are not the checkpoint's ``own`` files, nor
    their in-place backups (``model.safetensors.1.0.0.bak``), nor ckptmigrate's lock, journal
    and temporary files: what makes the folder loadable by ``from_pretrained`` beside the
    weights."""
    from ..lock import LOCK_SUFFIX
    from .sharded import PENDING_SUFFIX

    skip = set(own)

    def backup(name: str) -> bool:
        return name.endswith(".bak") and any(name.startswith(f"{o}.") for o in skip)

    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and p.name not in skip
        and not backup(p.name)
        and not p.name.endswith((LOCK_SUFFIX, PENDING_SUFFIX))
        and TEMP_MARKER not in p.name
    )


def copy_side_files(folder: Path, own: Iterable[str], dst: Path) -> list[Path]:
    """Copy :func:`side_files` into ``dst`` (atomically each), unless it is ``folder``."""
    if dst.resolve() == folder.resolve():
        return []
    copied = []
    for source in side_files(folder, own):
        with atomic_path(dst / source.name) as tmp:
            shutil.copyfile(source, tmp)
        copied.append(dst / source.name)
    return copied
