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

import contextlib
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ..errors import CheckpointFormatError, OutputOccupiedError
from .remote import location

# the writer's modules (atomic, filecmp) are imported where a folder is copied, not read

__all__ = [
    "WEIGHTS_NAMES",
    "check_side_files",
    "copy_side_files",
    "is_model_folder",
    "resolve",
    "side_files",
    "weights_file",
    "write_folder",
]

T = TypeVar("T")

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
    folder = location(folder)
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
    return location(path).is_dir() and resolve(path) != location(path)


def resolve(path: str | os.PathLike[str]) -> Path:
    """``path`` itself, or the weights file when it names a model folder."""
    from .registry import reader_for

    if not location(path).is_dir():
        return location(path)  # type: ignore[return-value]
    return reader_for(path)[0]


def side_files(folder: Path, own: Iterable[str]) -> list[Path]:
    """The top-level files of ``folder`` that are not the checkpoint's ``own`` files, nor
    their in-place backups (``model.safetensors.1.0.0.bak``), nor ckptmigrate's lock, journal
    and temporary files: what makes the folder loadable by ``from_pretrained`` beside the
    weights."""
    from .atomic import TEMP_MARKER
    from .lock import LOCK_SUFFIX
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


def _copy_of(path: Path, source: Path) -> bool:
    import filecmp

    return path.is_file() and not path.is_symlink() and filecmp.cmp(path, source, shallow=False)


def check_side_files(folder: Path, own: Iterable[str], dst: Path, kind: str) -> None:
    """Refuse (:class:`~ckptmigrate.errors.OutputOccupiedError`), before anything is written,
    to copy the :func:`side_files` into a ``dst`` that holds another file under one of their
    names (a user's ``config.json``): the copy would replace it."""
    if not dst.is_dir() or dst.resolve() == folder.resolve():
        return
    held = [
        s.name
        for s in side_files(folder, own)
        if os.path.lexists(dst / s.name) and not _copy_of(dst / s.name, s)
    ]
    if held:
        raise OutputOccupiedError(dst, held, kind)


def copy_side_files(folder: Path, own: Iterable[str], dst: Path) -> list[Path]:
    """Copy :func:`side_files` into ``dst`` (atomically each), unless it is ``folder``; one
    already there as a copy is left as it is."""
    import shutil

    from .atomic import atomic_path

    if dst.resolve() == folder.resolve():
        return []
    copied = []
    for source in side_files(folder, own):
        if _copy_of(dst / source.name, source):
            continue
        with atomic_path(dst / source.name) as tmp:
            shutil.copyfile(source, tmp)
        copied.append(dst / source.name)
    return copied


def check_folder_output(src: Path, dst: Path) -> None:
    """Refuse, before anything runs or is written, a folder ``dst`` that :func:`write_folder`
    could not write the model folder ``src`` into (a file there, a user's side file), or a
    file ``dst`` that exists (the weights written to a file name never replace a file)."""
    if dst.exists() and dst.resolve() == src.resolve():
        return
    if dst.suffix and not dst.is_dir():
        if os.path.lexists(dst):
            raise OutputOccupiedError(dst, [], "a model folder's weights file")
        return
    if os.path.lexists(dst) and not dst.is_dir():
        raise OutputOccupiedError(dst, [], "a model folder")
    check_side_files(src, [resolve(src).name], dst, "a model folder")


def write_folder(src: Path, dst: Path, write: Callable[[Path, Path], T]) -> T:
    """Write the model folder ``src``'s weights file with ``write(weights, target)``: in place,
    to the file ``dst`` names (a suffix, not a folder), or into the folder ``dst`` under the
    same name with the side files (config, tokenizer...) copied beside it, refused first when
    ``dst`` holds other files of those names. A write refused leaves no new folder behind.

    >>> write_folder(Path("tiny"), Path("tiny-v2"), lambda w, t: shutil.copyfile(w, t))  # doctest: +SKIP
    """
    weights = resolve(src)
    if dst.exists() and dst.resolve() == src.resolve():
        return write(weights, weights)
    check_folder_output(src, dst)
    if dst.suffix and not dst.is_dir():
        return write(weights, dst)
    made = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    try:
        result = write(weights, dst / weights.name)
    except BaseException:
        if made:
            with contextlib.suppress(OSError):
                dst.rmdir()  # only if still empty
        raise
    copy_side_files(src, [weights.name], dst)
    return result
