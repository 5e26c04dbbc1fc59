"""Run under transformers 4.57.1 (its own install folder first on PYTHONPATH, torch from the
venv): build the tiny models of tests/test_hf_pack.py from configs and save them the way 4.x
does, or load model folders the way 4.x does; outputs go to ``OUT/outputs.pt``.

    python tests/hf4_models.py save OUT
    python tests/hf4_models.py load OUT NAME=FOLDER...

Nothing here imports ckptmigrate: this process is what the old library does, nothing more.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

#: fixed input ids, the same on both sides (vocabulary 64)
INPUT_IDS = [[3, 17, 42, 5, 63, 0, 28, 11]]

SIZES = {"vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 48}
SIZES |= {"num_attention_heads": 4, "max_position_embeddings": 64}
MIXTRAL = {**SIZES, "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}


def models() -> dict[str, torch.nn.Module]:
    """The tiny models, seeded, in eval mode."""
    from transformers import BertConfig, BertModel, MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    mixtral = MixtralForCausalLM(MixtralConfig(**MIXTRAL)).eval()
    torch.manual_seed(1)
    bert = BertModel(BertConfig(**SIZES)).eval()
    return {"mixtral": mixtral, "bert": bert}


def outputs(model: torch.nn.Module) -> torch.Tensor:
    """The logits (MixtralForCausalLM) or the last hidden state (BertModel) on INPUT_IDS."""
    with torch.no_grad():
        out = model(torch.tensor(INPUT_IDS))
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).detach().clone()


def save_legacy_bert(model: torch.nn.Module, folder: Path, gamma_beta: bool) -> None:
    """The model as an older library wrote it: the ``position_ids`` buffer persisted (4.30
    and before), or the LayerNorm parameters named ``gamma``/``beta`` (TensorFlow ports)."""
    from safetensors.torch import save_file

    model.save_pretrained(folder)  # config.json; the weights are replaced below
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if gamma_beta:
        names = {".LayerNorm.weight": ".LayerNorm.gamma", ".LayerNorm.bias": ".LayerNorm.beta"}
        state = {next((k[: -len(a)] + b for a, b in names.items() if k.endswith(a)), k): v
                 for k, v in state.items()}  # fmt: skip
    else:
        state["embeddings.position_ids"] = model.embeddings.position_ids.clone()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})


def save(out: Path) -> None:
    """``mixtral``/``bert`` as 4.57.1's save_pretrained writes them, ``bert-4.30`` and
    ``bert-tf`` as older writers did; their outputs on INPUT_IDS."""
    built = models()
    for name, model in built.items():
        model.save_pretrained(out / name)  # safetensors by default
    save_legacy_bert(built["bert"], out / "bert-4.30", gamma_beta=False)
    save_legacy_bert(built["bert"], out / "bert-tf", gamma_beta=True)
    torch.save({name: outputs(model) for name, model in built.items()}, out / "outputs.pt")


def load(out: Path, folders: dict[str, Path]) -> None:
    """Each folder by ``from_pretrained``: its outputs, and what 4.57.1 said about its keys."""
    from transformers import AutoModel, AutoModelForCausalLM

    results, infos = {}, {}
    for name, folder in folders.items():
        auto = AutoModelForCausalLM if name.startswith("mixtral") else AutoModel
        model, info = auto.from_pretrained(folder, output_loading_info=True)
        results[name] = outputs(model.eval())
        infos[name] = {k: sorted(map(str, v)) for k, v in info.items()}
    torch.save(results, out / "outputs.pt")
    (out / "loading_info.json").write_text(json.dumps(infos, indent=1))


if __name__ == "__main__":
    import transformers

    if transformers.__version__ != "4.57.1":
        sys.exit(f"hf4_models.py needs transformers 4.57.1, found {transformers.__version__}")
    command, where = sys.argv[1], Path(sys.argv[2])
    if command == "save":
        save(where)
    else:
        load(where, {n: Path(f) for n, f in (a.split("=", 1) for a in sys.argv[3:])})
