"""The ``ckptmigrate`` command line: one thin function per command, each calling the library.

Heavy modules (torch, rich, deepdiff, the user's migrations) are imported inside the commands
that need them, so ``--help``, ``diff`` without ``--values``/``--upgrade`` and ``info`` on an
unstamped file start fast and never import torch.

Exit codes: 0 success (no drift), 1 drift (``diff``) or a failing fixture (``check``), 2 trouble,
reported as one line ``ckptmigrate: error: ...`` on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .errors import CommandLineError
from .readable import human_bytes as _human_bytes
from .readable import key_text, readable
from .terminal import Output, printable_output, progress_bar, styled
from .terminal import console as _console
from .terminal import is_terminal as _is_terminal

# the read-plan-write sequence, and the lock around in-place rewrites, live in the library

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .diff import Diff
    from .rewrite import Rewrite
    from .schema import Schema

PROG = "ckptmigrate"
EXIT_OK, EXIT_DRIFT, EXIT_TROUBLE = 0, 1, 2


# -- output ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    return "(absent)" if value is None else readable(value)


def _stamp_text(stamp: dict[str, Any] | None) -> str:
    if not stamp:
        return "unstamped"
    if stamp.get("mounts"):
        return "; ".join(_mount_text(m, m["version"]) for m in stamp["mounts"])
    return f"{stamp.get('schema')} {stamp.get('version')}"


def _mount_text(mount: dict[str, Any], version: str) -> str:
    """``net at 'net.' 1.0.0`` (the mount at "" without its prefix)."""
    at = f" at {mount['prefix']!r}" if mount["prefix"] else ""
    return f"{mount['schema']}{at} {version}"


# -- diff --------------------------------------------------------------------------------------


#: (kind, key, detail, how many key changes the row stands for)
DiffRow = tuple[str, str, str, int]


def _rename_rows(d: Diff, arrow: str) -> list[DiffRow]:
    """A rename per row, or one row per pattern of many (``blocks.N.* -> layers.N.* (x1200)``)."""
    from .rename_groups import group_renames

    rows: list[DiffRow] = []
    for group in group_renames(d.renamed):
        if group.summarised:
            n = len(group.members)
            rows.append(
                ("renamed", f"{group.pattern_from} {arrow} {group.pattern_to}", f"(x{n})", n)
            )
            continue
        for r in group.members:
            detail = f"{r['shape']} {r['dtype']} (conf {r['confidence']:.2f})"
            rows.append(("renamed", f"{r['from']} {arrow} {r['to']}", detail, 1))
    return rows


def _diff_rows(d: Diff, arrow: str) -> list[DiffRow]:
    """(kind, key, detail, count) rows in a fixed order: renames, removals, additions, changes."""

    def sig(record: dict[str, Any]) -> str:
        return f"{record['shape']} {record['dtype']}"

    singles: list[tuple[str, str, str]] = [("removed", r["key"], sig(r)) for r in d.removed]
    singles += [("added", r["key"], sig(r)) for r in d.added]
    singles += [("shape", c["key"], f"{c['a']} {arrow} {c['b']}") for c in d.shape_changed]
    singles += [("dtype", c["key"], f"{c['a']} {arrow} {c['b']}") for c in d.dtype_changed]
    singles += [
        ("values", v["key"], f"max abs diff {readable(v['max_abs_diff'])}") for v in d.value_changes
    ]
    singles += [("hparam", h["path"], f"{_fmt(h['a'])} {arrow} {_fmt(h['b'])}") for h in d.hparams]
    singles += [
        ("meta", m["path"], f"{_fmt(m['a'])} {arrow} {_fmt(m['b'])} (not drift)") for m in d.meta
    ]
    return _rename_rows(d, arrow) + [(kind, key, detail, 1) for kind, key, detail in singles]


def _diff_summary(d: Diff) -> str:
    parts = [
        f"{len(items)} {label}"
        for label, items in (
            ("renamed", d.renamed),
            ("removed", d.removed),
            ("added", d.added),
            ("shape changed", d.shape_changed),
            ("dtype changed", d.dtype_changed),
            ("values differ", d.value_changes),
            ("hparams changed", d.hparams),
        )
        if items
    ]
    if not parts:
        same = f"; {len(d.values)} tensors compared, all equal" if d.values is not None else ""
        return f"no drift{same}"
    return "drift: " + ", ".join(parts)


def _upgrade_lines(d: Diff, arrow: str) -> list[str]:
    if d.upgrade is None:
        return []
    return [
        f"A upgraded first: {_mount_text(u, u['from'])} {arrow} {u['to']} "
        f"({len(u['steps'])} step{'' if len(u['steps']) == 1 else 's'})"
        for u in d.upgrade.get("mounts") or [{**d.upgrade, "prefix": ""}]
    ]


def render_diff_plain(d: Diff, write: Callable[[str], Any]) -> None:
    """The diff as plain lines, for pipes and logs."""
    write(f"A: {d.a} ({_stamp_text(d.stamps.get('a'))})")
    write(f"B: {d.b} ({_stamp_text(d.stamps.get('b'))})")
    for line in _upgrade_lines(d, "->"):
        write(line)
    rows = _diff_rows(d, "->")
    width = max((len(row[0]) for row in rows), default=0)
    for kind, key, detail, _ in rows:
        write(f"{kind.ljust(width)}  {key}  {detail}")
    write(_diff_summary(d))


_STYLES = {
    "renamed": "yellow",
    "removed": "red",
    "added": "green",
    "shape": "magenta",
    "dtype": "magenta",
    "values": "magenta",
    "hparam": "cyan",
    "meta": "dim",
}


def _group_of(kind: str, key: str) -> str:
    if kind in ("hparam", "meta"):
        return f"({kind}s)"
    return key.split(".", 1)[0] if "." in key else "(top level)"


def render_diff_rich(d: Diff, console: Any) -> None:
    """The diff as a coloured table grouped by top-level module, with counts."""
    from rich.table import Table
    from rich.text import Text

    for side, path in (("A", d.a), ("B", d.b)):  # a stamp's text is never read as markup
        stamp = _stamp_text(d.stamps.get(side.lower()))
        console.print(Text.assemble((side, "bold"), f": {path} ", (f"({stamp})", "dim")))
    for line in _upgrade_lines(d, "→"):
        console.print(Text(line, style="dim"))
    rows = _diff_rows(d, "→")
    if rows:
        groups: dict[str, list[DiffRow]] = {}
        for row in rows:
            groups.setdefault(_group_of(row[0], row[1]), []).append(row)
        table = Table(show_edge=False, pad_edge=False)
        table.add_column("change")
        table.add_column("key")
        table.add_column("detail")
        for name, members in groups.items():
            count = sum(row[3] for row in members)
            table.add_row(Text(name, style="bold"), Text(f"{count} changes", style="dim"), "")
            for kind, key, detail, _ in members:
                table.add_row(
                    Text(kind, style=_STYLES.get(kind, "")), Text(f"  {key}"), Text(detail)
                )
        console.print(table)
    colour = "red" if d.has_drift else "green"
    console.print(Text(_diff_summary(d), style=colour))


def cmd_diff_model(args: argparse.Namespace) -> int:
    """``diff CKPT --model SCHEMA``: what a strict load into today's model would say."""
    from .diff import diff_model

    if args.b is not None or args.values or args.upgrade:
        raise CommandLineError(
            "--model compares one checkpoint with a model: drop B/--values/--upgrade"
        )
    result = diff_model(
        args.a,
        args.model,
        schemas=_schemas(args),
        from_version=args.from_version,
        allowed_globals=args.allow_global,
        param_names=_param_names(args),
    )
    if args.json:
        print(result.to_json())
        return EXIT_DRIFT if result.has_drift else EXIT_OK
    if result.upgrade and result.upgrade["steps"]:
        print(f"upgraded {result.upgrade['from']} -> {result.upgrade['to']} first")
    report = result.report
    for key in report.missing:
        print(f"missing     {key}")
    for key in report.unexpected:
        hidden = " (non-persistent buffer of the model)" if key in report.non_persistent else ""
        print(f"unexpected  {key}{hidden}")
    for m in report.shape_mismatched:
        print(
            f"shape       {m['key']}  {list(m['checkpoint'])} (file) vs {list(m['model'])} (model)"
        )
    for c in report.dtype_casts:
        print(f"dtype cast  {c['key']}  {c['checkpoint']} (file) -> {c['model']} (model)")
    verdict = (
        "a strict load would succeed" if report.clean_for_strict else "a strict load would fail"
    )
    print(f"{verdict}: {report.summary()}" if result.has_drift else f"{verdict}: clean")
    return EXIT_DRIFT if result.has_drift else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from .diff import diff

    if args.model is not None:
        return cmd_diff_model(args)
    if args.b is None:
        raise CommandLineError("diff needs two checkpoints A B, or one with --model SCHEMA")
    if args.param_names is not None and not args.upgrade:
        raise CommandLineError(
            "--param-names names the optimizer state an upgrade needs: add --upgrade"
        )
    schemas = _schemas(args) if args.upgrade else None
    with progress_bar("comparing values") as progress:
        result = diff(
            args.a,
            args.b,
            values=args.values,
            upgrade=args.upgrade,
            schemas=schemas,
            schema=args.schema,
            from_version=args.from_version,
            allowed_globals=args.allow_global,
            progress=progress,
            param_names=_param_names(args),
        )
    if args.json:
        print(result.to_json())
    elif _is_terminal(sys.stdout):
        render_diff_rich(result, _console())
    else:
        render_diff_plain(result, print)
    return EXIT_DRIFT if result.has_drift else EXIT_OK


