"""The head-only lower level shared by MemoryReduced, ITD-BiO and ANIL."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from mrmeta import _linear_ce as linear_ce
from mrmeta._heads import (
    batched_head_forward,
    check_inner_lr,
    check_loss_name,
    l2_penalty,
    linear_head_lipschitz,
    task_features,
    task_losses,
)
from mrmeta._tree import TensorDict
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms.base import ChunkedLearner
from mrmeta.inner import gradient_steps
from mrmeta.tasks import TaskBatch


class HeadLearner(ChunkedLearner):
    r"""Base of the methods whose lower level is a per-task head on shared backbone features.

    For task ``t`` with support features ``Z_s = backbone(x_s)`` the lower level is::

        g_t(φ) = L(head_φ(Z_s), y_s) + μ/2 ‖φ − c‖²

    with ``c`` the head's (meta-learned) starting point when ``learn_head_init``, else ``0``,
    minimised by ``K`` gradient steps of size ``λ`` (or ``1/L_t`` per task, ``"auto"``) from the
    head's parameters ``φ⁰``. Subclasses differ in how the meta-gradient flows through it.

    Args:
        backbone: maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task module ``φ``; its parameters are ``φ⁰``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``λ > 0``, or ``"auto"`` (``nn.Linear`` heads): ``λ_t = 1/L_t`` with
            ``L_t`` from :func:`~mrmeta._heads.linear_head_lipschitz` on the detached features.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together.
        l2: ``μ ≥ 0``.
        learn_head_init: meta-learn ``φ⁰`` (it then also centres the L2 term).
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
    ) -> None:
        super().__init__(chunk_size)
        self.backbone, self.head = backbone, head
        self.inner_steps = check_positive_int("inner_steps", inner_steps, minimum=0)
        self.inner_lr = check_inner_lr(inner_lr, head)
        self.loss = check_loss_name(loss)
        self.l2 = check_finite_number("l2", l2)
        self.learn_head_init = bool(learn_head_init)
        head.requires_grad_(self.learn_head_init)
        self.closed_form = True

    @property
    def uses_closed_form(self) -> bool:
        """Whether the head's gradients and Hessian products come in closed form
        (:mod:`mrmeta._linear_ce`: an ``nn.Linear`` head with a bias and cross-entropy)."""
        linear = isinstance(self.head, nn.Linear) and self.head.bias is not None
        return self.closed_form and linear and self.loss == "cross_entropy"

    def lower_gradient(
        self, features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> TensorDict:
        """``∇_φ g_t(φ_t)`` for every task, in closed form when possible, else by autograd."""
        if self.uses_closed_form:
            return linear_ce.head_gradient(features, labels, phi, center, self.l2)
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            objective = self.lower_objective(features, labels, leaves, center)
            grads = torch.autograd.grad(objective, list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    def head_start(self, tasks: int) -> TensorDict:
        """``φ⁰`` repeated per task, detached: ``(T, *shape)`` (a view, no copy)."""
        return {k: p.detach().expand(tasks, *p.shape) for k, p in self.head.named_parameters()}

    def l2_center(self, tasks: int) -> TensorDict:
        """The centre ``c`` of the L2 term per task: ``φ⁰`` when learned, else zeros."""
        start = self.head_start(tasks)
        if self.learn_head_init:
            return start
        return {k: torch.zeros_like(v) for k, v in start.items()}

    def lower_objective(
        self, features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> Tensor:
        """``Σ_t g_t(φ_t)`` for support ``features (T, n, d)`` and ``labels (T, n)``."""
        total = task_losses(batched_head_forward(self.head, phi, features), labels, self.loss)
        if self.l2 > 0:
            total = total + l2_penalty(phi, center, self.l2)
        return total.sum()

    def step_size(self, features: Tensor) -> Tensor | float:
        """``λ``, or ``1/L_t`` per task ``(T,)`` (never differentiated) when ``"auto"``."""
        if self.inner_lr != "auto":
            return float(self.inner_lr)
        out_dim = self.head.weight.shape[0]
        return 1.0 / linear_head_lipschitz(features.detach(), self.loss, out_dim, self.l2)

    def solve_lower_level(
        self, features: Tensor, labels: Tensor, start: TensorDict, center: TensorDict
    ) -> TensorDict:
        """``K`` gradient steps from ``start`` kept without a graph; returns ``φ^K``."""
        return gradient_steps(
            lambda phi: self.lower_gradient(features, labels, phi, center),
            start,
            steps=self.inner_steps,
            lr=self.step_size(features),
        )

    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TensorDict:
        """Solve each task's lower level from ``φ⁰``: per-task head parameters ``(T, *shape)``.

        Args:
            support_x: ``(T, n, *input)``.
            support_y: ``(T, n)`` labels (or ``(T, n, out)`` regression targets).
        """
        features = task_features(self.backbone, support_x)
        tasks = features.shape[0]
        return self.solve_lower_level(
            features, support_y, self.head_start(tasks), self.l2_center(tasks)
        )

    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        phi = self.adapt(chunk.support_x, chunk.support_y)
        return batched_head_forward(self.head, phi, task_features(self.backbone, chunk.query_x))
