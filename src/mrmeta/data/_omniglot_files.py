"""Omniglot on disk: find it, read it (``.npz`` pair or official PNGs), cache it, download it.

Two layouts are read:

* the ``.npz`` pair ``images_background.npz`` / ``images_evaluation.npz``: ``images`` bool
  ``(n_chars, 20, 105, 105)`` with True = white background, ``labels`` int64; optionally
  ``omniglot_characters.csv`` (``char_id,split,npz_index,alphabet,character``). Without the CSV
  the alphabet of each row comes from the official character-id ranges built in below.
* the official PNG layout ``images_background/<Alphabet>/characterNN/XXXX_YY.png`` (1-bit, 1 =
  white), as folders or zips, including the ``images_background_small1/2`` subsets. ``XXXX`` is
  the official character id, ``YY`` the drawer.

A complete PNG tree is converted once to the ``.npz`` pair + CSV in the same folder (written
atomically), so later loads take about a second.
"""

from __future__ import annotations

import csv
import io
import re
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mrmeta._checkpoint import atomic_write_bytes
from mrmeta.data._download import (
    check_zip_members,
    download_file,
    extract_zip,
    make_folder,
    verify_checksum,
)
from mrmeta.data._errors import DataError

BACKGROUND, EVALUATION = "background", "evaluation"
SETS = (BACKGROUND, EVALUATION)
CSV_NAME = "omniglot_characters.csv"

# (alphabet, number of characters) in the order of the official character ids: background ids
# 0001-0964, evaluation ids 0965-1623; characterNN counts up within each alphabet.
# fmt: off
ALPHABETS: dict[str, tuple[tuple[str, int], ...]] = {
    BACKGROUND: (
        ("Arcadian", 26), ("Armenian", 41), ("Asomtavruli_(Georgian)", 40), ("Balinese", 24),
        ("Bengali", 46), ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 14), ("Braille", 26),
        ("Cyrillic", 33), ("Early_Aramaic", 22), ("Syriac_(Estrangelo)", 23),
        ("Anglo-Saxon_Futhorc", 29), ("Futurama", 26), ("Grantha", 43), ("Greek", 24),
        ("Gujarati", 48), ("Hebrew", 22), ("Japanese_(hiragana)", 52),
        ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 16), ("Malay_(Jawi_-_Arabic)", 40),
        ("Japanese_(katakana)", 47), ("Korean", 40), ("Latin", 26), ("Alphabet_of_the_Magi", 20),
        ("Mkhedruli_(Georgian)", 41), ("Burmese_(Myanmar)", 34), ("N_Ko", 33),
        ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 14), ("Sanskrit", 42), ("Tagalog", 17),
        ("Tifinagh", 55),
    ),
    EVALUATION: (
        ("Angelic", 20), ("Atemayar_Qelisayer", 26), ("Atlantean", 26), ("Aurek-Besh", 26),
        ("Avesta", 26), ("Ge_ez", 26), ("Glagolitic", 45), ("Gurmukhi", 45), ("Kannada", 41),
        ("Keble", 26), ("Malayalam", 47), ("Manipuri", 40), ("Mongolian", 30),
        ("Old_Church_Slavonic_(Cyrillic)", 45), ("Oriya", 46), ("Syriac_(Serto)", 23),
        ("Sylheti", 28), ("Tengwar", 25), ("Tibetan", 42), ("ULOG", 26),
    ),
}
# fmt: on
FIRST_ID = {BACKGROUND: 1, EVALUATION: 965}


@dataclass(frozen=True)
class Archive:
    """One official Omniglot archive and how to verify it.

    The official sha256 of these archives could not be obtained while this was written (no
    network), so ``sha256`` is ``None`` and the download is verified by the md5 that torchvision
    and other loaders have pinned for years, plus the archive's structure (every member under
    ``top/``, ``n_characters`` character folders). Fill in ``sha256`` once computed from a
    trusted copy; it is then checked as well.
    """

    top: str
    n_characters: int
    sha256: str | None
    md5: str | None

    @property
    def filename(self) -> str:
        return f"{self.top}.zip"


