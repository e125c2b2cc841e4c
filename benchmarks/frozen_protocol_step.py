"""The frozen-backbone test protocol's fixed head step against the features it is applied to.

The protocol (:func:`mrmeta.evaluate.frozen_backbone_predict`) trains a linear head from zero
by ``steps`` gradient steps of a fixed size ``lr`` (20 of 0.05) on each task's support
cross-entropy. Gradient descent on a task's loss is stable for ``lr < 2 / L_t``, where

    L_t = ½ ‖[Z_t, 1]‖₂² / n        (:func:`mrmeta.lower_level.linear_head_lipschitz`, μ = 0)

bounds the curvature from above (so ``2 / L_t`` is a guaranteed-stable step, not the largest
one); ``L_t`` grows with the square of the feature norm, so a step that suits a young backbone
may be too large for a trained one. For each checkpoint this script reports the support
features' mean norm, the median of ``2 / L_t`` over the tasks, and the protocol's
accuracy at each ``(steps, lr)`` asked for, on validation tasks only (the test split is not
read)::

    python benchmarks/frozen_protocol_step.py --ways 5 --queries 15 \\
        --checkpoint runs/fair/long-5way1shot-mrml/best.pt --out benchmarks/results
"""

from __future__ import annotations

import inspect
import statistics
from pathlib import Path
from typing import Any

import torch
from _diagnostic_setup import learner_at, parser_with_common_options, write_diagnostic

from mrmeta._checkpoint import load_checkpoint
from mrmeta._per_task import task_features
from mrmeta.config import TrainConfig
from mrmeta.data import FewShotDataset, TaskSampler, load_dataset
from mrmeta.evaluate import backbone_of, frozen_backbone_predict
from mrmeta.lower_level import linear_head_lipschitz

_PROTOCOL_DEFAULTS = inspect.signature(frozen_backbone_predict).parameters
PROTOCOL_STEP = (_PROTOCOL_DEFAULTS["steps"].default, _PROTOCOL_DEFAULTS["lr"].default)
"""The protocol's own ``(steps, lr)``, read from :func:`frozen_backbone_predict`'s defaults."""


def measure_checkpoint(
    path: Path,
    split: FewShotDataset,
    args: Any,
    settings: list[tuple[int, float]],
) -> dict[str, Any]:
    """Feature norm, ``2 / L_t`` and the protocol's accuracy at each ``(steps, lr)`` for the
    backbone saved in ``path``, on ``args.tasks`` validation tasks (seed 0, batches of 32)."""
    state = load_checkpoint(path)
    config = TrainConfig.from_saved(state["config"], source=str(path))
    backbone = backbone_of(learner_at(config, split, state["learner"]))
    sampler = TaskSampler(split, args.ways, args.shots, args.queries, seed=0)
    batches = [sampler.sample(min(32, args.tasks - i)) for i in range(0, args.tasks, 32)]
    norms, bounds = [], []
    correct = {setting: 0.0 for setting in settings}
    with torch.no_grad():
        for batch in batches:
            features = task_features(backbone, batch.support_x)  # (T, n, d)
            norms += features.norm(dim=-1).mean(dim=1).tolist()
            lipschitz = linear_head_lipschitz(features, "cross_entropy", args.ways, 0.0)
            bounds += (2.0 / lipschitz).tolist()
            for steps, lr in settings:
                logits = frozen_backbone_predict(backbone, batch, args.ways, steps=steps, lr=lr)
                hits = (logits.argmax(-1) == batch.query_y).float().mean(dim=1)
                correct[(steps, lr)] += float(hits.sum())
    return {
        "checkpoint": path.as_posix(),
        "algo": config.algo,
        "iteration": state.get("progress", {}).get("iteration"),
        "feature_norm_mean": statistics.mean(norms),
        "stable_step_median": statistics.median(bounds),
        "accuracy": [
            {"steps": steps, "lr": lr, "accuracy": correct[(steps, lr)] / args.tasks}
            for steps, lr in settings
        ],
    }


def report(out: dict[str, Any]) -> str:
    """Markdown: one row per checkpoint, one accuracy column per ``(steps, lr)``."""
    settings = [(a["steps"], a["lr"]) for a in out["checkpoints"][0]["accuracy"]]
    head = " | ".join(f"{s} steps of {lr:g}" for s, lr in settings)
    lines = [
        f"# Frozen-backbone protocol: its fixed head step, Omniglot {out['setting']}",
        "",
        f"Command: `{out['command']}`. {out['tasks']} validation tasks (seed 0); the protocol's "
        f"own setting is {PROTOCOL_STEP[0]} steps of {PROTOCOL_STEP[1]:g}. `2 / L` is the "
        "median over tasks of `2 / L_t`, with `L_t` an upper bound on the support "
        "cross-entropy's curvature: below it gradient descent is guaranteed stable.",
        "",
        f"| checkpoint | algo | iteration | mean feature norm | 2 / L | {head} |",
        "|---|---|---|---|---|" + "---|" * len(settings),
    ]
    for row in out["checkpoints"]:
        accs = " | ".join(f"{100 * a['accuracy']:.2f}%" for a in row["accuracy"])
        lines.append(
            f"| `{row['checkpoint']}` | {row['algo']} | {row['iteration']} | "
            f"{row['feature_norm_mean']:.1f} | {row['stable_step_median']:.4f} | {accs} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = parser_with_common_options(__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=96)
    parser.add_argument(
        "--setting",
        nargs=2,
        action="append",
        metavar=("STEPS", "LR"),
        help="a (steps, lr) to measure; default: the protocol's and 20 steps of 0.01, 0.005",
    )
    args = parser.parse_args()
    if not args.checkpoint:
        parser.error("give at least one --checkpoint (a run folder's best.pt or last.pt)")
    settings = [(int(s), float(lr)) for s, lr in args.setting or []] or [
        PROTOCOL_STEP,
        (100, 0.05),
        (20, 0.01),
        (20, 0.005),
    ]
    torch.set_num_threads(1)
    split = load_dataset("omniglot", "val", root=args.data_root)
    fields = {
        "tasks": args.tasks,
        "checkpoints": [measure_checkpoint(p, split, args, settings) for p in args.checkpoint],
    }
    write_diagnostic("frozen_protocol_step", args, fields, report)


if __name__ == "__main__":
    main()
