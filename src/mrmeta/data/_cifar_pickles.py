"""The pickle format CIFAR-FS and FC100 are distributed in (MetaOptNet, Lee et al. 2019).

``<PREFIX>_<split>.pickle`` is a dict with ``data``: uint8 ``(N, 32, 32, 3)`` and ``labels``: a
list of ``N`` CIFAR-100 fine-label ids (0-99). The split is defined by which classes each file
holds. The files were written by Python 2, so they are read with ``encoding="latin1"``, through
the restricted unpickler (numpy arrays and plain containers only).
"""

from __future__ import annotations

from pathlib import Path

from mrmeta.data._arrays import check_class_count, check_split, get_field, hwc_images, int_labels
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._paths import find_file, resolve_root
from mrmeta.data._safe_pickle import load_pickle

SIDE = 32


def load_cifar_pickle(
    name: str,
    prefix: str,
    subdirs: tuple[str, ...],
    expected: dict[str, int],
    split: str,
    root: str | Path | None,
    check_classes: bool,
) -> FewShotDataset:
    """Load ``<prefix>_<split>.pickle`` from ``root`` (or one of ``subdirs`` under it).

    Returns:
        Images ``(N, 3, 32, 32)`` uint8 (a view of the file's array), one class per distinct
        label, named ``"cifar100-<label>"``.
    """
    check_split(name, split)
    path = find_file(resolve_root(root), subdirs, f"{prefix}_{split}.pickle", name)
    content = load_pickle(path)
    images = hwc_images(get_field(content, "data", path), path, SIDE)
    labels = int_labels(get_field(content, "labels", path), images.shape[0], path)
    names = {int(v): f"cifar100-{int(v)}" for v in set(labels.tolist())}
    dataset = FewShotDataset.from_labels(images, labels, names, name=name, split=split)
    check_class_count(dataset, expected[split], check_classes, path)
    return dataset