# -- info --------------------------------------------------------------------------------------


def _tensor_bytes(value: Any) -> int:
    info = getattr(value, "info", None)
    if info is not None:
        return int(info.nbytes)
    from .formats.tensorinfo import DTYPE_SIZES
    from .report import signature

    shape, dtype = signature(value)
    return math.prod(shape) * DTYPE_SIZES.get(dtype, 0)


def key_rows(tensors: dict[str, Any]) -> list[dict[str, Any]]:
    """``info --keys``: one row per tensor (name, shape, dtype, parameters, bytes), from stubs."""
    from .report import signature

    rows = []
    for name, value in tensors.items():
        shape, dtype = signature(value)
        rows.append(
            {
                "key": name,
                "shape": list(shape),
                "dtype": dtype,
                "params": math.prod(shape),
                "bytes": _tensor_bytes(value),
            }
        )
    return rows


def _schema_status(
    name: str | None, version: Any, args: argparse.Namespace
) -> dict[str, Any] | None:
    """Whether a stamp (or mount) is behind its registered schema (imports migrations)."""
    from .errors import CkptMigrateError
    from .registry import schema_status

    if name is None or version is None:
        return None
    try:
        schemas = _schemas(args)
    except CkptMigrateError as exc:
        print(f"{PROG}: warning: migrations not loaded: {exc}", file=sys.stderr)
        return {"registered": None, "error": str(exc)}
    status = schema_status(name, version, schemas)
    if not status.registered:
        return {"registered": False, "error": str(status.error)}
    record: dict[str, Any] = {
        "registered": True,
        "current": str(status.current),
        "behind": status.behind,
        "plan": None if status.plan is None else [p.record() for p in status.plan],
    }
    if status.error is not None:
        record["error"] = str(status.error)
    return record


