"""The ``ckptmigrate`` command line: one thin function per command, each calling the library.

A command computes nothing about checkpoints itself: it calls the library for a record
(:mod:`ckptmigrate.inspection.info`, :func:`ckptmigrate.inspection.diff.diff`, :func:`ckptmigrate.inspection.scan.scan`, ...),
hands it to a renderer of :mod:`ckptmigrate.render` (or prints it as JSON), and returns the
exit code.

Heavy modules (torch, rich, deepdiff, the user's migrations) are imported inside the commands
that need them, so ``--help``, ``diff`` without ``--values``/``--upgrade`` and ``info`` on an
unstamped file start fast and never import torch.

Exit codes: 0 success (no drift), 1 drift (``diff``) or a failing fixture (``check``), 2 trouble,
reported as one line ``ckptmigrate: error: ...`` on stderr (a traceback only with ``--debug``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from .base.readable import path_text
from .errors import CommandLineError
from .render import (
    error_line,
    render_check,
    render_diff_plain,
    render_diff_rich,
    render_history,
    render_info_plain,
    render_info_rich,
    render_model_diff_plain,
    render_scan,
    render_schema_list,
    render_weights_list,
)
from .terminal import Output, printable_output, progress_bar, styled
from .terminal import console as _console
from .terminal import is_terminal as _is_terminal

# the read-plan-write sequence, and the lock around in-place rewrites, live in the library

if TYPE_CHECKING:
    from .engine.rewrite import Rewrite
    from .schema.schema import Schema
    from .values.checkpoint import Checkpoint

PROG = "ckptmigrate"
EXIT_OK, EXIT_DRIFT, EXIT_TROUBLE = 0, 1, 2


def _print_json(value: Any, **options: Any) -> None:
    import json  # only --json pays for it

    print(json.dumps(value, **options))


# -- diff --------------------------------------------------------------------------------------


def cmd_diff_model(args: argparse.Namespace) -> int:
    """``diff CKPT --model SCHEMA``: what a strict load into today's model would say."""
    from .inspection.diff import diff_model

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
    else:
        render_model_diff_plain(result, print)
    return EXIT_DRIFT if result.has_drift else EXIT_OK


def cmd_diff(args: argparse.Namespace) -> int:
    from .inspection.diff import diff

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


def cmd_info(args: argparse.Namespace) -> int:
    from .inspection.info import edited_history, info_record, unloaded_migrations

    info = info_record(
        args.ckpt,
        schemas=lambda: _schemas(args),
        allowed_globals=args.allow_global,
        keys=args.keys,
    )
    for error in unloaded_migrations(info):
        print(f"{PROG}: warning: migrations not loaded: {error}", file=sys.stderr)
    for warning in edited_history(info):
        print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if args.json:
        _print_json(info, indent=2, allow_nan=False)
    elif _is_terminal(sys.stdout):
        render_info_rich(info, _console())
    else:
        render_info_plain(info, print)
    return EXIT_OK


# -- upgrade -----------------------------------------------------------------------------------


def _refuse_output_onto_source(src: str, dst: str | None, why: str) -> None:
    """``-o SRC`` would rewrite the source with no lock or recovery: refused, naming
    ``--in-place`` (``why`` says what it does instead)."""
    if dst is not None and _same_checkpoint(src, dst):
        raise CommandLineError(f"-o {dst} is {src} itself: pass --in-place instead ({why})")


def _same_checkpoint(src: str, dst: str) -> bool:
    """Whether ``dst`` names ``src`` (the same file, folder, or a set's index and its folder)."""
    from .formats.remote import is_remote, location

    if is_remote(src) or is_remote(dst):
        a, b = (location(p) for p in (src, dst))
        return a == b
    try:
        if os.path.samefile(src, dst):
            return True
    except OSError:
        return False
    a, b = Path(src).resolve(), Path(dst).resolve()
    index = a if a.name.endswith(".index.json") else b if b.name.endswith(".index.json") else None
    return index is not None and {a, b} == {index, index.parent}  # a set: index and folder


