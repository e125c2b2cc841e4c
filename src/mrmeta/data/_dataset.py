"""A few-shot classification dataset: uint8 images in memory, grouped by class."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from mrmeta.data._errors import DataError


@dataclass(frozen=True, eq=False)
class FewShotDataset:
    """The images of one split of a few-shot benchmark, held in memory as one uint8 tensor.

    Images are stored once, in whatever order the source file had them; ``class_rows`` indexes
    them by class, so ``images[class_rows[c, :class_counts[c]]]`` are the images of class ``c``.
    Classes may hold different numbers of images (tieredImageNet); ``class_rows`` is padded with
    ``-1``. Pixel values are ``0..255`` (for Omniglot, ink = 255); a :class:`TaskSampler` turns the
    images of a sampled task into float32 in ``[0, 1]``.

    Attributes:
        images: ``(n_images, C, H, W)`` uint8 (may be a channels-last view of the file's array).
        class_rows: ``(n_classes, max_per_class)`` int64 row indices into ``images``, ``-1`` padded.
        class_names: ``n_classes`` names, e.g. ``"Hebrew/character03/rot090"``.
        name: registry name of the benchmark (``"omniglot"``).
        split: ``"train"``, ``"val"``, ``"test"`` (or another split the loader defines).
        class_counts: ``(n_classes,)`` int64 number of images per class (derived).

    Example:
        >>> ds = FewShotDataset.from_class_tensor(torch.zeros(4, 6, 1, 8, 8, dtype=torch.uint8))
        >>> ds.num_classes, ds.class_images(2).shape
        (4, torch.Size([6, 1, 8, 8]))
    """

    images: Tensor
    class_rows: Tensor
    class_names: tuple[str, ...]
    name: str = "custom"
    split: str = "train"
    class_counts: Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_images(self.images, self.name)
        _check_class_rows(self.class_rows, self.images.shape[0], self.name)
        if len(self.class_names) != self.class_rows.shape[0]:
            raise DataError(
                f"{self.name}: {len(self.class_names)} class names for "
                f"{self.class_rows.shape[0]} classes; give one name per class"
            )
        object.__setattr__(self, "class_counts", (self.class_rows >= 0).sum(dim=1))

    @classmethod
    def from_class_tensor(
        cls,
        images: Tensor,
        class_names: tuple[str, ...] | list[str] | None = None,
        *,
        name: str = "custom",
        split: str = "train",
    ) -> FewShotDataset:
        """Build from ``(n_classes, n_per_class, C, H, W)`` uint8 images (no copy)."""
        if images.dim() != 5:
            raise DataError(
                f"{name}: expected images of shape (n_classes, n_per_class, C, H, W), "
                f"got {tuple(images.shape)}"
            )
        n_classes, n_per = images.shape[:2]
        rows = torch.arange(n_classes * n_per, dtype=torch.int64).reshape(n_classes, n_per)
        names = tuple(class_names) if class_names is not None else _default_names(n_classes)
        return cls(images.reshape(-1, *images.shape[2:]), rows, names, name, split)

    @classmethod
    def from_labels(
        cls,
        images: Tensor,
        labels: Tensor | np.ndarray,
        class_names: dict[int, str] | None = None,
        *,
        name: str = "custom",
        split: str = "train",
    ) -> FewShotDataset:
        """Build from ``(n_images, C, H, W)`` uint8 images and ``(n_images,)`` integer labels.

        Classes are the distinct label values in increasing order; ``class_names`` maps a label
        value to a name (default: the value as text).
        """
        labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.int64).reshape(-1)
        if labels_t.numel() != images.shape[0]:
            raise DataError(
                f"{name} {split}: {labels_t.numel()} labels for {images.shape[0]} images; "
                "the file is truncated or not in the expected format"
            )
        values, rows = rows_by_label(labels_t)
        names_map = class_names or {}
        names = tuple(names_map.get(int(v), str(int(v))) for v in values)
        return cls(images, rows, names, name, split)

    @property
    def num_classes(self) -> int:
        """Number of classes in the split."""
        return int(self.class_rows.shape[0])

    @property
    def num_images(self) -> int:
        """Number of images in the split."""
        return int(self.images.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of every image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def min_per_class(self) -> int:
        """Fewest images any class has (bounds ``shots + queries``)."""
        return int(self.class_counts.min()) if self.num_classes else 0

    def __len__(self) -> int:
        return self.num_classes

    def __repr__(self) -> str:
        return (
            f"FewShotDataset(name={self.name!r}, split={self.split!r}, "
            f"classes={self.num_classes}, images={tuple(self.images.shape)})"
        )

    def class_images(self, index: int) -> Tensor:
        """The ``(n_c, C, H, W)`` uint8 images of class ``index``."""
        rows = self.class_rows[index, : int(self.class_counts[index])]
        return self.images[rows.to(self.images.device)]

    def to(self, device: torch.device | str) -> FewShotDataset:
        """A copy whose images live on ``device`` (the index tables stay on the CPU)."""
        return FewShotDataset(
            self.images.to(device), self.class_rows, self.class_names, self.name, self.split
        )


def rows_by_label(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Group row indices by label value.

    Args:
        labels: ``(n,)`` int64 labels.

    Returns:
        ``values``: ``(n_classes,)`` the distinct labels, increasing; ``rows``:
        ``(n_classes, max_count)`` int64 row indices of each class in their original order,
        padded with ``-1``.
    """
    values, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    order = torch.argsort(inverse, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    sorted_class = inverse[order]
    position = torch.arange(labels.numel()) - starts[sorted_class]
    max_count = int(counts.max()) if counts.numel() else 0
    rows = torch.full((values.numel(), max_count), -1, dtype=torch.int64)
    rows[sorted_class, position] = order
    return values, rows


def _default_names(n: int) -> tuple[str, ...]:
    return tuple(f"class{i:04d}" for i in range(n))


def _check_images(images: Tensor, name: str) -> None:
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise DataError(
            f"{name}: images must be a uint8 tensor of shape (n_images, C, H, W), got "
            f"{images.dtype} {tuple(images.shape)}"
        )


def _check_class_rows(rows: Tensor, n_images: int, name: str) -> None:
    if rows.dtype != torch.int64 or rows.dim() != 2:
        raise DataError(f"{name}: class_rows must be int64 (n_classes, max_per_class)")
    if rows.numel() and (int(rows.max()) >= n_images or int(rows.min()) < -1):
        raise DataError(
            f"{name}: class_rows index outside 0..{n_images - 1}; the class index in the "
            "file points past its images (truncated or mismatched files)"
        )
    valid = (rows >= 0).to(torch.int8)
    if rows.numel() and bool((valid[:, 0] == 0).any()):
        raise DataError(f"{name}: a class has no images; remove it or fix the file")
    if rows.shape[1] > 1 and not bool((valid[:, :-1] >= valid[:, 1:]).all()):
        raise DataError(f"{name}: class_rows must list a class's rows first, then -1 padding")