ARCHIVES: dict[str, Archive] = {
    BACKGROUND: Archive("images_background", 964, None, "68d2efa1b9178cc56df9314c21c6e718"),
    EVALUATION: Archive("images_evaluation", 659, None, "6b91aef0f799c5bb55b94e3f2daec811"),
}
OFFICIAL_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"

_PNG_PATH = re.compile(r"(?:^|/)([^/]+)/(character\d+)/(\d+)_(\d+)\.png$")


@dataclass(frozen=True)
class CharacterSet:
    """The characters of one Omniglot set at full resolution.

    Attributes:
        kind: ``"background"`` or ``"evaluation"``.
        ink: ``(n_chars, n_drawers, H, W)`` bool, True = ink.
        ids: official character id of each row.
        alphabets: alphabet folder name of each row.
        characters: ``characterNN`` of each row.
    """

    kind: str
    ink: np.ndarray
    ids: tuple[int, ...]
    alphabets: tuple[str, ...]
    characters: tuple[str, ...]


@dataclass(frozen=True)
class Source:
    """Where one copy of Omniglot lives; ``stamp`` changes when its files change."""

    folder: Path
    layout: str  # "npz" or "png"
    paths: tuple[tuple[str, tuple[Path, ...]], ...]
    stamp: tuple[tuple[str, int, int], ...]


def find_source(folders: list[Path]) -> Source | None:
    """The first folder holding the ``.npz`` pair, else the first holding a PNG layout."""
    for folder in folders:
        npz = tuple(folder / f"images_{kind}.npz" for kind in SETS)
        if all(p.is_file() for p in npz):
            return _source(folder, "npz", tuple((k, (p,)) for k, p in zip(SETS, npz, strict=True)))
    for folder in folders:
        found = tuple((kind, _png_inputs(folder, kind)) for kind in SETS)
        if any(paths for _, paths in found):
            return _source(folder, "png", tuple((k, p) for k, p in found if p))
    return None


def _png_inputs(folder: Path, kind: str) -> tuple[Path, ...]:
    """``images_<kind>`` (folder, else zip), else every ``images_<kind>_*`` subset."""
    exact = folder / f"images_{kind}"
    for candidate in (exact, exact.with_suffix(".zip")):
        if candidate.exists():
            return (candidate,)
    subsets = sorted(folder.glob(f"images_{kind}_*"))
    return tuple(p for p in subsets if p.is_dir() or p.suffix == ".zip")


def _source(folder: Path, layout: str, paths: tuple[tuple[str, tuple[Path, ...]], ...]) -> Source:
    stamp = []
    for _, group in paths:
        for p in group:
            st = p.stat()
            stamp.append((str(p), st.st_mtime_ns, st.st_size))
    return Source(folder, layout, paths, tuple(stamp))


def read_sets(source: Source) -> list[CharacterSet]:
    """Read every set a source holds, at full resolution."""
    if source.layout == "npz":
        meta = _read_csv(source.folder / CSV_NAME)
        return [_read_npz(paths[0], kind, meta.get(kind)) for kind, paths in source.paths]
    return [_read_png_set(paths, kind) for kind, paths in source.paths]


# ---------------------------------------------------------------- .npz + csv


def _read_npz(path: Path, kind: str, meta: list[tuple[int, str, str]] | None) -> CharacterSet:
    try:
        with np.load(path, allow_pickle=False) as archive:
            images = archive["images"]
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as err:
        raise DataError(
            f"{path}: not an Omniglot .npz with an 'images' array ({err}); delete it to fall "
            "back to the PNG folders, or re-create it"
        ) from err
    meta = meta if meta is not None else _builtin_meta(kind)
    if images.dtype != np.bool_ or images.ndim != 4 or images.shape[0] != len(meta):
        raise DataError(
            f"{path}: 'images' is {images.dtype} {images.shape}, expected bool "
            f"({len(meta)}, 20, 105, 105) (True = background); delete or re-create the file"
        )
    ids, alphabets, characters = zip(*meta, strict=True) if meta else ((), (), ())
    return CharacterSet(kind, ~images, tuple(ids), tuple(alphabets), tuple(characters))


