"""Evaluation protocols: accuracy over many test tasks, mean ± 95% confidence interval."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from mrmeta._per_task import batched_head_forward, task_accuracies, task_features, task_losses
from mrmeta.algorithms.base import MetaLearner
from mrmeta.inner import gradient_descent
from mrmeta.tasks import TaskBatch

PROTOCOLS = ("native", "frozen-backbone")
"""Test protocols: the method's own adaptation, or a linear head on the frozen backbone."""


def format_accuracy(mean: float, ci95: float, tasks: int, protocol: str) -> str:
    """``"93.10% ± 0.52% (95% CI, 600 tasks, native)"``; one task has no interval to show."""
    if tasks < 2:  # the interval is undefined, not ± 0
        return f"{100 * mean:.2f}% (1 task: no confidence interval, {protocol})"
    return f"{100 * mean:.2f}% ± {100 * ci95:.2f}% (95% CI, {tasks} tasks, {protocol})"


@dataclass(frozen=True)
class EvalResult:
    """Accuracy over ``tasks`` tasks: mean, standard deviation and the 95% CI half-width
    ``1.96 · std / √tasks`` (fractions in ``[0, 1]``); ``checkpoint`` names the file the
    parameters came from when a saved run was tested."""

    mean: float
    std: float
    ci95: float
    tasks: int
    protocol: str
    checkpoint: str | None = None

    def __str__(self) -> str:
        text = format_accuracy(self.mean, self.ci95, self.tasks, self.protocol)
        return text if self.checkpoint is None else f"{text}; tested {self.checkpoint}"

    @classmethod
    def from_accuracies(cls, accuracies: Tensor, protocol: str) -> EvalResult:
        """From per-task accuracies ``(n,)``."""
        acc = accuracies.double()
        std = float(acc.std(unbiased=True)) if acc.numel() > 1 else 0.0
        return cls(
            float(acc.mean()), std, 1.96 * std / math.sqrt(acc.numel()), acc.numel(), protocol
        )


def backbone_of(learner: MetaLearner) -> nn.Module:
    """The feature extractor of a learner (:meth:`MetaLearner.feature_extractor`)."""
    return learner.feature_extractor()


@torch.no_grad()
def frozen_backbone_predict(
    backbone: nn.Module, batch: TaskBatch, ways: int, *, steps: int = 20, lr: float = 0.05
) -> Tensor:
    """The paper's test protocol: backbone frozen, a linear head trained from zero by ``steps``
    gradient steps of size ``lr`` on each task's support cross-entropy.

    Args:
        backbone: maps ``(n, *input)`` to ``(n, d)``.
        batch: tasks with ``ways`` classes.

    Returns:
        Query logits ``(B, n_query, ways)``.
    """
    zs = task_features(backbone, batch.support_x)
    zq = task_features(backbone, batch.query_x)
    head = nn.Linear(zs.shape[-1], ways).to(zs)
    start = {k: torch.zeros(zs.shape[0], *p.shape).to(zs) for k, p in head.named_parameters()}

    def support_loss(phi: dict[str, Tensor]) -> Tensor:
        return task_losses(
            batched_head_forward(head, phi, zs), batch.support_y, "cross_entropy"
        ).sum()

    phi = gradient_descent(support_loss, start, steps=steps, lr=lr)
    return batched_head_forward(head, phi, zq)


def evaluate(
    learner: MetaLearner,
    sample: Callable[[int], TaskBatch],
    *,
    tasks: int = 600,
    batch_size: int = 32,
    protocol: str = "native",
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> EvalResult:
    """Accuracy of ``learner`` on ``tasks`` tasks drawn by ``sample(batch_size)``.

    Args:
        learner: the meta-learner.
        sample: draws a batch of tasks (use a sampler with a fixed seed so that every method is
            evaluated on the same tasks).
        tasks: number of tasks (600 or more for a publishable number).
        batch_size: tasks drawn and evaluated together (memory; the sampler's draws depend on
            it, so compare methods with the same value).
        protocol: ``"native"`` (the method's own adaptation) or ``"frozen-backbone"``.
        device: where to run.
        progress: show a progress bar (tasks done of ``tasks``) on stderr.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)}; got {protocol!r}")
    accuracies = []
    remaining = tasks
    with tqdm(total=tasks, disable=not progress, desc="eval", unit="task") as bar:
        while remaining > 0:
            batch = sample(min(batch_size, remaining)).to(device)
            predictions = _predict(learner, batch, protocol)
            accuracies.append(task_accuracies(predictions, batch.query_y).cpu())
            remaining -= batch.num_tasks
            bar.update(batch.num_tasks)
    return EvalResult.from_accuracies(torch.cat(accuracies), protocol)


def _predict(learner: MetaLearner, batch: TaskBatch, protocol: str) -> Tensor:
    if protocol == "native":
        return learner.predict(batch)
    ways = int(batch.support_y.max()) + 1
    return frozen_backbone_predict(backbone_of(learner), batch, ways)
