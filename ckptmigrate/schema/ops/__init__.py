"""Declarative migration ops (``cm.ops``): key mapping as data, each with its inverse where one
exists.

One concept a module: :mod:`.base` (the ``Op`` class and the key matching all ops share),
:mod:`.keys` (renames, drops, added keys), :mod:`.tensors` (split, merge, reshape, transpose,
cast), :mod:`.hparams` and :mod:`.layouts` (the layout changes real models go through: stacked
experts, RoPE permutation, per-head interleaved qkv, padded vocabularies). Every name is
importable from here, as it was when the ops were one module.
"""

from __future__ import annotations

from . import data as data  # ops as JSON data and back (recorded inverses)
from . import layouts  # the module, for its __all__

# the names with ``as`` are importable from here as when the ops were one module, not in __all__
from .base import ABSENT, NothingMatched, Op
from .base import CODE as CODE
from .base import HPARAMS as HPARAMS
from .base import KEYS as KEYS
from .base import TENSORS as TENSORS
from .base import UNKNOWN as UNKNOWN
from .base import Call as Call
from .base import OpError as OpError
from .base import fill_template as fill_template
from .base import template_matches as template_matches
from .base import template_regex as template_regex
from .hparams import DropHparam, RenameHparam, SetHparam
from .keys import (
    STRIP_COMPILE,
    STRIP_DATAPARALLEL,
    AddKey,
    DropKeys,
    RenameKeys,
    RenamePrefix,
    StripPrefix,
    strip_wrappers,
)
from .keys import module_renames as module_renames
from .keys import prefix_mover as prefix_mover
from .layouts import *  # noqa: F403 - the layout ops, as layouts.__all__ lists them
from .tensors import Cast, Merge, Reshape, Split, Transpose
from .tensors import TensorOp as TensorOp

#: the ops and names a migration uses (``cm.ops.X``); the helpers above stay importable
__all__ = [
    "ABSENT",
    "AddKey",
    "Cast",
    "DropHparam",
    "DropKeys",
    "Merge",
    "NothingMatched",
    "Op",
    "RenameHparam",
    "RenameKeys",
    "RenamePrefix",
    "Reshape",
    "STRIP_COMPILE",
    "STRIP_DATAPARALLEL",
    "SetHparam",
    "Split",
    "StripPrefix",
    "Transpose",
    "strip_wrappers",
    *layouts.__all__,
]
