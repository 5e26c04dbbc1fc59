"""``ckptmigrate new``: a migration generated from the drift between two real checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from processes import run

import ckptmigrate as cm
from ckptmigrate import cli
from ckptmigrate.inspection.autogen import infer_drops, infer_renames
from ckptmigrate.schema.discovery import find_schemas


def gpt_sd(prefix: str = "blocks", layers: int = 3) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    sd = {"wte.weight": torch.randn(8, 4)}
    for i in range(layers):
        sd[f"{prefix}.{i}.attn.c_attn.weight"] = torch.randn(12, 4)
        sd[f"{prefix}.{i}.ln_1.weight"] = torch.ones(4)
        sd[f"{prefix}.{i}.ln_1.bias"] = torch.zeros(4)
    sd["ln_f.weight"] = torch.ones(4)
    return sd


NEW = ["new", "gpt", "--from-version", "1.0.0", "--to-version", "2.0.0"]
NEW_NET = ["new", "net", "--from-version", "1.0.0", "--to-version", "2.0.0"]


def test_rename_only_drift_gives_a_migration_that_leaves_no_drift(tmp_path: Path) -> None:
    old = gpt_sd()
    new = {k.replace("blocks.", "h."): v for k, v in old.items()}
    cm.save(tmp_path / "old.pth", old, schema="gpt", version="1.0.0")
    cm.save(tmp_path / "new.safetensors", new, schema="gpt", version="2.0.0")
    before = run(tmp_path, "diff", "old.pth", "new.safetensors")
    assert before.returncode == 1

    made = run(tmp_path, *NEW, "--from-file", "old.pth", "--to-file", "new.safetensors")
    assert made.returncode == 0, made.stderr
    module = tmp_path / "migrations" / "gpt_1_0_0_to_2_0_0.py"
    code = module.read_text()
    assert code.count("cm.ops.RenameKeys(") == 1  # one general rule, not one per key
    assert "todo(" not in code and "NotImplementedError" not in code

    after = run(
        tmp_path, "diff", "--upgrade", "old.pth", "new.safetensors", "--migrations", str(module)
    )
    assert after.returncode == 0, after.stdout + after.stderr
    schema = find_schemas([str(module)])["gpt"]
    assert schema.steps[0].reversible  # the generated rename carries its inverse


def test_what_cannot_be_inferred_becomes_a_todo_that_fails_the_step(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = gpt_sd()
    new = {k.replace("blocks.", "layers."): v for k, v in old.items()}
    del new["layers.2.ln_1.bias"]
    new["embed_scale"] = torch.tensor(2.0)
    new["wte.weight"] = torch.randn(8, 5)
    new["ln_f.weight"] = new["ln_f.weight"].half()
    cm.save(tmp_path / "old.pth", old, schema="gpt", version="1.0.0", hparams={"eps": 1e-5})
    cm.save(tmp_path / "new.pth", new, schema="gpt", version="2.0.0", hparams={"eps": 1e-6})
    out = tmp_path / "gen" / "step.py"
    args = [*NEW, "--from-file", str(tmp_path / "old.pth"), "--to-file", str(tmp_path / "new.pth")]
    assert cli.main([*args, "-o", str(out)]) == 0
    assert "TODO(s)" in capsys.readouterr().out
    code = out.read_text()
    assert 'cm.ops.DropKeys(r"blocks\\.2\\.ln_1\\.bias")' in code
    assert 'cm.ops.AddKey("embed_scale", todo(' in code
    assert 'cm.ops.Cast("ln_f.weight", "float16", from_dtype="float32")' in code
    assert "shape of 'wte.weight': [8, 4] -> [8, 5]" in code and "hparam eps" in code

    schema = find_schemas([str(out)])["gpt"]
    ckpt = cm.load(tmp_path / "old.pth", upgrade=False)
    with pytest.raises(cm.MigrationError, match="TODO") as info:
        cm.upgrade(ckpt, schema)
    assert isinstance(info.value.__cause__, NotImplementedError)
    assert cli.main([*args, "-o", str(out)]) == 2  # no silent overwrite
    assert "already exists" in capsys.readouterr().err


def test_an_existing_schema_gets_a_snippet_to_paste_not_a_second_schema(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "gpt.py").write_text(
        'import ckptmigrate as cm\nschema = cm.Schema("gpt", current="1.0.0")\n'
    )
    cm.save(tmp_path / "old.pth", gpt_sd(), schema="gpt", version="1.0.0")
    cm.save(tmp_path / "new.pth", gpt_sd("layers"), schema="gpt", version="2.0.0")
    args = [*NEW, "--from-file", str(tmp_path / "old.pth"), "--to-file", str(tmp_path / "new.pth")]
    assert cli.main([*args, "--migrations", str(tmp_path / "mig")]) == 0
    captured = capsys.readouterr()
    assert (
        captured.out.startswith("# gpt 1.0.0 -> 2.0.0") and "schema.add_migration(" in captured.out
    )
    assert "cm.Schema(" not in captured.out
    assert "raise its current= to 2.0.0" in captured.err
    assert sorted(p.name for p in (tmp_path / "mig").iterdir()) == ["gpt.py"]


def test_a_general_rename_is_kept_only_when_it_touches_no_other_key() -> None:
    keys = ["blocks.0.w", "blocks.1.w", "blocks.2.w", "head.w"]
    ops = infer_renames(keys, {f"blocks.{i}.w": f"layers.{i}.w" for i in range(3)})
    assert len(ops) == 1
    assert ops[0].renamed_keys(keys) == {f"blocks.{i}.w": f"layers.{i}.w" for i in range(3)}

    partial = infer_renames(keys, {"blocks.0.w": "layers.0.w", "blocks.1.w": "layers.1.w"})
    renamed: dict[str, str] = {}
    current = list(keys)
    for op in partial:
        step = op.renamed_keys(current)
        renamed.update(step)
        current = [step.get(k, k) for k in current]
    assert current == ["layers.0.w", "layers.1.w", "blocks.2.w", "head.w"]


def test_indices_inside_a_renamed_span_are_carried_over() -> None:
    keys = [f"h.{i}.attn.w" for i in range(3)]
    ops = infer_renames(keys, {f"h.{i}.attn.w": f"layers.{i}.attention.w" for i in range(3)})
    assert len(ops) == 1
    assert ops[0].renamed_keys(keys)["h.2.attn.w"] == "layers.2.attention.w"


def test_a_module_that_goes_entirely_is_dropped_with_one_pattern() -> None:
    keys = ["aux.0.w", "aux.0.b", "keep.w", "mixed.a", "mixed.b"]
    ops = infer_drops(keys, ["aux.0.w", "aux.0.b", "mixed.a"])
    assert [op.pattern for op in ops] == [r"aux\.0\..*", r"mixed\.a"]


class OldNet(torch.nn.Module):
    """The model as it was: a stack of Linear, LayerNorm, ReLU, Linear called ``input_stack``."""

    def __init__(self, stack: str = "input_stack") -> None:
        super().__init__()
        layers = torch.nn.Sequential(
            torch.nn.Linear(16, 32),
            torch.nn.LayerNorm(32),
            torch.nn.ReLU(),
            torch.nn.Linear(32, 32),
        )
        setattr(self, stack, layers)
        self.stack = stack
        self.head = torch.nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(getattr(self, self.stack)(x))


def trained(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """``model`` with every parameter moved off its initialisation, as training would."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    return model


