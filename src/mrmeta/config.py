"""The training configuration: one frozen dataclass, read from flags and/or a TOML file."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from functools import cache
from pathlib import Path
from types import UnionType
from typing import Any, get_args, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from mrmeta.algorithms import ALGORITHMS as ALGORITHM_CLASSES
from mrmeta.algorithms import algorithm_defaults, splits_head
from mrmeta.errors import ConfigError  # re-exported: ``mrmeta.config.ConfigError`` stays
from mrmeta.evaluate import PROTOCOLS  # the evaluation layer owns its protocol names
from mrmeta.models import ADAPTS

ALGORITHMS = tuple(ALGORITHM_CLASSES)  # the registry's names
# The TrainConfig fields that are options of (some) algorithms' constructors. Left at None, a
# field takes the algorithm's own default (mrmeta.algorithms.algorithm_defaults, read from its
# options dataclass: the one home of every default). APPLIES_TO: the options only some
# algorithms have, and those algorithms; setting one (a flag or a TOML key) for another
# algorithm is refused (options_not_applying).
ALGORITHM_OPTIONS = (
    "inner_solver",
    "inner_steps",
    "inner_tol",
    "inner_lr",
    "cg_iters",
    "l2",
    "reg",
    "warm_start_head",
    "warm_start_cg",
    "learn_head_init",
    "exact_v",
)
APPLIES_TO: dict[str, tuple[str, ...]] = {
    key: algos
    for key in ALGORITHM_OPTIONS
    if (algos := tuple(a for a in ALGORITHMS if key in algorithm_defaults(a))) != ALGORITHMS
}
# Options a run folder written before they existed does not hold, and the value it ran with.
LEGACY_VALUES: dict[str, Any] = {"exact_v": False}  # v came from N CG steps before exact_v
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
INNER_SOLVERS = ("newton", "gd")
BACKBONES = ("conv4", "resnet12")
# The head-only methods (a backbone/head split): the ones that can adapt the last block too.
LAST_BLOCK_ALGORITHMS = tuple(a for a in ALGORITHMS if splits_head(a))


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run folder.

    Defaults are the quick start: Omniglot 5-way 1-shot with ``mrml`` in about ten minutes on
    two CPU cores. The algorithm's options left at ``None`` (those in :data:`ALGORITHM_OPTIONS`:
    ``inner_solver``, ``inner_steps``, ``l2``, ``exact_v``, …) take its own defaults, which live
    in its options dataclass (``mrmeta.algorithms.algorithm_defaults``). ``distributed`` shards each
    meta-batch across the processes torchrun launched (see :mod:`mrmeta.distributed`);
    ``dtype = "float64"`` runs the model and the tasks in double precision. ``download``
    (Omniglot only; ignored for the bring-your-own datasets) fetches the official archives
    into the data root when no copy is found; ``download = false`` forbids it. ``adapt``
    (mrml, anil, itd-bio) is what their lower level adapts per task: the linear head, or the
    backbone's last block and the head (:func:`mrmeta.models.split_model`).
    """

    algo: str = "mrml"
    dataset: str = "omniglot"
    data_root: str | None = None
    download: bool = True
    omniglot_split: str = "lake"
    ways: int = 5
    shots: int = 1
    queries: int = 15
    meta_batch: int = 16
    iterations: int = 300
    time_budget: float | None = None
    budget_clock: str = "wall"
    inner_solver: str | None = None
    inner_steps: int | None = None
    inner_tol: float | None = None
    inner_lr: float | str | None = None
    cg_iters: int | None = None
    l2: float | None = None
    reg: float | None = None
    warm_start_head: bool | None = None
    warm_start_cg: bool | None = None
    learn_head_init: bool | None = None
    exact_v: bool | None = None
    optimizer: str = "adam"
    lr: float | None = None
    chunk_size: int | None = 1
    backbone: str = "conv4"
    adapt: str = "head"
    hidden: int = 64
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None
    val_every: int = 50
    val_every_seconds: float | None = None
    val_tasks: int = 200
    test_tasks: int = 600
    eval_protocol: str = "native"
    checkpoint_every: int = 10
    max_skipped: int = 10
    dtype: str = "float32"
    distributed: bool = False
    dist_timeout: float = 600.0

    def __post_init__(self) -> None:
        problems = _problems(self) or _adapt_problems(self) or _warm_cg_problems(self)
        if problems:
            raise ConfigError(problems=problems)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(
        cls,
        values: Mapping[str, Any],
        *,
        source: str = "config",
        name: Callable[[str], str] | None = None,
    ) -> TrainConfig:
        """Build from a mapping whose keys are field names (``-`` or ``_`` both accepted).

        Each unknown key, wrongly typed or out-of-range value is one line of the
        :class:`ConfigError`, naming the key as ``name(field)`` (default ``"{source}: {key}"``
        with the key as written). ``chunk_size = "all"`` means ``None``, as the flag does.
        """
        known = {f.name for f in fields(cls)}
        typed = {key.replace("-", "_"): key for key in values}
        normalized = {key.replace("-", "_"): value for key, value in values.items()}
        if normalized.get("chunk_size") == "all":
            normalized["chunk_size"] = None
        name = name or (lambda field: f"{source}: {typed.get(field, field)}")
        valid = f"is not a key; valid keys: {', '.join(sorted(known))}"
        unknown = [(key, valid) for key in typed if key not in known]
        try:
            config = cls(**{key: v for key, v in normalized.items() if key in known})
        except ConfigError as err:
            raise ConfigError(problems=[*unknown, *err.problems]).renamed(name) from None
        if unknown:
            raise ConfigError(problems=unknown).renamed(name)
        return config

    @classmethod
    def from_saved(cls, values: Mapping[str, Any], *, source: str) -> TrainConfig:
        """A run's saved configuration (``config.json`` or a checkpoint's), with the options that
        runs written before the option existed do not hold set to the value they ran with
        (:data:`LEGACY_VALUES`), so that such a run resumes and tests as it trained."""
        algo = values.get("algo", cls.algo)
        legacy = {
            key: value
            for key, value in LEGACY_VALUES.items()
            if key not in values and algo in APPLIES_TO.get(key, ALGORITHMS)
        }
        return cls.from_dict({**values, **legacy}, source=source)

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


