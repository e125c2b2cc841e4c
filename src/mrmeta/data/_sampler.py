"""N-way K-shot Q-query task sampling, vectorised over the tasks of a batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError
from mrmeta.tasks import TaskBatch


def make_generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator:
    """The CPU generator a sampler draws from.

    Args:
        seed: seeds a fresh generator (reproducible tasks).
        generator: used as is (shared state with the caller). Give at most one of the two;
            with neither, a fresh generator is seeded from system entropy.
    """
    if seed is not None and generator is not None:
        raise DataError("give either seed or generator to a task sampler, not both")
    if generator is not None:
        if generator.device.type != "cpu":
            raise DataError(f"task samplers draw on the CPU; got a {generator.device} generator")
        return generator
    fresh = torch.Generator()
    if seed is None:
        fresh.seed()
    else:
        fresh.manual_seed(int(seed))
    return fresh


class TaskSampler:
    """Draws batches of N-way K-shot Q-query classification tasks from a :class:`FewShotDataset`.

    For each task, ``ways`` distinct classes are drawn uniformly without replacement and given
    labels ``0..ways-1`` in the (random) order they were drawn; from each class, ``shots + queries``
    distinct images are drawn uniformly without replacement, the first ``shots`` for the support
    set and the rest for the query set, so support and query never share an image. Tasks are
    independent. Everything is drawn from one CPU ``torch.Generator`` with a fixed number of
    draws per batch, so the same seed gives the same tasks, and :meth:`state_dict` /
    :meth:`load_state_dict` resume a run bit-identically.

    Sampling is vectorised: one ``rand`` + ``topk`` picks the classes of all tasks, one picks the
    images of all classes, and one gather fetches the pixels (on the images' device), converted
    to float32 in ``[0, 1]``. Within a task, examples are ordered class by class (label 0's
    ``shots`` images first).

    Args:
        dataset: the split to sample from.
        ways: classes per task ``N`` (at most ``dataset.num_classes``).
        shots: support images per class ``K`` (>= 1).
        queries: query images per class ``Q`` (>= 0); ``K + Q`` at most the smallest class.
        seed: seed of a fresh generator (reproducible), or
        generator: a CPU generator to draw from.

    Example:
        >>> sampler = TaskSampler(dataset, ways=5, shots=1, queries=15, seed=0)
        >>> batch = sampler.sample(32)
        >>> batch.support_x.shape, batch.query_y.shape  # Omniglot 28x28
        (torch.Size([32, 5, 1, 28, 28]), torch.Size([32, 75]))
    """

    def __init__(
        self,
        dataset: FewShotDataset,
        ways: int,
        shots: int,
        queries: int,
        *,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        _check_task_shape(dataset, ways, shots, queries)
        self.dataset = dataset
        self.ways, self.shots, self.queries = int(ways), int(shots), int(queries)
        self.generator = make_generator(seed, generator)
        self._ragged = bool((dataset.class_counts != dataset.class_rows.shape[1]).any())

    def sample_indices(self, batch_size: int) -> tuple[Tensor, Tensor]:
        """Draw the classes and image rows of ``batch_size`` tasks (no pixels touched).

        Returns:
            ``classes``: ``(B, ways)`` int64 dataset class of label ``0..ways-1``;
            ``rows``: ``(B, ways, shots + queries)`` int64 rows of ``dataset.images``, the first
            ``shots`` of each class are support, the rest query.
        """
        _check_batch_size(batch_size)
        ds, g = self.dataset, self.generator
        class_keys = torch.rand(batch_size, ds.num_classes, generator=g, dtype=torch.float64)
        classes = class_keys.topk(self.ways, dim=1).indices
        width = ds.class_rows.shape[1]
        keys = torch.rand(batch_size, self.ways, width, generator=g, dtype=torch.float64)
        if self._ragged:
            beyond = torch.arange(width) >= ds.class_counts[classes].unsqueeze(-1)
            keys.masked_fill_(beyond, 2.0)
        picks = keys.topk(self.shots + self.queries, dim=2, largest=False).indices
        rows = ds.class_rows[classes.unsqueeze(-1), picks]
        return classes, rows

    def gather(self, rows: Tensor) -> TaskBatch:
        """Fetch the pixels of :meth:`sample_indices`' ``rows`` as a :class:`TaskBatch`.

        Args:
            rows: ``(B, ways, shots + queries)`` int64 rows of ``dataset.images``.

        Returns:
            ``support_x (B, ways*shots, C, H, W)`` and ``query_x (B, ways*queries, C, H, W)``
            float32 in ``[0, 1]``; ``support_y (B, ways*shots)`` and ``query_y``
            ``(B, ways*queries)`` int64 labels.
        """
        b, n, m = rows.shape
        k = self.shots
        support_x = self._pixels(rows[:, :, :k], b, n * k)
        query_x = self._pixels(rows[:, :, k:], b, n * (m - k))
        labels = torch.arange(n, device=support_x.device)
        support_y = labels.repeat_interleave(k).expand(b, -1).contiguous()
        query_y = labels.repeat_interleave(m - k).expand(b, -1).contiguous()
        return TaskBatch(support_x, support_y, query_x, query_y)

    def _pixels(self, rows: Tensor, batch_size: int, per_task: int) -> Tensor:
        """``(B, per_task, C, H, W)`` float32 in ``[0, 1]`` of the given image rows."""
        images = self.dataset.images
        flat = rows.reshape(-1).to(images.device)
        picked = images.index_select(0, flat)
        out = torch.empty(picked.shape, dtype=torch.float32, device=images.device)
        torch.mul(picked, 1.0 / 255.0, out=out)
        return out.reshape(batch_size, per_task, *images.shape[1:])

    def sample(self, batch_size: int) -> TaskBatch:
        """Draw ``batch_size`` tasks (see the class docstring for shapes and guarantees)."""
        _, rows = self.sample_indices(batch_size)
        return self.gather(rows)

    def state_dict(self) -> dict[str, Any]:
        """The generator state and task shape, to resume sampling bit-identically."""
        return {
            "generator": self.generator.get_state(),
            "ways": self.ways,
            "shots": self.shots,
            "queries": self.queries,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (the task shape must match this sampler's)."""
        saved = (state.get("ways"), state.get("shots"), state.get("queries"))
        if saved != (self.ways, self.shots, self.queries):
            raise DataError(
                f"sampler state was saved for (ways, shots, queries) = {saved}, this sampler "
                f"draws {(self.ways, self.shots, self.queries)}; build it with the saved shape"
            )
        self.generator.set_state(state["generator"])


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")


def _check_task_shape(dataset: FewShotDataset, ways: int, shots: int, queries: int) -> None:
    where = f"{dataset.name} '{dataset.split}'"
    for label, value, low in (("ways", ways, 1), ("shots", shots, 1), ("queries", queries, 0)):
        if isinstance(value, bool) or int(value) != value or value < low:
            raise DataError(f"{label} must be an integer >= {low}, got {value!r}")
    if ways > dataset.num_classes:
        raise DataError(
            f"ways={ways} but {where} has only {dataset.num_classes} classes; "
            f"lower --ways to at most {dataset.num_classes} or use a split with more classes"
        )
    if shots + queries > dataset.min_per_class:
        raise DataError(
            f"shots + queries = {shots} + {queries} = {shots + queries} but the smallest class "
            f"of {where} has {dataset.min_per_class} images; lower --shots/--queries so their "
            f"sum is at most {dataset.min_per_class}"
        )
