"""tieredImageNet (Ren et al., ICLR 2018): 608 classes in 34 categories, 351/97/160.

Classes of different splits come from different ImageNet categories (20/6/8). Bring your own
copy in the layout most code uses (MetaOptNet, RFS, FEAT): per split, ``<split>_images.npz``
with an ``images`` array uint8 ``(N, 84, 84, 3)`` and ``<split>_labels.pkl``, a dict whose
``label_specific`` holds the ``N`` class ids (and ``label_specific_str`` their names, if
present), in the data root or its ``tiered-imagenet/`` (``tieredImageNet/``,
``tiered_imagenet/``, ``tieredimagenet/``) subfolder. The ``.npz`` is read without pickle, the
labels with a restricted unpickler. Classes hold different numbers of images (732 to 1300).
The original ``*_images_png.pkl`` layout (PNG-encoded images) is not read: convert it first.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from mrmeta.data._arrays import get_field, hwc_images, int_labels
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError
from mrmeta.data._file_benchmark import FileBenchmark
from mrmeta.data._safe_pickle import load_pickle

NAME = "tiered-imagenet"
CLASSES = {"train": 351, "val": 97, "test": 160}
SUBDIRS = ("tiered-imagenet", "tieredImageNet", "tiered_imagenet", "tieredimagenet")
SIDE = 84


def _read_split(benchmark: FileBenchmark, root: Path, split: str) -> tuple[FewShotDataset, Path]:
    """``<split>_images.npz`` and ``<split>_labels.pkl``: images ``(N, 3, 84, 84)`` uint8 (a
    view of the file's array), one class per distinct ``label_specific`` value."""
    image_path = benchmark.find(root, f"{split}_images.npz")
    label_path = benchmark.find(root, f"{split}_labels.pkl")
    images = hwc_images(_read_npz_images(image_path), image_path, SIDE)
    content = load_pickle(label_path)
    raw_labels = get_field(content, "label_specific", label_path)
    labels = int_labels(raw_labels, images.shape[0], label_path)
    names = _class_names(content, labels)
    dataset = FewShotDataset.from_labels(images, labels, names, name=benchmark.name, split=split)
    return dataset, label_path


TIERED_IMAGENET = FileBenchmark(NAME, CLASSES, SUBDIRS, _read_split)


def _read_npz_images(path: Path) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return archive["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path}: not an .npz with an 'images' array ({err}); re-download or re-create it"
        ) from err


def _class_names(content: dict[Any, Any], labels: np.ndarray) -> dict[int, str]:
    """``label -> name`` from ``label_specific_str`` when it covers every label."""
    names = content.get("label_specific_str", content.get(b"label_specific_str"))
    values = set(labels.tolist())
    if not isinstance(names, list | tuple) or not values:
        return {}
    if min(values) < 0 or max(values) >= len(names):
        return {}
    return {v: str(names[v]) for v in values}
