"""``hf-mixtral``: MixtralForCausalLM (and MixtralModel) weights between transformers 4.x and 5.x.

4.x (Mixtral arrived in 4.36; proven on files 4.57.1 writes) keeps each expert as its own
module, ``model.layers.N.block_sparse_moe.experts.E.w1/w2/w3.weight`` and the router as
``block_sparse_moe.gate.weight``. 5.x renames the block to ``mlp`` and stacks the experts into
two parameters, ``mlp.experts.gate_up_proj`` (experts, 2 x intermediate, hidden: w1 then w3
along dim 1) and ``mlp.experts.down_proj`` (experts, hidden, intermediate: the w2s), which is
what transformers 5's own ``conversion_mapping`` does on load (``MergeModulelist(dim=0)``, then
``Concatenate(dim=1)``). Every op has its inverse, so ``--to 4.36.0`` writes what 4.x loads.

>>> ckptmigrate upgrade mixtral-4.x/ -o mixtral-5/ --schema hf-mixtral --from-version 4.36.0
"""

from __future__ import annotations

import ckptmigrate as cm

LEGACY = "4.36.0"  # the per-expert layout, 4.36 <= transformers < 5
STACKED = "5.0.0"  # the stacked experts of transformers 5

EXPERT = "{p}.mlp.experts.{i}"
EXPERTS = "{p}.mlp.experts"

schema = cm.Schema("hf-mixtral", current=STACKED)
schema.add_migration(
    LEGACY,
    STACKED,
    [
        cm.ops.RenameKeys(
            r"(.+)\.block_sparse_moe\.(.+)",
            r"\1.mlp.\2",
            reverse=(r"(.+)\.mlp\.(.+)", r"\1.block_sparse_moe.\2"),
        ),
        # count=None: as many experts as the file holds, as MergeModulelist does
        cm.ops.Stack(f"{EXPERT}.w1.weight", f"{EXPERTS}.w1", count=None),
        cm.ops.Stack(f"{EXPERT}.w3.weight", f"{EXPERTS}.w3", count=None),
        cm.ops.Merge([f"{EXPERTS}.w1", f"{EXPERTS}.w3"], f"{EXPERTS}.gate_up_proj", dim=1),
        cm.ops.Stack(f"{EXPERT}.w2.weight", f"{EXPERTS}.down_proj", count=None),
    ],
    reversible=True,
    name="stack the experts (block_sparse_moe.experts.E.w1/w3/w2 -> mlp.experts.gate_up_proj/down_proj)",
)
