"""The interface every meta-learner implements, and the meta-step built on it."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from mrmeta._per_task import task_accuracies, task_losses
from mrmeta.algorithms._options import LearnerOptions, options_signature, parse_options
from mrmeta.tasks import TaskBatch

ChunkStats = dict[str, Tensor]


@dataclass(frozen=True)
class StepStats:
    """What one meta-step measured (floats, averaged over the task batch).

    Attributes:
        loss: mean query loss after adaptation (the upper-level objective ``f``).
        accuracy: mean query accuracy (``None`` for regression).
        inner_grad_norm: mean ``‖∇_φ g(θ, φ^K)‖`` — how well the lower level was solved
            (``None`` where the method has no separate lower level).
        inner_grad_norm_max: the largest ``‖∇_φ g(θ, φ^K)‖`` over the batch's tasks.
        inner_iterations: mean iterations the lower-level solver used per task (Newton
            iterations, or the ``K`` gradient steps).
        cg_residual: mean residual ``‖∇_φ f − H v‖`` of ``v``, from CG or the exact solve
            (``None`` without an implicit term).
        cg_breakdowns: fraction of tasks whose CG stopped on non-positive curvature or a
            non-finite value (``None`` without CG); such a task keeps its last good ``v``.
        grad_norm: norm of the meta-gradient over all meta-parameters.
        skipped: the optimizer step was skipped because a value was not finite.
    """

    loss: float
    accuracy: float | None = None
    inner_grad_norm: float | None = None
    inner_grad_norm_max: float | None = None
    inner_iterations: float | None = None
    cg_residual: float | None = None
    cg_breakdowns: float | None = None
    grad_norm: float = math.nan
    skipped: bool = False

    def as_dict(self) -> dict[str, float | bool | None]:
        """Plain dict, for logging."""
        return asdict(self)


# The statistics a learner measures per chunk of tasks (the rest come from meta_step).
CHUNK_STAT_KEYS = tuple(f.name for f in fields(StepStats) if f.name not in ("grad_norm", "skipped"))


def mean_or_none(values: list[Tensor], weights: list[int]) -> float | None:
    """Task-weighted mean of per-chunk tensors, or ``None`` when there are none."""
    if not values:
        return None
    total = sum(float(v) * w for v, w in zip(values, weights, strict=True))
    return total / sum(weights)


def combine_chunk_stats(per_chunk: list[ChunkStats], sizes: list[int]) -> dict[str, float | None]:
    """Per-chunk statistics of a batch combined: a ``*_max`` key by its maximum, every other
    by the task-weighted mean; ``None`` where no chunk measured it."""
    combined: dict[str, float | None] = {}
    for key in CHUNK_STAT_KEYS:
        values = [s[key] for s in per_chunk if key in s]
        if key.endswith("_max"):
            combined[key] = max(float(v) for v in values) if values else None
        else:
            weights = [n for s, n in zip(per_chunk, sizes, strict=True) if key in s]
            combined[key] = mean_or_none(values, weights)
    return combined


class MetaLearner(nn.Module, ABC):
    """A meta-learner: computes a meta-gradient on a batch of tasks, adapts to new tasks.

    Subclasses implement :meth:`compute_meta_gradient` (accumulate ``.grad`` of the
    meta-parameters for the batch's mean query loss) and :meth:`predict` (adapt to each task's
    support set, return predictions for its queries). :meth:`meta_step` ties them to an optimizer.

    Example (any learner; here MAML on two toy 5-way tasks of 28×28 images):
        >>> import torch
        >>> from mrmeta import MAML, Conv4, TaskBatch
        >>> learner = MAML(Conv4(ways=5, hidden=8, image_size=28))
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> stats = learner.meta_step(batch, torch.optim.Adam(learner.meta_parameters(), 1e-3))
        >>> learner.predict(batch).shape
        torch.Size([2, 10, 5])
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

    def feature_extractor(self) -> nn.Module:
        """The module that maps inputs to features, for the frozen-backbone test protocol."""
        raise ValueError(
            f"{type(self).__name__} has no feature extractor: the frozen-backbone protocol "
            "needs a model split into a backbone and a head"
        )

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
        if not isinstance(batch, TaskBatch):
            raise TypeError(
                f"batch must be a mrmeta.TaskBatch (support_x, support_y, query_x, query_y); "
                f"got {type(batch).__name__}"
            )
        optimizer.zero_grad(set_to_none=True)
        stats = self.compute_meta_gradient(batch)
        if not math.isfinite(stats.loss):  # make the gradient say so too (seen by every rank)
            for param in self.meta_parameters():
                param.grad = torch.full_like(param, math.nan)
        if reduce_gradients is not None:
            reduce_gradients()
        norm = float(self.meta_gradient_norm())
        finite = math.isfinite(norm)
        if finite:
            optimizer.step()
        else:
            optimizer.zero_grad(set_to_none=True)
        return replace(stats, grad_norm=norm, skipped=not finite)


