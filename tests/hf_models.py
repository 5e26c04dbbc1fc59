"""A tiny GPT-2 built from a config (no download), its migrations and CLI upgrade, shared by the
Hugging Face tests; transformers is imported only inside the functions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import torch
from processes import run

QKV = "transformer.h.0.attn.c_attn.weight"


MIGRATIONS = {
    # a tensor op: the upgrade loads tensors (fused q/k/v split, then fused back)
    "split": f"""
        import ckptmigrate as cm

        QKV = {QKV!r}
        schema = cm.Schema("tinygpt", current="2.0.0")
        schema.add_migration("1.0.0", "2.0.0", [
            cm.ops.Split(QKV, [QKV + ".q", QKV + ".k", QKV + ".v"], dim=1),
            cm.ops.Merge([QKV + ".q", QKV + ".k", QKV + ".v"], QKV, dim=1),
        ])
        """,
    # an hparam op: the upgrade copies tensor bytes as stored
    "streamed": """
        import ckptmigrate as cm

        schema = cm.Schema("tinygpt", current="2.0.0")
        schema.add_migration("1.0.0", "2.0.0", [cm.ops.SetHparam("tied", True)])
        """,
}


INPUT = torch.tensor([[1, 2, 3, 4, 5]])


def tiny_gpt2() -> tuple[object, object]:
    """A tiny GPT-2 built from a config (seeded, eval mode) and a word-level tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    config = GPT2Config(
        vocab_size=16, n_positions=16, n_embd=8, n_layer=2, n_head=2, bos_token_id=1, eos_token_id=2
    )
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).eval(), tokenizer


def write_migrations(root: Path) -> None:
    """``split.py`` and ``streamed.py`` (:data:`MIGRATIONS`) into ``root``."""
    for name, text in MIGRATIONS.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))


def upgrade_1_to_2(root: Path, migration: str, *args: str) -> None:
    """``ckptmigrate upgrade ARGS`` from 1.0.0 with ``root/MIGRATION.py``; it must succeed."""
    done = run(
        root, "upgrade", *args, "--migrations", str(root / f"{migration}.py"),
        "--schema", "tinygpt", "--from-version", "1.0.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr


def assert_same_tokens(a: Path, b: Path) -> None:
    """The tokenizers of model folders ``a`` and ``b`` encode alike."""
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(a)("hello world")["input_ids"]
    assert tokens == AutoTokenizer.from_pretrained(b)("hello world")["input_ids"]