def cmd_upgrade(args: argparse.Namespace) -> int:
    from .engine.adapters import is_adapter_folder

    if args.in_place and (args.adapter or is_adapter_folder(args.src)):
        raise CommandLineError(
            f"{args.src} is a PEFT adapter, upgraded into a new folder: pass -o NEWDIR, not "
            "--in-place"
        )
    if (args.output is None) == (not args.in_place):
        raise CommandLineError("upgrade needs exactly one of -o DST or --in-place")
    if args.no_backup and not args.in_place:
        raise CommandLineError("--no-backup only applies to --in-place")
    out = Output()
    if args.adapter or is_adapter_folder(args.src):
        return _upgrade_adapter(args, out)
    _refuse_output_onto_source(
        args.src, args.output, "it locks the checkpoint and keeps a backup of the old version"
    )

    from .engine.inplace import migrate_file

    schemas = _schemas(args)
    show_plan = _plan_printer(args, out)
    with progress_bar("upgrading") as progress:
        outcome = migrate_file(
            args.src,
            None if args.in_place else args.output,
            schemas=schemas,
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


def _plan_printer(args: argparse.Namespace, out: Output) -> Any:
    """What ``upgrade`` prints once the plan is known: the steps, or that SRC is current."""

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

    return show_plan


def _upgrade_adapter(args: argparse.Namespace, out: Output) -> int:
    """``upgrade ADAPTER_DIR -o NEWDIR``: the adapter follows its base schema's plan."""
    from .engine.adapters import adapter_schema, upgrade_adapter

    schema = adapter_schema(args.src, _schemas(args), args.schema)
    outcome = upgrade_adapter(
        args.src,
        schema,
        out=args.output,
        to=args.to,
        from_version=args.from_version,
        dry_run=args.dry_run,
        on_plan=_plan_printer(args, out),
    )
    if args.dry_run:
        out.line(styled("dry run: nothing written", "dry run"))
    elif outcome.written:
        out.line(styled("wrote", "ok"), f" {outcome.written}")
    return EXIT_OK


def _param_names(args: argparse.Namespace) -> list[str] | None:
    """``--param-names FILE``: one parameter name a line, in the optimizer's order."""
    if args.param_names is None:
        return None
    from .engine.positions import read_param_names

    return read_param_names(args.param_names)


# -- scan --------------------------------------------------------------------------------------


def cmd_scan(args: argparse.Namespace) -> int:
    from .formats.torch import with_redirects
    from .inspection.scan import scan
    from .schema.schema import redirects_of

    schemas = _schemas(args)
    options: dict[str, Any] = {
        "workers": args.workers,
        "processes": None if args.threads is None else not args.threads,
        "allowed_globals": with_redirects(args.allow_global, redirects_of(schemas)),
    }
    recorded = None
    with progress_bar("scanning") as progress:
        if args.catalog is None:
            rows = scan(args.dir, schemas, progress=progress, **options)
        else:
            from .inspection.catalog import open_catalog, scan_into

            with open_catalog(args.catalog) as catalog:
                recorded = scan_into(catalog, args.dir, schemas, progress=progress, **options)
            rows = recorded.rows
    if recorded is not None:
        print(
            f"{PROG}: catalog {args.catalog}: {recorded.read} read, {recorded.unchanged} "
            f"unchanged (not read), {recorded.removed} removed",
            file=sys.stderr,
        )
    behind = any(r.behind for r in rows)
    if args.json:
        _print_json([r.to_dict() for r in rows], indent=2)
    else:
        render_scan(rows, Output())
    return EXIT_DRIFT if args.fail_behind and behind else EXIT_OK


def _positive_count(text: str) -> int:
    """An argument that counts something done at once: a whole number, 1 or more."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number, 1 or more; got {text!r}")
    return value


def cmd_catalog(args: argparse.Namespace) -> int:
    from .inspection.catalog import open_catalog, query

    if (args.min or args.max) and not args.best:
        raise CommandLineError("--min and --max say how --best METRIC ranks: pass --best too")
    if args.version and not args.schema:
        raise CommandLineError("--version needs --schema: a version is one schema's")
    behind = True if args.behind else False if args.current else None
    with open_catalog(args.db) as catalog:
        rows = query(
            catalog,
            schemas=_schemas(args),
            schema=args.schema,
            version=args.version,
            behind=behind,
            best=args.best,
            maximize=args.max,
        )
    if args.json:
        _print_json([r.to_dict() for r in rows], indent=2, allow_nan=False)
    else:
        render_scan(rows, Output())
    return EXIT_OK


# -- history -----------------------------------------------------------------------------------


def cmd_history(args: argparse.Namespace) -> int:
    from .inspection.info import history_record
    from .schema.registry import get_schema

    schemas = _schemas(args)
    if args.schema is None:
        return _list_schemas(schemas, args)
    record = history_record(get_schema(args.schema, schemas))
    if args.json:
        _print_json(record, indent=2)
    else:
        render_history(record, Output())
    return EXIT_OK


def _list_schemas(schemas: dict[str, Schema], args: argparse.Namespace) -> int:
    from .inspection.info import schema_list_record

    record = schema_list_record(schemas)
    if args.json:
        _print_json(record, indent=2)
        return EXIT_OK
    if not record:
        print(
            f"{PROG}: warning: no schemas discovered: pass --migrations PATH, or list them in "
            "[tool.ckptmigrate] migrations in pyproject.toml",
            file=sys.stderr,
        )
    render_schema_list(record, Output())
    return EXIT_OK


# -- check -------------------------------------------------------------------------------------


def cmd_check(args: argparse.Namespace) -> int:
    from .inspection.fixtures import check_fixtures
    from .schema.registry import fixtures_folders

    schemas = _schemas(args)
    if args.weights is not None:
        from .inspection.weights import check_weights

        root = args.weights
        which = None if args.weights == _EVERY else args.weights
        results = check_weights(schemas, which, safe_globals=args.allow_global)
    else:
        root = args.dir or fixtures_folders()[0]
        with progress_bar("checking fixtures") as progress:
            results = check_fixtures(
                root, schemas, progress=progress, safe_globals=args.allow_global
            )
    rows = [r.to_dict() for r in results]
    failed = sum(1 for r in results if not r.ok)
    if args.json:
        _print_json({"root": path_text(root), "fixtures": rows, "failed": failed}, indent=2)
        return EXIT_DRIFT if failed else EXIT_OK
    if not rows:
        where = (
            "named weights with a golden record"
            if args.weights
            else (f"fixtures under {path_text(root)}")
        )
        print(f"{PROG}: warning: no {where}", file=sys.stderr)
    render_check(rows, Output())
    return EXIT_DRIFT if failed else EXIT_OK


#: ``check --weights`` without SCHEMA[:NAME]: every listed weights entry.
_EVERY = "*"


# -- weights -----------------------------------------------------------------------------------


def cmd_weights(args: argparse.Namespace) -> int:
    from .inspection.weights import weights_record

    record = weights_record(_schemas(args), args.which)
    if args.json:
        _print_json(record, indent=2, allow_nan=False)
        return EXIT_OK
    if not record:
        print(f"{PROG}: warning: no named weights listed", file=sys.stderr)
    render_weights_list(record, Output())
    return EXIT_OK


# -- stamp -------------------------------------------------------------------------------------


def cmd_stamp(args: argparse.Namespace) -> int:
    if (args.output is None) == (not args.in_place):
        raise CommandLineError("stamp needs exactly one of -o DST or --in-place")
    _refuse_output_onto_source(args.ckpt, args.output, "it locks the checkpoint")
    if (args.version is None) == (not args.guess):
        raise CommandLineError("stamp needs exactly one of --version V or --guess")
    given = (lambda c: _guess(c, args)) if args.guess else args.version
    options: dict[str, Any] = dict(safe_globals=args.allow_global, prefix=args.prefix)
    if args.in_place:
        from .engine.inplace import stamp_in_place

        done = stamp_in_place(args.ckpt, args.schema, given, **options)
        target = args.ckpt
    else:
        from .engine.rewrite import stamp_file

        done = stamp_file(args.ckpt, args.output, args.schema, given, what="--version", **options)
        target = args.output
    print(f"stamped {target} as {args.schema} {_stamped_as(done)}")
    return EXIT_OK


def _stamped_as(done: Rewrite) -> str:
    at = f" at prefix {done.prefix!r}" if done.prefix else ""
    return f"{done.target_version}{at} (layout {done.layout})"


def _guess(ckpt: Checkpoint, args: argparse.Namespace) -> Any:
    try:
        from .engine.guess import guess_version
    except ImportError:
        raise CommandLineError(
            "version guessing is not available in this build: pass --version V"
        ) from None
    from .schema.registry import get_schema

    guess = guess_version(ckpt, get_schema(args.schema, _schemas(args)))
    print(f"guessed version {guess.version} (confidence {guess.confidence:.2f})")
    return guess.version


# -- new ---------------------------------------------------------------------------------------


def cmd_new(args: argparse.Namespace) -> int:
    from .base.version import parse_version
    from .errors import CkptMigrateError
    from .inspection.autogen import draft_migration, module_name
    from .schema.registry import migrations_folder

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
        folder = Path(args.migrations_dir) if args.migrations_dir else migrations_folder()
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
    from .schema.registry import find_schemas

    _PROJECT.enter()
    return find_schemas(args.migrations or None)


class _Formatter(argparse.HelpFormatter):
    """argparse's help layout, sized as argparse would (``COLUMNS``, else the terminal, else
    80) without importing :mod:`shutil` on every command."""

    def __init__(self, prog: str, **options: Any) -> None:
        if options.get("width") is None:
            columns = 0
            with contextlib.suppress(ValueError):
                columns = int(os.environ.get("COLUMNS") or 0)
            if columns <= 0:
                try:
                    columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
                except (AttributeError, ValueError, OSError):
                    columns = 80
            options["width"] = columns - 2
        super().__init__(prog, **options)


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other failure."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

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
        sub.add_argument(
            "--redirect-global",
            action="append",
            default=[],
            metavar="OLD=NEW",
            help="read a class an old pickle names as an allowed one, e.g. "
            "pytorch_lightning.utilities.parsing.AttributeDict=builtins.dict, or a prefix rule "
            "pytorch_lightning.*=lightning.pytorch.* (repeatable; NEW must be allowed)",
        )


def _param_names_option(sub: argparse.ArgumentParser, when: str = "") -> None:
    sub.add_argument(
        "--param-names",
        metavar="FILE",
        help=f"{when}names of position-keyed optimizer state, one a line in the optimizer's "
        "order (needed when a step splits, merges or drops parameters and the file cannot tell)",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of every command; with ``command``, only that command's parser is
    made (the others are listed, for ``--help`` and errors, and made if ever used)."""
    parser = _Parser(
        prog=PROG,
        description="Versioned PyTorch checkpoints: diff, inspect, upgrade and stamp them.",
        epilog="exit codes: 0 ok / no drift, 1 drift (diff) or failing fixture (check), 2 error",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_library_version()}")
    adding: list[tuple[bool, Any, Any]] = []  # the command add_parser is making: wanted, run, args

    def make_parser(**options: Any) -> Any:
        wanted, run, arguments = adding[-1]

        def build() -> argparse.ArgumentParser:
            sub = _Parser(**options)
            sub.set_defaults(func=run)
            arguments(sub)
            return sub

        return build() if wanted else _ParserOnDemand(build)

    commands = parser.add_subparsers(
        dest="command", metavar="COMMAND", required=True, parser_class=make_parser
    )
    for name, (summary, run, arguments) in _COMMANDS.items():
        adding.append((command is None or command == name, run, arguments))
        commands.add_parser(name, help=summary)
    return parser


