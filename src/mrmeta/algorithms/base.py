"""The interface every meta-learner implements, and the meta-step built on it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

from mrmeta.tasks import TaskBatch


@dataclass(frozen=True)
class StepStats:
    """What one meta-step measured (floats, averaged over the task batch).

    Attributes:
        loss: mean query loss after adaptation (the upper-level objective ``f``).
        accuracy: mean query accuracy (``None`` for regression).
        inner_grad_norm: mean ``‖∇_φ g(θ, φ^K)‖`` — how well the lower level was solved
            (``None`` where the method has no separate lower level).
        cg_residual: mean final CG residual ``‖∇_φ f − H v‖`` (``None`` without CG).
        grad_norm: norm of the meta-gradient over all meta-parameters.
        skipped: the optimizer step was skipped because a value was not finite.
    """

    loss: float
    accuracy: float | None = None
    inner_grad_norm: float | None = None
    cg_residual: float | None = None
    grad_norm: float = math.nan
    skipped: bool = False

    def as_dict(self) -> dict[str, float | bool | None]:
        """Plain dict, for logging."""
        return asdict(self)


def mean_or_none(values: list[Tensor], weights: list[int]) -> float | None:
    """Task-weighted mean of per-chunk tensors, or ``None`` when there are none."""
    if not values:
        return None
    total = sum(float(v) * w for v, w in zip(values, weights, strict=True))
    return total / sum(weights)


class MetaLearner(nn.Module, ABC):
    """A meta-learner: computes a meta-gradient on a batch of tasks, adapts to new tasks.

    Subclasses implement :meth:`compute_meta_gradient` (accumulate ``.grad`` of the
    meta-parameters for the batch's mean query loss) and :meth:`predict` (adapt to each task's
    support set, return predictions for its queries). :meth:`meta_step` ties them to an optimizer.
    """

    @abstractmethod
    def compute_meta_gradient(self, batch: TaskBatch) -> StepStats:
        """Add ``∇_θ (1/B) Σ_i f_i`` (the method's estimate of it) to ``.grad`` of
        :meth:`meta_parameters`, and return the step's statistics."""

    @abstractmethod
    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt to each task's support set and predict its queries: ``(B, n_query, out)``."""

    def reset_state(self) -> None:
        """Forget any state carried between meta-steps (warm starts); a no-op by default."""

    def meta_parameters(self) -> Iterator[nn.Parameter]:
        """The parameters the outer optimizer updates."""
        return (p for p in self.parameters() if p.requires_grad)

    def meta_gradient_norm(self) -> Tensor:
        """Euclidean norm of the current ``.grad`` over :meth:`meta_parameters` (0-d)."""
        norms = [p.grad.norm() for p in self.meta_parameters() if p.grad is not None]
        return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())

    def meta_step(
        self,
        batch: TaskBatch,
        optimizer: torch.optim.Optimizer,
        *,
        reduce_gradients: Callable[[], None] | None = None,
    ) -> StepStats:
        """One outer iteration: zero grads, meta-gradient, optimizer step.

        A non-finite loss or meta-gradient skips the optimizer step (and says so in the result)
        instead of writing NaN into the parameters.

        Args:
            batch: the tasks of this iteration.
            optimizer: over :meth:`meta_parameters`.
            reduce_gradients: called between the meta-gradient and the step (e.g. an all-reduce
                across processes).
        """
        optimizer.zero_grad(set_to_none=True)
        stats = self.compute_meta_gradient(batch)
        if reduce_gradients is not None:
            reduce_gradients()
        norm = float(self.meta_gradient_norm())
        finite = math.isfinite(norm) and math.isfinite(stats.loss)
        if finite:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return replace(stats, grad_norm=norm, skipped=not finite)
