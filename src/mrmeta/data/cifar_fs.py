"""CIFAR-FS (Bertinetto et al., ICLR 2019): CIFAR-100 split 64/16/20 by class.

Bring your own copy: the MetaOptNet distribution ``CIFAR_FS_train.pickle``,
``CIFAR_FS_val.pickle``, ``CIFAR_FS_test.pickle`` (dicts with ``data`` uint8 ``(N, 32, 32, 3)``
and ``labels``, 600 images per class), in the data root or its ``cifar-fs/`` (``CIFAR-FS/``,
``cifar_fs/``, ``CIFAR_FS/``) subfolder. They are read with a restricted unpickler.
"""

from __future__ import annotations

from mrmeta.data._cifar_pickles import cifar_pickle_reader
from mrmeta.data._file_benchmark import FileBenchmark

NAME = "cifar-fs"
CLASSES = {"train": 64, "val": 16, "test": 20}
SUBDIRS = ("cifar-fs", "CIFAR-FS", "cifar_fs", "CIFAR_FS")

CIFAR_FS = FileBenchmark(NAME, CLASSES, SUBDIRS, cifar_pickle_reader("CIFAR_FS"))
