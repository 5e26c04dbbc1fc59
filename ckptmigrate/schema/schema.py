"""A schema: the name, current version, model factory and migration steps of one model family."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from packaging.version import Version

from ..base.version import parse_version
from ..errors import FutureVersionError, MigrationGraphError, UsageError
from ..io.signature import signature_of
from ..values.checkpoint import Checkpoint
from .graph import FunctionStep, MigrationGraph, OpsStep, PlannedStep, Step
from .history import recorded_downgrade, recorded_floor
from .ops import Op
from .weights import Weights

MigrationFn = Callable[[Checkpoint], "Checkpoint | None"]
F = TypeVar("F", bound=Callable[..., Any])


class Schema:
    """The versions of one model family and the migrations between them.

    Creating a schema registers nothing globally: a test may build several with one name.

    ``build(hparams)`` makes today's model from (migrated) hparams; ``example_input()`` gives
    an input for golden checks. For resume checks (fixtures whose golden record holds
    ``resume`` batches and losses), two more describe how the model trains today:

    - ``optimizer(model)`` returns today's optimizer for ``model``, e.g.
      ``lambda m: torch.optim.Adam(m.named_parameters(), lr=1e-2)``. It must group the
      parameters as the code that wrote the checkpoints did (same groups, parameters in
      ``model.named_parameters()`` order within each), because torch loads optimizer state by
      position; building it from ``named_parameters()`` also stores ``param_names``, so the
      files it writes can be migrated without ``param_names=``.
    - ``train_step(model, optimizer, batch)`` runs one training step on ``batch`` and returns
      the loss computed *before* the update (a float or a 0-d tensor): zero the gradients,
      forward, backward, ``optimizer.step()``. It must be deterministic (no dropout, no
      sampling), so that the old code's losses can be reproduced.

    ``redirects`` maps a global old pickles name to one allowed today, so files that name a
    class which has since moved still load: ``{"pytorch_lightning.utilities.parsing.
    AttributeDict": "builtins.dict"}``, or a prefix rule ``{"pytorch_lightning.*":
    "lightning.pytorch.*"}`` (it maps only the names that are allowed). An exact target must be
    in torch's weights-only allow-list or ``builtins.dict``, refused here otherwise
    (:class:`~ckptmigrate.errors.RedirectError`); a redirect never makes a global reachable that
    was not already.

    >>> schema = Schema("tinylm", current="3.0.0", build=lambda hp: TinyLM(**hp),
    ...                 optimizer=lambda m: torch.optim.Adam(m.named_parameters(), lr=1e-2),
    ...                 train_step=lm_train_step)
    >>> @schema.migration("1.0.0", "1.1.0")
    ... def rename_blocks(ckpt):
    ...     ckpt.state_dict = {k.replace("blocks.", "layers."): v for k, v in ckpt.state_dict.items()}
    """

    def __init__(
        self,
        name: str,
        current: str | Version,
        build: Callable[[dict[str, Any]], Any] | None = None,
        example_input: Callable[[], Any] | None = None,
        *,
        optimizer: Callable[..., Any] | None = None,
        train_step: Callable[..., Any] | None = None,
        redirects: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise MigrationGraphError(f"a schema name must be a non-empty string, got {name!r}")
        self.name = name
        self.current = parse_version(current, what="current version")
        self.graph = MigrationGraph(name, self.current)
        self._build = build
        self._example_input = example_input
        self.optimizer = optimizer
        self.train_step = train_step
        self.origin: str | None = None  # where discovery found it, for error messages
        self.signatures: dict[Version, list[frozenset]] = {}
        #: the named weights that exist for this schema, by name, in the order added
        self.weights: dict[str, Weights] = {}
        # classes old pickles name, read as allowed ones ({"old.Name": "builtins.dict"})
        self.redirects: tuple[Any, ...] = _redirects(redirects)

    def add_signature(self, version: str | Version, state_dict: dict[str, Any]) -> None:
        """Record what a state_dict of ``version`` looks like, for ``from_version="auto"``."""
        v = parse_version(version)
        self.signatures.setdefault(v, []).append(signature_of(state_dict))

    def __repr__(self) -> str:
        return f"Schema({self.name!r}, current={str(self.current)!r}, steps={len(self.steps)})"

    @property
    def steps(self) -> list[Step]:
        """Every registered step, oldest first."""
        return self.graph.steps

    def migration(
        self,
        source: str,
        target: str,
        *,
        breaking: bool = False,
        preferred: bool = False,
        inverse: MigrationFn | None = None,
        optimizer_state: Callable[..., Any] | None = None,
    ) -> Callable[[F], F]:
        """Register the decorated function as the step ``source`` -> ``target``.

        The function mutates the checkpoint it gets, or returns a new one. Mark a step that
        changes behaviour ``breaking=True`` and pin the old behaviour in ``ckpt.hparams``.
        ``inverse`` (a function) makes the step usable for downgrades.

        Optimizer state follows every tensor the function moves unchanged under a new name.
        A parameter whose tensor it replaces starts with fresh state (a warning and the history
        say so) unless ``optimizer_state(states, before, after)`` returns its state: ``states``
        maps old parameter names to their state dicts; return ``{new_name: state}``.
        """

        def register(fn: F) -> F:
            name = getattr(fn, "__qualname__", repr(fn))
            action = FunctionStep(fn, inverse, optimizer_state)
            self._add(source, target, name, action, breaking, preferred, inverse is not None)
            return fn

        return register

    def add_migration(
        self,
        source: str,
        target: str,
        ops: Sequence[Op],
        *,
        breaking: bool = False,
        preferred: bool = False,
        name: str | None = None,
        reversible: bool | None = None,
    ) -> Step:
        """Register a list of declarative ops (``cm.ops``) as the step ``source`` -> ``target``.

        The step is reversible, so usable for downgrades, when every op has an inverse.
        Declare it: ``reversible=True`` refuses, at registration, a list with an op that has
        no inverse (naming it); ``reversible=False`` keeps the step forward-only even when its
        ops could be inverted. ``ckptmigrate history`` shows which steps are reversible.

        >>> schema.add_migration("1.0.0", "1.1.0", [cm.ops.RenamePrefix("blocks.", "layers.")],
        ...                      reversible=True)
        """
        ops = list(ops)
        bad = [op for op in ops if not isinstance(op, Op)]
        if bad:
            raise MigrationGraphError(
                f"schema {self.name!r}: add_migration takes cm.ops objects, got {bad[0]!r}; "
                "register functions with @schema.migration instead"
            )
        label = name or "; ".join(op.describe() for op in ops) or "no-op"
        one_way = [op for op in ops if op.inverse() is None]
        if reversible and one_way:
            raise MigrationGraphError(
                f"schema {self.name!r}: step {source} -> {target} is declared reversible, but "
                f"{one_way[0].describe()} has no inverse; give it one (e.g. RenameKeys(..., "
                "reverse=...), Reshape(..., from_shape=...), SetHparam(..., previous=...)) or "
                "declare reversible=False"
            )
        can_reverse = not one_way if reversible is None else reversible
        return self._add(
            source, target, label, OpsStep(tuple(ops)), breaking, preferred, can_reverse
        )

    def _add(
        self,
        source: str,
        target: str,
        name: str,
        action: FunctionStep | OpsStep,
        breaking: bool,
        preferred: bool,
        reversible: bool,
    ) -> Step:
        step = Step(
            source=parse_version(source, what="step source version"),
            target=parse_version(target, what="step target version"),
            name=name,
            action=action,
            breaking=breaking,
            preferred=preferred,
            reversible=reversible,
        )
        return self.graph.add(step)

    def add_weights(
        self,
        name: str,
        *,
        url: str,
        sha256: str,
        version: str | Version,
        meta: Mapping[str, Any] | None = None,
        transforms: str | Callable[..., Any] | None = None,
        golden: str | None = None,
        golden_sha256: str | None = None,
    ) -> Weights:
        """List trained weights of this schema under ``name`` (see :class:`Weights`); the file
        at ``url`` was saved at ``version`` and must hash to ``sha256``.

        >>> schema.add_weights("stripes_v1", url="https://example.com/tinyconv-3f2a.pth",
        ...                    sha256="3f2a...", version="1.0.0", meta={"val_acc": 0.93})
        """
        weights = Weights(name, url, sha256, version, meta or {}, transforms, golden, golden_sha256)
        if name in self.weights:
            raise MigrationGraphError(f"schema {self.name!r} already lists weights {name!r}")
        if weights.version > self.current:
            raise MigrationGraphError(
                f"schema {self.name!r}: weights {name!r} were saved at {weights.version}, past "
                f"the current version {self.current}"
            )
        self.weights[name] = weights
        return weights

    def plan(
        self,
        start: str | Version,
        target: str | Version | None = None,
        *,
        history: Sequence[Any] | None = None,
    ) -> list[PlannedStep]:
        """The steps from ``start`` to ``target`` (default: current), validated before running.

        ``history`` (the file's) lets a file newer than this schema knows go down to ``target``
        through the inverses its history records (newest first) until a version this schema
        knows, then through this schema's own steps: code that knows only the older versions
        can still write a newer file back. Without ``target`` such a file is a
        :class:`~ckptmigrate.FutureVersionError` that says how far the history reaches.

        >>> old_schema.plan(ckpt.version, "1.1.0", history=ckpt.history)   # ckpt at 2.0.0
        """
        begin = parse_version(start)
        if history is None or begin <= self.current:
            return self.graph.plan(begin, target)
        goal = None if target is None else parse_version(target, what="target version")
        if goal is None or goal > self.current:
            floor = recorded_floor(self.graph, begin, history)
            raise FutureVersionError(self.name, begin, self.current, recorded_to=floor)
        head = recorded_downgrade(self.graph, begin, goal, history)
        reached = head[-1].target if head else begin
        return head + self.graph.plan(reached, goal)

    def build(self, hparams: dict[str, Any]) -> Any:
        """Build today's model from (migrated) hparams with the schema's ``build`` factory."""
        if self._build is None:
            raise MigrationGraphError(
                f"schema {self.name!r} has no build= factory: pass build=lambda hp: Model(**hp)"
            )
        return self._build(dict(hparams))

    @property
    def can_build(self) -> bool:
        return self._build is not None

    def example_input(self) -> Any:
        """The schema's example input, for golden checks."""
        if self._example_input is None:
            raise MigrationGraphError(f"schema {self.name!r} has no example_input=")
        return self._example_input()


def _redirects(given: Mapping[str, str] | None) -> tuple[Any, ...]:
    """``Schema(redirects=)`` as :class:`~ckptmigrate.formats.torch.GlobalRedirect` rules, each
    exact one checked against the allow-list now, before any file is read."""
    if not given:
        return ()
    if not isinstance(given, Mapping):
        raise UsageError(
            f"redirects= takes a dict {{'old.module.Name': 'new.module.Name'}}, got "
            f"{type(given).__name__}"
        )
    from ..formats.torch import GlobalRedirect, redirect_map

    rules = tuple(GlobalRedirect(old, new) for old, new in given.items())
    redirect_map(rules)  # an exact target must be allowed without the caller's safe_globals
    return rules


def redirects_of(schemas: Schema | Mapping[str, Schema] | Sequence[Schema] | None) -> list[Any]:
    """The global redirects of one schema or of a discovered table, in order, each once: a
    file's schema is known only once it is read, so every schema's redirects apply to it.

    >>> redirects_of(find_schemas(["migrations"]))  # doctest: +SKIP
    [GlobalRedirect(old='pytorch_lightning.utilities.parsing.AttributeDict', new='builtins.dict')]
    """
    if schemas is None:
        return []
    if isinstance(schemas, Schema):
        table = [schemas]
    else:
        table = list(schemas.values()) if isinstance(schemas, Mapping) else list(schemas)
    return list(dict.fromkeys(rule for schema in table for rule in schema.redirects))