def accumulate_grad(params: Mapping[str, Tensor], grads: Mapping[str, Tensor]) -> None:
    """``params[k].grad += grads[k]`` (created when ``None``)."""
    for name, param in params.items():
        share = grads[name].detach()
        param.grad = share.clone() if param.grad is None else param.grad + share


def query_stats(pred: Tensor, target: Tensor, loss: str) -> ChunkStats:
    """Detached mean query loss (and accuracy for classification) of a chunk."""
    with torch.no_grad():
        stats = {"loss": task_losses(pred, target, loss).mean()}
        if loss == "cross_entropy":
            stats["accuracy"] = task_accuracies(pred, target).mean()
    return stats


class ChunkedLearner(MetaLearner):
    """A :class:`MetaLearner` that processes its task batch in chunks.

    Subclasses implement :meth:`_chunk_meta_gradient` (accumulate one chunk's share of the
    meta-gradient, return its statistics) and :meth:`_chunk_predict`; :meth:`_end_batch` runs
    after the last chunk (e.g. to keep per-slot warm starts), :meth:`_discard_batch` instead
    when a chunk raised.

    Its keyword options are the fields of :attr:`options_type` (the one home of their
    defaults, see :mod:`mrmeta.algorithms._options`); the checked values are :attr:`options`.

    Args:
        options: the keyword options given to the learner's constructor.
    """

    options_type: ClassVar[type[LearnerOptions]] = LearnerOptions
    options: LearnerOptions

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A class that names its options shows them in its signature (``help``)."""
        super().__init_subclass__(**kwargs)
        if "options_type" in vars(cls):
            cls.__signature__ = options_signature(cls.__init__, cls.options_type)  # type: ignore[attr-defined]

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.options = parse_options(self.options_type, options, type(self).__name__)

    @abstractmethod
    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        """Add ``(1/B) Σ_{t ∈ chunk} ∇ f_t`` to ``.grad``; return per-chunk statistics (0-d:
        means, or maxima for ``*_max`` keys)."""

    @abstractmethod
    def _chunk_predict(self, chunk: TaskBatch) -> Tensor:
        """Adapt to the chunk's supports, predict its queries: ``(T, n_query, out)``."""

    def _end_batch(self) -> None:
        """Called after the last chunk of :meth:`compute_meta_gradient`; a no-op by default."""

    def _discard_batch(self) -> None:
        """Called instead of :meth:`_end_batch` when a chunk raised; a no-op by default."""

    def compute_meta_gradient(self, batch: TaskBatch) -> StepStats:
        """The method's meta-gradient of the batch's mean query loss, added to ``.grad``."""
        sizes, per_chunk = [], []
        try:
            for chunk in batch.chunks(self.options.chunk_size):
                per_chunk.append(self._chunk_meta_gradient(chunk, batch.num_tasks))
                sizes.append(chunk.num_tasks)
        except BaseException:
            self._discard_batch()
            raise
        self._end_batch()
        return StepStats(**combine_chunk_stats(per_chunk, sizes))

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt on the support sets, predict the queries: ``(B, n_query, out)``."""
        chunks = batch.chunks(self.options.chunk_size)
        return torch.cat([self._chunk_predict(chunk) for chunk in chunks])


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