def info_record(path: str, args: argparse.Namespace) -> dict[str, Any]:
    """What ``ckptmigrate info`` shows, as JSON-able data (metadata read only)."""
    from .diff import plain
    from .files import checkpoint_bytes, read_metadata
    from .formats.detect import detect_format
    from .layout import is_tensor_like
    from .mounts import all_mounts
    from .report import signature

    fmt = detect_format(path)
    ckpt = read_metadata(path, allowed_globals=args.allow_global)
    tensors = {k: v for k, v in ckpt.state_dict.items() if is_tensor_like(v)}
    dtypes: dict[str, int] = {}
    for value in tensors.values():
        dtype = signature(value)[1]
        dtypes[dtype] = dtypes.get(dtype, 0) + 1
    record = {
        "path": str(path),
        "format": fmt,
        "layout": ckpt.layout,
        "file_bytes": checkpoint_bytes(path),
        "schema": ckpt.schema,
        "version": None if ckpt.version is None else str(ckpt.version),
        "history": plain(ckpt.history),
        "tensors": len(tensors),
        "tensor_bytes": sum(_tensor_bytes(v) for v in tensors.values()),
        "dtypes": dict(sorted(dtypes.items())),
        "hparams": plain(ckpt.hparams),
        "meta": plain(ckpt.meta),
        "optimizer": ckpt.optimizer is not None,
        "extra": sorted(key_text(k) for k in ckpt.extra),
        "status": _schema_status(ckpt.schema, ckpt.version, args) if not ckpt.mounts else None,
        "mounts": (
            [
                {
                    "prefix": m.prefix,
                    "schema": m.schema,
                    "version": str(m.version),
                    "history": plain(m.history),
                    "tensors": sum(1 for k in tensors if k.startswith(m.prefix)),
                    "status": _schema_status(m.schema, m.version, args),
                }
                for m in all_mounts(ckpt)
            ]
            if ckpt.mounts
            else []
        ),
    }
    if getattr(args, "keys", False):
        record["keys"] = key_rows(tensors)
    return record


def _status_lines(status: dict[str, Any] | None) -> list[str]:
    if status is None:
        return ["unstamped: stamp it with `ckptmigrate stamp CKPT --schema S --version V`"]
    if status.get("registered") is None:
        return [f"schema status unknown: {status.get('error')}"]
    if not status["registered"]:
        return ["schema not registered in the discovered migrations (pass --migrations PATH)"]
    if status.get("plan") is None:
        return [f"cannot plan to current {status['current']}: {status.get('error')}"]
    if not status["behind"]:
        return [f"up to date (schema current is {status['current']})"]
    lines = [f"behind: schema current is {status['current']}; planned steps:"]
    for step in status["plan"]:
        mark = " [breaking]" if step["breaking"] else ""
        lines.append(f"  {step['from']} -> {step['to']}  {step['step']}{mark}")
    return lines


def render_info_plain(info: dict[str, Any], write: Callable[[str], Any]) -> None:
    """``info`` as ``field: value`` lines (then the tensor table with ``--keys``)."""
    _render_info_fields(info, write)
    if "keys" in info:
        render_keys_plain(info["keys"], write)


