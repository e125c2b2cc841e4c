"""FC100 (Oreshkin et al., NeurIPS 2018): CIFAR-100 split 60/20/20 classes by superclass.

The 20 CIFAR-100 superclasses are divided 12/4/4 between train/val/test, so test classes share
no superclass with training classes. Bring your own copy: the MetaOptNet distribution
``FC100_train.pickle``, ``FC100_val.pickle``, ``FC100_test.pickle`` (dicts with ``data`` uint8
``(N, 32, 32, 3)`` and ``labels``, 600 images per class), in the data root or its ``fc100/``
(``FC100/``) subfolder. They are read with a restricted unpickler.
"""

from __future__ import annotations

from mrmeta.data._cifar_pickles import cifar_pickle_reader
from mrmeta.data._file_benchmark import FileBenchmark

NAME = "fc100"
CLASSES = {"train": 60, "val": 20, "test": 20}
SUBDIRS = ("fc100", "FC100")

FC100 = FileBenchmark(NAME, CLASSES, SUBDIRS, cifar_pickle_reader("FC100"))
