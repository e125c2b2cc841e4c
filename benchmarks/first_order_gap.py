"""How far first-order MAML's meta-gradient is from MAML's, on Omniglot tasks.

First-order MAML replaces the Jacobian ``∂φ^K/∂θ = Π_k (I − α H_k)`` of its ``K`` inner
steps by the identity, so its meta-gradient is ``(1/B) Σ_t ∇L_t^q(φ_t^K)`` instead of MAML's
``(1/B) Σ_t [Π_k (I − α H_k)]ᵀ ∇L_t^q(φ_t^K)``. The two agree when ``α‖H_k‖`` is small and
part ways when the inner steps see strong curvature. This script computes both, with the same
inner loop (``--inner-steps``, ``--inner-lr``: first-order MAML's tuned setting by default), on
one meta-batch of Omniglot training tasks (16 tasks, 1 shot, 5 queries), at the initial
network (seed 0) and at each ``--checkpoint``, and reports

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

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mrmeta._checkpoint import load_checkpoint
from mrmeta._factory import build_learner, build_model
from mrmeta.config import TrainConfig
from mrmeta.data import TaskSampler, load_dataset

RESULTS = Path(__file__).parent / "results"


def meta_gradient(learner: Any, batch: Any) -> Tensor:
    """The learner's meta-gradient on ``batch``, flattened over its meta-parameters."""
    for p in learner.meta_parameters():
        p.grad = None
    learner.compute_meta_gradient(batch)
    return torch.cat([p.grad.flatten() for p in learner.meta_parameters()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--queries", type=int, default=5)
    parser.add_argument("--meta-batch", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--inner-lr", type=float, default=0.1)
    parser.add_argument("--checkpoint", type=Path, action="append", default=[])
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_split = load_dataset("omniglot", "train", root=args.data_root)
    batch = TaskSampler(train_split, args.ways, args.shots, args.queries, seed=0).sample(
        args.meta_batch
    )
    states: dict[str, dict[str, Tensor] | None] = {"initial network (seed 0)": None}
    for path in args.checkpoint:
        states[path.as_posix()] = load_checkpoint(path)["learner"]
    rows = []
    for state_name, state in states.items():
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
            torch.manual_seed(0)
            learner = build_learner(
                config, build_model(config, tuple(train_split.images.shape[-3:]))
            )
            if state is not None:
                learner.load_state_dict(state)
            grads[algo] = meta_gradient(learner, batch)
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
    out = {
        "setting": f"{args.ways}way{args.shots}shot",
        "meta_batch": args.meta_batch,
        "queries": args.queries,
        "inner_steps": args.inner_steps,
        "inner_lr": args.inner_lr,
        "rows": rows,
        "command": " ".join(sys.argv),
    }
    stem = f"first_order_gap_{out['setting']}"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(out, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(report(out))
    print(f"wrote {args.out / stem}.{{json,md}}")


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
