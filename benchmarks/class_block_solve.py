"""The two exact solves of a linear head's Newton system: time per solve, by the number of logits.

mrml's lower level is solved by Newton's method with exact directions
(:meth:`mrmeta.lower_level._LinearCurvature.solve`, also the exact solve of ``v``). Up to
``SMALL_SYSTEM`` logits (``n·C``) the system is solved in the logit space (one ``n·C``-square
system); beyond it by the class-block structure of the Hessian (``C`` systems of size
``min(n, d+1)`` and one of size ``n``). This script times both on the same systems, to check where
the switch belongs: for each setting, one meta-batch of Omniglot training tasks (seed 0), each
task on its own as in training (one thread, float64 as Newton solves it), at mrml's default μ and
at the lower level's solution ``φ*`` with the right-hand side of ``v`` (``∇_φ f``). It reports
milliseconds per solve (median of ``--repeats`` interleaved repetitions after one untimed,
averaged over the tasks), each solve's largest relative residual ``‖H x − r‖ / ‖r‖``, and the
largest relative difference between the two. At the initial network (Conv4, seed 0) and at any
checkpoint given with ``--checkpoint`` (of the same setting). The training split only is read.
Command (the results committed in benchmarks/results/)::

    python benchmarks/class_block_solve.py --settings 5x1 10x1 12x1 15x1 20x1 5x5

Writes ``class_block_solve.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mrmeta import lower_level
from mrmeta._per_task import task_features
from mrmeta._tree import tree_norm, tree_sub
from mrmeta.config import TrainConfig
from mrmeta.data import TaskSampler
from mrmeta.lower_level import LinearHeadProblem, solve_lower_level

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import (  # noqa: E402
    learner_at,
    network_states,
    parser_with_common_options,
    training_batch,
    write_results,
)

# Each solve forced by the threshold that selects it (the module's switch, set per call).
SOLVES = {"logit space": sys.maxsize, "class blocks": 0}


def _wide(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: t.detach().double() for k, t in tensors.items()}


def measure(learner: Any, batch: Any, repeats: int) -> dict[str, Any]:
    """Both solves on every task of ``batch``, one task at a time, interleaved."""
    options = learner.options
    with torch.no_grad():
        support = task_features(learner.backbone, batch.support_x)
        query = task_features(learner.backbone, batch.query_x)
    systems = []
    for t in range(batch.num_tasks):
        problem = learner.problem(support[t : t + 1], batch.support_y[t : t + 1])
        phi, _ = solve_lower_level(
            problem,
            learner.head_start(1),
            solver="newton",
            max_iters=options.inner_steps,
            tol=options.inner_tol,
            lr=options.inner_lr,
        )
        wide = LinearHeadProblem(
            problem.features.double(),
            problem.labels,
            _wide(problem.center),
            problem.l2,
            problem.loss,
        )
        query_t, labels_t = query[t : t + 1].double(), batch.query_y[t : t + 1]
        _, rhs = wide.outer_gradient(_wide(phi), query_t, labels_t)
        systems.append((wide.curvature(_wide(phi)), rhs))
    seconds: dict[str, list[float]] = {name: [] for name in SOLVES}
    solutions: dict[str, list[dict[str, torch.Tensor]]] = {}
    switch = lower_level.SMALL_SYSTEM
    try:
        for repeat in range(repeats + 1):  # the first round warms up, and is not timed
            for name, threshold in SOLVES.items():
                lower_level.SMALL_SYSTEM = threshold
                started = time.perf_counter()
                solutions[name] = [curvature.solve(rhs) for curvature, rhs in systems]
                if repeat > 0:
                    seconds[name].append(time.perf_counter() - started)
    finally:
        lower_level.SMALL_SYSTEM = switch
    rows = {}
    for name, solved in solutions.items():
        residuals = [
            float(tree_norm(tree_sub(curvature.hvp(x), rhs)) / tree_norm(rhs))
            for (curvature, rhs), x in zip(systems, solved, strict=True)
        ]
        rows[name] = {
            "ms_per_solve": 1e3 * statistics.median(seconds[name]) / len(systems),
            "relative_residual_max": max(residuals),
        }
    first, second = (solutions[name] for name in SOLVES)
    difference = max(
        float(tree_norm(tree_sub(a, b)) / tree_norm(a)) for a, b in zip(first, second, strict=True)
    )
    return {"solves": rows, "relative_difference_max": difference}


def main() -> None:
    parser = parser_with_common_options(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--settings", nargs="+", default=["5x1", "20x1"], help="ways x shots, e.g. 20x1"
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    rows = []
    for setting in args.settings:
        args.ways, args.shots = (int(part) for part in setting.split("x"))
        train_split, _ = training_batch(args)
        batch = TaskSampler(train_split, args.ways, args.shots, args.queries, seed=0).sample(
            args.meta_batch
        )
        config = TrainConfig(algo="mrml", ways=args.ways, shots=args.shots, queries=args.queries)
        for state_name, state in network_states(args.checkpoint).items():
            learner = learner_at(config, train_split, state)
            logits = args.ways * args.shots * args.ways
            row = {"setting": setting, "logits": logits, "state": state_name}
            row.update(measure(learner, batch, args.repeats))
            print(row, flush=True)
            rows.append(row)
    out = {
        "meta_batch": args.meta_batch,
        "repeats": args.repeats,
        "l2": learner.options.l2,
        "small_system": lower_level.SMALL_SYSTEM,
        "torch": torch.__version__,
        "rows": rows,
        "command": " ".join(sys.argv),
    }
    write_results(out, "class_block_solve", args.out, report)


def report(out: dict[str, Any]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        "# The exact Newton solve of a linear head: logit space against class blocks",
        "",
        f"One meta-batch of {out['meta_batch']} Omniglot training tasks per setting, each task "
        f"solved on its own (one thread, float64) at μ = {out['l2']:g}, at the lower level's "
        f"solution, right-hand side ∇φ f; time: median of {out['repeats']} interleaved "
        "repetitions, per solve. mrml switches from the logit-space solve to the class-block "
        f"solve above {out['small_system']} logits (n·C). Command: `{out['command']}`",
        "",
        "| setting (ways x shots) | logits n·C | network | logit space, ms | class blocks, ms "
        "| class blocks / logit space | largest relative residual (logit space, class blocks) "
        "| largest relative difference |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in out["rows"]:
        logit, blocks = (row["solves"][name] for name in SOLVES)
        lines.append(
            f"| {row['setting']} | {row['logits']} | {row['state']} "
            f"| {logit['ms_per_solve']:.3f} | {blocks['ms_per_solve']:.3f} "
            f"| {blocks['ms_per_solve'] / logit['ms_per_solve']:.2f} "
            f"| {logit['relative_residual_max']:.1e}, {blocks['relative_residual_max']:.1e} "
            f"| {row['relative_difference_max']:.1e} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