class _ParserOnDemand:
    """A listed command's parser, made only if used: argv names another command, so a run
    never does (making the parsers of every command cost a millisecond at each start)."""

    def __init__(self, build: Callable[[], argparse.ArgumentParser]) -> None:
        self._build = build
        self._parser: argparse.ArgumentParser | None = None

    def __getattr__(self, attribute: str) -> Any:
        if self._parser is None:
            self._parser = self._build()
        return getattr(self._parser, attribute)


def _command_named(argv: Sequence[str]) -> str | None:
    """The command ``argv`` runs: its first word not an option (the top-level options take no
    value); None when that is no command's name (argparse then says what is wrong)."""
    name = next((word for word in argv if not word.startswith("-")), None)
    return name if name in _COMMANDS else None


def _diff_arguments(p: argparse.ArgumentParser) -> None:
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


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", metavar="CKPT", help="the checkpoint to describe")
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--keys",
        action="store_true",
        help="list every tensor: name, shape, dtype, parameters, bytes (from metadata only)",
    )
    _common(p, reads_files=True)


def _upgrade_arguments(p: argparse.ArgumentParser) -> None:
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
    p.add_argument(
        "--adapter",
        action="store_true",
        help="SRC is a PEFT LoRA adapter folder of a model of the schema: its factors follow "
        "the base's plan (found by its adapter_config.json without this flag)",
    )
    _param_names_option(p)
    _common(p, reads_files=True)


