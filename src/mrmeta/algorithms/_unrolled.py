"""Machinery shared by the baselines (MAML, first-order MAML, ANIL, ITD-BiO, iMAML).

* :class:`ChunkedLearner` — the chunk loop of :meth:`compute_meta_gradient` and :meth:`predict`
  and the averaging of per-chunk statistics; a subclass writes one chunk's work.
* :func:`batched_forward` — a whole network with per-task parameters on a task batch
  (``functional_call`` per task), so BatchNorm statistics stay per task.
* :class:`WholeNetworkLearner` — methods that adapt every parameter (MAML, iMAML).
* :class:`HeadUnrolledLearner` — methods that adapt only the head on backbone features computed
  once per task and back-propagate through the unrolled steps (ANIL, ITD-BiO).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mrmeta._heads import (
    batched_head_forward,
    check_inner_lr,
    check_loss_name,
    l2_penalty,
    linear_head_lipschitz,
    task_accuracies,
    task_features,
    task_losses,
)
from mrmeta._tree import TensorDict, tree_detach, tree_norm, tree_zeros_like
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms.base import MetaLearner, StepStats, mean_or_none
from mrmeta.inner import gradient_descent, unrolled_gradient_descent
from mrmeta.tasks import TaskBatch

ChunkStats = dict[str, Tensor]
STAT_KEYS = ("loss", "accuracy", "inner_grad_norm", "cg_residual")


# --------------------------------------------------------------------------- functional helpers
def per_task(params: Mapping[str, Tensor], tasks: int) -> TensorDict:
    """Each tensor repeated along a new leading task dimension (a view): ``(T, *shape)``.

    Gradients flowing into the result are summed over tasks into ``params``.
    """
    return {k: p.expand(tasks, *p.shape) for k, p in params.items()}


def batched_forward(model: nn.Module, params: Mapping[str, Tensor], x: Tensor) -> Tensor:
    """``model`` with task-specific parameters on a task batch, one task at a time.

    Task ``t`` runs ``functional_call(model, {k: params[k][t]}, x[t])``, so a normalisation
    layer in training mode uses each task's own batch statistics. Parameters missing from
    ``params`` (and buffers) are the module's own.

    A plain loop rather than ``torch.func.vmap``: on a Conv4 MAML step (CPU, 5-way 5-shot
    32×32) vmap over the tasks held 1.6× the memory of the loop (grouped convolutions) and was
    not faster; for one task it was 2.5× slower and took 1.3× the memory.

    Args:
        model: any module mapping ``(n, *input)`` to ``(n, out)``.
        params: ``(T, *param_shape)`` per name.
        x: ``(T, n, *input)``.

    Returns:
        ``(T, n, out)``.
    """
    outputs = [
        functional_call(model, {k: v[t] for k, v in params.items()}, (x[t],))
        for t in range(x.shape[0])
    ]
    return torch.stack(outputs)


def requiring_grad(module: nn.Module) -> TensorDict:
    """The parameters of ``module`` that require grad, by name."""
    return {k: p for k, p in module.named_parameters() if p.requires_grad}


def accumulate_grad(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """``params[k].grad += grads[k]`` (created when ``None``)."""
    for name, param in params.items():
        share = grads[name].detach()
        param.grad = share.clone() if param.grad is None else param.grad + share


def task_grad_norm(objective: Callable[[TensorDict], Tensor], phi: Mapping[str, Tensor]) -> Tensor:
    """``‖∇_φ g_t(φ_t)‖`` per task, ``(T,)``, at a detached copy of ``φ`` (``φ`` is ``(T, …)``
    and ``objective`` sums the per-task losses)."""
    with torch.enable_grad():
        leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
        grads = torch.autograd.grad(objective(leaves), list(leaves.values()))
    return tree_norm(dict(zip(leaves, grads, strict=True)), batched=True)


def query_stats(pred: Tensor, target: Tensor, loss: str) -> ChunkStats:
    """Detached mean query loss (and accuracy for classification) of a chunk."""
    with torch.no_grad():
        stats = {"loss": task_losses(pred, target, loss).mean()}
        if loss == "cross_entropy":
            stats["accuracy"] = task_accuracies(pred, target).mean()
    return stats


def backward_query_loss(pred: Tensor, target: Tensor, loss: str, batch_size: int) -> ChunkStats:
    """Back-propagate ``(1/B) Σ_t f_t`` of a chunk into ``.grad``; return its statistics.

    Args:
        pred: ``(T, n_query, out)`` predictions, in the graph of the meta-parameters.
        target: ``(T, n_query)`` labels or ``(T, n_query, out)`` targets.
        loss: task loss name.
        batch_size: ``B``, the number of tasks of the whole batch (not of the chunk).
    """
    (task_losses(pred, target, loss).sum() / batch_size).backward()
    return query_stats(pred, target, loss)


# --------------------------------------------------------------------------- base classes
class ChunkedLearner(MetaLearner):
    """A :class:`MetaLearner` that processes its task batch in chunks.

    Subclasses implement :meth:`_chunk_meta_gradient` (accumulate one chunk's share of the
    meta-gradient, return its statistics) and :meth:`_chunk_predict`.

    Args:
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
    """

    def __init__(self, chunk_size: int | None) -> None:
        super().__init__()
        self.chunk_size = (
            None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        )

    @abstractmethod
    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        """Add ``(1/B) Σ_{t ∈ chunk} ∇ f_t`` to ``.grad``; return per-chunk means (0-d)."""

    @abstractmethod
    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        """Adapt to the chunk's supports, predict its queries: ``(T, n_query, out)``."""

    def compute_meta_gradient(self, batch: TaskBatch) -> StepStats:
        """The method's meta-gradient of the batch's mean query loss, added to ``.grad``."""
        sizes, per_chunk = [], []
        for chunk in batch.chunks(self.chunk_size):
            per_chunk.append(self._chunk_meta_gradient(chunk, batch.num_tasks))
            sizes.append(chunk.num_tasks)
        return StepStats(
            **{
                key: mean_or_none([s[key] for s in per_chunk if key in s], sizes)
                for key in STAT_KEYS
            }
        )

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt on the support sets, predict the queries: ``(B, n_query, out)``."""
        return torch.cat([self._chunk_predict(chunk) for chunk in batch.chunks(self.chunk_size)])


class WholeNetworkLearner(ChunkedLearner):
    """Base of the methods that adapt every parameter of ``model`` that requires grad.

    The lower-level objective of task ``t`` is :meth:`inner_objective`: the mean support loss
    ``L_t(φ)`` (plus whatever a subclass adds), minimised by ``K`` steps from ``θ``.

    Args:
        model: maps ``(n, *input)`` to ``(n, out)`` (e.g. :class:`mrmeta.Conv4`).
        inner_steps: ``K ≥ 0``.
        inner_lr: step size ``α > 0``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together (one autograd call per inner step).
    """

    def __init__(
        self, model: nn.Module, *, inner_steps: int, inner_lr: float, loss: str,
        chunk_size: int | None,
    ) -> None:
        super().__init__(chunk_size)
        self.model = model
        self.inner_steps = check_positive_int("inner_steps", inner_steps, minimum=0)
        self.inner_lr = check_finite_number("inner_lr", inner_lr, positive=True)
        self.loss = check_loss_name(loss)

    def model_losses(self, phi: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        """``L_t(φ_t)`` per task, ``(T,)``, for ``x (T, n, *input)`` and ``y (T, n[, out])``."""
        return task_losses(batched_forward(self.model, phi, x), y, self.loss)

    def inner_objective(self, x: Tensor, y: Tensor, phi: TensorDict, theta: TensorDict) -> Tensor:
        """``Σ_t g_t(φ_t)`` with ``g_t = L_t`` on the support set ``(x, y)`` (``theta``, the
        per-task starting point ``(T, *shape)``, is unused here)."""
        return self.model_losses(phi, x, y).sum()

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TensorDict:
        """``K`` gradient steps from ``θ`` kept without a graph: ``φ^K``, ``(T, *shape)``.

        Args:
            support_x: ``(T, n, *input)``.
            support_y: ``(T, n)`` labels (or ``(T, n, out)`` targets).
        """
        theta = per_task(tree_detach(requiring_grad(self.model)), support_x.shape[0])
        return gradient_descent(
            lambda phi: self.inner_objective(support_x, support_y, phi, theta),
            theta, steps=self.inner_steps, lr=self.inner_lr,
        )

    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        phi = self.adapt(chunk.support_x, chunk.support_y)
        return batched_forward(self.model, phi, chunk.query_x)


class HeadUnrolledLearner(ChunkedLearner):
    r"""Base of ANIL and ITD-BiO: head-only inner loop, differentiated through its ``K`` steps.

    For task ``t`` with support features ``Z_s = backbone(x_s)`` and query features ``Z_q``
    (each computed once, in the graph of the backbone):

    * ``φ⁰`` = the head's parameters (learned when ``learn_head_init``; else a constant);
    * ``φ^{k+1} = φ^k − λ ∇_φ g_t(φ^k)`` with ``g_t(φ) = L(head_φ(Z_s), y_s) + μ/2 ‖φ‖²``, kept
      in the graph (``create_graph`` unless ``first_order``);
    * meta-gradient ``∇_{θ, φ⁰} (1/B) Σ_t L(head_{φ^K}(Z_q), y_q)`` by back-propagation
      through the steps into the backbone (memory linear in ``K`` on the head's tensors).

    Args:
        backbone: maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task module ``φ``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``λ > 0``, or ``"auto"`` for ``1/L_t`` per task from
            :func:`~mrmeta._heads.linear_head_lipschitz` on the detached features (``nn.Linear``
            heads only).
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together.
        first_order: treat the inner gradients as constants.
        learn_head_init: meta-learn ``φ⁰`` (ANIL) or keep it fixed (ITD-BiO).
        l2: ``μ ≥ 0``.
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
        first_order: bool,
        learn_head_init: bool,
        l2: float,
    ) -> None:
        super().__init__(chunk_size)
        self.backbone, self.head = backbone, head
        self.inner_steps = check_positive_int("inner_steps", inner_steps, minimum=0)
        self.inner_lr = check_inner_lr(inner_lr, head)
        self.loss = check_loss_name(loss)
        self.l2 = check_finite_number("l2", l2)
        self.first_order = bool(first_order)
        self.learn_head_init = bool(learn_head_init)
        head.requires_grad_(self.learn_head_init)

    def _head_init(self, tasks: int) -> TensorDict:
        """``φ⁰`` per task ``(T, *shape)``: in the graph of the head when learned, else a fresh
        leaf (the unrolled steps differentiate with respect to it)."""
        params = dict(self.head.named_parameters())
        if self.learn_head_init:
            return per_task(params, tasks)
        return {k: v.requires_grad_(True) for k, v in per_task(tree_detach(params), tasks).items()}

    def lower_objective(self, features: Tensor, labels: Tensor, phi: TensorDict) -> Tensor:
        """``Σ_t g_t(φ_t)`` for support ``features (T, n, d)`` and ``labels (T, n)``."""
        total = task_losses(batched_head_forward(self.head, phi, features), labels, self.loss)
        if self.l2 > 0:
            total = total + l2_penalty(phi, tree_zeros_like(phi), self.l2)
        return total.sum()

    def _step_size(self, features: Tensor) -> Tensor | float:
        """``λ``, or ``1/L_t`` per task ``(T,)`` (never differentiated) when ``"auto"``."""
        if self.inner_lr != "auto":
            return float(self.inner_lr)
        out_dim = self.head.weight.shape[0]
        return 1.0 / linear_head_lipschitz(features.detach(), self.loss, out_dim, self.l2)

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        zs = task_features(self.backbone, chunk.support_x)
        zq = task_features(self.backbone, chunk.query_x)
        phi = unrolled_gradient_descent(
            lambda p: self.lower_objective(zs, chunk.support_y, p),
            self._head_init(chunk.num_tasks),
            steps=self.inner_steps, lr=self._step_size(zs), first_order=self.first_order,
        )
        pred = batched_head_forward(self.head, phi, zq)
        stats = backward_query_loss(pred, chunk.query_y, self.loss, batch_size)
        zs_d = zs.detach()
        stats["inner_grad_norm"] = task_grad_norm(
            lambda p: self.lower_objective(zs_d, chunk.support_y, p), phi
        ).mean()
        return stats

    def adapt(self, support_x: Tensor, support_y: Tensor) -> TensorDict:
        """``K`` head steps from ``φ⁰`` without a graph: per-task head parameters ``(T, *shape)``.

        Args:
            support_x: ``(T, n, *input)``.
            support_y: ``(T, n)`` labels (or ``(T, n, out)`` targets).
        """
        with torch.no_grad():
            zs = task_features(self.backbone, support_x)
        start = per_task(tree_detach(dict(self.head.named_parameters())), zs.shape[0])
        return gradient_descent(
            lambda p: self.lower_objective(zs, support_y, p),
            start, steps=self.inner_steps, lr=self._step_size(zs),
        )

    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        phi = self.adapt(chunk.support_x, chunk.support_y)
        return batched_head_forward(self.head, phi, task_features(self.backbone, chunk.query_x))
