"""The digest of the code a step runs: what a history entry records, so an edited step shows.

A digest is a small dict, ``{"of": ..., "sha256": ...}``, saying what was hashed:

- ``"ops"``: the canonical JSON of the ops that ran (:func:`~ckptmigrate.schema.ops.data.op_data`;
  an op that is not data, such as ``Call``, by its function's digest);
- ``"source"``: a function's source, read with :func:`inspect.getsource` and normalised through
  its syntax tree, so comments, formatting, the docstring and the decorator do not count;
- ``"bytecode"`` (with ``"python"``, the interpreter it was compiled by): a function with no
  source to read (made by ``exec``, typed in a REPL); bytecode differs between Python
  versions, so such digests are compared only when both name the same interpreter.

Two digests are compared only when they say they hashed the same thing (:func:`same_code`).
A digest covers the step's own code, not the helpers it calls. An op of a project's own class
computes in that class (its ``transform``), so an ops digest also carries ``"classes"``: the
normalised source of each op class (and its bases) defined outside ckptmigrate. A class with no
source to read (made by ``exec``) is covered by its data alone.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from ..errors import OpDataError
from .ops import Op
from .ops.data import op_data, op_name

__all__ = ["function_digest", "ops_digest", "same_code"]


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def ops_digest(ops: Sequence[Op]) -> dict[str, str]:
    """The digest of a list of ops, from their data, and from the source of the op classes a
    project defines (``"classes"``, when there are any)."""
    canonical = json.dumps(
        [_op_fingerprint(op) for op in ops], sort_keys=True, separators=(",", ":"), default=str
    )
    digest = {"of": "ops", "sha256": _sha256(canonical)}
    classes = _project_classes_text(ops)
    if classes is not None:
        digest["classes"] = _sha256(classes)
    return digest


def _project_classes_text(ops: Sequence[Op]) -> str | None:
    """The normalised source of each op class (and base) of ``ops`` defined outside
    ckptmigrate, in order of first use; None when there is none."""
    package = __name__.split(".")[0]
    seen: dict[type, str] = {}
    for op in ops:
        for cls in type(op).__mro__:
            module = getattr(cls, "__module__", "") or ""
            if cls in seen or module == "builtins" or module.split(".")[0] == package:
                continue
            text = _source_text(cls)
            if text is not None:
                seen[cls] = f"{cls.__qualname__}:{text}"
    return "\n".join(seen.values()) if seen else None


def function_digest(*fns: Callable[..., Any] | None) -> dict[str, str]:
    """The digest of one or more functions (a step's function and its optimizer-state hook),
    from their source; from their bytecode when one has no source (then ``"python"`` says
    which interpreter)."""
    texts = []
    bytecode = False
    for fn in fns:
        if fn is None:
            texts.append("-")
            continue
        source = _source_text(fn)
        if source is None:
            bytecode = True
            source = _code_text(fn)
        texts.append(source)
    if bytecode:
        return {"of": "bytecode", "python": _interpreter(), "sha256": _sha256("\n".join(texts))}
    return {"of": "source", "sha256": _sha256("\n".join(texts))}


def same_code(recorded: Any, today: dict[str, str]) -> bool | None:
    """Whether a recorded digest matches today's; None when they cannot be compared: none was
    recorded (or a malformed one), or one hashed bytecode and the other did not hash the same
    interpreter's bytecode. Ops against a function's source is a change (the step was
    rewritten). The source of a project's op classes (``"classes"``) counts when both record
    it (a digest written before it was recorded is judged by its ops' data)."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return None
    if "bytecode" in (recorded.get("of"), today.get("of")):
        if recorded.get("of") != today.get("of") or recorded.get("python") != today.get("python"):
            return None
    elif recorded.get("of") not in ("ops", "source"):
        return None  # a kind this ckptmigrate does not know
    if recorded.get("of") != today.get("of") or recorded["sha256"] != today["sha256"]:
        return False
    classes = recorded.get("classes"), today.get("classes")
    return not (all(isinstance(c, str) for c in classes) and classes[0] != classes[1])


def _op_fingerprint(op: Op) -> Any:
    """An op as data; one that is not (it holds a function or a tensor) field by field, its
    functions by their digest and its tensors by their bytes."""
    try:
        return op_data(op)
    except OpDataError:
        pass
    from dataclasses import fields, is_dataclass

    if not is_dataclass(op):
        return {"op": op_name(type(op)), "repr": repr(op)}
    return {
        "op": op_name(type(op)),
        "args": {f.name: _value_fingerprint(getattr(op, f.name)) for f in fields(op) if f.init},
    }


def _value_fingerprint(value: Any) -> Any:
    if callable(value):
        return {"function": function_digest(value)}
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
        return {"tensor": [str(t.dtype), list(t.shape), hashlib.sha256(raw).hexdigest()]}
    if isinstance(value, (list, tuple)):
        return [_value_fingerprint(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _value_fingerprint(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"object": f"{type(value).__module__}.{type(value).__qualname__}"}


def _source_text(fn: Callable[..., Any]) -> str | None:
    """``fn``'s source, normalised: its syntax tree without decorators or docstring, written
    the same way by every Python 3 version (empty fields left out); None without source."""
    target = inspect.unwrap(fn) if callable(fn) else fn
    try:
        source = inspect.getsource(target)
    except (OSError, TypeError):
        return None
    try:
        tree = ast.parse(textwrap.dedent(source))
    except SyntaxError:  # a lambda cut out of a larger expression: its lines as they are
        return "\n".join(line.strip() for line in source.strip().splitlines())
    node: ast.AST = tree
    lambdas = [n for n in ast.walk(tree) if isinstance(n, ast.Lambda)]
    if tree.body and isinstance(tree.body[0], ast.ClassDef):
        node = tree.body[0]  # its decorators stay: ``@dataclass`` makes the fields
        _drop_docstring(node)
    elif tree.body and isinstance(tree.body[0], (ast.FunctionDef, ast.AsyncFunctionDef)):
        node = tree.body[0]
        node.decorator_list = []
        _drop_docstring(node)
    elif getattr(target, "__name__", "") == "<lambda>" and len(lambdas) == 1:
        node = lambdas[0]
    return _tree_text(node)


def _drop_docstring(node: ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) -> None:
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]


def _tree_text(node: Any) -> str:
    """A syntax tree as text, independent of the Python version's ``ast.dump`` defaults."""
    if isinstance(node, ast.AST):
        parts = []
        for name, value in ast.iter_fields(node):
            if value is None or value == []:
                continue  # fields that newer Pythons add empty (type_params) do not count
            parts.append(f"{name}={_tree_text(value)}")
        return f"{type(node).__name__}({', '.join(parts)})"
    if isinstance(node, list):
        return "[" + ", ".join(_tree_text(v) for v in node) + "]"
    return repr(node)


def _code_text(fn: Callable[..., Any]) -> str:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    if code is None:  # a callable object: by its class
        return f"{type(fn).__module__}.{type(fn).__qualname__}"
    return _code_object_text(code)


def _code_object_text(code: Any) -> str:
    consts = [_code_object_text(c) if inspect.iscode(c) else repr(c) for c in code.co_consts]
    return repr((code.co_code.hex(), consts, code.co_names))


def _interpreter() -> str:
    return f"{sys.implementation.name}-{sys.version_info.major}.{sys.version_info.minor}"