def _scan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir", metavar="DIR", help="the folder (or one file) to scan; it must exist")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per file")
    p.add_argument("--fail-behind", action="store_true", help="exit 1 if any file is behind")
    p.add_argument(
        "--workers",
        "--jobs",
        type=_positive_count,
        default=None,
        metavar="N",
        help="checkpoints read at once (default: a process per core for 64 local files or "
        "more, 16 threads for objects behind a URL)",
    )
    p.add_argument(
        "--threads",
        action="store_true",
        default=None,
        help="read with threads (good for network storage); default: worker processes for "
        "64 files or more, one per core",
    )
    p.add_argument(
        "--catalog",
        metavar="DB",
        help="record every checkpoint in DB (an SQLite file, or a postgresql:// URL); a "
        "rescan reads only what changed",
    )
    _common(p, reads_files=True)


def _catalog_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("db", metavar="DB", help="the SQLite file or postgresql:// URL")
    p.add_argument("--schema", help="only checkpoints (mounts) of this schema")
    p.add_argument("--version", metavar="V", help="with --schema: only those at version V")
    state = p.add_mutually_exclusive_group()
    state.add_argument("--behind", action="store_true", help="only those behind their schema")
    state.add_argument("--current", action="store_true", help="only those at its current version")
    p.add_argument(
        "--best",
        metavar="METRIC",
        help="the one whose meta METRIC (dotted: metrics.val_loss) is best",
    )
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--min", action="store_true", help="with --best: smallest wins (default)")
    rank.add_argument("--max", action="store_true", help="with --best: largest wins")
    p.add_argument("--json", action="store_true", help="print a JSON list, one object per row")
    _common(p, reads_files=False)


