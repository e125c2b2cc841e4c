"""FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split 60/20/20 classes by superclass.

The 20 CIFAR-100 superclasses are divided 12/4/4 between train/val/test, so test classes share
no superclass with training classes. Bring your own copy: the MetaOptNet distribution
``FC100_train.pickle``, ``FC100_val.pickle``, ``FC100_test.pickle`` (dicts with ``data`` uint8
``(N, 32, 32, 3)`` and ``labels``, 600 images per class), in the data root or its ``fc100/``
(``FC100/``) subfolder. They are read with a restricted unpickler.
"""

from __future__ import annotations

from pathlib import Path

from mrmeta.data._cifar_pickles import load_cifar_pickle
from mrmeta.data._dataset import FewShotDataset

NAME = "fc100"
CLASSES = {"train": 60, "val": 20, "test": 20}
SUBDIRS = ("fc100", "FC100")


def load_fc100(
    split: str = "train", root: str | Path | None = None, *, check_classes: bool = True
) -> FewShotDataset:
    """Load one FC100 split.

    Args:
        split: ``"train"`` (60 classes), ``"val"`` (20) or ``"test"`` (20).
        root: data root (default ``$MRMETA_DATA``, else ``~/.cache/mrmeta``).
        check_classes: require the standard class count of the split.

    Returns:
        Images ``(N, 3, 32, 32)`` uint8, one class per CIFAR-100 label in the file.
    """
    return load_cifar_pickle(NAME, "FC100", SUBDIRS, CLASSES, split, root, check_classes)
