"""What the CLI prints: colours and progress bars on a terminal only, a row per tensor with
``info --keys``, many same-pattern renames as one line, floats at a readable precision."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import run, run_on_terminal
from toy import write_toy_fixture

import ckptmigrate as cm
from ckptmigrate.base.readable import readable, readable_float
from ckptmigrate.inspection.rename_groups import MIN_GROUP, group_renames, rename_pattern

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


# -- colour and progress on a terminal, plain in a pipe ------------------------------------------


@pytest.mark.parametrize(
    ("args", "verdict"),
    [
        (("scan", ".", "--migrations", "mig"), "behind"),
        (("history", "toy", "--migrations", "mig"), "[breaking]"),
        (("upgrade", "a.pth", "-o", "c.pth", "--migrations", "mig"), "wrote"),
        (("check", "fixtures", "--migrations", "mig"), "1 of 1 fixtures ok"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_verdicts_are_coloured_on_a_terminal_and_plain_when_piped(
    files: Path, args: tuple[str, ...], verdict: str
) -> None:
    write_toy_fixture(files)
    code, shown = run_on_terminal(files, *args)
    assert code == 0, shown
    coloured = re.search(r"\x1b\[[0-9;]*m" + re.escape(verdict), shown)
    assert coloured, shown
    (files / "c.pth").unlink(missing_ok=True)
    piped = run(files, *args)
    assert piped.returncode == 0, piped.stderr
    assert verdict in piped.stdout and "\x1b[" not in piped.stdout + piped.stderr


def test_progress_bars_show_the_count_and_the_time_left_on_a_terminal(files: Path) -> None:
    code, shown = run_on_terminal(files, "scan", ".", "--migrations", "mig")
    assert code == 0, shown
    text = ANSI.sub("", shown)
    assert re.search(r"scanning .*3/3 left \d+:\d\d:\d\d", text), text
    piped = run(files, "scan", ".", "--migrations", "mig")
    assert "3/3" not in piped.stdout + piped.stderr


# -- info --keys ---------------------------------------------------------------------------------


def test_info_keys_lists_every_tensor_with_shape_dtype_parameters_and_bytes(files: Path) -> None:
    sd = {"emb.weight": torch.zeros(10, 3), "head.bias": torch.zeros(7, dtype=torch.float16)}
    sd["mask"] = torch.zeros(2, 2, 2, dtype=torch.bool)
    cm.save(files / "k.pth", sd, schema="toy", version="3.0.0")
    info = json.loads(run(files, "info", "k.pth", "--keys", "--json").stdout)
    rows = {r["key"]: r for r in info["keys"]}
    assert set(rows) == set(sd)
    for key, tensor in sd.items():
        row = rows[key]
        assert row["shape"] == list(tensor.shape)
        assert row["dtype"] == str(tensor.dtype).removeprefix("torch.")
        assert row["params"] == tensor.numel()
        assert row["bytes"] == tensor.numel() * tensor.element_size()
    assert "keys" not in json.loads(run(files, "info", "k.pth", "--json").stdout)
    plain = run(files, "info", "k.pth", "--keys").stdout.splitlines()
    line = next(line for line in plain if line.startswith("emb.weight"))
    assert line.split()[:5] == ["emb.weight", "[10,", "3]", "float32", "30"]
    assert f"3 tensors, {sum(t.numel() for t in sd.values())} parameters" in plain[-1]


def test_info_keys_reads_metadata_only_and_never_imports_torch(files: Path) -> None:
    torch.save({"w": torch.zeros(3, 5)}, files / "plain.pth")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ckptmigrate", "info", "plain.pth", "--keys"],
        capture_output=True,
        text=True,
        cwd=files,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines()}
    assert "torch" not in imported
    assert re.search(r"^w\s+\[3, 5\]\s+float32\s+15\s+60 B$", proc.stdout, re.M), proc.stdout


# -- renames summarised --------------------------------------------------------------------------


def test_hundreds_of_same_pattern_renames_print_as_one_line_and_json_keeps_every_key(
    files: Path,
) -> None:
    old = {f"blocks.{i}.{m}.weight": torch.full((2,), float(i)) for i in range(150) for m in "qk"}
    old["fc.weight"] = torch.zeros(3)
    torch.save(old, files / "old.pth")
    new = {k.replace("blocks.", "layers.").replace("fc.", "head."): v for k, v in old.items()}
    torch.save(new, files / "new.pth")
    plain = run(files, "diff", "old.pth", "new.pth").stdout
    assert "blocks.N.* -> layers.N.*  (x300)" in plain
    assert "fc.weight -> head.weight" in plain  # a pattern of one stays key by key
    assert "blocks.17.q.weight" not in plain and len(plain.splitlines()) < 10
    renamed = json.loads(run(files, "diff", "old.pth", "new.pth", "--json").stdout)["renamed"]
    assert {(r["from"], r["to"]) for r in renamed} == {(k, k2) for k, k2 in zip(old, new)}

    from rich.console import Console

    from ckptmigrate import cli

    console = Console(record=True, width=160, force_terminal=True)
    cli.render_diff_rich(cm.diff(files / "old.pth", files / "new.pth"), console)
    text = console.export_text()
    assert "blocks.N.* → layers.N.*" in text and "(x300)" in text and "300 changes" in text


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("blocks.3.attn.w", "layers.3.attn.w", ("blocks.N.*", "layers.N.*")),
        ("enc.2.q.weight", "enc.2.query.weight", ("enc.N.q.*", "enc.N.query.*")),
        ("fc.weight", "head.weight", ("fc.*", "head.*")),
        ("blocks.3.w", "blocks.4.w", ("blocks.3.w", "blocks.4.w")),  # renumbered: its own
    ],
)
def test_rename_patterns_fold_indices_and_the_shared_tail(old, new, pattern) -> None:
    assert rename_pattern(old, new) == pattern


def test_only_patterns_of_many_renames_are_summarised() -> None:
    few = [{"from": f"a.{i}.w", "to": f"b.{i}.w"} for i in range(MIN_GROUP - 1)]
    assert [g.summarised for g in group_renames(few)] == [False]
    many = few + [{"from": "a.99.w", "to": "b.99.w"}]
    assert [(g.summarised, len(g.members)) for g in group_renames(many)] == [(True, MIN_GROUP)]


# -- floats --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "shown"),
    [(0.1 + 0.2, "0.3"), (1e-5, "1e-05"), (3.4e-06, "3.4e-06"), (2.0, "2.0"), (1 / 3, "0.333333")],
)
def test_floats_print_at_six_significant_digits(value: float, shown: str) -> None:
    assert readable_float(value) == shown
    assert abs(float(shown) - value) <= 5e-6 * abs(value)  # half a unit in the 6th digit


def test_diff_and_info_print_hparams_and_value_differences_readably(files: Path) -> None:
    sd = {"w": torch.zeros(4)}
    cm.save(files / "x.pth", sd, schema="toy", version="3.0.0", hparams={"lr": 0.1 + 0.2})
    nudged = {"w": torch.tensor([0.0, 0.0, 3.4e-6, 0.0])}
    cm.save(files / "y.pth", nudged, schema="toy", version="3.0.0", hparams={"lr": 1e-5})
    shown = run(files, "diff", "x.pth", "y.pth", "--values").stdout
    assert "lr  0.3 -> 1e-05" in shown and "0.30000000000000004" not in shown
    match = re.search(r"max abs diff (\S+)", shown)
    assert match and match.group(1) == readable_float(float(torch.tensor(3.4e-6)))
    exact = json.loads(run(files, "diff", "x.pth", "y.pth", "--json").stdout)["hparams"]
    assert exact[0]["a"] == 0.1 + 0.2  # --json keeps the exact value
    assert "hparam: lr = 0.3" in run(files, "info", "x.pth").stdout
    assert (
        readable({"betas": (0.9, 0.999), "eps": [1e-8]})
        == "{'betas': (0.9, 0.999), 'eps': [1e-08]}"
    )


# -- strings from files are shown escaped ---------------------------------------------------------

#: what a hostile file's strings would make a terminal do: clear it, return the carriage, ring,
#: retitle the window; and a lone surrogate, which no encoding can write
HOSTILE_TEXT = "\x1b[2J\r\x07\x1b]0;pwned\x07\ud800"
RAW_CONTROLS = ("\x1b", "\r", "\x07")


def _hostile_files(root: Path) -> None:
    """hostile.pth (toy 1.0.0) whose hparams, meta, history and a tensor key hold
    HOSTILE_TEXT; odd/other.pth stamped with a schema named by it; odd/ also holds a DCP-like
    stamp file (ckptmigrate.json) whose JSON escapes spell it."""
    from hostile import our_layout, save_torch, stamp

    history = [{"from": "0.9.0", "to": "1.0.0", "step": "rename" + HOSTILE_TEXT}]
    obj = our_layout(
        stamp(history=history),
        hparams={"title" + HOSTILE_TEXT: HOSTILE_TEXT},
        meta={"note": HOSTILE_TEXT},
    )
    obj["state_dict"]["blocks.0.weight" + HOSTILE_TEXT] = torch.ones(2)
    save_torch(obj, root / "hostile.pth")
    (root / "odd").mkdir()
    save_torch(our_layout(stamp(schema="toy" + HOSTILE_TEXT)), root / "odd" / "other.pth")


def _assert_shown_escaped(proc: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    for stream in (proc.stdout, proc.stderr):
        assert not any(c in stream for c in RAW_CONTROLS), repr(stream)
    if proc.returncode == 2:
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert proc.stderr.startswith("ckptmigrate: error: "), proc.stderr


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (("info", "hostile.pth"), 0),
        (("info", "hostile.pth", "--keys"), 0),
        (("info", "hostile.pth", "--json"), 0),
        (("info", "odd/other.pth", "--migrations", "mig"), 0),
        (("diff", "a.pth", "hostile.pth"), 1),
        (("diff", "hostile.pth", "a.pth", "--json"), 1),
        (("scan", "odd", "--migrations", "mig"), 0),
        (("upgrade", "odd/other.pth", "-o", "c.pth", "--migrations", "mig"), 2),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v),
)
def test_control_characters_and_surrogates_from_a_file_are_printed_escaped(
    files: Path, args: tuple[str, ...], code: int
) -> None:
    _hostile_files(files)
    proc = run(files, *args, timeout=120)
    _assert_shown_escaped(proc)
    assert proc.returncode == code, proc.stderr
    shown = proc.stdout + proc.stderr
    if "--json" in args:
        json.loads(proc.stdout)
    elif code == 2:
        assert "no schema named 'toy\\x1b[2J" in proc.stderr  # the typed error, escaped
    else:
        assert "\\x1b[2J\\r\\x07\\x1b]0;pwned\\x07\\ud800" in shown  # shown, escaped


def test_a_stamp_file_spelling_controls_in_json_escapes_is_printed_escaped(files: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single process, no process group
        dcp.save({"model": {"w": torch.ones(2)}}, checkpoint_id=files / "dcp")
    escapes = json.dumps({"title" + HOSTILE_TEXT: 1}, ensure_ascii=True)  # "\u001b[2J\r..."
    assert "\\u001b" in escapes and "\\ud800" in escapes
    (files / "dcp" / "ckptmigrate.json").write_text(f'{{"stamp": null, "hparams": {escapes}}}')
    proc = run(files, "info", "dcp", timeout=120)
    _assert_shown_escaped(proc)
    assert proc.returncode == 0 and "\\ud800" in proc.stdout


def test_on_a_terminal_a_file_cannot_clear_the_screen_or_ring(files: Path) -> None:
    _hostile_files(files)
    for args in (("info", "hostile.pth"), ("info", "hostile.pth", "--keys")):
        code, shown = run_on_terminal(files, *args)
        assert code == 0, shown
        assert "Traceback" not in shown
        assert "\x1b[2J" not in shown and "\x07" not in shown and "\x1b]0;" not in shown
        assert "\\x1b[2J" in shown and "\\ud800" in shown


def test_on_a_terminal_a_stamp_is_never_read_as_rich_markup(files: Path) -> None:
    from hostile import our_layout, save_torch, stamp

    save_torch(our_layout(stamp(schema="toy[/]")), files / "markup.pth")
    code, shown = run_on_terminal(files, "diff", "a.pth", "markup.pth")
    assert code == 1, shown  # was: internal error (MarkupError: closing tag '[/]' ...)
    assert "toy[/] 1.0.0" in ANSI.sub("", shown) and "error" not in shown


def test_torchs_log_records_show_only_with_debug_and_others_as_one_line(capsys):
    # DCP logs each metadata fallback with its traceback on the root logger; with no handler
    # configured Python printed it all on the CLI's stderr, around our own one-line error
    import logging
    import os

    import torch

    from ckptmigrate.cli import _warnings_as_lines

    torch_file = os.path.join(os.path.dirname(torch.__file__), "distributed", "x.py")

    def records():
        for path, text in [(torch_file, "Global metadata is not found."), ("/x/lib.py", "a  b")]:
            logging.getLogger().handle(
                logging.LogRecord("root", logging.WARNING, path, 1, text, None, None)
            )

    with _warnings_as_lines(show_torch=False):
        records()
    assert capsys.readouterr().err.splitlines() == ["ckptmigrate: warning: a b"]
    with _warnings_as_lines(show_torch=True):
        records()
    err = capsys.readouterr().err
    assert "Global metadata is not found." in err and "ckptmigrate: warning: a b" in err
    records()  # the command is over: its handler is gone
    assert "ckptmigrate: warning" not in capsys.readouterr().err


LOGS_AS_IT_LOADS = """
import sys
FIRST = "logging" not in sys.modules
import logging
logging.getLogger("mine").warning("logging  first imported here: %s", FIRST)
"""


def test_a_log_record_from_code_that_imports_logging_mid_command_is_one_line(
    files: Path,
) -> None:
    # the CLI no longer imports logging up front; its handler joins when logging is imported
    (files / "logmig").mkdir()  # no torch (which imports logging) in this folder
    (files / "logmig" / "logs.py").write_text(LOGS_AS_IT_LOADS)
    proc = run(files, "history", "--migrations", "logmig")
    assert proc.returncode == 0, proc.stderr
    assert "ckptmigrate: warning: logging first imported here: True" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr
