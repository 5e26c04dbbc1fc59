"""Write a migration from the drift between two checkpoints (``ckptmigrate new``).

What ``diff`` can infer becomes declarative ops: renames (generalised to one regex where that
regex renames exactly the detected keys, checked against the old file's keys), drops and
casts. What it cannot infer (values for added keys, shape changes, hparam changes) becomes a
``todo(...)`` placeholder that raises NotImplementedError until someone writes it.

>>> code = generate_migration(cm.diff("v1.pth", "v2.pth"), keys_of_v1, "tinylm", "1.0.0", "2.0.0")
"""

from __future__ import annotations

import ast
import datetime as _dt
import keyword
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import InternalError, ModelBuildError, UsageError
from ..schema.ops import DropKeys, Merge, Op, RenameKeys, RenamePrefix, Split
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint
from .diff import Diff, diff
from .fusion import Fusion, infer_fusions

__all__ = [
    "Draft",
    "build_migration",
    "draft_migration",
    "generate_migration",
    "infer_drops",
    "infer_fusion_ops",
    "infer_renames",
    "model_target",
    "module_name",
    "schema_variable",
]

_PRE = r"(?P<pre>(?:.*\.)?)"
_POST = r"(?P<post>(?:\..*)?)"


def module_name(schema: str, source: str, target: str) -> str:
    """``tinylm``, ``1.0.0``, ``2.0.0`` -> ``tinylm_1_0_0_to_2_0_0.py``."""

    def clean(text: str) -> str:
        return re.sub(r"\W", "_", text)

    return f"{clean(schema)}_{clean(source)}_to_{clean(target)}.py"


def _mid_rule(mid_from: list[str], mid_to: list[str]) -> tuple[str, str]:
    """Regex and replacement for one run of tokens, layer indices captured when both keep them."""
    digits_from = [t for t in mid_from if t.isdigit()]
    digits_to = [t for t in mid_to if t.isdigit()]
    generalise = bool(digits_from) and digits_from == digits_to
    pattern = _numbered(mid_from, generalise, r"(?P<i{}>\d+)", re.escape)
    repl = _numbered(mid_to, generalise, r"\g<i{}>", lambda token: token.replace("\\", "\\\\"))
    return r"\.".join(pattern), ".".join(repl)


def _numbered(
    tokens: list[str], generalise: bool, numbered: str, other: Callable[[str], str]
) -> list[str]:
    """``tokens`` with the n-th digit token as ``numbered.format(n)`` (when ``generalise``) and
    every other token through ``other``."""
    out, index = [], 0
    for token in tokens:
        if generalise and token.isdigit():
            out.append(numbered.format(index))
            index += 1
        else:
            out.append(other(token))
    return out


def _candidate_ops(old: str, new: str) -> list[Op]:
    """Rename ops for ``old -> new``, from the most general to the exact one."""
    a, b = old.split("."), new.split(".")
    p = 0
    while p < min(len(a), len(b)) and a[p] == b[p]:
        p += 1
    s = 0
    while s < min(len(a), len(b)) - p and a[-1 - s] == b[-1 - s]:
        s += 1
    mid_a, mid_b = a[p : len(a) - s], b[p : len(b) - s]
    out: list[Op] = []
    if mid_a and mid_b:
        pattern, repl = _mid_rule(mid_a, mid_b)
        back_pattern, back_repl = _mid_rule(mid_b, mid_a)
        out.append(
            RenameKeys(
                _PRE + pattern + _POST,
                r"\g<pre>" + repl + r"\g<post>",
                reverse=(_PRE + back_pattern + _POST, r"\g<pre>" + back_repl + r"\g<post>"),
            )
        )
    if s:
        head_a, head_b = ".".join(a[: len(a) - s]), ".".join(b[: len(b) - s])
        out.append(RenamePrefix(head_a + "." if head_a else "", head_b + "." if head_b else ""))
    escaped_new, escaped_old = new.replace("\\", "\\\\"), old.replace("\\", "\\\\")
    out.append(RenameKeys(re.escape(old), escaped_new, reverse=(re.escape(new), escaped_old)))
    return out