def _builtin_meta(kind: str) -> list[tuple[int, str, str]]:
    """``(char_id, alphabet, characterNN)`` per row from the official id ranges."""
    rows, next_id = [], FIRST_ID[kind]
    for alphabet, count in ALPHABETS[kind]:
        for j in range(count):
            rows.append((next_id, alphabet, f"character{j + 1:02d}"))
            next_id += 1
    return rows


def _read_csv(path: Path) -> dict[str, list[tuple[int, str, str]]]:
    """Rows of ``omniglot_characters.csv`` per set, ordered by ``npz_index`` (empty if absent)."""
    if not path.is_file():
        return {}
    grouped: dict[str, dict[int, tuple[int, str, str]]] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                entry = (int(row["char_id"]), row["alphabet"], row["character"])
                grouped.setdefault(row["split"], {})[int(row["npz_index"])] = entry
    except (KeyError, ValueError, TypeError) as err:
        raise DataError(
            f"{path}: expected columns char_id,split,npz_index,alphabet,character ({err}); "
            "fix or delete the file (the built-in id table is used without it)"
        ) from err
    return {kind: [rows[i] for i in sorted(rows)] for kind, rows in grouped.items()}


def write_cache(folder: Path, sets: list[CharacterSet]) -> bool:
    """Write the ``.npz`` pair + CSV for a complete PNG tree, atomically; False if not writable."""
    try:
        payload = _csv_bytes(sets)
        atomic_write_bytes(folder / CSV_NAME, lambda handle: handle.write(payload))
        for cs in sets:
            buffer = io.BytesIO()
            labels = np.repeat(np.arange(len(cs.ids))[:, None], cs.ink.shape[1], axis=1)
            np.savez_compressed(buffer, images=~cs.ink, labels=labels.astype(np.int64))
            atomic_write_bytes(
                folder / f"images_{cs.kind}.npz", lambda h, b=buffer: h.write(b.getvalue())
            )
    except OSError as err:
        warnings.warn(f"could not cache Omniglot as .npz in {folder} ({err})", stacklevel=3)
        return False
    return True


def _csv_bytes(sets: list[CharacterSet]) -> bytes:
    lines = ["char_id,split,npz_index,alphabet,character"]
    for cs in sets:
        rows = zip(cs.ids, cs.alphabets, cs.characters, strict=True)
        lines += [f"{cid:04d},{cs.kind},{i},{a},{c}" for i, (cid, a, c) in enumerate(rows)]
    return ("\n".join(lines) + "\n").encode("utf-8")


# ---------------------------------------------------------------- PNG tree


def _read_png_set(paths: tuple[Path, ...], kind: str) -> CharacterSet:
    """Decode every ``<Alphabet>/characterNN/XXXX_YY.png`` under ``paths`` (folders or zips)."""
    drawings: dict[int, dict[int, np.ndarray]] = {}
    names: dict[int, tuple[str, str]] = {}
    for name, data in _png_files(paths):
        match = _PNG_PATH.search(name)
        if match is None:
            continue
        alphabet, character, cid, drawer = match.groups()
        names[int(cid)] = (alphabet, character)
        drawings.setdefault(int(cid), {})[int(drawer)] = decode_png(data, source=name) < 128
    if not drawings:
        where = ", ".join(str(p) for p in paths)
        raise DataError(
            f"no Omniglot PNGs (<Alphabet>/characterNN/XXXX_YY.png) in {where}; the folder is "
            "empty or in another layout"
        )
    return _stack_drawings(kind, drawings, names, paths)