def test_a_renamed_module_keeps_its_trained_weights_and_biases(tmp_path: Path) -> None:
    torch.manual_seed(0)
    old_model = trained(OldNet("input_stack"))
    new_model = OldNet("stem")  # today's code: the stack is called stem, freshly initialised
    cm.save(tmp_path / "old.pth", old_model.state_dict(), schema="net", version="1.0.0")
    cm.save(tmp_path / "new.pth", new_model.state_dict(), schema="net", version="2.0.0")

    made = run(tmp_path, *NEW_NET, "--from-file", "old.pth", "--to-file", "new.pth")
    assert made.returncode == 0, made.stderr
    module = tmp_path / "migrations" / "net_1_0_0_to_2_0_0.py"
    code = module.read_text()
    assert "DropKeys" not in code and "AddKey" not in code and "todo(" not in code

    up = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", str(module))
    assert up.returncode == 0, up.stderr
    upgraded = cm.load(tmp_path / "up.pth", upgrade=False).state_dict
    for key, value in old_model.state_dict().items():
        # a rename moves the tensor: equal exactly (tolerance 0), no re-initialised bias
        torch.testing.assert_close(
            upgraded[key.replace("input_stack.", "stem.")], value, rtol=0, atol=0
        )
    new_model.load_state_dict(upgraded, strict=True)
    x = torch.randn(3, 16)
    torch.testing.assert_close(new_model(x), old_model(x), rtol=0, atol=1e-6)

    drift = run(tmp_path, "diff", "--upgrade", "old.pth", "new.pth", "--migrations", str(module))
    assert drift.returncode == 0, drift.stdout + drift.stderr