def _render_info_fields(info: dict[str, Any], write: Callable[[str], Any]) -> None:
    stamp = f"{info['schema']} {info['version']}" if info["schema"] else "unstamped"
    if info["mounts"] and not info["schema"]:
        stamp = f"{len(info['mounts'])} mount(s)"
    write(f"path: {info['path']}")
    write(f"format: {info['format']} (layout {info['layout']})")
    write(f"size: {_human_bytes(info['file_bytes'])} on disk")
    write(f"stamp: {stamp}")
    write(
        f"tensors: {info['tensors']} ({_human_bytes(info['tensor_bytes'])}); dtypes: "
        + (", ".join(f"{k} x{v}" for k, v in info["dtypes"].items()) or "none")
    )
    for entry in info["history"]:
        if isinstance(entry, dict):
            write(f"history: {entry.get('from')} -> {entry.get('to')}  {entry.get('step', '')}")
    for key, value in info["hparams"].items():
        write(f"hparam: {key} = {readable(value)}")
    for key, value in info["meta"].items():
        write(f"meta: {key} = {readable(value)}")
    if info["optimizer"] or info["extra"]:
        extra = ", ".join(info["extra"])
        write(f"also holds: {'optimizer state' if info['optimizer'] else ''} {extra}".rstrip())
    if not info["mounts"]:
        for line in _status_lines(info["status"]):
            write(f"status: {line}" if not line.startswith("  ") else line)
    for m in info["mounts"]:
        write(f"mount: {m['prefix']!r} {m['schema']} {m['version']} ({m['tensors']} tensors)")
        for line in _status_lines(m["status"]):
            write(f"  status: {line}" if not line.startswith("  ") else "  " + line)


_KEY_COLUMNS = ("key", "shape", "dtype", "params", "bytes")


def _key_cells(row: dict[str, Any]) -> tuple[str, ...]:
    return (
        row["key"],
        "[" + ", ".join(str(d) for d in row["shape"]) + "]",
        row["dtype"],
        f"{row['params']:,}",
        _human_bytes(row["bytes"]),
    )


def render_keys_plain(rows: list[dict[str, Any]], write: Callable[[str], Any]) -> None:
    """``info --keys`` as aligned columns under a header, totals last."""
    cells = [_KEY_COLUMNS, *(_key_cells(r) for r in rows)]
    widths = [max(len(c[i]) for c in cells) for i in range(len(_KEY_COLUMNS))]
    for c in cells:
        text = "  ".join(
            v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(c, widths))
        )
        write(text.rstrip())
    params = sum(r["params"] for r in rows)
    write(
        f"{len(rows)} tensors, {params:,} parameters, {_human_bytes(sum(r['bytes'] for r in rows))}"
    )


