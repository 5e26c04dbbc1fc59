"""The schema the sharded-set and DCP tests migrate with: a rename, a drop and an hparam."""

from __future__ import annotations

import ckptmigrate as cm


def rename_drop_schema() -> cm.Schema:
    """lm 1.0.0 -> 2.0.0: ``blocks.`` -> ``layers.``, ``*.rotary`` dropped, ``eps`` set."""
    schema = cm.Schema("lm", current="2.0.0")
    schema.add_migration(
        "1.0.0",
        "2.0.0",
        [
            cm.ops.RenamePrefix("blocks.", "layers."),
            cm.ops.DropKeys(r".*\.rotary"),
            cm.ops.SetHparam("eps", 1e-6),
        ],
    )
    return schema
