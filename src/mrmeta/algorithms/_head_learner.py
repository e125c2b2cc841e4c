r"""The head-only methods' common base (MemoryReduced, ITD-BiO, ANIL) and the unrolled ones'.

Their lower level is a per-task head on backbone features; its problem, derivatives and
solvers live in :mod:`mrmeta.lower_level`. This module only ties them to a backbone and a head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mrmeta._per_task import batched_head_forward, task_features
from mrmeta._tree import TensorDict, tree_detach, tree_norm
from mrmeta._validation import check_finite_number
from mrmeta.algorithms._options import LearnerOptions
from mrmeta.algorithms.base import ChunkedLearner, ChunkStats, backward_query_loss
from mrmeta.inner import unrolled_gradient_descent
from mrmeta.lower_level import (
    HeadProblem,
    Solver,
    SolveReport,
    check_inner_lr,
    check_solver,
    head_objective,
    head_problem,
    solve_lower_level,
)
from mrmeta.tasks import TaskBatch


@dataclass(frozen=True, kw_only=True)
class HeadOptions(LearnerOptions):
    """The lower level of the head-only methods (see :class:`HeadLearner`).

    Not every method offers every field: the fixed ones (``init=False``) are re-declared, with
    their default, by the methods that offer them.
    """

    inner_lr: float | Literal["auto"]
    l2: float = field(default=0.0, init=False)
    learn_head_init: bool = field(default=False, init=False)
    inner_solver: Solver = field(default="gd", init=False)
    inner_tol: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.inner_lr != "auto":
            self._store("inner_lr", check_finite_number("inner_lr", self.inner_lr, positive=True))
        self._store("l2", check_finite_number("l2", self.l2))
        self._store("inner_solver", check_solver(self.inner_solver, self.l2))
        self._store("inner_tol", check_finite_number("inner_tol", self.inner_tol))
        self._store("learn_head_init", bool(self.learn_head_init))


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
        **options: the fields of :attr:`options_type` (:class:`HeadOptions`):

            * ``inner_steps``: ``K ≥ 0``: the number of gradient steps, or Newton's cap.
            * ``inner_lr``: ``λ > 0``, or ``"auto"`` (``nn.Linear`` heads): ``λ_t = 1/L_t``
              from :func:`~mrmeta.lower_level.linear_head_lipschitz` (gradient steps only).
            * ``loss``, ``chunk_size``: see :class:`~mrmeta.algorithms._options.LearnerOptions`.
            * ``l2``: ``μ ≥ 0``.
            * ``learn_head_init``: meta-learn ``φ⁰`` (it then also centres the L2 term).
            * ``inner_solver``: ``"newton"`` or ``"gd"``.
            * ``inner_tol``: Newton stops once ``‖∇_φ g_t‖ ≤ inner_tol`` for every task.
    """

    options_type: ClassVar[type[HeadOptions]] = HeadOptions
    options: HeadOptions

    def __init__(self, backbone: nn.Module, head: nn.Module, **options: Any) -> None:
        super().__init__(options)
        self.backbone, self.head = backbone, head
        check_inner_lr(self.options.inner_lr, head)
        head.requires_grad_(self.options.learn_head_init)

    def feature_extractor(self) -> nn.Module:
        """The shared backbone ``θ``."""
        return self.backbone

    def head_start(self, tasks: int) -> TensorDict:
        """``φ⁰`` repeated per task, detached: ``(T, *shape)`` (a view, no copy)."""
        return {k: p.detach().expand(tasks, *p.shape) for k, p in self.head.named_parameters()}

    def l2_center(self, tasks: int) -> TensorDict:
        """The centre ``c`` of the L2 term per task: ``φ⁰`` when learned, else zeros."""
        start = self.head_start(tasks)
        if self.options.learn_head_init:
            return start
        return {k: torch.zeros_like(v) for k, v in start.items()}

    def problem(self, features: Tensor, labels: Tensor) -> HeadProblem:
        """The lower level of a chunk: support ``features (T, n, d)`` (detached) and labels."""
        center = self.l2_center(features.shape[0])
        l2, loss = self.options.l2, self.options.loss
        return head_problem(self.head, features, labels, center, l2=l2, loss=loss)

    def solve(self, problem: HeadProblem, start: TensorDict) -> tuple[TensorDict, SolveReport]:
        """``φ`` of every task of the chunk from ``start``, without a graph, and its report."""
        return solve_lower_level(
            problem,
            start,
            solver=self.options.inner_solver,
            max_iters=self.options.inner_steps,
            tol=self.options.inner_tol,
            lr=self.options.inner_lr,
        )

    def lower_objective(
        self, features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> Tensor:
        """``Σ_t g_t(φ_t)`` in the graph of ``features (T, n, d)`` and ``phi`` (unrolled use)."""
        opts = self.options
        return head_objective(self.head, phi, features, labels, center, opts.l2, opts.loss).sum()

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


@dataclass(frozen=True, kw_only=True)
class UnrolledHeadOptions(HeadOptions):
    """The head options of the unrolled methods (see :class:`HeadUnrolledLearner`).

    Attributes:
        first_order: treat the inner gradients as constants.
    """

    first_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("first_order", bool(self.first_order))


class HeadUnrolledLearner(HeadLearner):
    r"""Base of ANIL and ITD-BiO: head-only inner loop, differentiated through its ``K`` steps.

    Support and query features are computed once per task, in the graph of the backbone; the
    ``K`` gradient steps are kept in the graph (``create_graph`` unless ``first_order``) and the
    meta-gradient ``∇_{θ, φ⁰} (1/B) Σ_t L(head_{φ^K}(Z_q), y_q)`` is back-propagated through
    them into the backbone (memory linear in ``K`` on the head's tensors only).

    Args:
        backbone, head: see :class:`HeadLearner`.
        **options: the fields of :class:`UnrolledHeadOptions`: the lower level of
            :class:`HeadLearner` (``inner_solver`` is ``"gd"``) and ``first_order``.
    """

    options_type: ClassVar[type[UnrolledHeadOptions]] = UnrolledHeadOptions
    options: UnrolledHeadOptions

    def _differentiable_start(self, tasks: int) -> TensorDict:
        """``φ⁰`` per task ``(T, *shape)``: in the graph of the head when learned, else a fresh
        leaf (the unrolled steps differentiate with respect to it)."""
        if self.options.learn_head_init:
            return {k: p.expand(tasks, *p.shape) for k, p in self.head.named_parameters()}
        return {k: v.clone().requires_grad_(True) for k, v in self.head_start(tasks).items()}

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        zs = task_features(self.backbone, chunk.support_x)
        zq = task_features(self.backbone, chunk.query_x)
        if (skip := non_finite_features(zs, zq)) is not None:
            return skip
        problem = self.problem(zs, chunk.support_y)
        lr = problem.step_size() if self.options.inner_lr == "auto" else self.options.inner_lr
        phi = unrolled_gradient_descent(
            lambda p: self.lower_objective(zs, chunk.support_y, p, problem.center),
            self._differentiable_start(chunk.num_tasks),
            steps=self.options.inner_steps,
            lr=lr,
            first_order=self.options.first_order,
        )
        pred = batched_head_forward(self.head, phi, zq)
        stats = backward_query_loss(pred, chunk.query_y, self.options.loss, batch_size)
        norm = tree_norm(problem.gradient(tree_detach(phi)), batched=True)
        return {**stats, "inner_grad_norm": norm.mean(), "inner_grad_norm_max": norm.max()}