def infer_renames(keys: Sequence[str], renames: Mapping[str, str]) -> list[Op]:
    """Few rename ops that turn exactly ``renames`` (old -> new) and nothing else in ``keys``.

    Each candidate op is checked with the op's own matching against the keys as they are when
    it runs, so a general regex is kept only when it renames no other key.

    >>> infer_renames(["blocks.0.w", "blocks.1.w"], {"blocks.0.w": "layers.0.w", ...})
    [RenameKeys(pattern='(?P<pre>(?:.*\\\\.)?)blocks(?P<post>(?:\\\\..*)?)', ...)]
    """
    pending = dict(renames)
    current = list(keys)
    ops: list[Op] = []
    while pending:
        old, new = next(iter(pending.items()))
        for op in _candidate_ops(old, new):
            mapping = op.renamed_keys(current)
            if mapping.get(old) == new and all(pending.get(k) == v for k, v in mapping.items()):
                break
        else:  # pragma: no cover - the exact rename always qualifies
            raise InternalError(f"no rename op renames {old!r} to {new!r}")
        ops.append(op)
        for key in mapping:
            del pending[key]
        current = [mapping.get(k, k) for k in current]
    return ops


def infer_drops(keys: Sequence[str], dropped: Sequence[str]) -> list[DropKeys]:
    """DropKeys ops for ``dropped``: one per module whose every key goes, else one per key."""
    gone = set(dropped)
    ops: list[DropKeys] = []
    covered: set[str] = set()
    for key in dropped:
        if key in covered:
            continue
        module = key.rsplit(".", 1)[0] if "." in key else ""
        members = [k for k in keys if module and k.startswith(module + ".")]
        if module and len(members) > 1 and all(k in gone for k in members):
            ops.append(DropKeys(re.escape(module) + r"\..*"))
            covered.update(members)
        else:
            ops.append(DropKeys(re.escape(key)))
            covered.add(key)
    return ops


def _template(key: str) -> str:
    """``layers.3.mlp.gate.weight`` -> ``layers.{i0}.mlp.gate.weight``: indices become fields."""
    out, index = [], 0
    for token in key.split("."):
        if token.isdigit():
            out.append(f"{{i{index}}}")
            index += 1
        else:
            out.append(token)
    return ".".join(out)


def _fusion_op(fusion: Fusion, template: Callable[[str], str]) -> Merge | Split:
    sizes = None if len(set(fusion.sizes)) == 1 else list(fusion.sizes)
    parts = [template(k) for k in fusion.parts]
    if fusion.kind == "merge":
        return Merge(parts, template(fusion.whole), dim=fusion.dim, sizes=sizes)
    return Split(template(fusion.whole), parts, dim=fusion.dim, sizes=sizes)


def _fused_by(op: Merge | Split, keys: Sequence[str]) -> set[tuple[str, tuple[str, ...]]]:
    """(whole, parts) of every fusion ``op`` performs on ``keys``."""
    traced = op.trace(keys)
    if isinstance(op, Merge):
        return {(new, tuple(old)) for new, old in traced.items() if old != [new]}
    parts: dict[str, list[str]] = {}
    for new, old in traced.items():
        if old != [new]:
            parts.setdefault(old[0], []).append(new)
    return {(whole, tuple(news)) for whole, news in parts.items()}


def infer_fusion_ops(
    keys: Sequence[str], fusions: Sequence[Fusion]
) -> list[tuple[Merge | Split, list[Fusion]]]:
    """``Merge``/``Split`` ops for ``fusions`` on ``keys`` (the old keys after renames).

    Fusions that differ only in layer indices share one templated op when, traced over
    ``keys``, it fuses exactly them; otherwise each gets an op on its exact keys.
    """
    groups: dict[tuple[Any, ...], list[Fusion]] = {}
    for f in fusions:
        shape = (f.kind, _template(f.whole), tuple(map(_template, f.parts)), f.dim)
        groups.setdefault((*shape, tuple(f.sizes)), []).append(f)
    out: list[tuple[Merge | Split, list[Fusion]]] = []
    for group in groups.values():
        general = _fusion_op(group[0], _template)
        expected = {(f.whole, tuple(f.parts)) for f in group}
        if len(group) > 1 and _fused_by(general, keys) == expected:
            out.append((general, group))
        else:
            out += [(_fusion_op(f, lambda k: k), [f]) for f in group]
    return out


