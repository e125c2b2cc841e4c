"""The few-shot task batch that flows from a task sampler into a meta-learner."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class TaskBatch:
    """A batch of ``B`` few-shot tasks that all have the same shape.

    Attributes:
        support_x: ``(B, n_support, *input_shape)`` support inputs (float).
        support_y: ``(B, n_support)`` support targets: class indices ``0..ways-1``
            (``int64``) for classification, or ``(B, n_support, out_dim)`` floats for
            regression.
        query_x: ``(B, n_query, *input_shape)`` query inputs.
        query_y: ``(B, n_query)`` (or ``(B, n_query, out_dim)``) query targets.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor

    def __post_init__(self) -> None:
        batch = self.support_x.shape[0]
        for name in ("support_y", "query_x", "query_y"):
            if getattr(self, name).shape[0] != batch:
                raise ValueError(
                    f"TaskBatch.{name} has {getattr(self, name).shape[0]} tasks but support_x "
                    f"has {batch}; every field must have the task index as its first dimension"
                )
        if self.support_x.shape[1] != self.support_y.shape[1]:
            raise ValueError("TaskBatch: support_x and support_y disagree on n_support")
        if self.query_x.shape[1] != self.query_y.shape[1]:
            raise ValueError("TaskBatch: query_x and query_y disagree on n_query")

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``B`` in the batch."""
        return int(self.support_x.shape[0])

    def __len__(self) -> int:
        return self.num_tasks

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move every tensor to ``device``; floating inputs (and float targets) get ``dtype``."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(*(move(t) for t in self.fields()))

    def fields(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(support_x, support_y, query_x, query_y)``."""
        return self.support_x, self.support_y, self.query_x, self.query_y

    def slice(self, start: int, stop: int) -> TaskBatch:
        """The tasks ``start..stop-1`` as a new batch (views, no copy)."""
        return TaskBatch(*(t[start:stop] for t in self.fields()))

    def chunks(self, size: int | None) -> list[TaskBatch]:
        """Split into consecutive chunks of at most ``size`` tasks (``None``: one chunk)."""
        if size is None or size >= self.num_tasks:
            return [self]
        if size < 1:
            raise ValueError(f"chunk size must be >= 1 or None (all tasks), got {size}")
        return [
            self.slice(i, min(i + size, self.num_tasks)) for i in range(0, self.num_tasks, size)
        ]