def read_toml(path: str | Path) -> dict[str, Any]:
    """The key/values of a TOML config file (top level, or a ``[train]`` table)."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as err:
        raise ConfigError(f"config file {path} does not exist; check the --config path") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {path} cannot be read: {err}") from err
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"config file {path} is not valid TOML: {err}") from err
    return dict(data.get("train", data))


def options_not_applying(algo: str, given: Iterable[str]) -> list[tuple[str, str]]:
    """The ``(key, text)`` problems of the options in ``given`` that ``algo`` does not have
    (:data:`APPLIES_TO`). ``given`` are the keys a user set, not the defaults."""
    return [
        (key, f"applies only to {' and '.join(APPLIES_TO[key])}, not to {algo}; remove it")
        for key in given
        if key in APPLIES_TO and algo not in APPLIES_TO[key]
    ]


def _adapt_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """The ``(key, text)`` problems of ``adapt = "last-block"``: only the head-only methods adapt
    the last block, with fixed-size gradient steps (no curvature bound, no convexity) and the
    native test protocol."""
    if config.adapt == "head":
        return []
    if config.algo not in LAST_BLOCK_ALGORITHMS:
        return [
            (
                "adapt",
                f"last-block applies to {', '.join(LAST_BLOCK_ALGORITHMS)} only; --algo "
                f"{config.algo} adapts the whole network: drop --adapt or pick one of them",
            )
        ]
    problems = []
    if config.inner_lr == "auto":
        problems.append(
            (
                "inner_lr",
                "'auto' needs the linear head's curvature bound (--adapt head); with --adapt "
                "last-block pass a number, or leave it unset for the last-block default",
            )
        )
    if config.inner_solver == "newton":
        problems.append(
            (
                "inner_solver",
                "newton needs a convex lower level; the last block's is not (50 Newton-CG "
                "iterations left |grad| near 10 on Omniglot): with --adapt last-block use "
                "--inner-solver gd (its default)",
            )
        )
    if config.eval_protocol == "frozen-backbone":
        problems.append(
            (
                "eval_protocol",
                "frozen-backbone fits a linear head on the backbone's features and needs "
                "--adapt head; with --adapt last-block use --eval-protocol native",
            )
        )
    return problems


def _warm_cg_problems(config: TrainConfig) -> list[tuple[str, str]]:
    """``warm_start_cg`` with mrml's exact solve of ``v`` (a linear head), which uses no CG."""
    exact_v = config.exact_v
    if exact_v is None:
        exact_v = algorithm_defaults(config.algo).get("exact_v", False)
    if config.warm_start_cg and exact_v and config.adapt == "head":
        return [
            (
                "warm_start_cg",
                "needs --no-exact-v: it warm-starts CG's N steps, and the exact solve of v "
                "(--exact-v, mrml's default for a linear head) uses no CG",
            )
        ]
    return []


