"""``hf-bert``: BertModel (and the Bert* task models) weights, transformers 3.1 -> 4.31 -> 5.x.

From 3.1 through 4.30, ``BertEmbeddings.position_ids`` was a persistent buffer (added in 3.1:
huggingface/transformers#6882), so every file held ``embeddings.position_ids``
(``arange(max_position_embeddings)[None]``); 4.31 made it non-persistent (#24505), and a strict
load of an older file reports it unexpected. Older files still, ported from TensorFlow BERT,
name the LayerNorm parameters ``gamma``/``beta``; transformers' loaders rename them on load
(4.x in ``_fix_state_dict_key_on_load``, 5.x in its ``legacy`` conversion), so the 3.1.0 step
does too (a file from before 3.1 has neither and is already in the 4.31.0 layout). 5.x saves
and strictly loads exactly what 4.31 through 4.57 write, so 4.31.0 -> 5.0.0 changes nothing.
Downgrading to 3.1.0 writes the buffer back (what 3.1 to 4.30's ``save_pretrained`` wrote)
and keeps ``weight``/``bias``, which every version reads.

>>> ckptmigrate upgrade bert-4.30/ -o bert-5/ --schema hf-bert --from-version 3.1.0
"""

from __future__ import annotations

import re

import ckptmigrate as cm

PERSISTED = "3.1.0"  # position_ids in the file, 3.1 <= transformers < 4.31
NON_PERSISTENT = "4.31.0"  # what 4.31 .. 4.57 write
V5 = "5.0.0"

POSITION_IDS = re.compile(r"(.*\.)?embeddings\.position_ids")
POSITION_EMBEDDINGS = re.compile(r"((?:.*\.)?embeddings\.)position_embeddings\.weight")
TF_NAMES = re.compile(r"(.*\.LayerNorm)\.(gamma|beta)")
TORCH_NAMES = {"gamma": "weight", "beta": "bias"}

schema = cm.Schema("hf-bert", current=V5)


def persist_position_ids(ckpt: cm.Checkpoint) -> None:
    """Write ``embeddings.position_ids`` back, one an embeddings module, as 3.1 to 4.30 did."""
    import torch

    for key, value in list(ckpt.state_dict.items()):
        m = POSITION_EMBEDDINGS.fullmatch(key)
        if m is not None:
            positions = torch.arange(value.shape[0], dtype=torch.int64)[None]
            ckpt.state_dict[m[1] + "position_ids"] = positions


@schema.migration(PERSISTED, NON_PERSISTENT, inverse=persist_position_ids)
def drop_persisted_position_ids(ckpt: cm.Checkpoint) -> None:
    """Drop the ``position_ids`` buffer 4.31 stopped saving; LayerNorm ``gamma``/``beta`` become
    ``weight``/``bias``, as transformers' loaders rename them."""
    renamed = {}
    for key, value in ckpt.state_dict.items():
        if POSITION_IDS.fullmatch(key):
            continue
        m = TF_NAMES.fullmatch(key)
        new = f"{m[1]}.{TORCH_NAMES[m[2]]}" if m else key
        if new in renamed or (m and new in ckpt.state_dict):
            raise ValueError(f"{key!r} and {new!r} are both in the file: which one is the weight?")
        renamed[new] = value
    ckpt.state_dict = renamed


schema.add_migration(NON_PERSISTENT, V5, [], name="none: 5.x reads the 4.31 layout as it is")