def render_keys_rich(rows: list[dict[str, Any]], console: Any) -> None:
    """``info --keys`` as a table, numbers right-aligned."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_edge=False, pad_edge=False)
    for i, name in enumerate(_KEY_COLUMNS):
        table.add_column(name, justify="right" if i >= 3 else "left")
    for row in rows:
        table.add_row(*(Text(c) for c in _key_cells(row)))
    console.print(table)
    params = sum(r["params"] for r in rows)
    total = _human_bytes(sum(r["bytes"] for r in rows))
    console.print(Text(f"{len(rows)} tensors, {params:,} parameters, {total}", style="bold"))


def render_info_rich(info: dict[str, Any], console: Any) -> None:
    """``info`` as a two-column table."""
    from rich.table import Table
    from rich.text import Text

    table = Table(show_header=False, show_edge=False, pad_edge=False)
    table.add_column(style="bold")
    table.add_column()
    lines: list[str] = []
    _render_info_fields(info, lines.append)
    for line in lines:
        name, _, value = line.partition(": ")
        table.add_row(Text(name if value else ""), Text(value if value else line))
    console.print(table)
    if "keys" in info:
        render_keys_rich(info["keys"], console)


def cmd_info(args: argparse.Namespace) -> int:
    info = info_record(args.ckpt, args)
    if args.json:
        print(json.dumps(info, indent=2, allow_nan=False))
    elif _is_terminal(sys.stdout):
        render_info_rich(info, _console())
    else:
        render_info_plain(info, print)
    return EXIT_OK


# -- upgrade -----------------------------------------------------------------------------------


def _same_checkpoint(src: str, dst: str) -> bool:
    """Whether ``dst`` names ``src`` (the same file, folder, or a set's index and its folder)."""
    try:
        if os.path.samefile(src, dst):
            return True
    except OSError:
        return False
    a, b = Path(src).resolve(), Path(dst).resolve()
    index = a if a.name.endswith(".index.json") else b if b.name.endswith(".index.json") else None
    return index is not None and {a, b} == {index, index.parent}  # a set: index and folder


def cmd_upgrade(args: argparse.Namespace) -> int:
    if (args.output is None) == (not args.in_place):
        raise CommandLineError("upgrade needs exactly one of -o DST or --in-place")
    if args.no_backup and not args.in_place:
        raise CommandLineError("--no-backup only applies to --in-place")
    if args.output is not None and _same_checkpoint(args.src, args.output):
        raise CommandLineError(
            f"-o {args.output} is {args.src} itself: pass --in-place instead (it locks the "
            "checkpoint and keeps a backup of the old version)"
        )

    from .inplace import migrate_file

    out = Output()

    def show_plan(outcome: Rewrite) -> None:
        at = f" at {outcome.prefix!r}" if outcome.prefix else ""
        head = f"{args.src}: {outcome.schema}{at} {outcome.source_version}"
        if not outcome.plan:
            out.line(head, ": ", styled(f"already at {outcome.target_version}", "current"))
            out.line("  no steps to run")
            return
        count = styled(f"{len(outcome.plan)} step(s)", "behind")
        out.line(f"{head} -> {outcome.target_version}, ", count, ":")
        for step in outcome.plan:
            marks = [" ", styled("[breaking]", "breaking")] if step["breaking"] else []
            marks += [" ", styled("[downgrade]", "downgrade")] if step["downgrade"] else []
            out.line(f"  {step['from']} -> {step['to']}  {step['step']}", *marks)
        sys.stdout.flush()

    with progress_bar("upgrading") as progress:
        outcome = migrate_file(
            args.src,
            None if args.in_place else args.output,
            schemas=_schemas(args),
            schema=args.schema,
            to=args.to,
            from_version=args.from_version,
            dry_run=args.dry_run,
            backup=not args.no_backup,
            allowed_globals=args.allow_global,
            on_plan=show_plan,
            progress=progress,
            param_names=_param_names(args),
        )
    if args.dry_run:
        out.line(styled("dry run: nothing written", "dry run"))
    elif outcome.written:
        kept = f" (backup: {outcome.backup})" if outcome.backup else ""
        out.line(styled("wrote", "ok"), f" {outcome.written}{kept}")
    return EXIT_OK


def _param_names(args: argparse.Namespace) -> list[str] | None:
    """``--param-names FILE``: one parameter name a line, in the optimizer's order."""
    if args.param_names is None:
        return None
    from .positions import read_param_names

    return read_param_names(args.param_names)


# -- scan --------------------------------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from .scan import scan

    with progress_bar("scanning") as progress:
        rows = scan(
            args.dir,
            _schemas(args),
            workers=args.workers,
            processes=None if args.threads is None else not args.threads,
            progress=progress,
            allowed_globals=args.allow_global,
        )
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return EXIT_DRIFT if args.fail_behind and any(r.behind for r in rows) else EXIT_OK
    out = Output()
    for r in rows:
        where = f"{r.path} [{r.prefix}]" if r.prefix else r.path
        if r.error and not r.behind:  # unreadable, unknown, or newer than the code
            out.line(f"{where}  ", styled("?", "error"), f"  {r.error}")
        elif r.behind:
            steps = f", {len(r.steps)} step(s)"
            out.line(
                f"{where}  {r.schema} {r.version} -> {r.current}: ",
                styled("behind", "behind"),
                steps,
            )
        else:
            out.line(f"{where}  {r.schema} {r.version}: ", styled("current", "current"))
    behind = sum(1 for r in rows if r.behind)
    files = len({r.path for r in rows})
    mounts = f"{len(rows)} mount(s), " if len(rows) != files else ""
    out.line(
        f"{files} checkpoint(s), {mounts}",
        styled(f"{behind} behind", "behind" if behind else "ok"),
    )
    return EXIT_DRIFT if args.fail_behind and behind else EXIT_OK


# -- history -----------------------------------------------------------------------------------


def history_record(schema: Schema) -> dict[str, Any]:
    """The migration graph of ``schema``, oldest step first."""
    return {
        "schema": schema.name,
        "current": str(schema.current),
        "origin": schema.origin,
        "versions": [str(v) for v in schema.graph.versions],
        "steps": [
            {
                "from": str(s.source),
                "to": str(s.target),
                "step": s.name,
                "breaking": s.breaking,
                "reversible": s.reversible,
                "preferred": s.preferred,
            }
            for s in schema.steps
        ],
    }


def schema_list_record(schemas: dict[str, Schema]) -> list[dict[str, Any]]:
    """Every discovered schema: name, current version, step count and where it came from."""
    return [
        {
            "schema": s.name,
            "current": str(s.current),
            "steps": len(s.steps),
            "origin": s.origin,
        }
        for _, s in sorted(schemas.items())
    ]


def cmd_history(args: argparse.Namespace) -> int:
    from .registry import get_schema

    schemas = _schemas(args)
    if args.schema is None:
        return _list_schemas(schemas, args)
    record = history_record(get_schema(args.schema, schemas))
    if args.json:
        print(json.dumps(record, indent=2))
        return EXIT_OK
    out = Output()
    out.line(f"{record['schema']} (current {record['current']}; from {record['origin'] or '?'})")
    if not record["steps"]:
        out.line(styled("  no migration steps", "note"))
    for step in record["steps"]:
        marks = [m for m in ("breaking", "reversible", "preferred") if step[m]]
        shown = ["  ", styled(f"[{', '.join(marks)}]", "breaking" if step["breaking"] else "note")]
        out.line(f"  {step['from']} -> {step['to']}  {step['step']}", *(shown if marks else []))
    return EXIT_OK


def _list_schemas(schemas: dict[str, Schema], args: argparse.Namespace) -> int:
    record = schema_list_record(schemas)
    if args.json:
        print(json.dumps(record, indent=2))
        return EXIT_OK
    out = Output()
    if not record:
        print(
            f"{PROG}: warning: no schemas discovered: pass --migrations PATH, or list them in "
            "[tool.ckptmigrate] migrations in pyproject.toml",
            file=sys.stderr,
        )
    for row in record:
        origin = row["origin"] or "?"
        out.line(
            styled(row["schema"], "ok"),
            f"  current {row['current']}  {row['steps']} step(s)  from {origin}",
        )
    return EXIT_OK


# -- check -------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .fixtures import check_fixtures
    from .registry import configured

    root = args.dir or (configured("fixtures") or ["fixtures"])[0]
    schemas = _schemas(args)
    with progress_bar("checking fixtures") as progress:
        results = check_fixtures(root, schemas, progress=progress, safe_globals=args.allow_global)
    rows = [
        {
            "schema": r.fixture.schema,
            "version": r.fixture.version,
            "variant": r.fixture.variant,
            "path": str(r.fixture.path),
            "steps_applied": r.steps_applied,
            "max_abs_error": r.max_abs_error,
            "ok": r.ok,
            "reason": r.reason,
        }
        for r in results
    ]
    failed = [r for r in rows if not r["ok"]]
    if args.json:
        print(json.dumps({"root": str(root), "fixtures": rows, "failed": len(failed)}, indent=2))
        return EXIT_DRIFT if failed else EXIT_OK
    out = Output()
    if not rows:
        print(f"{PROG}: warning: no fixtures under {root}", file=sys.stderr)
    for r in rows:
        error = "-" if r["max_abs_error"] is None else readable(r["max_abs_error"])
        verdict = styled("ok", "ok") if r["ok"] else styled(f"FAIL: {r['reason']}", "fail")
        head = f"{r['schema']}  {r['version']}  {r['variant'] or '-'}  "
        if r["schema"] == "?":  # an unreadable golden record: name the file it came from
            head = f"{r['path']}  "
        out.line(f"{head}steps={r['steps_applied']}  max_abs_error={error}  ", verdict)
    summary = f"{len(rows) - len(failed)} of {len(rows)} fixtures ok"
    out.line(styled(summary, "fail" if failed else "ok"))
    return EXIT_DRIFT if failed else EXIT_OK


# -- stamp -------------------------------------------------------------------------------------


def cmd_stamp(args: argparse.Namespace) -> int:
    if (args.output is None) == (not args.in_place):
        raise CommandLineError("stamp needs exactly one of -o DST or --in-place")
    if (args.version is None) == (not args.guess):
        raise CommandLineError("stamp needs exactly one of --version V or --guess")
    given = (lambda c: _guess(c, args)) if args.guess else args.version
    options: dict[str, Any] = dict(safe_globals=args.allow_global, prefix=args.prefix)
    if args.in_place:
        from .inplace import stamp_in_place

        done = stamp_in_place(args.ckpt, args.schema, given, **options)
        target = args.ckpt
    else:
        from .rewrite import stamp_file

        done = stamp_file(args.ckpt, args.output, args.schema, given, what="--version", **options)
        target = args.output
    print(f"stamped {target} as {args.schema} {_stamped_as(done)}")
    return EXIT_OK


def _stamped_as(done: Rewrite) -> str:
    at = f" at prefix {done.prefix!r}" if done.prefix else ""
    return f"{done.target_version}{at} (layout {done.layout})"


def _guess(ckpt: Checkpoint, args: argparse.Namespace) -> Any:
    try:
        from .guess import guess_version
    except ImportError:
        raise CommandLineError(
            "version guessing is not available in this build: pass --version V"
        ) from None
    from .registry import get_schema

    guess = guess_version(ckpt, get_schema(args.schema, _schemas(args)))
    print(f"guessed version {guess.version} (confidence {guess.confidence:.2f})")
    return guess.version


# -- new ---------------------------------------------------------------------------------------


def _default_migrations_dir() -> Path:
    from .registry import configured

    for source in configured("migrations"):
        if Path(source).is_dir():
            return Path(source)
    return Path("migrations")


def cmd_new(args: argparse.Namespace) -> int:
    from .autogen import draft_migration, module_name
    from .errors import CkptMigrateError
    from .version import parse_version

    v1 = parse_version(args.from_version, what="--from-version")
    v2 = parse_version(args.to_version, what="--to-version")
    if v2 <= v1:
        raise CommandLineError(f"--to-version {v2} must be newer than --from-version {v1}")
    if args.to_model and args.values:
        raise CommandLineError(
            "--values compares the tensors of two files, and --to-model has only a freshly "
            "built model: drop --values, or pass --to-file NEW (a file the new code saved)"
        )
    try:
        schemas = _schemas(args)
    except CkptMigrateError as exc:
        raise CommandLineError(
            f"cannot load the existing migrations to check for {args.schema!r}: {exc}"
        ) from None
    existing = schemas.get(args.schema)
    new: Any = args.to_file
    if args.to_model:
        if existing is None or not existing.can_build:
            found = "it has no build= factory" if existing else "no such schema was discovered"
            raise CommandLineError(
                f"--to-model compares with what schema {args.schema!r} builds today, but {found}: "
                "pass --migrations PATH to its module (with build=lambda hp: Model(**hp)), or "
                "--to-file NEW"
            )
        new = existing
    draft = draft_migration(
        args.from_file,
        new,
        args.schema,
        str(v1),
        str(v2),
        values=args.values,
        allowed_globals=args.allow_global,
        existing=existing,
    )
    code = draft.code
    if args.output is not None:
        target: Path | None = Path(args.output)
    elif existing is not None:
        target = None  # a snippet for an existing schema: printed, to paste beside its steps
    else:
        folder = Path(args.migrations_dir) if args.migrations_dir else _default_migrations_dir()
        target = folder / module_name(args.schema, str(v1), str(v2))
    if target is None:
        print(code)
        print(
            f"{PROG}: schema {args.schema!r} already exists ({existing.origin}): paste the step "  # type: ignore[union-attr]
            f"above beside its other steps and raise its current= to {v2}",
            file=sys.stderr,
        )
        _warn_unconfirmed(draft.unconfirmed)
        return EXIT_OK
    if target.exists() and not args.force:
        raise CommandLineError(f"{target} already exists: pick another -o, or pass --force")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(code, encoding="utf-8")
    note = f"; {draft.todos} TODO(s) to finish before it runs" if draft.todos else ""
    print(f"wrote {target}{note}")
    _warn_unconfirmed(draft.unconfirmed)
    return EXIT_OK


def _warn_unconfirmed(count: int) -> None:
    if count:
        print(
            f"{PROG}: {count} Merge/Split op(s) found from names and shapes only (marked "
            "UNCONFIRMED): check the order of the parts, or rerun with --values against a "
            "converted file",
            file=sys.stderr,
        )


# -- plumbing ------------------------------------------------------------------------------------


def _schemas(args: argparse.Namespace) -> dict[str, Schema]:
    """The schemas of ``--migrations PATH``, else the configured or installed ones."""
    from .registry import find_schemas

    return find_schemas(args.migrations or None)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other failure."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see `{self.prog} --help`)"
        self.exit(EXIT_TROUBLE, f"{PROG}: error: {message}{hint}\n")


def _common(sub: argparse.ArgumentParser, *, reads_files: bool) -> None:
    sub.add_argument(
        "--migrations",
        action="append",
        metavar="PATH",
        help="folder of migration .py files or a dotted module (repeatable); default: "
        "pyproject [tool.ckptmigrate] migrations, else installed entry points",
    )
    sub.add_argument("--debug", action="store_true", help="show tracebacks")
    if reads_files:
        sub.add_argument(
            "--allow-global",
            action="append",
            default=[],
            metavar="module.Name",
            help="let a trusted class through the safe loader (repeatable)",
        )


def _param_names_option(sub: argparse.ArgumentParser, when: str = "") -> None:
    sub.add_argument(
        "--param-names",
        metavar="FILE",
        help=f"{when}names of position-keyed optimizer state, one a line in the optimizer's "
        "order (needed when a step splits, merges or drops parameters and the file cannot tell)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    parser = _Parser(
        prog=PROG,
        description="Versioned PyTorch checkpoints: diff, inspect, upgrade and stamp them.",
        epilog="exit codes: 0 ok / no drift, 1 drift (diff) or failing fixture (check), 2 error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_library_version()}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = commands.add_parser("diff", help="key/shape/dtype/hparam drift from A to B")
    p.add_argument("a", metavar="A", help="the old checkpoint (file, folder or URL)")
    p.add_argument("b", metavar="B", nargs="?", help="the new checkpoint; omitted with --model")
    p.add_argument(
        "--model",
        metavar="SCHEMA",
        help="compare A (upgraded) with the model SCHEMA's build makes: a strict load, before it",
    )
    p.add_argument(
        "--json", action="store_true", help="print the JSON object (README: diff --json)"
    )
    p.add_argument("--values", action="store_true", help="also compare tensor contents")
    p.add_argument(
        "--upgrade", action="store_true", help="migrate A to B's version first (what it misses)"
    )
    p.add_argument("--schema", help="with --upgrade: A's schema when A carries no stamp")
    p.add_argument(
        "--from-version",
        metavar="V",
        help="with --upgrade or --model: A's version when it has no stamp (auto: guess it)",
    )
    _param_names_option(p, "with --upgrade or --model: ")
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_diff)

    p = commands.add_parser("info", help="what a checkpoint holds and whether it is behind")
    p.add_argument("ckpt", metavar="CKPT", help="the checkpoint to describe")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--keys",
        action="store_true",
        help="list every tensor: name, shape, dtype, parameters, bytes (from metadata only)",
    )
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_info)

    p = commands.add_parser("upgrade", help="migrate a file to a newer (or older) version")
    p.add_argument("src", metavar="SRC", help="the checkpoint to migrate")
    p.add_argument("-o", "--output", metavar="DST", help="write the upgraded file here")
    p.add_argument("--in-place", action="store_true", help="replace SRC (a backup stays beside)")
    p.add_argument("--no-backup", action="store_true", help="with --in-place: keep no backup")
    p.add_argument("--to", metavar="V", help="target version (default: the schema's current)")
    p.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    p.add_argument(
        "--from-version",
        metavar="V",
        help="SRC's version when it has no stamp (auto: guess it from its keys)",
    )
    p.add_argument("--schema", help="SRC's schema when it has no stamp")
    _param_names_option(p)
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_upgrade)

    p = commands.add_parser("scan", help="schema, version and drift of every checkpoint in DIR")
    p.add_argument("dir", metavar="DIR", help="the folder (or one file) to scan; it must exist")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    p.add_argument("--fail-behind", action="store_true", help="exit 1 if any file is behind")
    p.add_argument(
        "--workers", type=int, default=None, metavar="N", help="parallel readers (default: auto)"
    )
    p.add_argument(
        "--threads",
        action="store_true",
        default=None,
        help="read with threads (good for network storage); default: worker processes for "
        "64 files or more, one per core",
    )
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_scan)

    p = commands.add_parser(
        "history", help="the migration graph of a schema, oldest first (no SCHEMA: list them)"
    )
    p.add_argument(
        "schema", metavar="SCHEMA", nargs="?", help="omit to list every discovered schema"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _common(p, reads_files=False)
    p.set_defaults(func=cmd_history)

    p = commands.add_parser("check", help="upgrade and verify every legacy fixture under DIR")
    p.add_argument(
        "dir", metavar="DIR", nargs="?", help="default: pyproject fixtures, else fixtures"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_check)

    p = commands.add_parser("stamp", help="give an unversioned legacy file its stamp")
    p.add_argument("ckpt", metavar="CKPT", help="the unstamped checkpoint")
    p.add_argument("--schema", required=True, help="the schema the file belongs to")
    p.add_argument("--version", metavar="V", help="the version the file was written at")
    p.add_argument("--guess", action="store_true", help="guess the version from the keys")
    p.add_argument(
        "--prefix",
        default="",
        metavar="P",
        help="mount the schema at the key prefix P (e.g. net. for a LightningModule's self.net)",
    )
    p.add_argument("-o", "--output", metavar="DST", help="write the stamped copy here")
    p.add_argument("--in-place", action="store_true", help="stamp CKPT itself (atomically)")
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_stamp)

    p = commands.add_parser("new", help="generate a migration from two checkpoints")
    p.add_argument("schema", metavar="SCHEMA", help="the schema the step belongs to")
    p.add_argument("--from-version", required=True, metavar="V1", help="the step's old version")
    p.add_argument("--to-version", required=True, metavar="V2", help="the step's new version")
    p.add_argument("--from-file", required=True, metavar="OLD", help="a checkpoint at V1")
    to = p.add_mutually_exclusive_group(required=True)
    to.add_argument("--to-file", metavar="NEW", help="a checkpoint the new code saved, at V2")
    to.add_argument(
        "--to-model", action="store_true", help="compare with what the schema's build= makes today"
    )
    p.add_argument(
        "--values", action="store_true", help="compare tensors: confirms renames, merges, splits"
    )
    p.add_argument("--migrations-dir", metavar="DIR", help="where to write the module")
    p.add_argument("-o", "--output", metavar="FILE", help="write exactly here")
    p.add_argument("--force", action="store_true", help="overwrite an existing file")
    _common(p, reads_files=True)
    p.set_defaults(func=cmd_new)
    return parser


