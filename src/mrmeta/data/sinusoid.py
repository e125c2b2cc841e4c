"""Sinusoid regression tasks (Finn et al., MAML, ICML 2017, section 5.1).

Each task is a function ``y = A sin(x - phi)`` with amplitude ``A ~ U[0.1, 5]`` and phase
``phi ~ U[0, pi]``; inputs ``x ~ U[-5, 5]``. ``K`` support and ``Q`` query points are drawn
independently for each task. The data are generated, so every split draws from the same
distribution; the split name only records what the tasks are used for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mrmeta.data._errors import DataError
from mrmeta.data._sampler import make_generator
from mrmeta.tasks import TaskBatch

NAME = "sinusoid"
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class SinusoidTasks:
    """The sinusoid task distribution: a generated dataset.

    Attributes:
        amplitude: range of ``A`` (uniform).
        phase: range of ``phi`` (uniform).
        x_range: range of the inputs ``x`` (uniform).
        split: recorded only; all splits share the distribution.
        name: ``"sinusoid"``.

    Example:
        >>> sampler = SinusoidSampler(SinusoidTasks(), shots=10, queries=10, seed=0)
        >>> batch = sampler.sample(25)
        >>> batch.support_x.shape, batch.support_y.shape
        (torch.Size([25, 10, 1]), torch.Size([25, 10, 1]))
    """

    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    split: str = "train"
    name: str = NAME

    def __post_init__(self) -> None:
        for label in ("amplitude", "phase", "x_range"):
            low, high = getattr(self, label)
            if not (math.isfinite(low) and math.isfinite(high) and low <= high):
                raise DataError(
                    f"sinusoid {label} must be a finite (low, high) range, got {(low, high)}"
                )


class SinusoidSampler:
    """Draws batches of sinusoid regression tasks.

    Per batch it draws, in this order, ``A`` ``(B,)``, ``phi`` ``(B,)`` and ``x``
    ``(B, shots + queries)`` from one CPU generator, so a seed fixes the tasks and
    :meth:`state_dict` resumes them bit-identically.

    Args:
        tasks: the distribution.
        shots: support points per task ``K`` (>= 1).
        queries: query points per task ``Q`` (>= 0).
        seed: seed of a fresh generator, or
        generator: a CPU generator to draw from.
    """

    def __init__(
        self,
        tasks: SinusoidTasks,
        shots: int,
        queries: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        for label, value, low in (("shots", shots, 1), ("queries", queries, 0)):
            if isinstance(value, bool) or int(value) != value or value < low:
                raise DataError(f"{label} must be an integer >= {low}, got {value!r}")
        self.tasks, self.shots, self.queries = tasks, int(shots), int(queries)
        self.generator = make_generator(seed, generator)

    def sample_with_params(self, batch_size: int) -> tuple[TaskBatch, Tensor, Tensor]:
        """Draw tasks and return them with their parameters.

        Returns:
            The batch (``support_x``/``support_y`` ``(B, shots, 1)``, ``query_x``/``query_y``
            ``(B, queries, 1)``, float32) and ``amplitude``, ``phase``, each ``(B,)``.
        """
        if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
            raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
        t, g = self.tasks, self.generator
        amplitude = _uniform((batch_size,), t.amplitude, g)
        phase = _uniform((batch_size,), t.phase, g)
        x = _uniform((batch_size, self.shots + self.queries, 1), t.x_range, g)
        y = amplitude[:, None, None] * torch.sin(x - phase[:, None, None])
        k = self.shots
        batch = TaskBatch(x[:, :k], y[:, :k], x[:, k:], y[:, k:])
        return batch, amplitude, phase

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks (see :meth:`sample_with_params`)."""
        return self.sample_with_params(batch_size)[0]

    def state_dict(self) -> dict[str, Any]:
        """The generator state, to resume sampling bit-identically."""
        state = self.generator.get_state()
        return {"generator": state, "shots": self.shots, "queries": self.queries}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.generator.set_state(state["generator"])


def _uniform(shape: tuple[int, ...], bounds: tuple[float, float], g: torch.Generator) -> Tensor:
    low, high = bounds
    return torch.rand(shape, generator=g, dtype=torch.float32).mul_(high - low).add_(low)


def load_sinusoid(
    split: str = "train",
    root: str | Path | None = None,
    *,
    amplitude: tuple[float, float] = (0.1, 5.0),
    phase: tuple[float, float] = (0.0, math.pi),
    x_range: tuple[float, float] = (-5.0, 5.0),
    download: bool = False,
) -> SinusoidTasks:
    """The sinusoid distribution (``root`` and ``download`` are ignored: the data are generated)."""
    if split not in SPLITS:
        raise DataError(f"sinusoid has no split {split!r}; choose one of {', '.join(SPLITS)}")
    return SinusoidTasks(tuple(amplitude), tuple(phase), tuple(x_range), split)