def _history_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "schema", metavar="SCHEMA", nargs="?", help="omit to list every discovered schema"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    _common(p, reads_files=False)


def _check_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "dir", metavar="DIR", nargs="?", help="default: pyproject fixtures, else fixtures"
    )
    p.add_argument("--json", action="store_true", help="print a JSON object")
    p.add_argument(
        "--weights",
        nargs="?",
        const=_EVERY,
        metavar="SCHEMA[:NAME]",
        help="check named weights that list a golden record instead of fixtures (all, a "
        "schema's, or one)",
    )
    _common(p, reads_files=True)


def _weights_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("which", metavar="SCHEMA[:NAME]", nargs="?", help="default: every schema's")
    p.add_argument("--json", action="store_true", help="print a JSON list")
    _common(p, reads_files=False)


def _stamp_arguments(p: argparse.ArgumentParser) -> None:
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


def _new_arguments(p: argparse.ArgumentParser) -> None:
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


#: Each command: its one-line help, the function that runs it, what adds its arguments.
_COMMANDS: dict[str, tuple[str, Any, Any]] = {
    "diff": ("key/shape/dtype/hparam drift from A to B", cmd_diff, _diff_arguments),
    "info": ("what a checkpoint holds and whether it is behind", cmd_info, _info_arguments),
    "upgrade": ("migrate a file to a newer (or older) version", cmd_upgrade, _upgrade_arguments),
    "scan": ("schema, version and drift of every checkpoint in DIR", cmd_scan, _scan_arguments),
    "catalog": ("query the catalog a scan --catalog recorded", cmd_catalog, _catalog_arguments),
    "history": (
        "the migration graph of a schema, oldest first (no SCHEMA: list them)",
        cmd_history,
        _history_arguments,
    ),
    "check": ("upgrade and verify every legacy fixture under DIR", cmd_check, _check_arguments),
    "weights": ("the named weights the schemas list", cmd_weights, _weights_arguments),
    "stamp": ("give an unversioned legacy file its stamp", cmd_stamp, _stamp_arguments),
    "new": ("generate a migration from two checkpoints", cmd_new, _new_arguments),
}


def _migrations_layouts(args: argparse.Namespace) -> contextlib.AbstractContextManager[None]:
    """A command that reads files reads the layouts its migrations declare (``cm.Layout``):
    a file in none of the known layouts imports them, once, and is matched again."""
    if not hasattr(args, "allow_global"):
        return contextlib.nullcontext()
    from .formats.layout import layouts_from

    return layouts_from(lambda: _schemas(args))


def _add_redirects(args: argparse.Namespace) -> None:
    """``--redirect-global OLD=NEW`` joins the allowed globals every reader gets; one pointing
    to a global that is not allowed (torch's list, ``builtins.dict``, ``--allow-global``) is
    refused here, before any file is read."""
    if not getattr(args, "redirect_global", None):
        return
    from .formats.torch import GlobalRedirect, allowed_names, redirect_map

    found = [*args.allow_global, *(GlobalRedirect.parse(text) for text in args.redirect_global)]
    redirect_map(allowed_names(found))
    args.allow_global = found


def _run(args: argparse.Namespace) -> int:
    """The command; run once more with the discovered schemas' redirects when the file names a
    global one of them redirects (the file's schema is known only once it is read), as an
    unknown layout imports the migrations once and matches the file again."""
    from .errors import UnsafeCheckpointError

    try:
        return int(args.func(args))
    except UnsafeCheckpointError as exc:
        if not _schema_redirects_cover(args, exc.global_name):
            raise
    return int(args.func(args))


