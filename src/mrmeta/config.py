"""The training configuration: one frozen dataclass, read from flags and/or a TOML file."""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

from mrmeta.errors import ConfigError  # re-exported: ``mrmeta.config.ConfigError`` stays
from mrmeta.evaluate import PROTOCOLS  # the evaluation layer owns its protocol names
from mrmeta.models import ADAPTS

ALGORITHMS = ("mrml", "maml", "fomaml", "anil", "itd-bio", "imaml")
OPTIMIZERS = ("adam", "sgd")
DEVICES = ("cpu", "cuda")
DTYPES = ("float32", "float64")
INNER_SOLVERS = ("newton", "gd")
BACKBONES = ("conv4", "resnet12")
LAST_BLOCK_ALGORITHMS = ("mrml", "anil", "itd-bio")  # the head-only methods


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on; saved as ``config.json`` in the run folder.

    Defaults are the quick start: Omniglot 5-way 1-shot with ``mrml`` in about ten minutes on
    two CPU cores. The algorithm's options left at ``None`` (``inner_solver``, ``inner_steps``,
    ``inner_tol``, ``inner_lr``, ``cg_iters``, ``l2``, ``reg``) take its own defaults, which live
    in its constructor (``mrmeta.algorithms.algorithm_defaults``). ``distributed`` shards each
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
    warm_start_head: bool = False
    warm_start_cg: bool = False
    learn_head_init: bool = False
    optimizer: str = "adam"
    lr: float = 1e-3
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
        _check_choice("algo", self.algo, ALGORITHMS)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("device", self.device, DEVICES)
        _check_choice("eval_protocol", self.eval_protocol, PROTOCOLS)
        _check_choice("omniglot_split", self.omniglot_split, ("lake", "vinyals"))
        _check_choice("dtype", self.dtype, DTYPES)
        _check_choice("budget_clock", self.budget_clock, ("wall", "cpu"))
        _check_choice("backbone", self.backbone, BACKBONES)
        _check_adapt(self)
        for name in (
            "ways",
            "shots",
            "meta_batch",
            "iterations",
            "hidden",
            "val_every",
            "val_tasks",
            "checkpoint_every",
            "max_skipped",
        ):
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("queries", self.queries, minimum=1)
        _check_int("test_tasks", self.test_tasks, minimum=0)
        if self.inner_steps is not None:
            _check_int("inner_steps", self.inner_steps, minimum=0)
        if self.cg_iters is not None:
            _check_int("cg_iters", self.cg_iters, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        for name in ("lr", "dist_timeout"):
            _check_number(name, getattr(self, name), positive=True)
        _check_learner_options(self)
        if self.chunk_size is not None:
            _check_int("chunk_size", self.chunk_size, minimum=1)
        if self.threads is not None:
            _check_int("threads", self.threads, minimum=1)
        for name in ("time_budget", "val_every_seconds"):
            if getattr(self, name) is not None:
                _check_number(name, getattr(self, name), positive=True)
        if self.inner_lr is not None and self.inner_lr != "auto":
            _check_number("inner_lr", self.inner_lr, positive=True)

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any], *, source: str = "config") -> TrainConfig:
        """Build from a mapping whose keys are field names (``-`` or ``_`` both accepted)."""
        known = {f.name: f for f in fields(cls)}
        normalized = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in known:
                raise ConfigError(
                    f"{source}: unknown key {key!r}; valid keys: {', '.join(sorted(known))}"
                )
            normalized[name] = value
        try:
            return cls(**normalized)
        except TypeError as err:
            raise ConfigError(f"{source}: {err}") from err

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


def _check_learner_options(config: TrainConfig) -> None:
    """The algorithm options that may be left unset (None: the algorithm's default)."""
    for name in ("l2", "inner_tol"):
        if getattr(config, name) is not None:
            _check_number(name, getattr(config, name), positive=False)
    if config.reg is not None:
        _check_number("reg", config.reg, positive=True)
    if config.inner_solver is not None:
        _check_choice("inner_solver", config.inner_solver, INNER_SOLVERS)


def _check_adapt(config: TrainConfig) -> None:
    """``adapt`` is a choice; the last block is adapted by the head-only methods only, with a
    fixed inner step (no curvature bound), gradient steps and the native test protocol."""
    _check_choice("adapt", config.adapt, ADAPTS)
    if config.adapt == "head":
        return
    if config.algo not in LAST_BLOCK_ALGORITHMS:
        raise ConfigError(
            f"adapt last-block applies to {', '.join(LAST_BLOCK_ALGORITHMS)} only; "
            f"--algo {config.algo} adapts the whole network: drop --adapt or pick one of them"
        )
    if config.inner_lr == "auto":
        raise ConfigError(
            "inner_lr 'auto' needs the linear head's curvature bound (--adapt head); with "
            "--adapt last-block pass a number, or leave it unset for the last-block default"
        )
    if config.inner_solver == "newton":
        raise ConfigError(
            "inner_solver newton needs a convex lower level; the last block's is not (50 "
            "Newton-CG iterations left |grad| near 10 on Omniglot): with --adapt last-block "
            "use --inner-solver gd (its default)"
        )
    if config.eval_protocol == "frozen-backbone":
        raise ConfigError(
            "eval_protocol frozen-backbone fits a linear head on the backbone's features and "
            "needs --adapt head; with --adapt last-block use --eval-protocol native"
        )


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value!r}")
    if value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}; got {value}")


def _check_number(name: str, value: object, *, positive: bool) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number; got {value!r}")
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number; got {value}")
    if value < 0 or (positive and value == 0):
        raise ConfigError(f"{name} must be {'> 0' if positive else '>= 0'}; got {value}")
