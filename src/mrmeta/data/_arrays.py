"""Checks shared by the loaders of image benchmarks distributed as arrays (pickles, ``.npz``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError

SPLITS = ("train", "val", "test")


def check_split(dataset: str, split: str, splits: tuple[str, ...] = SPLITS) -> None:
    """Raise a :class:`DataError` listing the valid splits if ``split`` is not one of them."""
    if split not in splits:
        raise DataError(f"{dataset} has no split {split!r}; choose one of {', '.join(splits)}")


def get_field(mapping: Any, key: str, path: Path) -> Any:
    """``mapping[key]``, also accepting a ``bytes`` key (pickles written by Python 2)."""
    if not isinstance(mapping, dict):
        raise DataError(
            f"{path}: expected a dict with key {key!r}, got {type(mapping).__name__}; "
            "not the standard distribution of this dataset"
        )
    for candidate in (key, key.encode()):
        if candidate in mapping:
            return mapping[candidate]
    keys = ", ".join(repr(k) for k in mapping)
    raise DataError(f"{path}: no {key!r} entry (found {keys}); not the standard distribution")


def hwc_images(array: Any, path: Path, side: int) -> Tensor:
    """View ``(N, side, side, 3)`` uint8 images as an ``(N, 3, side, side)`` tensor (no copy).

    Raises:
        DataError: wrong type, dtype or shape (the message gives the expected shape).
    """
    is_array = isinstance(array, np.ndarray)
    if not is_array or array.dtype != np.uint8 or array.shape[1:] != (side, side, 3):
        got = f"{array.dtype} {array.shape}" if is_array else type(array)
        raise DataError(
            f"{path}: images are {got}, expected uint8 (N, {side}, {side}, 3); the file is not "
            "the standard distribution (or is corrupt): re-download it"
        )
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array).permute(0, 3, 1, 2)


def int_labels(values: Any, n_images: int, path: Path) -> np.ndarray:
    """``(n_images,)`` int64 labels from a list or array, checked against the image count."""
    try:
        labels = np.asarray(values, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: labels are not integers ({err}); re-download the file") from err
    if labels.shape[0] != n_images:
        raise DataError(
            f"{path}: {labels.shape[0]} labels for {n_images} images; the file is truncated or "
            "not the standard distribution"
        )
    return labels


def check_class_count(dataset: FewShotDataset, expected: int, check: bool, path: Path) -> None:
    """Require the standard number of classes unless ``check`` is False."""
    if check and dataset.num_classes != expected:
        raise DataError(
            f"{path}: {dataset.num_classes} classes, but the standard {dataset.name} "
            f"'{dataset.split}' split has {expected}; use the standard files, or pass "
            "check_classes=False to load a custom subset"
        )
