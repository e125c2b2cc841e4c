"""The ``mrmeta`` command: ``train`` and ``eval``. It parses arguments and calls the library."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from mrmeta import __version__
from mrmeta.config import (
    ALGORITHMS,
    OPTIMIZERS,
    PROTOCOLS,
    ConfigError,
    TrainConfig,
    is_switch,
    options_not_applying,
    read_toml,
)
from mrmeta.data import available_datasets
from mrmeta.errors import (
    DataError,
    MrmetaError,
    OutOfMemory,
    RunWriteError,
    TrainingDiverged,
    TrainingInterrupted,
)
from mrmeta.evaluate import format_accuracy

HELP = {
    "algo": f"meta-learning method: {', '.join(ALGORITHMS)}",
    "dataset": f"image benchmark: {', '.join(available_datasets(images_only=True))}",
    "data_root": "folder holding the dataset files (else $MRMETA_DATA, else ~/.cache/mrmeta)",
    "download": "download Omniglot's official archives into the data root if no copy is found "
    "(--no-download forbids it; other datasets are bring-your-own)",
    "omniglot_split": "Omniglot split: lake (by alphabet) or vinyals (1200/423 chars + rotations)",
    "ways": "classes per task N",
    "shots": "support examples per class K",
    "queries": "query examples per class",
    "meta_batch": "tasks per meta-iteration |B|",
    "iterations": "number of meta-iterations",
    "time_budget": "stop after this many seconds of meta-training",
    "budget_clock": "what --time-budget counts: wall (elapsed seconds) or cpu (the process's CPU "
    "seconds: with --threads 1, robust to other load on the machine)",
    "inner_solver": "lower-level solver of mrml: newton (to --inner-tol, at most --inner-steps "
    "iterations) or gd (--inner-steps plain steps of --inner-lr; the paper's)",
    "inner_steps": "inner gradient steps K, or Newton's cap",
    "inner_tol": "Newton stops once every task's lower-level gradient norm is below this (mrml)",
    "inner_lr": "inner step size, or 'auto' (1/L per task; head-only methods)",
    "cg_iters": "CG iterations N (mrml, imaml); 0: no implicit term (mrml with --exact-v: only "
    "0 or not matters)",
    "l2": "L2 coefficient mu of the lower level (mrml, itd-bio)",
    "reg": "proximal coefficient lambda of iMAML",
    "warm_start_head": "warm-start the head per task slot across iterations (mrml)",
    "warm_start_cg": "warm-start CG per task slot across iterations (mrml, with --no-exact-v)",
    "learn_head_init": "meta-learn the head's starting point too (mrml)",
    "exact_v": "solve for v exactly (linear head: one Woodbury solve) instead of --cg-iters "
    "CG steps (mrml)",
    "optimizer": f"outer optimizer: {', '.join(OPTIMIZERS)}",
    "lr": "outer learning rate (meta_lr)",
    "chunk_size": "tasks processed together: a number, or 'all'",
    "backbone": "feature extractor: conv4 or resnet12 (4 residual blocks, per-task BatchNorm)",
    "adapt": "what mrml/anil/itd-bio adapt per task: head, or last-block (last block + head)",
    "hidden": "Conv4 filters per layer; ResNet-12: first block's width h (blocks h-2.5h-5h-10h)",
    "seed": "random seed (model init, tasks)",
    "device": "cpu or cuda",
    "threads": "torch CPU threads",
    "val_every": "validate every this many iterations",
    "val_every_seconds": "validate also every this many seconds of training (--budget-clock's "
    "clock), so that every method is validated at the same times",
    "val_tasks": "validation tasks",
    "test_tasks": "test tasks at the end (>= 600 for a publishable number; 0: no test, e.g. "
    "while tuning on the validation split)",
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
    "inner_tol": float,
    "inner_solver": str,
    "l2": float,
    "reg": float,
    "cg_iters": int,
    "time_budget": float,
    "val_every_seconds": float,
    "lr": float,
    "data_root": str,
    "threads": int,
}


def _default_text(name: str, default: object) -> str:
    """The default shown in ``--help``: per algorithm for the options the algorithm sets."""
    from mrmeta.algorithms import ALGORITHMS as CLASSES
    from mrmeta.algorithms import algorithm_defaults
    from mrmeta.config import ALGORITHM_OPTIONS

    option = "meta_lr" if name == "lr" else name  # the outer lr lives with the algorithm's
    if (option not in ALGORITHM_OPTIONS and option != "meta_lr") or default is not None:
        return str(default)
    per_algo = [
        f"{algo} {algorithm_defaults(algo)[option]}"
        for algo in CLASSES
        if option in algorithm_defaults(algo)
    ]
    return ", ".join(per_algo)


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`TrainConfig` field; unset flags stay out of the namespace."""
    defaults = TrainConfig()
    for field in dataclasses.fields(TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        default = getattr(defaults, field.name)
        kwargs: dict[str, Any] = {
            "dest": field.name,
            "default": argparse.SUPPRESS,
            "help": f"{HELP[field.name]} (default: {_default_text(field.name, default)})",
        }
        if is_switch(field.name):
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
    train.add_argument(
        "--out", required=True, type=Path, help="run folder (new, or the run to --resume)"
    )
    train.add_argument("--config", type=Path, help="TOML file whose keys match the flags")
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out (settings given again must equal the saved ones)",
    )
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
    evaluate.add_argument(
        "--data-root",
        help="where the data is now (default: the run's, else $MRMETA_DATA, else ~/.cache/mrmeta)",
    )
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def given_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The settings the command gave: the TOML file's, overridden by the flags typed."""
    values: dict[str, Any] = {}
    if args.config is not None:
        values.update(read_toml(args.config))
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    return values


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

    if args.resume:  # what is given again must match the run (see mrmeta.train.resumed_config)
        settings = given_settings(args)
        try:
            result = train(None, args.out, resume=True, overrides=settings, progress=not args.quiet)
        except ConfigError as err:  # name the settings as the flags the user typed
            raise err.renamed(lambda key: _flag(key) if key in settings else key) from None
    else:
        result = train(config_from_args(args), args.out, progress=not args.quiet)
    if "test_accuracy" not in result:  # a rank other than 0 of a distributed run
        return
    if result["test_accuracy"] is None:
        print(
            f"no test (--test-tasks 0); best validation accuracy "
            f"{100 * result['best_val_accuracy']:.2f}%; results in {args.out}"
        )
        return
    accuracy = format_accuracy(
        result["test_accuracy"], result["test_ci95"], result["test_tasks"], result["test_protocol"]
    )
    print(f"test accuracy: {accuracy}; results in {args.out}")