def _migrations_layouts(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """A command that reads files reads the layouts its migrations declare (``cm.Layout``):
    a file in none of the known layouts imports them, once, and is matched again."""
    if not hasattr(args, "allow_global"):
        return contextlib.nullcontext()
    from .layout import layouts_from

    return layouts_from(lambda: _schemas(args))


def _library_version() -> str:
    from . import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``ckptmigrate diff a.pth b.pth``)."""
    with printable_output():  # what a file says reaches the terminal escaped
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with (
            _warnings_as_lines(show_torch=args.debug),
            _project_importable(),
            _migrations_layouts(args),
        ):
            return int(args.func(args))
    except KeyboardInterrupt:
        print(f"{PROG}: error: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (``| head``): not our trouble; silence the flush at exit
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_OK
    except Exception as exc:
        if args.debug:
            raise
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_TROUBLE


@contextlib.contextmanager
def _project_importable() -> Iterator[None]:
    """The project's folder first on sys.path for the whole command: migrations import its
    model code, and a ``build=`` may do so only when it runs (``diff --model``, ``check``)."""
    from .registry import project_folder, project_on_sys_path

    try:
        folder = project_folder()
    except Exception:  # an unreadable pyproject.toml is reported where migrations are found
        yield
        return
    with project_on_sys_path(folder):
        yield


@contextlib.contextmanager
def _warnings_as_lines(*, show_torch: bool) -> Iterator[None]:
    """Our warnings as one ``ckptmigrate: warning:`` line each; torch's notes about its own
    internals (a pickle protocol it did not write, a deprecated call) only with ``--debug``."""

    def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if not show_torch and f"{os.sep}torch{os.sep}" in filename:
            return
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def _one_line(exc: BaseException) -> str:
    from .errors import CkptMigrateError

    text = " ".join(str(exc).split())
    if isinstance(exc, CkptMigrateError):
        return " ".join(exc.render(cli=True).split())
    if isinstance(exc, CommandLineError):
        return text
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.filename}: {exc.strerror or text}"
    said = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    if isinstance(exc, (OSError, ValueError)):  # the disk's error; a refusal said in a sentence
        return said
    # the readers raise typed errors for whatever a file holds: anything else is our bug
    return (
        f"internal error ({said[:300]}): rerun with --debug for the traceback, and please "
        "report it"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
