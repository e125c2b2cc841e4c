"""What the diagnostics (``imaml_breakdowns.py``, ``first_order_gap.py``, ``newton_start.py``,
``class_block_solve.py``, ``frozen_protocol_step.py``, ``run_trajectory.py``) share: their
command-line options, the Omniglot meta-batch they measure on, the network states (the initial
one and any checkpoints), the learner built at each state, and how results are written."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from mrmeta import MetaLearner, TaskBatch
from mrmeta._checkpoint import load_checkpoint
from mrmeta._factory import build_learner, build_model
from mrmeta.config import TrainConfig
from mrmeta.data import FewShotDataset, TaskSampler, load_dataset

RESULTS = Path(__file__).parent / "results"
INITIAL = "initial network (seed 0)"


def parser_with_common_options(description: str) -> argparse.ArgumentParser:
    """``--ways --shots --queries --meta-batch --checkpoint --data-root --out``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    return parser


def training_batch(args: argparse.Namespace) -> tuple[FewShotDataset, TaskBatch]:
    """Omniglot's training split and one meta-batch drawn from it with seed 0 (one thread)."""
    torch.set_num_threads(1)
    train_split = load_dataset("omniglot", "train", root=args.data_root)
    sampler = TaskSampler(train_split, args.ways, args.shots, args.queries, seed=0)
    return train_split, sampler.sample(args.meta_batch)


def network_states(checkpoints: list[Path]) -> dict[str, dict[str, torch.Tensor] | None]:
    """The states measured, by name: the initial network (``None``) and each checkpoint's
    learner state (loaded with ``weights_only``)."""
    states: dict[str, dict[str, torch.Tensor] | None] = {INITIAL: None}
    for path in checkpoints:
        states[path.as_posix()] = load_checkpoint(path)["learner"]
    return states


def learner_at(
    config: TrainConfig, split: FewShotDataset, state: dict[str, torch.Tensor] | None
) -> MetaLearner:
    """The learner of ``config`` on Conv4 initialised with seed 0, then given ``state``."""
    torch.manual_seed(0)
    learner = build_learner(config, build_model(config, tuple(split.images.shape[-3:])))
    if state is not None:
        learner.load_state_dict(state)
    return learner


def write_results(
    out: dict[str, Any], stem: str, folder: Path, report: Callable[[dict[str, Any]], str]
) -> None:
    """``<stem>.json`` (``out``) and ``<stem>.md`` (``report(out)``) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / f"{stem}.md").write_text(report(out))
    print(f"wrote {folder / stem}.{{json,md}}")


def write_diagnostic(
    name: str,
    args: argparse.Namespace,
    fields: dict[str, Any],
    report: Callable[[dict[str, Any]], str],
) -> None:
    """A diagnostic's results, ``<name>_<ways>way<shots>shot.{json,md}`` into ``args.out``:
    the setting, then ``fields``, then the command that ran (:func:`write_results`)."""
    setting = f"{args.ways}way{args.shots}shot"
    out = {"setting": setting, **fields, "command": " ".join(sys.argv)}
    write_results(out, f"{name}_{setting}", args.out, report)
