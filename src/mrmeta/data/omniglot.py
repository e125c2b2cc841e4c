"""Omniglot (Lake et al., Science 2015): 1623 handwritten characters from 50 alphabets, 20 each.

Two split schemes (which characters go to which split):

``split_scheme="lake"`` (default), Lake's official alphabet split:
    ``train``: the 30 background alphabets minus the 5 held out for validation (792 characters);
    ``val``: the background alphabets Armenian, Bengali, Early_Aramaic, Hebrew and
    Mkhedruli_(Georgian) (172 characters, the same alphabets as the Vinyals validation split);
    ``test``: the 20 evaluation alphabets (659 characters); ``trainval``: all 964 background
    characters. No rotations unless ``rotations=True``.

``split_scheme="vinyals"``, the character-level split of Vinyals et al. (2016) used by MAML-style
papers, exactly as distributed with Snell et al.'s prototypical networks
(``splits/vinyals/{train,val,test}.txt``):
    ``test``: 423 characters, the evaluation alphabets Kannada, Keble, Malayalam, Manipuri,
    Mongolian, Old_Church_Slavonic_(Cyrillic), Oriya, Syriac_(Serto), Sylheti, Tengwar, Tibetan,
    ULOG and Gurmukhi character42-45; ``trainval``: the other 1200 characters; ``val``: the 172
    characters of Armenian, Bengali, Early_Aramaic, Hebrew and Mkhedruli_(Georgian), carved out
    of the 1200; ``train``: the remaining 1028. With rotations (the default here) every character
    also gives three classes rotated by 90, 180 and 270 degrees: 4112 / 688 / 1692 / 4800 classes.

Images are resized to ``image_size`` (28 by default) with area averaging, so strokes keep grey
edges; ink = 255, background = 0, one channel.
"""

from __future__ import annotations

import functools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from mrmeta.data import _omniglot_files as files
from mrmeta.data._dataset import FewShotDataset
from mrmeta.data._errors import DataError, DataNotFoundError
from mrmeta.data._paths import HOW_TO_POINT, candidate_dirs, resolve_root

NAME = "omniglot"
SPLITS = ("train", "val", "test", "trainval")
SPLIT_SCHEMES = ("lake", "vinyals")
VAL_ALPHABETS = ("Armenian", "Bengali", "Early_Aramaic", "Hebrew", "Mkhedruli_(Georgian)")
# fmt: off
VINYALS_TEST_ALPHABETS = (
    "Kannada", "Keble", "Malayalam", "Manipuri", "Mongolian", "Old_Church_Slavonic_(Cyrillic)",
    "Oriya", "Syriac_(Serto)", "Sylheti", "Tengwar", "Tibetan", "ULOG",
)
# fmt: on
VINYALS_TEST_CHARACTERS = tuple(("Gurmukhi", f"character{i}") for i in range(42, 46))
ROTATIONS = (0, 90, 180, 270)
_RESIZE_CHUNK = 4096


@dataclass(frozen=True)
class _Characters:
    """All characters of a source, resized: ``images`` ``(n_chars, n_drawers, 1, s, s)`` uint8."""

    images: Tensor
    kinds: tuple[str, ...]
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]


def load_omniglot(
    split: str = "train",
    root: str | Path | None = None,
    *,
    split_scheme: str = "lake",
    rotations: bool | None = None,
    image_size: int | None = 28,
    download: bool = False,
    base_url: str | None = None,
    cache: bool = True,
) -> FewShotDataset:
    """Load one split of Omniglot (see the module docstring for the splits).

    Args:
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        root: folder holding the data (or an ``omniglot/`` subfolder of it); default
            ``$MRMETA_DATA``, else ``~/.cache/mrmeta``.
        split_scheme: ``"lake"`` (alphabet split, default) or ``"vinyals"`` (1200/423
            characters).
        rotations: add 90/180/270-degree rotations as extra classes; default True for
            ``"vinyals"``, False for ``"lake"``.
        image_size: side of the square images (``None``: keep 105).
        download: fetch the official archives into ``root/omniglot`` if no copy is found
            (checksums verified; a notice on stderr says where they went).
        base_url: where the archives are fetched from (default: the official repository,
            ``files.OFFICIAL_URL``).
        cache: convert a complete PNG tree to the fast ``.npz`` pair next to it.

    Returns:
        The split, images ``(n_classes * 20, 1, s, s)`` uint8 with 20 per class, classes named
        ``"Alphabet/characterNN"`` (``+ "/rotDDD"`` with rotations).

    Raises:
        DataNotFoundError: no copy found and ``download`` is False (names ``--data-root`` and
            ``MRMETA_DATA``).
        DataError: bad split/split scheme/size, malformed files, failed or corrupt download.
    """
    _check_options(split, split_scheme, image_size)
    source = _locate(resolve_root(root), download, base_url)
    chars = _load_characters(source, image_size, cache)
    keep = [_in_split(split_scheme, split, k, a, c) for k, a, c in _infos(chars)]
    if not any(keep):
        raise DataError(
            f"omniglot {split_scheme} '{split}' has no characters in {source.folder}: the copy "
            f"there holds only {sorted(set(chars.kinds))}; add the missing images_* set"
        )
    index = torch.tensor(np.flatnonzero(keep))
    images = chars.images.index_select(0, index)
    names = [f"{chars.alphabets[i]}/{chars.characters[i]}" for i in index.tolist()]
    with_rotations = split_scheme == "vinyals" if rotations is None else bool(rotations)
    if with_rotations:
        images, names = _add_rotations(images, names)
    return FewShotDataset.from_class_tensor(images, names, name=NAME, split=split)


