"""Why iMAML trails at Omniglot 20-way 1-shot: its CG breaks down, and which λ stops that.

iMAML's meta-gradient solves ``(I + H_t/λ) v_t = ∇L_t^q(φ_t)`` by CG, with ``H_t`` the Hessian
of the support loss of the *whole network* at the adapted ``φ_t``. CG needs the matrix to be
positive definite; a step with ``pᵀ(I + H/λ)p ≤ 0``, i.e. a direction of curvature
``pᵀHp/‖p‖² ≤ −λ``, stops it (a *breakdown*: :class:`mrmeta.CGResult` ``failed``), and the
iterate before that step is used. This script measures, on one meta-batch of Omniglot training
tasks (the fair comparison's shape: 16 tasks, 1 shot, 5 queries) and at iMAML's tuned setting
otherwise (K = 10 steps of 0.1, N = 5 CG steps), for several λ:

* the fraction of tasks whose CG broke down, and after how many CG steps on average;
* the relative residual ``‖b − (I + H/λ)v‖ / ‖b‖`` of the returned ``v`` (1 = no better than 0);
* ``‖∇_φ g_t(φ^K)‖``, how far the K inner steps are from the lower level's minimiser;
* a negative curvature ``pᵀH_t p/‖p‖²`` of the support loss at ``φ^K`` found by power
  iteration (:func:`extreme_curvatures`): CG cannot break down once λ exceeds its size;
* the spectral radius of ``H_t`` found on the way: the inner steps of size ``α`` are stable
  only while ``α (λ + L) < 2`` for the largest curvature ``L`` along their path.

Each is measured at the initial network (seed 0) and at any checkpoint given with
``--checkpoint`` (for instance the best checkpoint of a fair-comparison run). The training
split only is read. Command (the results committed in benchmarks/results/)::

    python benchmarks/imaml_breakdowns.py --ways 20 \\
        --checkpoint runs/fair/final-20way1shot-imaml-seed0/best.pt

Writes ``imaml_breakdowns_<ways>way1shot.json`` and ``.md`` into ``--out``.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mrmeta._tree import TensorDict, expand_like, tree_dot, tree_norm
from mrmeta.config import TrainConfig
from mrmeta.implicit import CGResult, vjp_dict

sys.path.insert(0, str(Path(__file__).parent))
from _diagnostic_setup import (  # noqa: E402
    learner_at,
    network_states,
    parser_with_common_options,
    training_batch,
    write_diagnostic,
)


def cg_steps_before_breakdown(cg: CGResult) -> list[int]:
    """Per task, the CG steps that changed its residual (a failed system is frozen after)."""
    norms = cg.residual_norms  # (N + 1, B)
    changed = (norms[1:] != norms[:-1]).sum(0)
    return [int(c) for c in changed]


def extreme_curvatures(
    learner: Any, batch: Any, phi: TensorDict, iters: int
) -> tuple[Tensor, Tensor]:
    """Per task, the most negative curvature ``pᵀH_t p/‖p‖²`` of the support loss at ``φ_t``
    found by power iteration (an upper bound on ``H_t``'s smallest eigenvalue) and the spectral
    radius estimate ``s_t`` used to find it (a lower bound on ``max |eig H_t|``); both ``(T,)``.

    Power iteration on ``H_t`` gives ``s_t ≈`` its spectral radius; on ``H_t − s_t I`` (all of
    whose eigenvalues are ≤ 0 once ``s_t ≥ λ_max``) it converges to ``λ_min − s_t``. The
    Rayleigh quotient of the last iterate is returned, so the value is attained by a direction
    (a breakdown needs only one): CG's matrix ``I + H_t/λ`` is indefinite when it is ``< −λ``.
    """
    leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
    with torch.enable_grad():
        support = learner.model_losses(leaves, batch.support_x, batch.support_y).sum()
        grads = torch.autograd.grad(support, list(leaves.values()), create_graph=True)
    grad_s = dict(zip(leaves, grads, strict=True))
    generator = torch.Generator().manual_seed(0)

    def power(shift: Tensor) -> Tensor:
        v = {k: torch.randn(t.shape, generator=generator) for k, t in leaves.items()}
        quotient = torch.zeros(batch.num_tasks)
        for _ in range(iters):
            norm = tree_norm(v, batched=True)
            v = {k: t / expand_like(norm, t, True) for k, t in v.items()}
            hv = vjp_dict(grad_s, leaves, v)
            w = {k: hv[k].detach() - expand_like(shift, hv[k], True) * v[k] for k in v}
            quotient = tree_dot(v, w, batched=True) + shift
            v = w
        return quotient

    radius = power(torch.zeros(batch.num_tasks)).abs()
    return power(radius), radius


def measure(learner: Any, batch: Any, power_iters: int) -> dict[str, Any]:
    """Adapt, solve for ``v`` by CG and summarise the solve over the batch's tasks."""
    phi = learner.adapt(batch.support_x, batch.support_y)
    lowest, radius = extreme_curvatures(learner, batch, phi, power_iters)
    curvature = lowest.tolist()
    cg, _, inner_norm = learner.solve_implicit(batch, phi)
    relative = (cg.residual / cg.residual_norms[0]).tolist()  # CG starts at v = 0: r₀ = b
    failed = cg.failed.tolist()
    steps = cg_steps_before_breakdown(cg)
    broken = [s for s, f in zip(steps, failed, strict=True) if f]
    return {
        "breakdown_fraction": sum(failed) / len(failed),
        "cg_steps_before_breakdown_mean": statistics.mean(broken) if broken else None,
        "relative_residual_median": statistics.median(relative),
        "relative_residual_max": max(relative),
        "inner_grad_norm_median": statistics.median(inner_norm.tolist()),
        "negative_curvature_median": statistics.median(curvature),
        "negative_curvature_min": min(curvature),
        "spectral_radius_median": statistics.median(radius.tolist()),
    }


def main() -> None:
    parser = parser_with_common_options(__doc__.split("\n\n")[0])
    parser.add_argument("--regs", type=float, nargs="+", default=[0.5, 2.0, 8.0, 16.0])
    parser.add_argument("--power-iters", type=int, default=20)
    args = parser.parse_args()
    train_split, batch = training_batch(args)
    rows = []
    for state_name, state in network_states(args.checkpoint).items():
        for reg in args.regs:
            config = TrainConfig(
                algo="imaml", ways=args.ways, shots=args.shots, queries=args.queries, reg=reg
            )
            learner = learner_at(config, train_split, state)
            started = time.process_time()
            row = {"state": state_name, "reg": reg, **measure(learner, batch, args.power_iters)}
            row["cpu_seconds"] = time.process_time() - started
            print(json.dumps(row), flush=True)
            rows.append(row)
    fields = {
        "meta_batch": args.meta_batch,
        "queries": args.queries,
        "inner_steps": learner.options.inner_steps,
        "inner_lr": learner.options.inner_lr,
        "cg_iters": learner.options.cg_iters,
        "rows": rows,
    }
    write_diagnostic("imaml_breakdowns", args, fields, report)


def report(out: dict[str, Any]) -> str:
    """The measurements as a Markdown table."""
    lines = [
        f"# iMAML's CG at Omniglot {out['setting']}: breakdowns against λ",
        "",
        f"One meta-batch of {out['meta_batch']} training tasks ({out['queries']} queries), "
        f"K = {out['inner_steps']} inner steps of {out['inner_lr']}, N = {out['cg_iters']} CG "
        "steps. Command: `" + out["command"] + "`",
        "",
        "| network | λ | tasks whose CG broke down | CG steps before it (mean) "
        "| ‖b − Av‖/‖b‖ median (max) | ‖∇φ g‖ after K steps (median) "
        "| negative curvature of H found, median (min) | spectral radius of H, median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in out["rows"]:
        steps = r["cg_steps_before_breakdown_mean"]
        lines.append(
            f"| {r['state']} | {r['reg']:g} | {r['breakdown_fraction']:.0%} "
            f"| {'-' if steps is None else f'{steps:.1f}'} "
            f"| {r['relative_residual_median']:.3f} ({r['relative_residual_max']:.3f}) "
            f"| {r['inner_grad_norm_median']:.3g} "
            f"| {r['negative_curvature_median']:.3g} ({r['negative_curvature_min']:.3g}) "
            f"| {r['spectral_radius_median']:.3g} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