_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _has_type(kind: type, value: object) -> bool:
    """``isinstance`` where a bool is no number and an int is a float."""
    if kind is type(None):
        return value is None
    if kind in (int, float) and isinstance(value, bool):
        return False
    return isinstance(value, (int, float) if kind is float else kind)


def _type_problem(hint: Any, value: object) -> str | None:
    """Why ``value`` does not fit the annotation ``hint`` (``int | None`` etc.), or ``None``."""
    kinds = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    if any(_has_type(kind, value) for kind in kinds):
        return None
    wanted = " or ".join(_KINDS[kind] for kind in kinds if kind is not type(None))
    quoted = bool in kinds and isinstance(value, str)
    return f"must be {wanted}; got {value!r}" + (
        " (a string: write true or false)" if quoted else ""
    )


def _choice(*choices: str) -> Callable[[Any], str | None]:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}; got {v!r}"


def _at_least(minimum: int) -> Callable[[Any], str | None]:
    return lambda v: None if v >= minimum else f"must be an integer >= {minimum}; got {v}"


def _number(*, positive: bool) -> Callable[[Any], str | None]:
    def rule(value: float) -> str | None:
        if not math.isfinite(value):
            return f"must be a finite number; got {value}"
        if value < 0 or (positive and value == 0):
            return f"must be {'> 0' if positive else '>= 0'}; got {value}"
        return None

    return rule


def _inner_lr(value: float | str) -> str | None:
    if isinstance(value, str):
        return None if value == "auto" else f"must be a number or 'auto'; got {value!r}"
    return _number(positive=True)(value)


# The value rule of each field, applied once its type is right and it is not None.
_RULES: dict[str, Callable[[Any], str | None]] = {
    "algo": _choice(*ALGORITHMS),
    "optimizer": _choice(*OPTIMIZERS),
    "device": _choice(*DEVICES),
    "eval_protocol": _choice(*PROTOCOLS),
    "omniglot_split": _choice("lake", "vinyals"),
    "dtype": _choice(*DTYPES),
    **dict.fromkeys(
        ("ways", "shots", "queries", "meta_batch", "iterations", "hidden", "val_every"),
        _at_least(1),
    ),
    **dict.fromkeys(
        ("val_tasks", "checkpoint_every", "max_skipped", "chunk_size", "threads"), _at_least(1)
    ),
    "test_tasks": _at_least(0),
    "inner_solver": _choice(*INNER_SOLVERS),
    "budget_clock": _choice("wall", "cpu"),
    "backbone": _choice(*BACKBONES),
    "adapt": _choice(*ADAPTS),
    "inner_tol": _number(positive=False),
    "val_every_seconds": _number(positive=True),
    **dict.fromkeys(("inner_steps", "cg_iters", "seed"), _at_least(0)),
    **dict.fromkeys(("lr", "reg", "dist_timeout", "time_budget"), _number(positive=True)),
    "l2": _number(positive=False),
    "inner_lr": _inner_lr,
}


@cache
def _field_types() -> dict[str, Any]:
    """The evaluated annotations of :class:`TrainConfig` (``int | None`` etc.)."""
    return get_type_hints(TrainConfig)


def is_switch(name: str) -> bool:
    """Whether :class:`TrainConfig` field ``name`` is a boolean (``bool`` or ``bool | None``):
    a flag without a value (``--exact-v`` / ``--no-exact-v``)."""
    hint = _field_types()[name]
    kinds = get_args(hint) if isinstance(hint, UnionType) else (hint,)
    return bool in kinds


def _problems(config: TrainConfig) -> list[tuple[str, str]]:
    """Every ``(key, text)`` problem of ``config``: the type of each field, then its value."""
    hints = _field_types()
    problems = []
    for field in fields(config):
        value = getattr(config, field.name)
        problem = _type_problem(hints[field.name], value)
        if problem is None and value is not None and field.name in _RULES:
            problem = _RULES[field.name](value)
        if problem is not None:
            problems.append((field.name, problem))
    return problems