def _fusion_comment(group: Sequence[Fusion]) -> list[str]:
    f = group[0]
    parts = " + ".join(_text(k) for k in f.parts)
    verb = "fused" if f.kind == "merge" else "split"
    line = f"# {verb}: {parts} <-> {_text(f.whole)} (dim {f.dim}, parts in this order)"
    if len(group) > 1:
        line += f", and {len(group) - 1} more like it"
    if all(g.confirmed for g in group):
        return [line, "#   confirmed by values: torch.cat of the parts equals the whole"]
    return [
        line,
        "#   UNCONFIRMED: found from names and shapes only. Check the order of the parts,",
        "#   or rerun `ckptmigrate new ... --values` against a converted file to confirm it.",
    ]


_ESCAPES = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escaped(text: str) -> str:
    """``text`` in printable ASCII: quotes, backslashes and every other character escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


def _literal(text: str) -> str:
    """A Python string literal equal to ``text``, in printable ASCII on one line.

    Every string taken from a file (a key, an hparam path) reaches generated code this way, so
    a newline, ``\\r``, NUL, U+2028 or a quote in it stays inside the literal.
    """
    printable = all(0x20 <= ord(ch) < 0x7F for ch in text)
    if printable and "\\" in text and '"' not in text and not text.endswith("\\"):
        return f'r"{text}"'  # raw reads better for regexes, and is valid here
    return f'"{_escaped(text)}"'


_BARE = re.compile(r"[\w.\-/]+", re.ASCII)


def _text(text: str) -> str:
    """``text`` for a comment or docstring: bare when it is a plain name, else a literal."""
    return text if _BARE.fullmatch(text) else f'"{_escaped(text)}"'


def _value_text(value: object) -> str:
    """An hparam value for a comment: its ``ascii()`` repr, anything odd in it escaped."""
    return "".join(ch if 0x20 <= ord(ch) < 0x7F else _escaped(ch) for ch in ascii(value))


def _checked(code: str) -> str:
    """``code`` after checking it is printable ASCII, line by line, and parses.

    It is parsed, never run: a string from a file that escaped its literal would show here.
    """
    odd = [ch for ch in set(code) if ch != "\n" and not 0x20 <= ord(ch) < 0x7F]
    if odd:  # pragma: no cover - every interpolation goes through _literal/_text
        raise InternalError(f"generated code holds the characters {sorted(odd)!r}")
    ast.parse(code)
    return code


def _call(name: str, args: list[str]) -> list[str]:
    """``cm.ops.Name(args),`` on one line, or one argument per line when that is too long."""
    line = f"cm.ops.{name}({', '.join(args)}),"
    if len(line) <= 88:
        return [line]
    return [f"cm.ops.{name}("] + [f"    {arg}," for arg in args] + ["),"]


def _op_code(op: Op) -> list[str]:
    if isinstance(op, RenameKeys):
        args = [_literal(op.pattern), _literal(op.repl)]
        if op.reverse:
            args.append(f"reverse=({_literal(op.reverse[0])}, {_literal(op.reverse[1])})")
        return _call("RenameKeys", args)
    if isinstance(op, RenamePrefix):
        return _call("RenamePrefix", [_literal(op.old), _literal(op.new)])
    if isinstance(op, DropKeys):
        return _call("DropKeys", [_literal(op.pattern)])
    if isinstance(op, (Merge, Split)):
        many, one = (op.sources, op.target) if isinstance(op, Merge) else (op.targets, op.source)
        listed = "[" + ", ".join(_literal(k) for k in many) + "]"
        args = [listed, _literal(one)] if isinstance(op, Merge) else [_literal(one), listed]
        args.append(f"dim={op.dim}")
        if op.sizes is not None:
            args.append(f"sizes={list(op.sizes)}")
        return _call(type(op).__name__, args)
    raise InternalError(f"no code for {op!r}")  # pragma: no cover


_TODO_IMPORTS = "from collections.abc import Callable\nfrom typing import Any\n"

_TODO_HELPER = '''

def todo(what: str) -> Callable[[cm.Checkpoint], Any]:
    """A placeholder that fails the step, naming what is left to write."""

    def fail(ckpt: cm.Checkpoint) -> Any:
        raise NotImplementedError(f"TODO in {__file__}: {what}")

    return fail
'''


def generate_migration(
    d: Diff,
    old_keys: Sequence[str],
    schema: str,
    source: str,
    target: str,
    **options: Any,
) -> str:
    """Python source of a migration ``source -> target`` that covers the drift ``d``
    (:func:`build_migration`'s code; it takes the same options)."""
    return build_migration(d, old_keys, schema, source, target, **options).code


def build_migration(
    d: Diff,
    old_keys: Sequence[str],
    schema: str,
    source: str,
    target: str,
    *,
    fusions: Sequence[Fusion] = (),
    existing_origin: str | None = None,
    schema_variable: str = "schema",
    sources: tuple[str, str] | None = None,
) -> Draft:
    """A migration ``source -> target`` that covers the drift ``d``, and what it leaves to do.

    ``old_keys`` are every key of the old checkpoint: a generalised rename must leave the
    keys that did not change alone. ``fusions`` (from :func:`ckptmigrate.inspection.fusion.infer_fusions`
    on ``d.removed``/``d.added``) become ``Merge``/``Split`` ops instead of drops and adds.

    For a new schema it is a standalone module defining ``schema = cm.Schema(...)``; for one
    that exists (``existing_origin``: where it is defined, as ``schema_variable``) it is a
    snippet to paste there, since discovery refuses two different schemas with one name; it
    imports what it uses, so it runs where it is pasted.
    """
    renames = {r["from"]: r["to"] for r in d.renamed}
    rename_ops = infer_renames(old_keys, renames)
    after = [renames.get(k, k) for k in old_keys]
    fusion_ops = infer_fusion_ops(after, fusions)
    fused_old = {k for f in fusions for k in f.old_keys}
    fused_new = {k for f in fusions for k in f.new_keys}
    after = [k for k in after if k not in fused_old] + sorted(fused_new)
    drop_ops = infer_drops(after, [r["key"] for r in d.removed if r["key"] not in fused_old])
    added = [r for r in d.added if r["key"] not in fused_new]

    lines: list[str] = []
    if rename_ops:
        lines.append("# renamed: same shape and dtype, similar names (check the confidence)")
        for r in d.renamed:
            lines.append(f"#   {_text(r['from'])} -> {_text(r['to'])}  ({r['confidence']:.2f})")
        lines += [line for op in rename_ops for line in _op_code(op)]
    for op, group in fusion_ops:
        lines += _fusion_comment(group)
        lines += _op_code(op)
    if drop_ops:
        lines.append("# removed in the new version")
        lines += [line for op in drop_ops for line in _op_code(op)]
    if added:
        lines.append("# added in the new version: give each a value (a tensor or a function)")
        for r in added:
            what = f"a value for {ascii(r['key'])}: shape {r['shape']}, {r['dtype']}"
            lines += _call("AddKey", [_literal(r["key"]), f"todo({_literal(what)})"])
    todos = len(added)
    for c in d.dtype_changed:
        if c["key"] not in {s["key"] for s in d.shape_changed}:
            args = [_literal(c["key"]), _literal(c["b"]), f"from_dtype={_literal(c['a'])}"]
            lines += _call("Cast", args)
    manual = [f"shape of {ascii(c['key'])}: {c['a']} -> {c['b']}" for c in d.shape_changed]
    manual += [
        f"hparam {_text(h['path'])}: {_value_text(h['a'])} -> {_value_text(h['b'])} ({h['change']})"
        for h in d.hparams
    ]
    if manual:
        lines.append("# TODO: not inferable, write these (cm.ops.Reshape/Transpose/Split/Merge,")
        lines.append(
            "# cm.ops.SetHparam(name, old_default, overwrite=False, previous=cm.ops.ABSENT)"
        )
        lines.append("# to pin an old default, or a function), then delete the todo below:")
        lines += [f"#   {m}" for m in manual]
        summary = "; ".join(manual)
        if len(summary) > 300:
            summary = summary[:300] + f"... ({len(manual)} items, see the comments above)"
        lines += _call("Call", [f"todo({_literal(summary)})"])
        todos += 1

    when = _dt.date.today().isoformat()
    origin = f" from {_text(sources[0])} and {_text(sources[1])}" if sources else ""
    title = f"{_text(schema)} {_text(source)} -> {_text(target)}"
    body = "".join(f"        {line}\n" for line in lines or ["# no drift"])
    step = (
        f"{schema_variable}.add_migration(\n    {_literal(source)},\n    {_literal(target)},\n"
        f"    [\n{body}    ],\n)\n"
    )
    needs_todo = todos > 0
    helper = _TODO_HELPER if needs_todo else ""
    imports = _TODO_IMPORTS + "\n" if needs_todo else ""
    unfinished = (
        "What could not be inferred fails the step (see todo) until it is written.\n"
        if needs_todo
        else ""
    )
    if existing_origin is not None:
        code = (
            f"# {title}, generated by `ckptmigrate new`{origin} on {when}.\n"
            f"# Paste into {_text(existing_origin)} beside the other steps, and raise the\n"
            f"# schema's current= to {_text(target)}. Review the inferred ops before relying on"
            " them.\n"
            f"{imports}import ckptmigrate as cm\n"
            f"{helper}\n\n{step}"
        )
    else:
        code = (
            f'"""{title}, generated by `ckptmigrate new`{origin} on {when}.\n\n'
            "Review it: renames and drops were inferred from key names and shapes.\n"
            f'{unfinished}"""\n\n'
            f"{imports}import ckptmigrate as cm\n\n"
            f"schema = cm.Schema({_literal(schema)}, current={_literal(target)})\n"
            f"{helper}\n\n{step}"
        )
    unconfirmed = sum(1 for _, group in fusion_ops if not all(f.confirmed for f in group))
    return Draft(_checked(code), todos, unconfirmed)


# -- from files ---------------------------------------------------------------------------------


@dataclass
class Draft:
    """A generated migration: its source, and what is left for a person to do."""

    code: str
    todos: int  # placeholders that fail the step until written
    unconfirmed: int  # Merge/Split ops found from names and shapes only


def model_target(schema: Schema, hparams: Mapping[str, Any], *, path: object = None) -> Checkpoint:
    """What ``schema.build(hparams)`` makes today, as a checkpoint (keys, shapes, dtypes).

    The hparams are carried over unchanged: a model has no hparams of its own to compare.
    """
    try:
        model = schema.build(dict(hparams))
    except Exception as exc:
        raise ModelBuildError(schema.name, exc, path=path) from exc
    return Checkpoint(dict(model.state_dict()), hparams=dict(hparams), schema=schema.name)


def draft_migration(
    old: str | os.PathLike[str],
    new: str | os.PathLike[str] | Schema,
    schema: str,
    source: str,
    target: str,
    *,
    values: bool = False,
    allowed_globals: Iterable[str] = (),
    existing: Schema | None = None,
) -> Draft:
    """The migration ``source -> target`` from file ``old`` to file ``new``, or to what the
    schema ``new`` builds today from ``old``'s hparams (as Alembic compares with the models).

    ``values=True`` reads the tensors: equal values confirm renames, merges and splits.
    ``existing``: the discovered schema of that name, for which a snippet is written instead
    of a module.

    >>> draft = draft_migration("v1.pth", "v2.pth", "tinylm", "1.0.0", "2.0.0")
    >>> print(draft.code)
    """
    from ..io import files

    allowed = list(allowed_globals)

    def read(path: str | os.PathLike[str]) -> Checkpoint:
        if values:
            return files.read_checkpoint(path, mmap=True, safe_globals=allowed)
        return files.read_metadata(path, allowed_globals=allowed)

    if values and isinstance(new, Schema):
        raise UsageError("values=True compares two files' tensors; a built model has fresh ones")
    old_ckpt = read(old)
    new_ckpt = (
        model_target(new, old_ckpt.hparams, path=old) if isinstance(new, Schema) else read(new)
    )
    d = diff(old_ckpt, new_ckpt, values=values)
    removed = {r["key"]: (r["shape"], r["dtype"]) for r in d.removed}
    added = {r["key"]: (r["shape"], r["dtype"]) for r in d.added}
    tensors = (old_ckpt.state_dict, new_ckpt.state_dict) if values else None
    fusions = infer_fusions(removed, added, tensors=tensors)
    to_label = f"what {new.name}.build makes" if isinstance(new, Schema) else os.fspath(new)
    return build_migration(
        d,
        list(old_ckpt.state_dict),
        schema,
        source,
        target,
        fusions=fusions,
        existing_origin=(existing.origin or "its module") if existing is not None else None,
        schema_variable=schema_variable(existing) if existing is not None else "schema",
        sources=(os.fspath(old), to_label),
    )


def schema_variable(schema: Schema) -> str:
    """The name its module binds ``schema`` to (``schema`` when none is found)."""
    for module in list(sys.modules.values()):
        if schema.origin is None or getattr(module, "__file__", None) != schema.origin:
            continue
        for name, value in vars(module).items():
            if value is schema and name.isidentifier() and not keyword.iskeyword(name):
                return name
    return "schema"
