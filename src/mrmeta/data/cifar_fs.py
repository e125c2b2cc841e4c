"""CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100 split 64/16/20 by class.

Bring your own copy: the MetaOptNet distribution ``CIFAR_FS_train.pickle``,
``CIFAR_FS_val.pickle``, ``CIFAR_FS_test.pickle`` (dicts with ``data`` uint8 ``(N, 32, 32, 3)``
and ``labels``, 600 images per class), in the data root or its ``cifar-fs/`` (``CIFAR-FS/``,
``cifar_fs/``, ``CIFAR_FS/``) subfolder. They are read with a restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path

from mrmeta.data._cifar_pickles import load_cifar_pickle
from mrmeta.data._dataset import FewShotDataset

NAME = "cifar-fs"
CLASSES = {"train": 64, "val": 16, "test": 20}
SUBDIRS = ("cifar-fs", "CIFAR-FS", "cifar_fs", "CIFAR_FS")


def load_cifar_fs(
    split: str = "train", root: str | Path | None = None, *, check_classes: bool = True
) -> FewShotDataset:
    """Load one CIFAR-FS split.

    Args:
        split: ``"train"`` (64 classes), ``"val"`` (16) or ``"test"`` (20).
        root: data root (default ``$MRMETA_DATA``, else ``~/.cache/mrmeta``).
        check_classes: require the standard class count of the split.

    Returns:
        Images ``(N, 3, 32, 32)`` uint8, one class per CIFAR-100 label in the file.
    """
    return load_cifar_pickle(NAME, "CIFAR_FS", SUBDIRS, CLASSES, split, root, check_classes)
