"""The benchmarks whose files the user brings (CIFAR-FS, FC100, miniImageNet, tieredImageNet).

They differ only in their file formats; everything else — the splits, the data root and the
folders searched under it, the standard class count of each split — is one
:class:`FileBenchmark`, whose :meth:`~FileBenchmark.load` is the dataset's loader in the
registry. Each dataset's module holds its constants, its reader and the text that says which
files it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from mrmeta.data._arrays import check_class_count, check_split
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._paths import find_file, resolve_root

# ``read(benchmark, root, split)``: one split's dataset and the file that defines its classes.
SplitReader = Callable[["FileBenchmark", Path, str], tuple[FewShotDataset, Path]]


@dataclass(frozen=True)
class FileBenchmark:
    """A few-shot image benchmark read from files placed under the data root.

    Attributes:
        name: the registry's name of the dataset (``"cifar-fs"``).
        classes: the standard number of classes of each split ``"train"``, ``"val"``,
            ``"test"``.
        subdirs: the folders under the data root that may hold the files (else the root).
        read: reads one split from the data root (see ``SplitReader``).
    """

    name: str
    classes: Mapping[str, int]
    subdirs: tuple[str, ...]
    read: SplitReader

    def find(self, root: Path, filename: str) -> Path:
        """``filename`` in ``root`` or one of :attr:`subdirs`, else a DataError naming the fix."""
        return find_file(root, self.subdirs, filename, self.name)

    def load(
        self, split: str = "train", root: str | Path | None = None, *, check_classes: bool = True
    ) -> FewShotDataset:
        """Load one split.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.
            root: data root (default ``$MRMETA_DATA``, else ``~/.cache/mrmeta``).
            check_classes: require the standard class count of the split (:attr:`classes`).

        Returns:
            Images ``(N, 3, side, side)`` uint8 and their classes (see the dataset's module).
        """
        check_split(self.name, split)
        dataset, path = self.read(self, resolve_root(root), split)
        check_class_count(dataset, self.classes[split], check_classes, path)
        return dataset
