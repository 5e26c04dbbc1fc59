"""The migrations pack ``packs/ckptmigrate-hf``, proven on the real library: tiny Mixtral and
BERT models built from configs and saved by transformers 4.57.1, upgraded by the ckptmigrate
CLI (which finds the pack by its entry points alone) to what transformers 5.x loads strictly,
and downgraded back to what 4.57.1 loads; the outputs agree across both libraries both ways.

transformers 4.57.1 runs in a subprocess from its own install folder (``pip install --target``,
without torch: the venv's torch serves both), first on PYTHONPATH so that it shadows the venv's
5.x: ``$CKPTMIGRATE_HF4_DIR`` when set (``.ci/run`` installs it there), else pytest's cache.
The tests skip, saying why, only when that install fails (no network). The pack is installed
the way a third party's is, by pip, into a folder of its own put on the CLI's PYTHONPATH (not
into the venv, where its entry points would reach every other test's discovery).

Outputs (Mixtral's logits, BERT's last hidden state) are compared within ATOL: the same
weights through the same kernels, one library's code or the other's.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hf4_models import MIXTRAL, SIZES, outputs
from processes import one_error_line, run
from safetensors import safe_open
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"needs transformers 5.x in the venv, found {transformers.__version__}",
                allow_module_level=True)  # fmt: skip

REPO = Path(__file__).resolve().parent.parent
PACK = REPO / "packs" / "ckptmigrate-hf"
SIDE = Path(__file__).resolve().parent / "hf4_models.py"
ATOL = 1e-5  # absolute, on logits / hidden states of order 1

#: transformers 4.57.1 and the versions of its dependencies that it accepts (the venv's are 5.x's)
HF4 = ["transformers==4.57.1", "huggingface-hub>=0.34.0,<1.0", "tokenizers>=0.22.0,<=0.23.0"]
HF4_MARK = "transformers-4.57.1.dist-info"


def pip_target(folder: Path, *what: str, skip: bool) -> None:
    """``pip install --no-deps --target folder WHAT``, into a temporary folder renamed at the
    end, so an interrupted install leaves nothing that looks finished. When pip fails: skip
    (``skip``: a download that needs the network) or fail (the pack, which needs none)."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    done = subprocess.run(
        [*command, "--no-deps", "--no-build-isolation", "--target", str(partial), *what],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if done.returncode != 0:
        shutil.rmtree(partial, ignore_errors=True)
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        if not skip:
            pytest.fail(f"pip install {' '.join(what)} failed: {done.stderr}")
        pytest.skip(f"cannot pip install {' '.join(what)} (no network?): {last}")
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)


@pytest.fixture(scope="session")
def hf4(request) -> Path:
    """The install folder of transformers 4.57.1 and its 4.x-compatible dependencies."""
    given = os.environ.get("CKPTMIGRATE_HF4_DIR")
    folder = Path(given) if given else cache_folder(request, "transformers-4.57.1")
    if not (folder / HF4_MARK).is_dir():
        if given and folder.exists() and any(folder.iterdir()):
            pytest.fail(f"CKPTMIGRATE_HF4_DIR={given} holds files but no {HF4_MARK}: point it "
                        "at an empty or missing folder, which the tests fill")  # fmt: skip
        pip_target(folder, *HF4, skip=True)
    return folder


@pytest.fixture(scope="session")
def pack(request, tmp_path_factory) -> Path:
    """The pack pip-installed into a folder of its own (cached by its sources' digest)."""
    digest = hashlib.sha256()
    for path in sorted(PACK.rglob("*")):
        if path.is_file() and not {"build", "__pycache__"} & set(path.parts) and ".egg-info" not in str(path):  # fmt: skip
            digest.update(str(path.relative_to(PACK)).encode() + b"\0" + path.read_bytes())
    folder = cache_folder(request, f"pack-{digest.hexdigest()[:16]}")
    if not (folder / "ckptmigrate_hf").is_dir():
        for stale in folder.parent.glob("pack-*"):  # installs of the pack's earlier sources
            shutil.rmtree(stale, ignore_errors=True)
        source = tmp_path_factory.mktemp("pack-source") / "ckptmigrate-hf"
        shutil.copytree(PACK, source, ignore=shutil.ignore_patterns("build", "*.egg-info"))
        pip_target(folder, str(source), skip=False)  # built outside the repo: no build/ left in it
    return folder


def cache_folder(request, name: str) -> Path:
    """``name`` in pytest's cache (kept across runs), else in this session's temporary folder."""
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        return Path(cache.mkdir("ckptmigrate-hf")) / name
    return request.getfixturevalue("tmp_path_factory").getbasetemp() / name


