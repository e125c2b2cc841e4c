r"""The head-only methods' common base (MemoryReduced, ITD-BiO, ANIL) and the unrolled ones'.

Their lower level is a per-task head on backbone features; its problem, derivatives and
solvers live in :mod:`mrmeta.lower_level`. This module only ties them to a backbone and a head.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mrmeta._per_task import batched_head_forward, check_loss_name, task_features, task_losses
from mrmeta._tree import TensorDict, tree_detach, tree_norm
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms.base import ChunkedLearner, ChunkStats, backward_query_loss
from mrmeta.inner import unrolled_gradient_descent
from mrmeta.lower_level import (
    HeadProblem,
    Solver,
    SolveReport,
    check_inner_lr,
    check_solver,
    head_problem,
    l2_penalty,
    solve_lower_level,
)
from mrmeta.tasks import TaskBatch


class HeadLearner(ChunkedLearner):
    r"""Base of the methods whose lower level is a per-task head on shared backbone features.

    For task ``t`` with support features ``Z_s = backbone(x_s)`` the lower level is::

        g_t(φ) = L(head_φ(Z_s), y_s) + μ/2 ‖φ − c‖²

    with ``c`` the head's (meta-learned) starting point when ``learn_head_init``, else ``0``,
    solved from the head's parameters ``φ⁰`` by ``inner_solver`` (see
    :func:`mrmeta.lower_level.solve_lower_level`). Subclasses differ in how the meta-gradient
    flows through it.

    Args:
        backbone: maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task module ``φ``; its parameters are ``φ⁰``.
        inner_steps: ``K ≥ 0``: the number of gradient steps, or Newton's cap.
        inner_lr: ``λ > 0``, or ``"auto"`` (``nn.Linear`` heads): ``λ_t = 1/L_t`` from
            :func:`~mrmeta.lower_level.linear_head_lipschitz` (gradient steps only).
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together.
        l2: ``μ ≥ 0``.
        learn_head_init: meta-learn ``φ⁰`` (it then also centres the L2 term).
        inner_solver: ``"newton"`` or ``"gd"``.
        inner_tol: Newton stops once ``‖∇_φ g_t‖ ≤ inner_tol`` for every task.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        inner_steps: int,
        inner_lr: float | Literal["auto"],
        loss: str,
        chunk_size: int | None,
        l2: float,
        learn_head_init: bool,
        inner_solver: Solver = "gd",
        inner_tol: float = 0.0,
    ) -> None:
        super().__init__(chunk_size)
        self.backbone, self.head = backbone, head
        self.inner_steps = check_positive_int("inner_steps", inner_steps, minimum=0)
        self.inner_lr = check_inner_lr(inner_lr, head)
        self.loss = check_loss_name(loss)
        self.l2 = check_finite_number("l2", l2)
        self.inner_solver = check_solver(inner_solver, self.l2)
        self.inner_tol = check_finite_number("inner_tol", inner_tol)
        self.learn_head_init = bool(learn_head_init)
        head.requires_grad_(self.learn_head_init)

    def feature_extractor(self) -> nn.Module:
        """The shared backbone ``θ``."""
        return self.backbone

    def head_start(self, tasks: int) -> TensorDict:
        """``φ⁰`` repeated per task, detached: ``(T, *shape)`` (a view, no copy)."""
        return {k: p.detach().expand(tasks, *p.shape) for k, p in self.head.named_parameters()}

    def l2_center(self, tasks: int) -> TensorDict:
        """The centre ``c`` of the L2 term per task: ``φ⁰`` when learned, else zeros."""
        start = self.head_start(tasks)
        if self.learn_head_init:
            return start
        return {k: torch.zeros_like(v) for k, v in start.items()}

    def problem(self, features: Tensor, labels: Tensor) -> HeadProblem:
        """The lower level of a chunk: support ``features (T, n, d)`` (detached) and labels."""
        center = self.l2_center(features.shape[0])
        return head_problem(self.head, features, labels, center, l2=self.l2, loss=self.loss)

    def solve(self, problem: HeadProblem, start: TensorDict) -> tuple[TensorDict, SolveReport]:
        """``φ`` of every task of the chunk from ``start``, without a graph, and its report."""
        return solve_lower_level(
            problem,
            start,
            solver=self.inner_solver,
            max_iters=self.inner_steps,
            tol=self.inner_tol,
            lr=self.inner_lr,
        )

    def lower_objective(
        self, features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> Tensor:
        """``Σ_t g_t(φ_t)`` in the graph of ``features (T, n, d)`` and ``phi`` (unrolled use)."""
        total = task_losses(batched_head_forward(self.head, phi, features), labels, self.loss)
        if self.l2 > 0:
            total = total + l2_penalty(phi, center, self.l2)
        return total.sum()

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TensorDict:
        """Solve each task's lower level from ``φ⁰``: per-task head parameters ``(T, *shape)``.

        Args:
            support_x: ``(T, n, *input)``.
            support_y: ``(T, n)`` labels (or ``(T, n, out)`` regression targets).
        """
        features = task_features(self.backbone, support_x)
        phi, _ = self.solve(self.problem(features, support_y), self.head_start(features.shape[0]))
        return phi

    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        phi = self.adapt(chunk.support_x, chunk.support_y)
        return batched_head_forward(self.head, phi, task_features(self.backbone, chunk.query_x))


def non_finite_features(*features: Tensor) -> ChunkStats | None:
    """The statistics of a chunk to skip (loss NaN) when a feature is not finite, else ``None``.

    Checked before any linear algebra on the features (an SVD or a solve would raise on them);
    :meth:`~mrmeta.MetaLearner.meta_step` then skips the optimizer step."""
    if all(bool(torch.isfinite(z).all()) for z in features):
        return None
    return {"loss": torch.tensor(float("nan"))}


def solve_stats(report: SolveReport) -> ChunkStats:
    """``inner_grad_norm`` (mean and max over the chunk) and ``inner_iterations`` (mean)."""
    norm = report.grad_norm.float()
    return {
        "inner_grad_norm": norm.mean(),
        "inner_grad_norm_max": norm.max(),
        "inner_iterations": report.iterations.float().mean(),
    }


class HeadUnrolledLearner(HeadLearner):
    r"""Base of ANIL and ITD-BiO: head-only inner loop, differentiated through its ``K`` steps.

    Support and query features are computed once per task, in the graph of the backbone; the
    ``K`` gradient steps are kept in the graph (``create_graph`` unless ``first_order``) and the
    meta-gradient ``∇_{θ, φ⁰} (1/B) Σ_t L(head_{φ^K}(Z_q), y_q)`` is back-propagated through
    them into the backbone (memory linear in ``K`` on the head's tensors only).

    Args:
        first_order: treat the inner gradients as constants.
        **options: the lower level, see :class:`HeadLearner` (``inner_solver`` is ``"gd"``).
    """

    def __init__(
        self, backbone: nn.Module, head: nn.Module, *, first_order: bool, **options: object
    ) -> None:
        super().__init__(backbone, head, **options)  # type: ignore[arg-type]
        self.first_order = bool(first_order)

    def _differentiable_start(self, tasks: int) -> TensorDict:
        """``φ⁰`` per task ``(T, *shape)``: in the graph of the head when learned, else a fresh
        leaf (the unrolled steps differentiate with respect to it)."""
        if self.learn_head_init:
            return {k: p.expand(tasks, *p.shape) for k, p in self.head.named_parameters()}
        return {k: v.clone().requires_grad_(True) for k, v in self.head_start(tasks).items()}

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        zs = task_features(self.backbone, chunk.support_x)
        zq = task_features(self.backbone, chunk.query_x)
        if (skip := non_finite_features(zs, zq)) is not None:
            return skip
        problem = self.problem(zs, chunk.support_y)
        lr = problem.step_size() if self.inner_lr == "auto" else self.inner_lr
        phi = unrolled_gradient_descent(
            lambda p: self.lower_objective(zs, chunk.support_y, p, problem.center),
            self._differentiable_start(chunk.num_tasks),
            steps=self.inner_steps,
            lr=lr,
            first_order=self.first_order,
        )
        pred = batched_head_forward(self.head, phi, zq)
        stats = backward_query_loss(pred, chunk.query_y, self.loss, batch_size)
        norm = tree_norm(problem.gradient(tree_detach(phi)), batched=True)
        return {**stats, "inner_grad_norm": norm.mean(), "inner_grad_norm_max": norm.max()}
