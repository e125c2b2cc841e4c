"""The pickle format CIFAR-FS and FC100 are distributed in (MetaOptNet, Lee et al. 2019).

``<PREFIX>_<split>.pickle`` is a dict with ``data``: uint8 ``(N, 32, 32, 3)`` and ``labels``: a
list of ``N`` CIFAR-100 fine-label ids (0-99). The split is defined by which classes each file
holds. The files were written by Python 2, so they are read with ``encoding="latin1"``, through
the restricted unpickler (numpy arrays and plain containers only).
"""

from __future__ import annotations

from pathlib import Path

from mrmeta.data._arrays import get_field, hwc_images, int_labels
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._file_benchmark import FileBenchmark, SplitReader
from mrmeta.data._safe_pickle import load_pickle

SIDE = 32


def cifar_pickle_reader(prefix: str) -> SplitReader:
    """The reader of ``<prefix>_<split>.pickle`` (``prefix`` ``"CIFAR_FS"`` or ``"FC100"``).

    It gives images ``(N, 3, 32, 32)`` uint8 (a view of the file's array), one class per
    distinct label, named ``"cifar100-<label>"``.
    """

    def read(benchmark: FileBenchmark, root: Path, split: str) -> tuple[FewShotDataset, Path]:
        path = benchmark.find(root, f"{prefix}_{split}.pickle")
        content = load_pickle(path)
        images = hwc_images(get_field(content, "data", path), path, SIDE)
        labels = int_labels(get_field(content, "labels", path), images.shape[0], path)
        names = {int(v): f"cifar100-{int(v)}" for v in set(labels.tolist())}
        dataset = FewShotDataset.from_labels(
            images, labels, names, name=benchmark.name, split=split
        )
        return dataset, path

    return read
