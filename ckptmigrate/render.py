"""What the command line prints: each command's records as plain lines or rich tables.

A renderer takes a record the library made (:mod:`ckptmigrate.inspection.info`, :class:`~ckptmigrate.diff.Diff`,
:mod:`ckptmigrate.inspection.scan` rows) and writes it, plain (``write`` is ``print``) for pipes and logs,
rich (a console) on a terminal; it computes nothing about checkpoints.

>>> render_info_plain(info_record("ckpt.pth"), print)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .base.readable import human_bytes as _human_bytes
from .base.readable import readable
from .errors import CkptMigrateError, CommandLineError
from .terminal import Output, styled

if TYPE_CHECKING:
    from .inspection.diff import Diff, ModelDiff
    from .inspection.scan import ScanRow


# -- diff --------------------------------------------------------------------------------------


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


#: (kind, key, detail, how many key changes the row stands for)
DiffRow = tuple[str, str, str, int]


def _rename_rows(d: Diff, arrow: str) -> list[DiffRow]:
    """A rename per row, or one row per pattern of many (``blocks.N.* -> layers.N.* (x1200)``)."""
    from .inspection.rename_groups import group_renames

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


# -- info --------------------------------------------------------------------------------------


def _status_lines(status: dict[str, Any] | None) -> list[str]:
    edited = [
        f"step {e['from']} -> {e['to']} ({e['step']}) was edited since it was applied"
        for e in (status or {}).get("edited") or []
    ]
    return _plan_lines(status) + edited


def _plan_lines(status: dict[str, Any] | None) -> list[str]:
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
    edited = {e["index"] for e in (info["status"] or {}).get("edited") or []}
    for index, entry in enumerate(info["history"]):
        if isinstance(entry, dict):
            mark = "  [edited since applied]" if index in edited else ""
            write(
                f"history: {entry.get('from')} -> {entry.get('to')}  {entry.get('step', '')}{mark}"
            )
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


def render_model_diff_plain(result: ModelDiff, write: Callable[[str], Any]) -> None:
    """``diff CKPT --model SCHEMA``: what a strict load into today's model would say."""
    if result.upgrade and result.upgrade["steps"]:
        write(f"upgraded {result.upgrade['from']} -> {result.upgrade['to']} first")
    report = result.report
    for key in report.missing:
        write(f"missing     {key}")
    for key in report.unexpected:
        hidden = " (non-persistent buffer of the model)" if key in report.non_persistent else ""
        write(f"unexpected  {key}{hidden}")
    for m in report.shape_mismatched:
        write(
            f"shape       {m['key']}  {list(m['checkpoint'])} (file) vs {list(m['model'])} (model)"
        )
    for c in report.dtype_casts:
        write(f"dtype cast  {c['key']}  {c['checkpoint']} (file) -> {c['model']} (model)")
    verdict = (
        "a strict load would succeed" if report.clean_for_strict else "a strict load would fail"
    )
    write(f"{verdict}: {report.summary()}" if result.has_drift else f"{verdict}: clean")


# -- scan --------------------------------------------------------------------------------------


def render_scan(rows: Sequence[ScanRow], out: Output) -> None:
    """One line per file (or mount): current, behind, or why it could not be read; totals."""
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
        if r.edited:
            steps = ", ".join(f"{e['from']} -> {e['to']} ({e['step']})" for e in r.edited)
            out.line(styled(f"  {len(r.edited)} applied step(s) edited since: {steps}", "behind"))
    behind = sum(1 for r in rows if r.behind)
    files = len({r.path for r in rows})
    mounts = f"{len(rows)} mount(s), " if len(rows) != files else ""
    out.line(
        f"{files} checkpoint(s), {mounts}",
        styled(f"{behind} behind", "behind" if behind else "ok"),
    )


# -- history -----------------------------------------------------------------------------------


def render_history(record: dict[str, Any], out: Output) -> None:
    """A schema's steps, oldest first, each with its marks (breaking, reversible, preferred)."""
    out.line(f"{record['schema']} (current {record['current']}; from {record['origin'] or '?'})")
    if not record["steps"]:
        out.line(styled("  no migration steps", "note"))
    for step in record["steps"]:
        marks = [m for m in ("breaking", "reversible", "preferred") if step[m]]
        shown = ["  ", styled(f"[{', '.join(marks)}]", "breaking" if step["breaking"] else "note")]
        out.line(f"  {step['from']} -> {step['to']}  {step['step']}", *(shown if marks else []))


def render_schema_list(record: list[dict[str, Any]], out: Output) -> None:
    """One line per discovered schema: name, current version, steps, origin."""
    for row in record:
        origin = row["origin"] or "?"
        out.line(
            styled(row["schema"], "ok"),
            f"  current {row['current']}  {row['steps']} step(s)  from {origin}",
        )


def render_weights_list(record: list[dict[str, Any]], out: Output) -> None:
    """One line per named weights entry: schema, name, saved-at version, sha256, where; then
    its meta, indented."""
    for row in record:
        behind = "" if row["version"] == row["current"] else f" (upgraded to {row['current']})"
        golden = "  golden" if row["golden"] else ""
        out.line(
            styled(f"{row['schema']}:{row['name']}", "ok"),
            f"  saved at {row['version']}{behind}  sha256 {row['sha256'][:12]}{golden}  "
            f"{row['url']}",
        )
        for key, value in row["meta"].items():
            out.line(f"    {key}: {_fmt(value)}")


# -- check -------------------------------------------------------------------------------------


def render_check(rows: list[dict[str, Any]], out: Output) -> None:
    """One line per fixture (ok, or why it failed) and the count that passed."""
    failed = [r for r in rows if not r["ok"]]
    for r in rows:
        error = "-" if r["max_abs_error"] is None else readable(r["max_abs_error"])
        verdict = styled("ok", "ok") if r["ok"] else styled(f"FAIL: {r['reason']}", "fail")
        head = f"{r['schema']}  {r['version']}  {r['variant'] or '-'}  "
        if r["schema"] == "?":  # an unreadable golden record: name the file it came from
            head = f"{r['path']}  "
        out.line(f"{head}steps={r['steps_applied']}  max_abs_error={error}  ", verdict)
    summary = f"{len(rows) - len(failed)} of {len(rows)} fixtures ok"
    out.line(styled(summary, "fail" if failed else "ok"))


# -- errors ------------------------------------------------------------------------------------


def error_line(exc: BaseException) -> str:
    """What ``ckptmigrate: error:`` says about ``exc``, on one line."""
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