def _schema_redirects_cover(args: argparse.Namespace, name: str) -> bool:
    """Whether the discovered schemas redirect ``name``, not yet among ``args.allow_global``;
    if so they join it."""
    from .errors import CkptMigrateError

    if not hasattr(args, "allow_global"):
        return False
    try:
        schemas = _schemas(args)
    except CkptMigrateError:
        return False  # the file's own refusal says more than a broken migrations module
    from .formats.torch import allowed_names, redirect_map, with_redirects
    from .schema.schema import redirects_of

    rules = [rule for rule in redirects_of(schemas) if rule not in args.allow_global]
    found = with_redirects(args.allow_global, rules)
    if not rules or name not in redirect_map(allowed_names(found)):
        return False
    args.allow_global = found
    return True


def _library_version() -> str:
    from .base.version import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (``ckptmigrate diff a.pth b.pth``)."""
    with printable_output():  # what a file says reaches the terminal escaped
        return _main(argv)


def _main(argv: Sequence[str] | None) -> int:
    words = sys.argv[1:] if argv is None else argv
    args = build_parser(_command_named(words)).parse_args(argv)
    try:
        _add_redirects(args)
        with (
            _warnings_as_lines(show_torch=args.debug),
            _PROJECT,
            _migrations_layouts(args),
        ):
            return _run(args)
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
        print(f"{PROG}: error: {error_line(exc)}", file=sys.stderr)
        return EXIT_TROUBLE


class _ProjectImportable(contextlib.ExitStack):
    """The project's folder first on sys.path from the moment a command first looks for
    migrations until it ends: migrations import its model code, and a ``build=`` may do so only
    when it runs (``diff --model``, ``check``). A command that never looks for them (``diff``
    of two files, ``info`` of a stamped one) never reads pyproject.toml."""

    def enter(self) -> None:
        if self._entered:
            return
        self._entered = True
        from .schema.project import project_folder, project_on_sys_path

        try:
            folder = project_folder()
        except Exception:  # an unreadable pyproject.toml is reported where migrations are found
            return
        self.enter_context(project_on_sys_path(folder))

    def __enter__(self) -> _ProjectImportable:
        self._entered = False
        return super().__enter__()


#: The running command's project folder on sys.path (entered by :func:`_schemas`).
_PROJECT = _ProjectImportable()


@contextlib.contextmanager
def _warnings_as_lines(*, show_torch: bool) -> Iterator[None]:
    """Our warnings (and log records) as one ``ckptmigrate: warning:`` line each; torch's
    notes about its own internals (a pickle protocol it did not write, a deprecated call, DCP's
    fallbacks) only with ``--debug``."""

    def show(message: Any, category: Any, filename: str, lineno: int, *rest: Any) -> None:
        if not show_torch and f"{os.sep}torch{os.sep}" in filename:
            return
        print(f"{PROG}: warning: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        with _log_records_as_lines(show_torch=show_torch):
            yield


@contextlib.contextmanager
def _log_records_as_lines(*, show_torch: bool) -> Iterator[None]:
    """Log records as warnings are shown: torch's own (DCP logs each fallback with its
    traceback on the root logger) only with ``--debug``, others as one line each. A command
    that never imports :mod:`logging` (a metadata ``diff``) does not pay for importing it."""
    from .base.on_import import when_imported

    attached: list[tuple[Any, Any]] = []

    def attach(logging: Any) -> None:
        root = logging.getLogger()
        handler = _log_lines_handler(logging, show_torch)
        root.addHandler(handler)
        attached.append((root, handler))

    try:
        with when_imported("logging", attach):
            yield
    finally:
        for root, handler in attached:
            root.removeHandler(handler)


def _log_lines_handler(logging: Any, show_torch: bool) -> Any:
    """A :class:`logging.Handler` writing records as ``ckptmigrate: warning:`` lines."""

    class LogLines(logging.Handler):  # type: ignore[misc,name-defined]
        def emit(self, record: Any) -> None:
            if f"{os.sep}torch{os.sep}" in (record.pathname or ""):
                if show_torch:
                    print(self.format(record), file=sys.stderr)
                return
            print(f"{PROG}: warning: {' '.join(record.getMessage().split())}", file=sys.stderr)

    return LogLines(logging.WARNING)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
