"""iMAML (Rajeswaran et al., 2019): implicit gradients of a proximally regularised inner loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from mrmeta._per_task import task_losses
from mrmeta._tree import TensorDict, tree_norm
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms._whole_network import (
    WholeNetworkLearner,
    WholeNetworkOptions,
    batched_forward,
)
from mrmeta.algorithms.base import ChunkStats, accumulate_grad, query_stats
from mrmeta.implicit import CGResult, conjugate_gradient, vjp_dict
from mrmeta.lower_level import l2_penalty
from mrmeta.tasks import TaskBatch


@dataclass(frozen=True, kw_only=True)
class IMAMLOptions(WholeNetworkOptions):
    """:class:`IMAML`'s options and their defaults (documented there)."""

    meta_lr: float = 0.001  # tuned
    inner_steps: int = 10
    inner_lr: float = 0.1  # tuned
    reg: float = 0.5  # tuned
    cg_iters: int = 5
    cg_tol: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("reg", check_finite_number("reg", self.reg, positive=True))
        self._store("cg_iters", check_positive_int("cg_iters", self.cg_iters))
        self._store("cg_tol", check_finite_number("cg_tol", self.cg_tol))


class IMAML(WholeNetworkLearner):
    r"""Implicit MAML: the whole network adapted under a proximal term, implicit meta-gradient.

    For task ``t`` with support loss ``L_t^s`` and query loss ``L_t^q`` (means over examples)
    the lower level is ``g_t(θ, φ) = L_t^s(φ) + λ/2 ‖φ − θ‖²``, solved approximately by ``K``
    plain gradient steps from ``φ⁰ = θ`` kept without a graph::

        φ^{k+1} = φ^k − α (∇L_t^s(φ^k) + λ (φ^k − θ))

    At ``φ_t = φ^K`` the implicit function theorem gives ``dφ_t*/dθ = (I + H_t/λ)⁻¹`` with
    ``H_t = ∇²L_t^s(φ_t)``, so the meta-gradient is::

        ∇F(θ) = (1/B) Σ_t v_t,    (I + H_t/λ) v_t = ∇L_t^q(φ_t)

    with ``v_t`` from ``N`` conjugate-gradient steps using Hessian-vector products by autograd.
    Memory is one graph of ``∇L_t^s`` per chunk, independent of ``K`` and ``N``. ``H_t`` is not
    positive semi-definite in general: CG stops at non-positive curvature and
    :attr:`StepStats.cg_residual` reports how well the system was solved.

    The defaults of the keyword options are the fields of :class:`IMAMLOptions`.

    Args:
        model: the network ``θ`` (every parameter that requires grad is adapted); maps
            ``(n, *input)`` to ``(n, out)``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``.
        reg: ``λ > 0``, the proximal coefficient.
        cg_iters: ``N ≥ 1``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        cg_tol: CG stops early once every residual norm is below this.

    Example (a meta-step and a prediction as for any :class:`~mrmeta.MetaLearner`):
        >>> from mrmeta import Conv4
        >>> learner = IMAML(Conv4(ways=5, hidden=8, image_size=28), inner_steps=5, cg_iters=5)
        >>> learner.options.reg
        0.5
    """

    options_type: ClassVar[type[IMAMLOptions]] = IMAMLOptions
    options: IMAMLOptions

    def inner_objective(self, x: Tensor, y: Tensor, phi: TensorDict, theta: TensorDict) -> Tensor:
        """``Σ_t [L_t^s(φ_t) + λ/2 ‖φ_t − θ‖²]`` on the support set ``(x, y)``."""
        support = self.model_losses(phi, x, y)
        return (support + l2_penalty(phi, theta, self.options.reg)).sum()

    def _damped_hvp(self, grad_s: TensorDict, phi: TensorDict, v: TensorDict) -> TensorDict:
        """``(I + H/λ) v`` per task, with ``H v`` a vector-Jacobian product of ``∇L^s``."""
        hv = vjp_dict(grad_s, phi, v)
        return {k: v[k] + hv[k] / self.options.reg for k in v}

    def solve_implicit(self, chunk: TaskBatch, phi: TensorDict) -> tuple[CGResult, Tensor, Tensor]:
        """CG on ``(I + H_t/λ) v_t = ∇L_t^q(φ_t)`` for every task of the chunk.

        Args:
            chunk: ``T`` tasks.
            phi: adapted parameters ``(T, *shape)``.

        Returns:
            The :class:`~mrmeta.CGResult` (solution ``(T, *shape)``), the query predictions
            ``(T, n_query, out)`` and ``‖∇_φ g_t(φ_t)‖`` per task ``(T,)`` (all detached).
        """
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        keys, values = list(leaves), list(leaves.values())
        with torch.enable_grad():
            pred = batched_forward(self.model, leaves, chunk.query_x)
            query = task_losses(pred, chunk.query_y, self.options.loss).sum()
            b = dict(zip(keys, torch.autograd.grad(query, values), strict=True))
            support = self.model_losses(leaves, chunk.support_x, chunk.support_y).sum()
            grads = torch.autograd.grad(support, values, create_graph=True)
            grad_s = dict(zip(keys, grads, strict=True))
            cg = conjugate_gradient(
                lambda v: self._damped_hvp(grad_s, leaves, v),
                b,
                iters=self.options.cg_iters,
                tol=self.options.cg_tol,
                batched=True,
            )
        theta = self.start_per_task(chunk.num_tasks)
        reg = self.options.reg
        inner = {k: grad_s[k].detach() + reg * (phi[k] - theta[k].detach()) for k in keys}
        return cg, pred.detach(), tree_norm(inner, batched=True)

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        phi = self.adapt(chunk.support_x, chunk.support_y)
        cg, pred, inner_norm = self.solve_implicit(chunk, phi)
        shares = {k: v.sum(0) / batch_size for k, v in cg.solution.items()}
        accumulate_grad(self.adapted_parameters(), shares)
        stats = query_stats(pred, chunk.query_y, self.options.loss)
        stats["inner_grad_norm"] = inner_norm.mean()
        stats["cg_residual"] = cg.residual.mean()
        stats["cg_breakdowns"] = cg.failed.to(cg.residual.dtype).mean()
        return stats
