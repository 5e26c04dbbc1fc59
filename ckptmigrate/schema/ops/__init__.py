"""Declarative migration ops (``cm.ops``): key mapping as data, each with its inverse where one
exists. The op base and the matching helpers live in :mod:`.base`."""

from __future__ import annotations

from .base import *  # noqa: F403
from .base import __all__ as __all__