def _run_eval(args: argparse.Namespace) -> None:
    from mrmeta.train import evaluate_run

    result = evaluate_run(
        args.run,
        tasks=args.tasks,
        protocol=args.protocol,
        checkpoint=args.checkpoint,
        device=args.device,
        data_root=args.data_root,
        progress=not args.quiet,
    )
    print(f"test accuracy: {result}")  # says which checkpoint was tested


def _print_error(err: Exception) -> None:
    """One ``mrmeta: error:`` line per problem the error lists."""
    for line in str(err).splitlines() or [""]:
        print(f"mrmeta: error: {line}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status. User mistakes print one line, no traceback."""
    from mrmeta.distributed import DistributedError

    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            _run_train(args)
        else:
            _run_eval(args)
    except TrainingInterrupted as err:
        print(f"mrmeta: {err}", file=sys.stderr)
        return 128 + err.signal_number
    except (TrainingDiverged, DistributedError, RunWriteError, OutOfMemory) as err:
        _print_error(err)
        return 1
    except (MrmetaError, DataError, FileNotFoundError) as err:
        _print_error(err)
        return 2
    except KeyboardInterrupt:
        print("mrmeta: interrupted", file=sys.stderr)
        return 130
    return 0


def run() -> NoReturn:
    """The ``mrmeta`` command: :func:`main`, then the process ends with its exit status."""
    from mrmeta.distributed import exit_process

    exit_process(main())


if __name__ == "__main__":  # pragma: no cover
    run()
