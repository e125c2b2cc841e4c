"""miniImageNet (Vinyals et al. 2016; Ravi & Larochelle 2017 split): 100 classes, 64/16/20.

Bring your own copy: the widely shared cache pickles ``mini-imagenet-cache-train.pkl``,
``mini-imagenet-cache-val.pkl``, ``mini-imagenet-cache-test.pkl`` (dicts with ``image_data``
uint8 ``(N, 84, 84, 3)`` and ``class_dict`` ``{wordnet id: [row indices]}``, 600 images per
class), in the data root or its ``mini-imagenet/`` (``miniImageNet/``, ``miniimagenet/``,
``mini_imagenet/``) subfolder. They are read with a restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from mrmeta.data._arrays import get_field, hwc_images
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError
from mrmeta.data._file_benchmark import FileBenchmark
from mrmeta.data._safe_pickle import load_pickle

NAME = "mini-imagenet"
CLASSES = {"train": 64, "val": 16, "test": 20}
SUBDIRS = ("mini-imagenet", "miniImageNet", "miniimagenet", "mini_imagenet")
SIDE = 84


def _read_split(benchmark: FileBenchmark, root: Path, split: str) -> tuple[FewShotDataset, Path]:
    """``mini-imagenet-cache-<split>.pkl``: images ``(N, 3, 84, 84)`` uint8 (a view of the
    file's array), classes named by their WordNet ids in sorted order."""
    path = benchmark.find(root, f"mini-imagenet-cache-{split}.pkl")
    content = load_pickle(path)
    images = hwc_images(get_field(content, "image_data", path), path, SIDE)
    names, rows = _class_rows(get_field(content, "class_dict", path), images.shape[0], path)
    return FewShotDataset(images, rows, names, benchmark.name, split), path


MINI_IMAGENET = FileBenchmark(NAME, CLASSES, SUBDIRS, _read_split)


def _class_rows(class_dict: Any, n_images: int, path: Path) -> tuple[tuple[str, ...], Tensor]:
    """Sorted class names and their ``(n_classes, max_count)`` rows, ``-1`` padded."""
    if not isinstance(class_dict, dict) or not class_dict:
        raise DataError(f"{path}: 'class_dict' must be a non-empty {{name: [indices]}} dict")
    names = sorted(class_dict, key=str)
    lists = [_index_list(class_dict[name], n_images, path) for name in names]
    rows = torch.full((len(lists), max(len(r) for r in lists)), -1, dtype=torch.int64)
    for i, indices in enumerate(lists):
        rows[i, : len(indices)] = torch.tensor(indices, dtype=torch.int64)
    return tuple(_text(n) for n in names), rows


def _index_list(values: Any, n_images: int, path: Path) -> list[int]:
    try:
        indices = [int(v) for v in values]
    except (TypeError, ValueError) as err:
        raise DataError(f"{path}: class_dict holds non-integer indices ({err})") from err
    if not indices or min(indices) < 0 or max(indices) >= n_images:
        raise DataError(
            f"{path}: class_dict indices must be non-empty and within 0..{n_images - 1}; the "
            "file is truncated or not the standard distribution"
        )
    return indices


def _text(name: Any) -> str:
    return name.decode("latin1") if isinstance(name, bytes) else str(name)
