"""Newton's start: iterations and time per task with and without the ray start.

mrml solves each task's lower level by Newton's method (:func:`mrmeta.lower_level.newton_solve`).
By default it starts at :meth:`~mrmeta.lower_level.LinearHeadProblem.newton_start`, the best
point of a grid on the ray from the given start through the squared-loss (ridge) solution,
rather than at the given start (zero) itself. This script measures both on one meta-batch of
Omniglot training tasks (seed 0), each task solved on its own as in training (chunks of one
task, one thread, a float32 model solved in float64 as :func:`~mrmeta.lower_level.
solve_lower_level` does), at mrml's default settings: Newton iterations per task (mean and
max), milliseconds per task (median of ``--repeats`` interleaved repetitions, summed over the
tasks), the largest final ``‖∇_φ g‖`` and the largest difference between the two solutions.
At the initial network (Conv4, seed 0) and at any checkpoint given with ``--checkpoint``.
The training split only is read. Commands (the results committed in benchmarks/results/ were
measured at the defaults of the time, μ = 0.1; today's default is 0.03)::

    python benchmarks/newton_start.py --ways 20
    python benchmarks/newton_start.py --ways 5

Writes ``newton_start_<ways>way<shots>shot.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mrmeta._per_task import task_features
from mrmeta.config import TrainConfig
from mrmeta.lower_level import solve_lower_level

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import (  # noqa: E402
    learner_at,
    network_states,
    parser_with_common_options,
    training_batch,
    write_diagnostic,
)

STARTS = {"ray start (default)": True, "from the given start (zero)": False}


def measure(learner: Any, batch: Any, repeats: int) -> dict[str, Any]:
    """Both starts on every task of ``batch``, one task at a time, interleaved."""
    with torch.no_grad():
        features = task_features(learner.backbone, batch.support_x)
    problems = [
        learner.problem(features[t : t + 1], batch.support_y[t : t + 1])
        for t in range(batch.num_tasks)
    ]
    options = learner.options
    seconds: dict[str, list[float]] = {name: [] for name in STARTS}
    solutions: dict[str, list[Any]] = {}
    for _ in range(repeats):
        for name, ray in STARTS.items():
            started = time.perf_counter()
            solutions[name] = [
                solve_lower_level(
                    problem,
                    learner.head_start(1),
                    solver=options.inner_solver,
                    max_iters=options.inner_steps,
                    tol=options.inner_tol,
                    lr=options.inner_lr,
                    ray_start=ray,
                )
                for problem in problems
            ]
            seconds[name].append(time.perf_counter() - started)
    rows = {}
    for name, solved in solutions.items():
        iterations = [int(report.iterations) for _, report in solved]
        rows[name] = {
            "iterations_mean": statistics.mean(iterations),
            "iterations_max": max(iterations),
            "ms_per_task": 1e3 * statistics.median(seconds[name]) / len(problems),
            "grad_norm_max": max(float(report.grad_norm) for _, report in solved),
        }
    ray, zero = (solutions[name] for name in STARTS)
    difference = max(
        float((a[0][k] - b[0][k]).abs().max()) for a, b in zip(ray, zero, strict=True) for k in a[0]
    )
    return {"starts": rows, "solution_difference_max": difference}


def main() -> None:
    parser = parser_with_common_options(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    train_split, batch = training_batch(args)
    config = TrainConfig(algo="mrml", ways=args.ways, shots=args.shots, queries=args.queries)
    rows = []
    for state_name, state in network_states(args.checkpoint).items():
        learner = learner_at(config, train_split, state)
        row = {"state": state_name, **measure(learner, batch, args.repeats)}
        print(row, flush=True)
        rows.append(row)
    fields = {
        "meta_batch": args.meta_batch,
        "repeats": args.repeats,
        "inner_tol": learner.options.inner_tol,
        "l2": learner.options.l2,
        "torch": torch.__version__,
        "rows": rows,
    }
    write_diagnostic("newton_start", args, fields, report)


def report(out: dict[str, Any]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        f"# Newton's start at Omniglot {out['setting']}: iterations and time per task",
        "",
        f"One meta-batch of {out['meta_batch']} training tasks, each solved on its own (one "
        f"thread) to ‖∇φ g‖ ≤ {out['inner_tol']:g} at μ = {out['l2']:g}; time: median of "
        f"{out['repeats']} interleaved repetitions. Command: `{out['command']}`",
        "",
        "| network | start | Newton iterations per task, mean (max) | ms per task "
        "| largest final ‖∇φ g‖ |",
        "|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        for name, start in row["starts"].items():
            lines.append(
                f"| {row['state']} | {name} | {start['iterations_mean']:.2f} "
                f"({start['iterations_max']}) | {start['ms_per_task']:.2f} "
                f"| {start['grad_norm_max']:.1e} |"
            )
    lines += ["", "Largest difference between the two solutions (max abs entry of φ):", ""]
    lines += [f"- {row['state']}: {row['solution_difference_max']:.1e}" for row in out["rows"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
