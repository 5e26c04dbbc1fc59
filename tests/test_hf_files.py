"""Hugging Face model folders as transformers and huggingface_hub write them: read, upgrade, and
load back with ``from_pretrained``.

transformers 5 writes safetensors sets only; the ``.bin`` set is written the way transformers
4 wrote it, by ``huggingface_hub.save_torch_state_dict(safe_serialization=False)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from hf_models import (
    INPUT,
    assert_same_tokens,
    tiny_gpt2,
    upgrade_1_to_2,
    write_migrations,
)
from processes import run

transformers = pytest.importorskip("transformers")
huggingface_hub = pytest.importorskip("huggingface_hub")
tokenizers = pytest.importorskip("tokenizers")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny GPT-2 with its tokenizer, saved as a sharded safetensors set and a .bin set."""
    root = tmp_path_factory.mktemp("hf")
    model, tokenizer = tiny_gpt2()
    model.save_pretrained(root / "st", max_shard_size="4KB")
    tokenizer.save_pretrained(root / "st")
    (root / "bin").mkdir()
    huggingface_hub.save_torch_state_dict(
        model.state_dict(), root / "bin", safe_serialization=False, max_shard_size="4KB"
    )
    model.config.save_pretrained(root / "bin")
    model.generation_config.save_pretrained(root / "bin")
    tokenizer.save_pretrained(root / "bin")
    write_migrations(root)
    return {"root": root, "st": root / "st", "bin": root / "bin"}


def index_of(folder: Path) -> Path:
    (index,) = folder.glob("*.index.json")
    return index


def shard_paths(folder: Path) -> list[Path]:
    weight_map = json.loads(index_of(folder).read_text())["weight_map"]
    return [folder / name for name in sorted(set(weight_map.values()))]


def logits(folder: Path) -> torch.Tensor:
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(INPUT).logits


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_info_reads_a_set_by_its_index_file_and_counts_the_sets_files(folders, kind):
    folder = folders[kind]
    by_index = run(folder.parent, "info", str(index_of(folder)), "--json")
    assert by_index.returncode == 0, by_index.stderr
    by_folder = run(folder.parent, "info", str(folder), "--json")
    assert by_folder.returncode == 0, by_folder.stderr
    index, whole = json.loads(by_index.stdout), json.loads(by_folder.stdout)
    assert index["format"] == whole["format"] == "sharded"
    weight_map = json.loads(index_of(folder).read_text())["weight_map"]
    assert index["tensors"] == whole["tensors"] == len(weight_map)
    expected = sum(p.stat().st_size for p in [index_of(folder), *shard_paths(folder)])
    assert index["file_bytes"] == whole["file_bytes"] == expected


def test_an_upgrade_that_loads_tensors_keeps_each_shards_foreign_header(folders, tmp_path):
    source = folders["st"]
    out = tmp_path / "upgraded"
    done = run(
        folders["root"], "upgrade", str(source), "-o", str(out), "--migrations",
        str(folders["root"] / "split.py"), "--schema", "tinygpt", "--from-version", "1.0.0",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from safetensors import safe_open

    def foreign(path: Path) -> dict[str, str]:
        with safe_open(str(path), framework="pt") as f:
            return {k: v for k, v in (f.metadata() or {}).items() if not k.startswith("ckpt")}

    expected = foreign(shard_paths(source)[0])
    assert expected, "transformers wrote no header metadata to keep"
    assert all(foreign(p) == expected for p in shard_paths(out))


@pytest.mark.parametrize("migration", ["split", "streamed"])
@pytest.mark.parametrize("kind", ["st", "bin"])
def test_upgrading_a_model_folder_to_a_new_one_keeps_it_loadable_by_from_pretrained(
    folders, tmp_path, kind, migration
):

    source, out = folders[kind], tmp_path / "upgraded"
    upgrade_1_to_2(folders["root"], migration, str(source), "-o", str(out))
    for name in ("config.json", "generation_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (source / name).read_bytes(), name
    assert (
        not set(os.listdir(out))
        - {p.name for p in [index_of(out), *shard_paths(out)]}
        - set(os.listdir(source))
    )
    torch.testing.assert_close(logits(out), logits(source), atol=1e-6, rtol=0)
    assert_same_tokens(out, source)
    assert json.loads(run(out, "info", str(out), "--json").stdout)["version"] == "2.0.0"