NET_MODULE = """
import torch
from ckptmigrate import Schema


class Net(torch.nn.Module):
    def __init__(self, width, gain=False):
        super().__init__()
        self.stem = torch.nn.Sequential(
            torch.nn.Linear(16, width), torch.nn.LayerNorm(width), torch.nn.ReLU(),
            torch.nn.Linear(width, width),
        )
        self.head = torch.nn.Linear(width, 4)
        if gain:
            self.gain = torch.nn.Parameter(torch.ones(4))

    def forward(self, x):
        return self.head(self.stem(x))


net_schema = Schema("net", current="1.0.0", build=lambda hp: Net(**hp))
"""


def net_project(tmp_path: Path, hparams: dict[str, object]) -> OldNet:
    (tmp_path / "mig").mkdir()
    (tmp_path / "mig" / "net.py").write_text(NET_MODULE)
    old_model = trained(OldNet("input_stack"))
    cm.save(
        tmp_path / "old.pth", old_model.state_dict(), schema="net", version="1.0.0", hparams=hparams
    )
    return old_model


def paste(tmp_path: Path, snippet: str) -> None:
    module = tmp_path / "mig" / "net.py"
    text = module.read_text().replace('current="1.0.0"', 'current="2.0.0"')
    module.write_text(text + "\n\n" + snippet)


TO_MODEL = [*NEW_NET, "--from-file", "old.pth", "--to-model", "--migrations", "mig"]


def test_to_model_compares_with_what_build_makes_today_and_the_snippet_runs_pasted(
    tmp_path: Path,
) -> None:
    old_model = net_project(tmp_path, {"width": 32})
    made = run(tmp_path, *TO_MODEL)
    assert made.returncode == 0, made.stderr
    assert "net_schema.add_migration(" in made.stdout  # the module's own name for the schema
    assert "RenameKeys" in made.stdout and "AddKey" not in made.stdout
    paste(tmp_path, made.stdout)

    up = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", "mig")
    assert up.returncode == 0, up.stderr
    upgraded = cm.load(tmp_path / "up.pth", upgrade=False)
    model = find_schemas([str(tmp_path / "mig")])["net"].build(upgraded.hparams)
    model.load_state_dict(upgraded.state_dict, strict=True)
    x = torch.randn(2, 16)
    torch.testing.assert_close(model(x), old_model(x), rtol=0, atol=1e-6)


def test_a_pasted_snippet_with_a_todo_imports_what_it_uses(tmp_path: Path) -> None:
    net_project(tmp_path, {"width": 32, "gain": True})  # today's model has a new parameter
    made = run(tmp_path, *TO_MODEL)
    assert made.returncode == 0, made.stderr
    assert "todo(" in made.stdout and "import ckptmigrate as cm" in made.stdout
    paste(tmp_path, made.stdout)  # the module itself imports only `from ckptmigrate import Schema`

    history = run(tmp_path, "history", "net", "--migrations", "mig")
    assert history.returncode == 0, history.stderr
    up = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", "mig")
    assert up.returncode == 2 and "TODO" in up.stderr and "'gain'" in up.stderr


@pytest.mark.parametrize(
    ("module", "extra", "message"),
    [
        (NET_MODULE.replace(", build=lambda hp: Net(**hp)", ""), [], "has no build= factory"),
        (NET_MODULE, ["--values"], "drop --values, or pass --to-file NEW"),
        (NET_MODULE.replace("Net(**hp)", "Net(**hp, depth=2)"), [], "could not build today's"),
    ],
)
def test_to_model_trouble_is_one_line_naming_the_flag_to_use(
    tmp_path: Path, module: str, extra: list[str], message: str
) -> None:
    net_project(tmp_path, {"width": 32})
    (tmp_path / "mig" / "net.py").write_text(module)
    made = run(tmp_path, *TO_MODEL, *extra)
    assert made.returncode == 2
    assert made.stderr.startswith("ckptmigrate: error: ") and made.stderr.count("\n") == 1
    assert message in made.stderr and "--to-file NEW" in made.stderr
