"""How far first-order MAML's meta-gradient is from MAML's, on Omniglot tasks.

First-order MAML replaces the Jacobian ``∂φ^K/∂θ = Π_k (I − α H_k)`` of its ``K`` inner
steps by the identity, so its meta-gradient is ``(1/B) Σ_t ∇L_t^q(φ_t^K)`` instead of MAML's
``(1/B) Σ_t [Π_k (I − α H_k)]ᵀ ∇L_t^q(φ_t^K)``. The two agree when ``α‖H_k‖`` is small and
part ways when the inner steps see strong curvature. This script computes both, with the same
inner loop (``--inner-steps``, ``--inner-lr``: by default the first tuning study's first-order
MAML setting, 5 steps of 0.1), on one meta-batch of Omniglot training tasks (16 tasks, 1 shot,
5 queries), at the initial network (seed 0) and at each ``--checkpoint``, and reports

* the cosine between the two meta-gradients (1: the same direction; ≤ 0: first-order MAML's
  step does not descend MAML's objective to first order), and
* the ratio of their norms, first-order over exact.

Only the training split is read. Command (results committed in benchmarks/results/)::

    python benchmarks/first_order_gap.py --ways 20 \\
        --checkpoint runs/fair/final-20way1shot-fomaml-seed0/best.pt \\
        --checkpoint runs/fair/final-20way1shot-fomaml-seed0/last.pt

Writes ``first_order_gap_<ways>way1shot.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mrmeta.config import TrainConfig

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import (  # noqa: E402
    learner_at,
    network_states,
    parser_with_common_options,
    training_batch,
    write_diagnostic,
)


def meta_gradient(learner: Any, batch: Any) -> Tensor:
    """The learner's meta-gradient on ``batch``, flattened over its meta-parameters."""
    for p in learner.meta_parameters():
        p.grad = None
    learner.compute_meta_gradient(batch)
    return torch.cat([p.grad.flatten() for p in learner.meta_parameters()])


def main() -> None:
    parser = parser_with_common_options(__doc__.split("\n\n")[0])
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    args = parser.parse_args()
    train_split, batch = training_batch(args)
    rows = []
    for state_name, state in network_states(args.checkpoint).items():
        grads = {}
        started = time.process_time()
        for algo in ("maml", "fomaml"):
            config = TrainConfig(
                algo=algo,
                ways=args.ways,
                shots=args.shots,
                queries=args.queries,
                inner_steps=args.inner_steps,
                inner_lr=args.inner_lr,
            )
            grads[algo] = meta_gradient(learner_at(config, train_split, state), batch)
        exact, first = grads["maml"], grads["fomaml"]
        row = {
            "state": state_name,
            "cosine": float(torch.nn.functional.cosine_similarity(first, exact, dim=0)),
            "norm_ratio": float(first.norm() / exact.norm()),
            "exact_norm": float(exact.norm()),
            "cpu_seconds": time.process_time() - started,
        }
        print(json.dumps(row), flush=True)
        rows.append(row)
    fields = {
        "meta_batch": args.meta_batch,
        "queries": args.queries,
        "inner_steps": args.inner_steps,
        "inner_lr": args.inner_lr,
        "rows": rows,
    }
    write_diagnostic("first_order_gap", args, fields, report)


def report(out: dict[str, Any]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        f"# First-order MAML's meta-gradient against MAML's, Omniglot {out['setting']}",
        "",
        f"One meta-batch of {out['meta_batch']} training tasks ({out['queries']} queries), "
        f"the same inner loop for both: K = {out['inner_steps']} steps of {out['inner_lr']}. "
        "Command: `" + out["command"] + "`",
        "",
        "| network | cosine(first-order, exact) | ‖first-order‖ / ‖exact‖ | ‖exact‖ |",
        "|---|---|---|---|",
    ]
    for r in out["rows"]:
        lines.append(
            f"| {r['state']} | {r['cosine']:.3f} | {r['norm_ratio']:.3f} | {r['exact_norm']:.3g} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