def _check_options(split: str, split_scheme: str, image_size: int | None) -> None:
    if split not in SPLITS:
        raise DataError(f"omniglot has no split {split!r}; choose one of {', '.join(SPLITS)}")
    if split_scheme not in SPLIT_SCHEMES:
        raise DataError(
            f"omniglot has no split scheme {split_scheme!r}; choose one of "
            f"{', '.join(SPLIT_SCHEMES)}"
        )
    if image_size is not None and (isinstance(image_size, bool) or image_size < 1):
        raise DataError(f"image_size must be a positive integer or None, got {image_size!r}")


def _locate(root: Path, download: bool, base_url: str) -> files.Source:
    """Find a copy under ``root`` (or ``root/omniglot``), downloading it if allowed."""
    source = files.find_source(candidate_dirs(root, ["omniglot"]))
    if source is not None:
        return source
    if not download:
        raise DataNotFoundError(
            f"Omniglot not found in {root} or {root / 'omniglot'} (expected "
            "images_background.npz + images_evaluation.npz, or images_background/ + "
            f"images_evaluation/ as folders or zips); {HOW_TO_POINT}, or pass download=True "
            "(--download) to fetch the official archives"
        )
    target = root / "omniglot"
    _notice(f"Omniglot not found in {root}; downloading the official archives into {target}")
    files.download(target, files.OFFICIAL_URL if base_url is None else base_url)
    source = files.find_source(candidate_dirs(root, ["omniglot"]))
    if source is None:
        raise DataError(f"Omniglot download into {target} left no readable copy")
    _notice(f"Omniglot downloaded and verified (md5/sha256) into {target}")
    return source


def _notice(message: str) -> None:
    """A one-line progress notice on stderr (stdout stays for results)."""
    print(f"mrmeta: {message}", file=sys.stderr, flush=True)


@functools.lru_cache(maxsize=2)
def _load_characters(source: files.Source, image_size: int | None, cache: bool) -> _Characters:
    """Read and resize every character of ``source`` once per process (memoised on its stamp)."""
    sets = files.read_sets(source)
    if source.layout == "png" and cache and files.is_complete(sets):
        files.write_cache(source.folder, sets)
    resized = [resize_ink(cs.ink, image_size) for cs in sets]
    return _Characters(
        images=torch.cat(resized),
        kinds=tuple(cs.kind for cs in sets for _ in cs.ids),
        alphabets=tuple(a for cs in sets for a in cs.alphabets),
        characters=tuple(c for cs in sets for c in cs.characters),
    )


def _infos(chars: _Characters) -> zip[tuple[str, str, str]]:
    return zip(chars.kinds, chars.alphabets, chars.characters, strict=True)


def resize_ink(ink: np.ndarray, size: int | None) -> Tensor:
    """Resize binary drawings with area averaging.

    Args:
        ink: ``(n, d, H, W)`` bool, True = ink.
        size: output side ``s`` (``None``: keep ``H x W``).

    Returns:
        ``(n, d, 1, s, s)`` uint8, the ink fraction of each output pixel times 255, rounded.
    """
    n, d, h, w = ink.shape
    flat = torch.from_numpy(np.ascontiguousarray(ink)).reshape(n * d, 1, h, w)
    if size is None or (size == h and size == w):
        return flat.to(torch.uint8).mul_(255).reshape(n, d, 1, h, w)
    out = torch.empty(n * d, 1, size, size, dtype=torch.uint8)
    for start in range(0, n * d, _RESIZE_CHUNK):
        chunk = flat[start : start + _RESIZE_CHUNK].to(torch.float32)
        area = F.interpolate(chunk, size=(size, size), mode="area")
        out[start : start + _RESIZE_CHUNK] = area.mul_(255.0).round_().to(torch.uint8)
    return out.reshape(n, d, 1, size, size)


def _in_split(scheme: str, split: str, kind: str, alphabet: str, character: str) -> bool:
    """Whether a character belongs to ``split`` under the split ``scheme``."""
    if scheme == "lake":
        held_out = alphabet in VAL_ALPHABETS
        test, val = kind == files.EVALUATION, kind == files.BACKGROUND and held_out
    else:
        named = (alphabet, character) in VINYALS_TEST_CHARACTERS
        test = alphabet in VINYALS_TEST_ALPHABETS or named
        val = alphabet in VAL_ALPHABETS
    return {"test": test, "val": val, "train": not (test or val), "trainval": not test}[split]


def _add_rotations(images: Tensor, names: list[str]) -> tuple[Tensor, list[str]]:
    """Each class of ``(n, d, C, H, W)`` followed by its 90/180/270-degree rotations (4n)."""
    rotated = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)], dim=1)
    out_names = [f"{name}/rot{deg:03d}" for name in names for deg in ROTATIONS]
    return rotated.reshape(-1, *images.shape[1:]), out_names