def run_hf4(hf4: Path, *args: str) -> None:
    """``tests/hf4_models.py ARGS`` under transformers 4.57.1."""
    env = {**os.environ, "PYTHONPATH": str(hf4), "TRANSFORMERS_VERBOSITY": "error"}
    env |= {"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run(
        [sys.executable, str(SIDE), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-4000:]


def ckptmigrate_run(pack: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The ckptmigrate CLI in ``cwd`` (no pyproject: the pack's entry points are all it has)."""
    path = os.pathsep.join(p for p in (str(pack), os.environ.get("PYTHONPATH", "")) if p)
    return run(cwd, *args, PYTHONPATH=path)


def ckptmigrate(pack: Path, cwd: Path, *args: str) -> str:
    """:func:`ckptmigrate_run`, which must succeed; its stdout."""
    done = ckptmigrate_run(pack, cwd, *args)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture(scope="module")
def saved(hf4: Path, tmp_path_factory) -> Path:
    """The model folders 4.57.1 (and, for BERT, older writers) saved, and their outputs."""
    root = tmp_path_factory.mktemp("hf4")
    run_hf4(hf4, "save", str(root))
    return root


def keys_in(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


#: what each file 4.x wrote is stamped as on the way in: (saved folder, schema, version)
SOURCES = {
    "mixtral": ("mixtral", "hf-mixtral", "4.36.0"),
    "bert": ("bert", "hf-bert", "4.31.0"),  # what 4.57.1 writes
    "bert-4.30": ("bert-4.30", "hf-bert", "3.1.0"),  # the position_ids buffer persisted
    "bert-tf": ("bert-tf", "hf-bert", "3.1.0"),  # LayerNorm gamma/beta
}
#: the downgrades: name -> (upgraded folder, --to)
DOWNGRADES = {
    "mixtral": ("mixtral", "4.36.0"),
    "bert": ("bert-4.30", "4.31.0"),  # from the oldest file, to what 4.57.1 writes
    "bert-4.30": ("bert-4.30", "3.1.0"),
}


@pytest.fixture(scope="module")
def migrated(pack: Path, saved: Path, tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Every saved file upgraded to 5.0.0 by the CLI (``up``), and the DOWNGRADES (``down``)."""
    root = tmp_path_factory.mktemp("migrated")
    # names without a dot: "-o bert-4.30-5" would have a suffix, so name a weights file
    up = {name: root / f"{name.replace('.', '_')}-5" for name in SOURCES}
    down = {name: root / f"{name.replace('.', '_')}-down" for name in DOWNGRADES}
    upgrades = [("upgrade", str(saved / folder), "-o", str(up[name]), "--schema", schema,
                 "--from-version", version) for name, (folder, schema, version) in SOURCES.items()]  # fmt: skip
    downgrades = [("upgrade", str(up[source]), "-o", str(down[name]), "--to", version)
                  for name, (source, version) in DOWNGRADES.items()]  # fmt: skip
    # each batch side by side: the processes are independent, and mostly import torch
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        for batch in (upgrades, downgrades):
            list(pool.map(lambda args: ckptmigrate(pack, root, *args), batch))
    return {"up": up, "down": down}


@pytest.fixture(scope="module")
def in_hf4(hf4: Path, migrated, tmp_path_factory) -> tuple[dict, dict]:
    """The downgraded folders through 4.57.1's ``from_pretrained`` (one process): outputs and
    what it said about the keys, by name."""
    out = tmp_path_factory.mktemp("hf4-loaded")
    folders = (f"{name}={folder}" for name, folder in migrated["down"].items())
    run_hf4(hf4, "load", str(out), *folders)
    return torch.load(out / "outputs.pt"), json.loads((out / "loading_info.json").read_text())


def golden(saved: Path, name: str) -> torch.Tensor:
    """What 4.57.1 computed with the model it saved."""
    return torch.load(saved / "outputs.pt")[name.split("-")[0]]


def load_strict_in_v5(folder: Path, model_class: type) -> torch.Tensor:
    """The outputs of a 5.x model built from the folder's config that loads its file with
    ``load_state_dict(strict=True)``; ``from_pretrained`` must report nothing either."""
    config = transformers.AutoConfig.from_pretrained(folder)
    model = model_class(config).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    loaded, info = model_class.from_pretrained(folder, output_loading_info=True)
    assert {k: sorted(v) for k, v in info.items()} == CLEAN
    torch.testing.assert_close(outputs(loaded.eval()), outputs(model), rtol=0, atol=ATOL)
    return outputs(model)


CLEAN = {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}


def test_the_cli_finds_both_schemas_by_the_installed_entry_points_alone(pack, tmp_path):
    listed = ckptmigrate(pack, tmp_path, "history")
    assert "hf-mixtral" in listed and "hf-bert" in listed, listed
    steps = ckptmigrate(pack, tmp_path, "history", "hf-mixtral")
    assert "4.36.0 -> 5.0.0" in steps and "reversible" in steps, steps
    assert "entry point" in steps, steps  # where it came from


def test_a_bert_file_with_both_gamma_and_weight_is_refused_in_one_line_and_nothing_written(
    pack, tmp_path
):
    from safetensors.torch import save_file

    both = {
        "embeddings.LayerNorm.gamma": torch.ones(4),
        "embeddings.LayerNorm.weight": torch.ones(4),
    }
    save_file(both, str(tmp_path / "both.safetensors"))
    done = ckptmigrate_run(pack, tmp_path, "upgrade", "both.safetensors", "-o", "up.safetensors",
                           "--schema", "hf-bert", "--from-version", "3.1.0")  # fmt: skip
    line = one_error_line(done)
    assert "drop_persisted_position_ids" in line and "which one is the weight" in line, line
    assert not (tmp_path / "up.safetensors").exists()


def test_mixtral_from_4_57_upgrades_to_the_stacked_experts_that_5_x_loads_strictly(saved, migrated):
    assert "model.layers.0.block_sparse_moe.experts.3.w2.weight" in keys_in(saved / "mixtral")
    up = migrated["up"]["mixtral"]
    keys = keys_in(up)
    hidden, inter, experts = MIXTRAL["hidden_size"], MIXTRAL["intermediate_size"], 4
    assert keys["model.layers.1.mlp.experts.gate_up_proj"] == (experts, 2 * inter, hidden)
    assert keys["model.layers.1.mlp.experts.down_proj"] == (experts, hidden, inter)
    assert not [k for k in keys if "block_sparse_moe" in k or ".experts.0." in k]
    logits = load_strict_in_v5(up, transformers.MixtralForCausalLM)
    torch.testing.assert_close(logits, golden(saved, "mixtral"), rtol=0, atol=ATOL)


def test_mixtral_both_ways_give_the_tensors_transformers_5s_own_converter_gives(
    saved, migrated, tmp_path
):
    model = transformers.MixtralForCausalLM.from_pretrained(saved / "mixtral")
    converted, ours = model.state_dict(), load_file(migrated["up"]["mixtral"] / "model.safetensors")
    assert sorted(converted) == sorted(ours)
    for key, value in converted.items():
        torch.testing.assert_close(ours[key], value, rtol=0, atol=ATOL)
    # 5.x saves in the 4.x layout by default (save_original_format): the same as our downgrade
    model.save_pretrained(tmp_path / "saved-by-5")
    reverted = load_file(tmp_path / "saved-by-5" / "model.safetensors")
    down = load_file(migrated["down"]["mixtral"] / "model.safetensors")
    assert sorted(reverted) == sorted(down)
    for key, value in reverted.items():
        torch.testing.assert_close(down[key], value, rtol=0, atol=ATOL)


@pytest.mark.parametrize("name", ["bert", "bert-4.30", "bert-tf"])
def test_bert_files_upgrade_to_what_5_x_loads_strictly(saved, migrated, name):
    up = migrated["up"][name]
    assert keys_in(up) == keys_in(saved / "bert")  # what 4.57.1 itself writes
    hidden = load_strict_in_v5(up, transformers.BertModel)
    torch.testing.assert_close(hidden, golden(saved, name), rtol=0, atol=ATOL)


def test_the_legacy_bert_files_differ_where_a_strict_5_x_load_fails(saved):
    """The cases above prove something: their inputs do not load strictly as they are."""
    model = transformers.BertModel(transformers.AutoConfig.from_pretrained(saved / "bert"))
    for name, wrong in [("bert-4.30", "Unexpected key"), ("bert-tf", "Missing key")]:
        with pytest.raises(RuntimeError, match=wrong):
            model.load_state_dict(load_file(saved / name / "model.safetensors"), strict=True)


@pytest.mark.parametrize("name", list(DOWNGRADES))
def test_downgrades_give_the_old_files_keys_and_load_in_4_57_with_the_old_outputs(
    saved, migrated, in_hf4, name
):
    assert keys_in(migrated["down"][name]) == keys_in(saved / name)
    results, info = in_hf4
    assert info[name] == CLEAN  # 4.57.1 ignores a persisted position_ids buffer by itself
    torch.testing.assert_close(results[name], golden(saved, name), rtol=0, atol=ATOL)


def test_bert_downgrade_to_3_1_writes_the_position_ids_buffer_as_3_1_to_4_30_saved_it(
    saved, migrated
):
    down = load_file(migrated["down"]["bert-4.30"] / "model.safetensors")
    old = load_file(saved / "bert-4.30" / "model.safetensors")
    assert down["embeddings.position_ids"].dtype == old["embeddings.position_ids"].dtype
    assert torch.equal(down["embeddings.position_ids"], old["embeddings.position_ids"])
    assert torch.equal(
        old["embeddings.position_ids"], torch.arange(SIZES["max_position_embeddings"])[None]
    )
