"""Dataset names and their loaders: ``load_dataset(name, split, root, **options)``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError
from mrmeta.data._paths import HOW_TO_POINT
from mrmeta.data.cifar_fs import CIFAR_FS
from mrmeta.data.fc100 import FC100
from mrmeta.data.mini_imagenet import MINI_IMAGENET
from mrmeta.data.omniglot import load_omniglot
from mrmeta.data.sinusoid import SinusoidTasks, load_sinusoid
from mrmeta.data.tiered_imagenet import TIERED_IMAGENET

_LOADERS: dict[str, Callable[..., FewShotDataset | SinusoidTasks]] = {
    "omniglot": load_omniglot,
    "cifar-fs": CIFAR_FS.load,
    "fc100": FC100.load,
    "mini-imagenet": MINI_IMAGENET.load,
    "tiered-imagenet": TIERED_IMAGENET.load,
    "sinusoid": load_sinusoid,
}
# Not image-classification benchmarks: loadable from Python, not trained by ``mrmeta train``
# (which meta-trains Conv4 on images).
_LIBRARY_ONLY = frozenset({"sinusoid"})
_ALIASES = {
    "cifarfs": "cifar-fs",
    "miniimagenet": "mini-imagenet",
    "tieredimagenet": "tiered-imagenet",
}


def available_datasets(*, images_only: bool = False) -> tuple[str, ...]:
    """Names :func:`load_dataset` accepts (case, ``_`` vs ``-`` and a missing dash are forgiven).

    Args:
        images_only: only the image-classification benchmarks, the ones ``mrmeta train`` can
            meta-train on (``sinusoid`` regression is for the library only).
    """
    return tuple(n for n in _LOADERS if not (images_only and n in _LIBRARY_ONLY))


def canonical_dataset_name(name: str) -> str:
    """The registry's spelling of ``name`` (``"CIFAR_FS"`` → ``"cifar-fs"``); an unknown name
    comes back lower-cased and dashed, and is then not in :func:`available_datasets`."""
    key = str(name).strip().lower().replace("_", "-")
    return _ALIASES.get(key.replace("-", ""), key)


def image_datasets() -> tuple[str, ...]:
    """The classification benchmarks (``mrmeta train`` trains on these; not ``sinusoid``)."""
    return available_datasets(images_only=True)


def is_image_dataset(name: str) -> bool:
    """Whether ``name`` (spelled as :func:`load_dataset` forgives) is in :func:`image_datasets`."""
    return canonical_dataset_name(name) in image_datasets()


def load_dataset(
    name: str, split: str = "train", root: str | Path | None = None, **options: Any
) -> FewShotDataset | SinusoidTasks:
    """Load one split of a few-shot benchmark.

    Args:
        name: one of :func:`available_datasets` (``"omniglot"``, ``"cifar-fs"``, ``"fc100"``,
            ``"mini-imagenet"``, ``"tiered-imagenet"``, ``"sinusoid"``).
        split: ``"train"``, ``"val"`` or ``"test"`` (Omniglot also ``"trainval"``).
        root: data root; default ``$MRMETA_DATA``, else ``~/.cache/mrmeta``.
        **options: dataset-specific keywords, e.g. ``split_scheme="vinyals"``, ``download=True`` or
            ``image_size=28`` for Omniglot, ``check_classes=False`` for the others.

    Returns:
        A :class:`FewShotDataset` (classification; draw tasks with :class:`TaskSampler`) or
        :class:`SinusoidTasks` (regression; draw tasks with :class:`SinusoidSampler`).

    Example:
        >>> train = load_dataset("omniglot", "train", root="data/omniglot")
        >>> batch = TaskSampler(train, ways=5, shots=1, queries=15, seed=0).sample(32)

    Raises:
        DataError: unknown name or option, bad split, bad or missing files (one line, names
            the fix).
    """
    loader = _LOADERS.get(canonical_dataset_name(name))
    if loader is None:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(available_datasets())}"
        )
    valid = _keyword_options(loader)
    if "download" in options and "download" not in valid:
        _refuse_download(name, options.pop("download"))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise DataError(
            f"dataset {name!r} has no option {', '.join(unknown)}; valid options: "
            f"{', '.join(valid) or 'none'}"
        )
    return loader(split, root, **options)


def _keyword_options(loader: Callable[..., Any]) -> list[str]:
    params = inspect.signature(loader).parameters
    return [p for p, v in params.items() if v.kind is inspect.Parameter.KEYWORD_ONLY]


def _refuse_download(name: str, download: Any) -> None:
    """``download=False`` is accepted by every dataset; ``True`` only where a source exists."""
    if download:
        raise DataError(
            f"{name} cannot be downloaded by mrmeta (only Omniglot can); place its files under "
            f"the data root: {HOW_TO_POINT}"
        )
