"""The ``mrmeta`` command: ``train`` and ``eval``. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mrmeta import __version__
from mrmeta.config import (
    ALGORITHMS,
    OPTIMIZERS,
    PROTOCOLS,
    ConfigError,
    TrainConfig,
    options_not_applying,
    read_toml,
)

HELP = {
    "algo": f"meta-learning method: {', '.join(ALGORITHMS)}",
    "dataset": "benchmark name (omniglot, cifar-fs, fc100, mini-imagenet, tiered-imagenet)",
    "data_root": "folder holding the dataset files (else $MRMETA_DATA, else ~/.cache/mrmeta)",
    "download": "download the dataset if it is not found (Omniglot only)",
    "omniglot_split": "Omniglot split: lake (by alphabet) or vinyals (1200/423 chars + rotations)",
    "ways": "classes per task N",
    "shots": "support examples per class K",
    "queries": "query examples per class",
    "meta_batch": "tasks per meta-iteration |B|",
    "iterations": "number of meta-iterations",
    "time_budget": "stop after this many seconds of meta-training",
    "inner_steps": "inner gradient steps K (default: the algorithm's, see README)",
    "inner_lr": "inner step size, or 'auto' (1/L per task; head-only methods)",
    "cg_iters": "CG iterations N (mrml, imaml; default: the algorithm's); 0: no implicit term",
    "l2": "L2 coefficient mu of the lower level (mrml, itd-bio)",
    "reg": "proximal coefficient lambda of iMAML",
    "warm_start_head": "warm-start the head per task slot across iterations (mrml)",
    "warm_start_cg": "warm-start CG per task slot across iterations (mrml)",
    "learn_head_init": "meta-learn the head's starting point too (mrml)",
    "optimizer": f"outer optimizer: {', '.join(OPTIMIZERS)}",
    "lr": "outer learning rate",
    "chunk_size": "tasks processed together: a number, or 'all'",
    "hidden": "Conv4 filters per layer",
    "seed": "random seed (model init, tasks)",
    "device": "cpu or cuda",
    "threads": "torch CPU threads",
    "val_every": "validate every this many iterations",
    "val_tasks": "validation tasks",
    "test_tasks": "test tasks at the end (>= 600 for a publishable number)",
    "eval_protocol": f"test protocol: {', '.join(PROTOCOLS)}",
    "checkpoint_every": "write last.pt every this many iterations",
    "max_skipped": "stop when more than this many consecutive meta-steps are non-finite",
    "dtype": "floating-point precision of the model and the tasks: float32 or float64",
    "distributed": "shard each meta-batch's tasks across the processes torchrun launched "
    "(gloo on cpu, nccl on cuda); --meta-batch must be divisible by their number",
    "dist_timeout": "seconds a rank waits for the others before failing (--distributed); "
    "must exceed rank 0's validation time",
}


def _chunk(text: str) -> int | None:
    if text == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a whole number or 'all', got {text!r}"
        ) from None


def _lr_or_auto(text: str) -> float | str:
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


SPECIAL_TYPES = {
    "chunk_size": _chunk,
    "inner_lr": _lr_or_auto,
    "inner_steps": int,
    "cg_iters": int,
    "time_budget": float,
    "data_root": str,
    "threads": int,
}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; unset flags stay out of the namespace."""
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": f"{HELP[field.name]} (default: {default})",
        }
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = SPECIAL_TYPES.get(field.name, type(default))
        parser.add_argument(flag, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mrmeta", description="Memory-reduced meta-learning and its baselines."
    )
    parser.add_argument("--version", action="version", version=f"mrmeta {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="meta-train, validate, test")
    train.add_argument("--out", required=True, type=Path, help="run folder (must be new)")
    train.add_argument("--config", type=Path, help="TOML file whose keys match the flags")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    evaluate = commands.add_parser("eval", help="test a trained run")
    evaluate.add_argument("--run", required=True, type=Path, help="a run folder of 'train'")
    evaluate.add_argument("--tasks", type=int, default=600, help="test tasks (default: 600)")
    evaluate.add_argument("--protocol", choices=PROTOCOLS, default="native")
    evaluate.add_argument("--checkpoint", choices=("best", "last"), default="best")
    evaluate.add_argument(
        "--device", choices=("cpu", "cuda"), help="where to evaluate (default: the run's device)"
    )
    return parser


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Defaults, overridden by the TOML file, overridden by the flags.

    Errors name each key as its user wrote it: ``--time-budget`` for a flag,
    ``run.toml: time_budget`` for a key of the file. An option the chosen algorithm does not
    have (:data:`mrmeta.config.APPLIES_TO`) is refused when the flags or the file set it;
    options left out keep their defaults and are never refused.
    """
    file_values = read_toml(args.config) if args.config is not None else {}
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    flag_values = {k: v for k, v in vars(args).items() if k in names}
    typed = {key.replace("-", "_"): key for key in file_values}

    def name(key: str) -> str:
        return _flag(key) if key in flag_values else f"{args.config}: {typed.get(key, key)}"

    values = {**{k.replace("-", "_"): v for k, v in file_values.items()}, **flag_values}
    config = TrainConfig.from_dict(values, name=name)
    problems = options_not_applying(config.algo, values)
    problems += _dataset_problem(config.dataset)
    if problems:
        raise ConfigError(problems=problems).renamed(name)
    return config


def _dataset_problem(dataset: str) -> list[tuple[str, str]]:
    """``[("dataset", why)]`` unless ``dataset`` names an image benchmark 'train' can train."""
    from mrmeta.data import image_datasets, is_image_dataset

    if is_image_dataset(dataset):
        return []
    return [("dataset", f"must be one of {', '.join(image_datasets())}; got {dataset!r}")]


def _run_train(args: argparse.Namespace) -> None:
    from mrmeta.train import train

    if args.resume:
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        overrides = {k: v for k, v in vars(args).items() if k in names}
        result = train(None, args.out, resume=True, overrides=overrides, progress=not args.quiet)
    else:
        result = train(config_from_args(args), args.out, progress=not args.quiet)
    if "test_accuracy" not in result:  # a rank other than 0 of a distributed run
        return
    accuracy = _accuracy_text(
        result["test_accuracy"], result["test_ci95"], result["test_tasks"], result["test_protocol"]
    )
    print(f"test accuracy: {accuracy}; results in {args.out}")


def _accuracy_text(mean: float, ci95: float, tasks: int, protocol: str) -> str:
    """``"93.10% ± 0.52% (95% CI, 600 tasks, native)"``; one task has no interval to show."""
    if tasks < 2:
        return f"{100 * mean:.2f}% (1 task: no confidence interval, {protocol})"
    return f"{100 * mean:.2f}% ± {100 * ci95:.2f}% (95% CI, {tasks} tasks, {protocol})"


def _run_eval(args: argparse.Namespace) -> None:
    from mrmeta.train import evaluate_run

    result = evaluate_run(
        args.run,
        tasks=args.tasks,
        protocol=args.protocol,
        checkpoint=args.checkpoint,
        device=args.device,
    )
    accuracy = _accuracy_text(result.mean, result.ci95, result.tasks, result.protocol)
    print(f"test accuracy: {accuracy}")


def _print_error(err: Exception) -> None:
    """One ``mrmeta: error:`` line per problem the error lists."""
    for line in str(err).splitlines() or [""]:
        print(f"mrmeta: error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. User mistakes print one line, no traceback."""
    from mrmeta.data import DataError
    from mrmeta.distributed import DistributedError
    from mrmeta.train import TrainingDiverged

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            _run_train(args)
        else:
            _run_eval(args)
    except (ConfigError, DataError, FileNotFoundError) as err:
        _print_error(err)
        return 2
    except (TrainingDiverged, DistributedError) as err:
        _print_error(err)
        return 1
    except KeyboardInterrupt:
        print(
            "mrmeta: interrupted; continue with 'mrmeta train --out DIR --resume'", file=sys.stderr
        )
        return 130
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
