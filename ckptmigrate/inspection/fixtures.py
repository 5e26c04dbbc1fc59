"""Legacy fixtures: old checkpoints with the golden outputs their own code produced.

A fixture is a checkpoint file written by an earlier version of the model code, with a golden
record beside it, ``<stem>.golden.pt``: a ``torch.save`` dict holding ``fixture`` (the file
name), ``schema``, ``version``, ``variant``, ``input``, ``output``, ``atol``, ``rtol`` and the
old code's ``hparams``. Checking a fixture proves the migration chain end to end: it upgrades to
the current version, loads with ``strict=True`` into the model built from the migrated hparams,
and reproduces the golden output.

A fixture whose stamp has mounts (a Lightning checkpoint with the model at ``net.``) has every
mount upgraded with its own schema; the model of the record's ``schema`` loads its mount's view
(keys without the prefix, the mount's hparams). The record's optional ``prefix`` names that
mount when several hold the schema.

A *resume* fixture also holds optimizer state, and its record a ``resume`` entry: the
``batches`` the old code trained on next and the ``losses`` it computed (``atol``/``rtol``
optional). Checking it also builds today's optimizer with the schema's ``optimizer(model)``,
loads the migrated optimizer state into it, runs the schema's ``train_step`` on each batch and
compares the losses: it fails when the optimizer state was lost or misplaced on the way.

>>> results = check_fixtures("fixtures", find_schemas(["migrations"]))
>>> [r.reason for r in results if not r.ok]
[]
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..errors import CkptMigrateError, PathNotFoundError
from ..io.golden import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    GOLDEN_SUFFIX,
    REQUIRED_KEYS,
    Fixture,
    find_fixtures,
    fixture_from_golden,
    golden_paths,
    one_line,
    read_golden,
)
from ..schema.schema import Schema
from ..values.checkpoint import Checkpoint

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "GOLDEN_SUFFIX",
    "REQUIRED_KEYS",
    "Fixture",
    "FixtureResult",
    "ProgressCallback",
    "check_fixture",
    "check_fixtures",
    "check_resume",
    "compare_outputs",
    "find_fixtures",
    "fixture_from_golden",
    "golden_paths",
    "load_fixture",
    "read_golden",
]


@dataclass(frozen=True)
class FixtureResult:
    """What checking one fixture found; ``reason`` says in one line why it failed."""

    fixture: Fixture
    steps_applied: int = 0
    max_abs_error: float | None = None
    ok: bool = False
    reason: str | None = None
    #: for resume fixtures: the largest loss difference from the old code's next steps
    resume_max_abs_error: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """The row ``ckptmigrate check --json`` prints for this fixture."""
        return {
            "schema": self.fixture.schema,
            "version": self.fixture.version,
            "variant": self.fixture.variant,
            "path": str(self.fixture.path),
            "steps_applied": self.steps_applied,
            "max_abs_error": self.max_abs_error,
            "ok": self.ok,
            "reason": self.reason,
        }


ProgressCallback = Callable[[int, int, FixtureResult], None]


def load_fixture(
    fixture: Fixture,
    schema: Schema,
    *,
    to: str | None = None,
    upgrade: bool = True,
    safe_globals: Iterable[Any] = (),
) -> Checkpoint:
    """Read a fixture and upgrade it (to ``schema.current`` unless ``to``).

    An unstamped file takes its version from the golden record, and its hparams too (a legacy
    file carries none; the record holds what the old code was built with).
    """
    from ..engine import api
    from ..engine.upgrade import upgrade as run_upgrade

    allowed = list(safe_globals)
    stored = api.load(fixture.path, schema=schema, upgrade=False, safe_globals=allowed)
    if stored.mounts or fixture.prefix:
        _check_mount_version(fixture, stored)
        return run_upgrade(stored, schema, to=to, origin=fixture.path) if upgrade else stored
    if stored.version is None:
        stored = api.load(
            fixture.path,
            schema=schema,
            upgrade=False,
            from_version=fixture.version,
            safe_globals=allowed,
        )
    elif str(stored.version) != fixture.version:
        raise CkptMigrateError(
            f"{fixture.path} is stamped {stored.schema} {stored.version}, but its golden record "
            f"says version {fixture.version}: one of the two is wrong"
        )
    if not stored.hparams:
        hparams = read_golden(fixture.golden_path).get("hparams") or {}
        stored = replace(stored, hparams=dict(hparams))
    if not upgrade:
        return stored
    return run_upgrade(stored, schema, to=to, origin=fixture.path)


def _check_mount_version(fixture: Fixture, stored: Checkpoint) -> None:
    from ..engine.mounts import model_view

    view = model_view(stored, fixture.schema, fixture.prefix)
    if str(view.version) != fixture.version:
        at = f" at {fixture.prefix!r}" if fixture.prefix else ""
        raise CkptMigrateError(
            f"{fixture.path} mounts {fixture.schema}{at} at version {view.version}, but its "
            f"golden record says version {fixture.version}: one of the two is wrong"
        )


def check_fixture(
    fixture: Fixture, schemas: Mapping[str, Schema], *, safe_globals: Iterable[Any] = ()
) -> FixtureResult:
    """Upgrade, build, load strictly and run one fixture; a failure is a result, not a raise.

    ``safe_globals`` lets trusted classes in the fixture's pickle through the safe loader.

    >>> check_fixture(find_fixtures("fixtures")[0], schemas).ok
    True
    """
    from ..errors import UnknownSchemaError
    from ..schema.registry import get_schema

    try:
        schema = get_schema(fixture.schema, schemas)
    except UnknownSchemaError as exc:
        return FixtureResult(fixture, reason=exc.render(cli=True))
    from ..engine.mounts import model_view, upgrade_every_mount
    from ..engine.upgrade import upgrade as run_upgrade
    from ..io.report import load_report

    steps = 0
    stage = "reading the golden record"
    try:
        golden = read_golden(fixture.golden_path)
        stage = "loading"
        stored = load_fixture(fixture, schema, upgrade=False, safe_globals=safe_globals)
        stage = "upgrading"
        if stored.mounts:  # every mount, each with its schema; the model loads its own
            every = upgrade_every_mount(stored, schemas, origin=fixture.path)
            upgraded = model_view(every, schema.name, fixture.prefix)
            stored = model_view(stored, schema.name, fixture.prefix)
        else:
            upgraded = run_upgrade(stored, schema, origin=fixture.path)
        steps = len(upgraded.history) - len(stored.history)
        stage = "building the model from the migrated hparams"
        model = schema.build(upgraded.hparams)
        stage = "load_state_dict(strict=True)"
        report = load_report(model, upgraded.state_dict, upgraded.module_metadata)
        if not report.clean_for_strict:
            return FixtureResult(fixture, steps, reason=f"{stage} would fail: {report.summary()}")
        model.load_state_dict(upgraded.state_dict_for_torch(), strict=True)
        stage = "running the golden input"
        output = _run(model, golden["input"])
    except Exception as exc:
        return FixtureResult(fixture, steps, reason=f"{stage}: {_describe(exc)}")
    error, problem = compare_outputs(output, golden["output"], fixture.atol, fixture.rtol)
    if problem is not None or "resume" not in golden:
        return FixtureResult(fixture, steps, error, ok=problem is None, reason=problem)
    try:
        resume_error, problem = check_resume(schema, model, upgraded, golden["resume"])
    except Exception as exc:
        return FixtureResult(fixture, steps, error, reason=f"resuming training: {_describe(exc)}")
    return FixtureResult(fixture, steps, error, problem is None, problem, resume_error)


def check_resume(
    schema: Schema, model: Any, upgraded: Checkpoint, record: Mapping[str, Any]
) -> tuple[float | None, str | None]:
    """Resume training ``model`` (loaded from ``upgraded``) and compare the next losses.

    Builds the optimizer with ``schema.optimizer(model)``, loads ``upgraded.optimizer`` into
    it and runs ``schema.train_step(model, optimizer, batch)`` on each recorded batch. Returns
    the largest loss difference and why the losses differ (None when within tolerance).
    """
    import torch

    if schema.optimizer is None or schema.train_step is None:
        return None, (
            f"the fixture records resumed training, but schema {schema.name!r} does not say how "
            "to train: pass optimizer=lambda model: ... and train_step=(model, optimizer, batch) "
            "-> loss to its Schema"
        )
    state = upgraded.optimizer
    if isinstance(state, list) and len(state) == 1:
        state = state[0]  # Lightning's optimizer_states
    if state is None:
        return None, "the fixture records resumed training, but its file holds no optimizer state"
    optimizer = schema.optimizer(model)
    optimizer.load_state_dict(state)
    want = torch.as_tensor(record["losses"], dtype=torch.float64)
    got = torch.tensor(
        [float(schema.train_step(model, optimizer, batch)) for batch in record["batches"]],
        dtype=torch.float64,
    )
    atol = float(record.get("atol", DEFAULT_ATOL))
    rtol = float(record.get("rtol", DEFAULT_RTOL))
    diff = (got - want).abs()
    worst = float(diff.max()) if diff.numel() else 0.0
    bad = (diff > atol + rtol * want.abs()).nonzero()
    if len(bad):
        i = int(bad[0])
        return worst, (
            f"resumed training differs from the old code at step {i + 1} of {len(want)}: loss "
            f"{float(got[i]):.6g}, the old code's {float(want[i]):.6g} (allowed: atol {atol:g} + "
            f"rtol {rtol:g} * |loss|); was the optimizer state migrated with the weights?"
        )
    return worst, None


def check_fixtures(
    root: str | os.PathLike[str],
    schemas: Mapping[str, Schema],
    *,
    progress: ProgressCallback | None = None,
    safe_globals: Iterable[Any] = (),
) -> list[FixtureResult]:
    """Check every fixture under ``root``; ``progress(done, total, result)`` after each one.

    A golden record that cannot be read fails its own fixture (a result with the reason);
    the others are still checked. A ``root`` behind a URL (``s3://bucket/fixtures``) is
    copied into a private temporary folder first (a check reads every byte of every
    fixture), and its results name the objects by their URLs.
    """
    from ..formats.remote import RemotePath, location

    where = location(root)
    if isinstance(where, RemotePath):
        return _check_remote(where, schemas, progress, list(safe_globals))
    goldens = golden_paths(root)
    allowed = list(safe_globals)
    results = []
    for i, golden in enumerate(goldens, start=1):
        try:
            fixture = fixture_from_golden(golden)
        except CkptMigrateError as exc:
            results.append(_unreadable(golden, exc))
        else:
            results.append(check_fixture(fixture, schemas, safe_globals=allowed))
        if progress is not None:
            progress(i, len(goldens), results[-1])
    return results


def _check_remote(
    root: Any,
    schemas: Mapping[str, Schema],
    progress: ProgressCallback | None,
    safe_globals: list[Any],
) -> list[FixtureResult]:
    """:func:`check_fixtures` of the objects under the URL ``root`` (a folder, or one golden
    record and the objects beside it), on a private copy of them."""
    from ..formats.remote import downloaded

    folder = root if root.is_dir() else root.parent
    if not (root.is_dir() or (root.is_file() and root.name.endswith(GOLDEN_SUFFIX))):
        raise PathNotFoundError(
            root, "fixtures folder", f"the folder that holds the *{GOLDEN_SUFFIX} golden records"
        )
    objects = list(folder.rglob("*"))
    with downloaded(folder, objects) as local:
        local_root = local if root == folder else local / root.name
        results = check_fixtures(local_root, schemas, progress=progress, safe_globals=safe_globals)

    def remote(path: Path) -> Any:
        return folder / path.relative_to(local).as_posix()

    return [
        replace(
            r,
            fixture=replace(
                r.fixture, path=remote(r.fixture.path), golden_path=remote(r.fixture.golden_path)
            ),
            reason=None if r.reason is None else r.reason.replace(str(local), str(folder)),
        )
        for r in results
    ]


def _unreadable(golden: Path, exc: CkptMigrateError) -> FixtureResult:
    """The failed result of a golden record that does not say which fixture it is."""
    fixture = Fixture(path=golden, golden_path=golden, schema="?", version="?")
    return FixtureResult(fixture, reason=f"unreadable golden record: {one_line(exc)}")


def compare_outputs(
    output: Any, golden: Any, atol: float, rtol: float
) -> tuple[float | None, str | None]:
    """Largest absolute difference, and why the outputs differ (None when within tolerance).

    Tensors are compared like ``torch.allclose``; tuples, lists and dicts element by element.
    """
    import torch

    pairs: list[tuple[str, Any, Any]] = []
    problem = _pair_up("output", output, golden, pairs)
    if problem:
        return None, problem
    worst: float | None = None
    for where, got, want in pairs:
        if not isinstance(got, torch.Tensor):
            if got != want:
                return worst, f"{where} is {got!r}, the golden one {want!r}"
            continue
        if got.shape != want.shape:
            return (
                worst,
                f"{where} has shape {tuple(got.shape)}, the golden one {tuple(want.shape)}",
            )
        got, want = got.detach().double().cpu(), want.detach().double().cpu()
        diff = (got - want).abs()
        error = float(diff.max()) if diff.numel() else 0.0
        worst = error if worst is None else max(worst, error)
        if not torch.allclose(got, want, atol=atol, rtol=rtol, equal_nan=True):
            return worst, (
                f"{where} differs from the golden output: max abs error {error:.3g} "
                f"(allowed: atol {atol:g} + rtol {rtol:g} * |golden|)"
            )
    return worst, None


def _pair_up(where: str, got: Any, want: Any, out: list[tuple[str, Any, Any]]) -> str | None:
    if isinstance(want, (tuple, list)):
        if not isinstance(got, (tuple, list)) or len(got) != len(want):
            return f"{where} is a {type(got).__name__}, the golden one a {len(want)}-sequence"
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            problem = _pair_up(f"{where}[{i}]", g, w, out)
            if problem:
                return problem
        return None
    if isinstance(want, Mapping):
        if not isinstance(got, Mapping) or set(got) != set(want):
            found = sorted(got) if isinstance(got, Mapping) else type(got).__name__
            return f"{where} has keys {found}, the golden one {sorted(want)}"
        for key in want:
            problem = _pair_up(f"{where}[{key!r}]", got[key], want[key], out)
            if problem:
                return problem
        return None
    out.append((where, got, want))
    return None


def _run(model: Any, golden_input: Any) -> Any:
    """Eval mode, no grad; a tuple/list input is positional arguments, a dict keywords."""
    import torch

    model.eval()
    with torch.no_grad():
        if isinstance(golden_input, (tuple, list)):
            return model(*golden_input)
        if isinstance(golden_input, Mapping):
            return model(**golden_input)
        return model(golden_input)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc)}"
