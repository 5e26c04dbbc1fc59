"""ckptmigrate migrations for Hugging Face transformers checkpoints, keyed by the transformers
version whose layout a file has: :mod:`ckptmigrate_hf.mixtral` (``hf-mixtral``) and
:mod:`ckptmigrate_hf.bert` (``hf-bert``). Installed, the package's entry points in the group
``ckptmigrate.migrations`` make ``ckptmigrate`` find both schemas by itself."""

from .bert import schema as bert
from .mixtral import schema as mixtral

__all__ = ["bert", "mixtral"]
