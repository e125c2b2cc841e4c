"""A small decoder for grayscale PNGs (the official Omniglot files are 1-bit grayscale).

Decoding the 32,460 Omniglot PNGs needs no imaging library: a PNG is a zlib stream of filtered
rows. This module handles non-interlaced grayscale images of bit depth 1, 2, 4 or 8 with all five
row filters, which covers the official Omniglot archives; anything else raises a clear error.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from mrmeta.data._errors import DataError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def decode_png(data: bytes, *, source: str = "PNG") -> np.ndarray:
    """Decode a grayscale PNG.

    Args:
        data: the file's bytes.
        source: name used in error messages.

    Returns:
        ``(H, W)`` uint8 array scaled to ``0..255`` (a 1-bit image gives 0 and 255).

    Raises:
        DataError: not a PNG, corrupt, or not a non-interlaced grayscale PNG.
    """
    width, height, depth, idat = _read_chunks(data, source)
    try:
        raw = zlib.decompress(idat)
    except zlib.error as err:
        raise DataError(f"{source}: corrupt PNG data ({err}); re-download the archive") from err
    stride = (width * depth + 7) // 8
    if len(raw) != height * (stride + 1):
        expected = height * (stride + 1)
        raise DataError(f"{source}: PNG data has {len(raw)} bytes, expected {expected}")
    rows = np.frombuffer(raw, dtype=np.uint8).reshape(height, stride + 1)
    packed = _unfilter(rows, source)
    return _unpack(packed, width, depth)


def _read_chunks(data: bytes, source: str) -> tuple[int, int, int, bytes]:
    """``(width, height, bit_depth, concatenated IDAT)`` after validating the header."""
    if not data.startswith(_SIGNATURE):
        raise DataError(f"{source}: not a PNG file")
    pos, header, idat = len(_SIGNATURE), None, []
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    if header is None or not idat:
        raise DataError(f"{source}: truncated PNG (no IHDR or IDAT chunk)")
    width, height, depth, color, _, _, interlace = header
    if color != 0 or depth not in (1, 2, 4, 8) or interlace != 0:
        raise DataError(
            f"{source}: unsupported PNG (color type {color}, bit depth {depth}, interlace "
            f"{interlace}); only non-interlaced grayscale PNGs (as in Omniglot) are read"
        )
    return width, height, depth, b"".join(idat)


def _unfilter(rows: np.ndarray, source: str) -> np.ndarray:
    """Undo the per-row PNG filters of ``(H, 1 + stride)`` rows; returns ``(H, stride)``."""
    filters, packed = rows[:, 0], rows[:, 1:]
    if not filters.any():
        return packed
    out = np.zeros_like(packed)
    previous = np.zeros(packed.shape[1], dtype=np.uint8)
    for r in range(packed.shape[0]):
        out[r] = _unfilter_row(int(filters[r]), packed[r], previous, source)
        previous = out[r]
    return out


def _unfilter_row(kind: int, row: np.ndarray, prev: np.ndarray, source: str) -> np.ndarray:
    """One row (1 byte per pixel unit, as for grayscale depths <= 8)."""
    if kind == 0:
        return row
    if kind == 1:
        return np.cumsum(row, dtype=np.uint8)
    if kind == 2:
        return row + prev
    if kind in (3, 4):
        return _unfilter_sequential(kind, row, prev)
    raise DataError(f"{source}: invalid PNG row filter {kind}; the file is corrupt")


def _unfilter_sequential(kind: int, row: np.ndarray, prev: np.ndarray) -> np.ndarray:
    """Average (3) and Paeth (4) filters, which depend on the row's own decoded bytes."""
    out = [0] * len(row)
    left = 0
    for i, (x, up) in enumerate(zip(row.tolist(), prev.tolist(), strict=True)):
        up_left = int(prev[i - 1]) if i else 0
        predictor = (left + up) // 2 if kind == 3 else _paeth(left, up, up_left)
        left = out[i] = (x + predictor) & 0xFF
    return np.asarray(out, dtype=np.uint8)


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def _unpack(packed: np.ndarray, width: int, depth: int) -> np.ndarray:
    """``(H, stride)`` packed samples to ``(H, W)`` uint8 scaled to ``0..255``."""
    if depth == 8:
        return np.ascontiguousarray(packed[:, :width])
    bits = np.unpackbits(packed, axis=1)[:, : width * depth].reshape(packed.shape[0], width, depth)
    weights = (1 << np.arange(depth - 1, -1, -1)).astype(np.uint16)
    values = bits.astype(np.uint16) @ weights
    return (values * (255 // ((1 << depth) - 1))).astype(np.uint8)