def decode_png(data: bytes, *, source: str = "PNG") -> np.ndarray:
    """Decode a PNG (any bit depth or colour type) to grayscale with Pillow.

    Args:
        data: the file's bytes.
        source: the file's name, used in error messages.

    Returns:
        ``(H, W)`` uint8 array in ``0..255`` (a 1-bit Omniglot drawing gives 0 and 255).

    Raises:
        DataError: not a PNG, or corrupt/truncated (one line naming ``source``).
    """
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            return np.asarray(image.convert("L"))
    except UnidentifiedImageError as err:
        raise DataError(f"{source}: not a PNG file; re-download the archive") from err
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(
            f"{source}: not a readable PNG ({err}); the file is corrupt, re-download the archive"
        ) from err


def _stack_drawings(
    kind: str,
    drawings: dict[int, dict[int, np.ndarray]],
    names: dict[int, tuple[str, str]],
    paths: tuple[Path, ...],
) -> CharacterSet:
    ids = sorted(drawings)
    counts = {len(drawings[i]) for i in ids}
    shapes = {img.shape for i in ids for img in drawings[i].values()}
    if len(counts) != 1 or len(shapes) != 1:
        raise DataError(
            f"Omniglot PNGs in {paths[0]}: characters have {sorted(counts)} drawings and sizes "
            f"{sorted(shapes)}; every character needs the same number of equal-size drawings"
        )
    ink = np.stack([np.stack([drawings[i][d] for d in sorted(drawings[i])]) for i in ids])
    alphabets = tuple(names[i][0] for i in ids)
    characters = tuple(names[i][1] for i in ids)
    return CharacterSet(kind, ink, tuple(ids), alphabets, characters)


def _png_files(paths: tuple[Path, ...]) -> Iterator[tuple[str, bytes]]:
    """``(path-like name, bytes)`` of every ``.png`` in the given folders and zips."""
    for path in paths:
        if path.is_dir():
            for file in sorted(path.rglob("*.png")):
                yield file.relative_to(path.parent).as_posix(), file.read_bytes()
        else:
            yield from _zip_pngs(path)


def _zip_pngs(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".png"):
                    yield info.filename, zf.read(info)
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path} is not a readable zip ({err}); delete or re-download it") from err


def is_complete(sets: list[CharacterSet]) -> bool:
    """Both sets present with the official number of characters."""
    counts = {cs.kind: len(cs.ids) for cs in sets}
    return all(counts.get(kind) == ARCHIVES[kind].n_characters for kind in SETS)


# ---------------------------------------------------------------- download


def download(folder: Path, base_url: str = OFFICIAL_URL, timeout: float = 60.0) -> None:
    """Fetch, verify and unpack both official archives into ``folder`` (skipping present ones)."""
    make_folder(folder)
    for kind in SETS:
        archive = ARCHIVES[kind]
        if (folder / archive.top).is_dir():
            continue
        zip_path = folder / archive.filename
        if zip_path.is_file():
            verify_checksum(zip_path, sha256=archive.sha256, md5=archive.md5, source=str(zip_path))
        else:
            url = f"{base_url.rstrip('/')}/{archive.filename}"
            download_file(url, zip_path, sha256=archive.sha256, md5=archive.md5, timeout=timeout)
        try:
            _check_structure(zip_path, archive)
        except DataError:
            zip_path.unlink(missing_ok=True)
            raise
        extract_zip(zip_path, folder, archive.top)
        zip_path.unlink()


def _check_structure(zip_path: Path, archive: Archive) -> None:
    """Every member under ``top/`` and ``n_characters`` character folders of PNGs."""
    names = check_zip_members(zip_path, archive.top)
    chars = {m.group(1, 2) for m in map(_PNG_PATH.search, names) if m is not None}
    if len(chars) != archive.n_characters:
        raise DataError(
            f"{zip_path}: {len(chars)} character folders, expected {archive.n_characters}; this "
            "is not the official Omniglot archive; delete it and retry"
        )
