"""MAML (Finn et al., 2017) and first-order MAML: the whole network unrolled through K steps."""

from __future__ import annotations

from torch import nn

from mrmeta.algorithms._whole_network import (
    WholeNetworkLearner,
    batched_forward,
    per_task,
    requiring_grad,
)
from mrmeta.algorithms.base import ChunkStats, backward_query_loss
from mrmeta.inner import unrolled_gradient_descent
from mrmeta.tasks import TaskBatch


class MAML(WholeNetworkLearner):
    r"""Model-agnostic meta-learning: every parameter adapted, differentiated through the steps.

    For task ``t`` with support loss ``L_t^s`` and query loss ``L_t^q`` (means over examples)::

        φ_t⁰ = θ,   φ_t^{k+1} = φ_t^k − α ∇_φ L_t^s(φ_t^k)   (k < K)
        ∇F(θ) = (1/B) Σ_t (∂φ_t^K/∂θ)ᵀ ∇_φ L_t^q(φ_t^K)

    The steps are kept in the autograd graph (``create_graph=True``), so memory grows linearly
    with ``K`` — the whole network's activations are stored once per step. With
    ``first_order=True`` the Jacobian ``∂φ^K/∂θ`` is replaced by the identity (the inner
    gradients are constants): first-order MAML, ``∇F ≈ (1/B) Σ_t ∇_φ L_t^q(φ_t^K)``.

    Each task runs the model through ``torch.func.functional_call`` with its own parameters
    (BatchNorm statistics stay per task); the tasks of a chunk share one autograd call per step.

    Args:
        model: the network ``θ`` (every parameter that requires grad is adapted); maps
            ``(n, *input)`` to ``(n, out)``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        first_order: drop the second-order terms (first-order MAML).

    Example:
        >>> import torch
        >>> from mrmeta import Conv4, TaskBatch
        >>> learner = MAML(Conv4(ways=5, hidden=8, image_size=28), inner_steps=1, inner_lr=0.4)
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> stats = learner.meta_step(batch, torch.optim.Adam(learner.meta_parameters(), 1e-3))
        >>> learner.predict(batch).shape
        torch.Size([2, 10, 5])
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        loss: str = "cross_entropy",
        chunk_size: int | None = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__(
            model, inner_steps=inner_steps, inner_lr=inner_lr, loss=loss, chunk_size=chunk_size
        )
        self.first_order = bool(first_order)

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        theta = per_task(requiring_grad(self.model), chunk.num_tasks)
        phi = unrolled_gradient_descent(
            lambda p: self.inner_objective(chunk.support_x, chunk.support_y, p, theta),
            theta,
            steps=self.inner_steps,
            lr=self.inner_lr,
            first_order=self.first_order,
        )
        pred = batched_forward(self.model, phi, chunk.query_x)
        return backward_query_loss(pred, chunk.query_y, self.loss, batch_size)


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True`` (``fomaml`` by name).

    Args:
        model: the network ``θ``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        inner_steps: int = 1,
        inner_lr: float = 0.4,
        loss: str = "cross_entropy",
        chunk_size: int | None = 1,
    ) -> None:
        super().__init__(
            model,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            loss=loss,
            chunk_size=chunk_size,
            first_order=True,
        )
