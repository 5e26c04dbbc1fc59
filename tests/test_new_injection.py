"""``ckptmigrate new`` never turns a string from a file into code.

Key names, hparam paths and file names reach the generated module only as escaped string
literals, in comments too, so importing it (``history``, ``upgrade``, ``check``) runs nothing
a file smuggled in.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from processes import run

import ckptmigrate as cm


def payload(tag: str) -> str:
    """Python that, if it ever ran, would leave the file ``PWNED_<tag>`` behind."""
    return f"import os; os.system('touch PWNED_{tag}')"


HOSTILE = [
    f"a\n{payload('nl')}\n#",
    f"b\r{payload('cr')}\r#",
    f"c\r\n{payload('crlf')}\r\n#",
    f"d\u2028{payload('ls')}\u2029#",
    f'e"""\n{payload("docstring")}\n"""',
    f"f'''\n{payload('single')}\n'''",
    f"g\\\n{payload('backslash')}",
    "h\x00nul",
    'i"quote\\',
    "j{brace}.weight",
    "k\U0001f600.emoji",
]


def pwned(where: Path) -> list[str]:
    return sorted(p.name for p in where.rglob("PWNED_*"))


def generate(tmp_path: Path, old: str = "old.pth", *extra: str) -> subprocess.CompletedProcess[str]:
    return run(
        tmp_path,
        *["new", "evil", "--from-version", "1.0.0", "--to-version", "2.0.0"],
        *["--from-file", old, "--to-file", "new.pth", "-o", "step.py", *extra],
    )


def test_hostile_keys_renamed_by_values_keep_their_exact_names(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    old = {key: torch.randn(i + 2, generator=gen) for i, key in enumerate(HOSTILE)}
    new = {f"renamed.{key}": value for key, value in old.items()}
    new["k\U0001f600.emoji"] = new.pop("renamed.k\U0001f600.emoji")  # one key stays
    old["gone\n" + payload("drop")] = torch.zeros(40)
    cm.save(tmp_path / "old.pth", old, schema="evil", version="1.0.0")
    cm.save(tmp_path / "new.pth", new, schema="evil", version="2.0.0")

    made = generate(tmp_path, "old.pth", "--values")
    assert made.returncode == 0, made.stderr
    code = (tmp_path / "step.py").read_text(encoding="utf-8")
    assert code.isascii() and all(line.isprintable() for line in code.split("\n"))
    assert "\r" not in code and "\u2028" not in code
    ast.parse(code)  # parses without running

    for command in (["history", "evil"], ["upgrade", "old.pth", "-o", "up.pth"]):
        done = run(tmp_path, *command, "--migrations", "step.py")
        assert done.returncode == 0, done.stderr
    assert pwned(tmp_path) == []
    upgraded = cm.load(tmp_path / "up.pth", upgrade=False).state_dict
    assert sorted(upgraded) == sorted(new)  # every exact name, NUL and emoji included
    for key, value in new.items():
        torch.testing.assert_close(upgraded[key], value, rtol=0, atol=0)


def test_hostile_added_keys_shapes_dtypes_and_hparam_paths_stay_in_literals(
    tmp_path: Path,
) -> None:
    old = {key: torch.zeros(3) for key in HOSTILE}
    new = {key: torch.zeros(4) for key in HOSTILE[:4]}  # shape changes
    new.update({key: torch.zeros(3, dtype=torch.float16) for key in HOSTILE[4:8]})  # casts
    new.update({"added." + key: torch.zeros(5, 5) for key in HOSTILE})
    hp_old = {HOSTILE[0]: 1, "nested": {HOSTILE[1]: 2, "list": [HOSTILE[2]]}, HOSTILE[3]: "x"}
    hp_new = {HOSTILE[4]: 1, "nested": {HOSTILE[5]: 3, "list": [HOSTILE[6]]}, HOSTILE[3]: "\n"}
    cm.save(tmp_path / "old.pth", old, schema="evil", version="1.0.0", hparams=hp_old)
    cm.save(tmp_path / "new.pth", new, schema="evil", version="2.0.0", hparams=hp_new)

    made = generate(tmp_path)
    assert made.returncode == 0, made.stderr
    code = (tmp_path / "step.py").read_text(encoding="utf-8")
    assert code.isascii() and all(line.isprintable() for line in code.split("\n"))
    tree = ast.parse(code)
    literals = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant)}
    assert {"added." + key for key in HOSTILE} <= literals  # AddKey keeps the exact keys

    history = run(tmp_path, "history", "evil", "--migrations", "step.py")
    assert history.returncode == 0, history.stderr
    upgrade = run(tmp_path, "upgrade", "old.pth", "-o", "up.pth", "--migrations", "step.py")
    assert upgrade.returncode == 2 and "TODO" in upgrade.stderr  # the todo fails the step
    assert pwned(tmp_path) == []


@pytest.mark.parametrize("name", ['old"""\nimport os; os.system("touch PWNED_path")\n""".pth'])
def test_a_hostile_file_name_stays_in_the_docstring(tmp_path: Path, name: str) -> None:
    cm.save(tmp_path / name, {"blocks.0.w": torch.zeros(2)}, schema="evil", version="1.0.0")
    cm.save(tmp_path / "new.pth", {"layers.0.w": torch.zeros(2)}, schema="evil", version="2.0.0")
    made = generate(tmp_path, name)
    assert made.returncode == 0, made.stderr
    history = run(tmp_path, "history", "evil", "--migrations", "step.py")
    assert history.returncode == 0, history.stderr
    assert pwned(tmp_path) == []


@given(st.text())
def test_every_string_becomes_a_one_line_ascii_literal_equal_to_it(text: str) -> None:
    from ckptmigrate.inspection.autogen import _literal

    literal = _literal(text)
    assert literal.isascii() and literal.isprintable()
    assert ast.literal_eval(literal) == text
