"""Omniglot: PNG decoding, the PNG and .npz layouts, download (local HTTP server), real data."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import struct
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from mrmeta.cli import main as cli_main
from mrmeta.data import (
    DataError,
    DataNotFoundError,
    TaskSampler,
    default_data_root,
    load_dataset,
)
from mrmeta.data import _omniglot_files as files

REAL = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data") / "omniglot"
SIDE = 105


# ------------------------------------------------------------------ a reference PNG encoder


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    return a if pa <= pb and pa <= pc else (b if pb <= pc else c)


def _filter_row(kind: int, row: list[int], prev: list[int]) -> list[int]:
    out = []
    for i, x in enumerate(row):
        left, up, up_left = (row[i - 1] if i else 0), prev[i], (prev[i - 1] if i else 0)
        predictor = [0, left, up, (left + up) // 2, _paeth(left, up, up_left)][kind]
        out.append((x - predictor) % 256)
    return out


def encode_png(values: np.ndarray, depth: int, filters: list[int] | None = None) -> bytes:
    """Grayscale PNG of ``(H, W)`` integer samples in ``0..2**depth-1``; row ``r`` uses
    filter ``filters[r % len(filters)]`` (byte-wise, written independently of the decoder)."""
    h, w = values.shape
    bits = ((values[..., None] >> np.arange(depth - 1, -1, -1)) & 1).reshape(h, w * depth)
    packed = np.packbits(bits.astype(np.uint8), axis=1)
    filters = filters or [0]
    raw, prev = bytearray(), [0] * packed.shape[1]
    for r in range(h):
        row = packed[r].tolist()
        kind = filters[r % len(filters)]
        raw += bytes([kind, *_filter_row(kind, row, prev)])
        prev = row

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(raw)))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("depth", [1, 2, 4, 8])
def test_png_decoder_all_filters(depth):
    rng = np.random.default_rng(depth)
    values = rng.integers(0, 2**depth, size=(13, 11))
    decoded = files.decode_png(encode_png(values, depth, [0, 1, 2, 3, 4]))
    assert np.array_equal(decoded, (values * (255 // (2**depth - 1))).astype(np.uint8))


def test_png_decoder_rejects_bad_files():
    with pytest.raises(DataError, match="^x.png: not a PNG file; re-download"):
        files.decode_png(b"GIF89a", source="x.png")
    good = encode_png(np.random.default_rng(0).integers(0, 256, size=(40, 40)), 8)
    with pytest.raises(DataError, match="^y.png: not a readable PNG .*; the file is corrupt"):
        files.decode_png(good[:-40], source="y.png")  # IDAT cut short


def test_corrupt_png_in_a_zip_names_the_file(tmp_path):
    archive = tmp_path / "images_background.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("images_background/Latin/character01/0683_01.png", b"\x89PNG\r\n\x1a\nbad")
    with pytest.raises(DataError, match="Latin/character01/0683_01.png: not a"):
        load_dataset("omniglot", "train", root=tmp_path)


# ------------------------------------------------------------------ a small synthetic Omniglot

BACKGROUND_CHARS = [
    ("Latin", 1, 683),
    ("Latin", 2, 684),
    ("Latin", 3, 685),
    ("Hebrew", 1, 466),
    ("Hebrew", 2, 467),
]
EVALUATION_CHARS = [("Angelic", 1, 965), ("Angelic", 2, 966)]
DRAWERS = 20


def drawing(char_id: int, drawer: int) -> np.ndarray:
    """``(105, 105)`` bool ink: a bar whose position encodes the character and the drawer."""
    ink = np.zeros((SIDE, SIDE), dtype=bool)
    ink[char_id % 50 : char_id % 50 + 30, 2 + 5 * (drawer - 1) : 5 + 5 * (drawer - 1)] = True
    return ink


def build_zip(path: Path, top: str, chars: list[tuple[str, int, int]], extra: str = "") -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for alphabet, number, char_id in chars:
            for d in range(1, DRAWERS + 1):
                png = encode_png((~drawing(char_id, d)).astype(int), 1)  # 1 = white background
                zf.writestr(
                    f"{top}/{alphabet}/character{number:02d}/{char_id:04d}_{d:02d}.png", png
                )
        if extra:
            zf.writestr(extra, b"x")
    return path


def expected_images(chars: list[tuple[str, int, int]]) -> torch.Tensor:
    ink = np.stack(
        [np.stack([drawing(cid, d) for d in range(1, DRAWERS + 1)]) for *_, cid in chars]
    )
    return torch.from_numpy(ink.astype(np.uint8) * 255).reshape(-1, 1, SIDE, SIDE)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path/srv``; yields (folder, base url)."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    folder = tmp_path / "srv"
    folder.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(folder))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def publish(folder: Path, monkeypatch, *, bad_sha: bool = False, extra: str = "") -> None:
    """Serve the two synthetic archives and make them the 'official' ones (checksum, size)."""
    for kind, chars in (("background", BACKGROUND_CHARS), ("evaluation", EVALUATION_CHARS)):
        top = f"images_{kind}"
        archive = build_zip(folder / f"{top}.zip", top, chars, extra)
        digest = "0" * 64 if bad_sha else _sha(archive)
        monkeypatch.setitem(files.ARCHIVES, kind, files.Archive(top, len(chars), digest, None))


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*") if p.name.startswith(".") or p.suffix == ".zip")


def test_download_verifies_unpacks_and_caches(tmp_path, server, monkeypatch):
    served, url = server
    publish(served, monkeypatch)
    root = tmp_path / "data"
    train = load_dataset(
        "omniglot", "train", root=root, download=True, base_url=url, image_size=None
    )
    folder = root / "omniglot"
    assert (folder / "images_background" / "Latin" / "character03").is_dir()
    assert (folder / "images_evaluation" / "Angelic").is_dir()
    assert leftovers(folder) == []
    assert train.class_names == ("Latin/character01", "Latin/character02", "Latin/character03")
    assert torch.equal(train.images, expected_images(BACKGROUND_CHARS[:3]))
    # The complete tree was converted to the .npz pair: the next load reads it, same pixels.
    assert (folder / "images_background.npz").is_file() and (folder / files.CSV_NAME).is_file()
    source = files.find_source([folder])
    assert source is not None and source.layout == "npz"
    again = load_dataset("omniglot", "train", root=root, image_size=None)
    assert torch.equal(again.images, train.images) and again.class_names == train.class_names
    val = load_dataset("omniglot", "val", root=root, image_size=None)
    test = load_dataset("omniglot", "test", root=root, image_size=None)
    assert val.class_names == ("Hebrew/character01", "Hebrew/character02")
    assert torch.equal(test.images, expected_images(EVALUATION_CHARS))


def test_download_with_wrong_checksum_leaves_no_data(tmp_path, server, monkeypatch):
    served, url = server
    publish(served, monkeypatch, bad_sha=True)
    root = tmp_path / "data"
    with pytest.raises(DataError, match="checksum mismatch.*expected sha256 0000"):
        load_dataset("omniglot", "train", root=root, download=True, base_url=url)
    assert [p.name for p in (root / "omniglot").iterdir()] == []
    with pytest.raises(DataNotFoundError):
        load_dataset("omniglot", "train", root=root)


def test_download_refuses_archive_with_foreign_members(tmp_path, server, monkeypatch):
    served, url = server
    publish(served, monkeypatch, extra="../outside.txt")
    root = tmp_path / "data"
    with pytest.raises(DataError, match="outside 'images_background/'"):
        load_dataset("omniglot", "train", root=root, download=True, base_url=url)
    assert list((root / "omniglot").iterdir()) == []
    assert not (tmp_path / "outside.txt").exists()


def test_offline_download_names_data_root_and_env_var(tmp_path, monkeypatch):
    publish(tmp_path, monkeypatch)
    with pytest.raises(DataError, match="could not download.*--data-root.*MRMETA_DATA"):
        load_dataset(
            "omniglot", "train", root=tmp_path / "d", download=True, base_url="http://127.0.0.1:9"
        )


def _cli_train(root: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data-root", str(root), "--out", str(out), "--ways", "2", "--shots", "1",
            "--queries", "2", "--meta-batch", "2", "--hidden", "2", "--iterations", "1",
            "--inner-steps", "1", "--cg-iters", "1", "--val-every", "1", "--val-tasks", "2",
            "--test-tasks", "2", "--threads", "1", "--quiet", *extra]  # fmt: skip


def test_train_downloads_omniglot_by_default_and_says_where(tmp_path, server, monkeypatch, capsys):
    served, url = server
    publish(served, monkeypatch)
    monkeypatch.setattr(files, "OFFICIAL_URL", url)
    root, out = tmp_path / "cache", tmp_path / "run"
    assert cli_main(_cli_train(root, out)) == 0, capsys.readouterr().err
    err = capsys.readouterr().err
    assert f"downloading the official archives into {root / 'omniglot'}" in err
    assert f"downloaded and verified (md5/sha256) into {root / 'omniglot'}" in err
    assert (root / "omniglot" / "images_background.npz").is_file() and (out / "best.pt").is_file()
    assert leftovers(root / "omniglot") == []


def test_train_with_no_download_does_not_fetch(tmp_path, server, monkeypatch, capsys):
    served, url = server
    publish(served, monkeypatch)
    monkeypatch.setattr(files, "OFFICIAL_URL", url)
    root, out = tmp_path / "cache", tmp_path / "run"
    assert cli_main(_cli_train(root, out, "--no-download")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Omniglot not found" in err and "--download" in err
    assert not root.exists() and not out.exists()
    config = tmp_path / "run.toml"
    config.write_text("download = false\n")
    assert cli_main([*_cli_train(root, out), "--config", str(config)]) == 2
    assert not root.exists()


def test_train_offline_ends_with_one_line_naming_data_root_and_env_var(tmp_path, capsys):
    root, out = tmp_path / "cache", tmp_path / "run"  # conftest: the source is a closed port
    assert cli_main(_cli_train(root, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "Traceback" not in "\n".join(err)
    assert err[-1].startswith("mrmeta: error: could not download")
    assert "--data-root" in err[-1] and "MRMETA_DATA" in err[-1]
    assert not out.exists() and leftovers(root) == []


def test_missing_data_without_download_is_a_clear_error(tmp_path):
    with pytest.raises(DataNotFoundError, match="--data-root.*MRMETA_DATA.*download=True"):
        load_dataset("omniglot", "train", root=tmp_path)


def test_interrupted_download_leftovers_never_count_as_data(tmp_path):
    archive = build_zip(tmp_path / "a.zip", "images_background", BACKGROUND_CHARS)
    archive.rename(tmp_path / ".images_background.zip.x1y2.part")
    (tmp_path / ".images_background.k3.unpack" / "images_background").mkdir(parents=True)
    with pytest.raises(DataNotFoundError, match="Omniglot not found"):
        load_dataset("omniglot", "train", root=tmp_path)


def test_zips_in_root_are_read_but_partial_sets_not_cached(tmp_path):
    build_zip(tmp_path / "images_background.zip", "images_background", BACKGROUND_CHARS)
    ds = load_dataset("omniglot", "val", root=tmp_path, image_size=None)
    assert torch.equal(ds.images, expected_images(BACKGROUND_CHARS[3:]))
    assert not (tmp_path / "images_background.npz").exists()  # not the official 964 characters
    with pytest.raises(DataError, match="no characters.*images_"):
        load_dataset("omniglot", "test", root=tmp_path)


def test_env_var_is_the_default_root(tmp_path, monkeypatch):
    build_zip(tmp_path / "images_background.zip", "images_background", BACKGROUND_CHARS)
    monkeypatch.setenv("MRMETA_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
    ds = load_dataset("omniglot", "train", rotations=True)
    assert ds.num_classes == 12 and ds.class_names[1] == "Latin/character01/rot090"
    assert ds.images.shape == (12 * DRAWERS, 1, 28, 28)
    first = ds.class_images(0).float()
    assert torch.equal(ds.class_images(2).float(), torch.rot90(first, 2, dims=(-2, -1)))


def test_cache_folder_default(monkeypatch, tmp_path):
    monkeypatch.delenv("MRMETA_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_root() == tmp_path / "mrmeta"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_data_root() == Path.home() / ".cache" / "mrmeta"


def test_npz_of_wrong_shape_is_refused(tmp_path):
    for kind in ("background", "evaluation"):
        np.savez(tmp_path / f"images_{kind}.npz", images=np.ones((3, 20, 105, 105), bool))
    with pytest.raises(DataError, match=r"expected bool \(964, 20, 105, 105\)"):
        load_dataset("omniglot", "train", root=tmp_path)


def test_empty_png_folder_is_a_clear_error(tmp_path):
    (tmp_path / "images_background").mkdir()
    with pytest.raises(DataError, match="no Omniglot PNGs"):
        load_dataset("omniglot", "train", root=tmp_path)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"split_scheme": "snell"}, "no split scheme"), ({"image_size": 0}, "image_size")],
)
def test_bad_options(tmp_path, options, message):
    with pytest.raises(DataError, match=message):
        load_dataset("omniglot", "train", root=tmp_path, **options)
    with pytest.raises(DataError, match="no split 'eval'"):
        load_dataset("omniglot", "eval", root=tmp_path)


# ------------------------------------------------------------------ the real data

needs_real = pytest.mark.skipif(
    not (REAL / "images_background.npz").is_file(), reason=f"real Omniglot not found at {REAL}"
)


def base_names(names: tuple[str, ...]) -> set[str]:
    return {"/".join(n.split("/")[:2]) for n in names}


@pytest.mark.data
@needs_real
@pytest.mark.parametrize(
    ("split_scheme", "rotations", "counts"),
    [
        ("lake", False, {"train": 792, "val": 172, "test": 659, "trainval": 964}),
        ("vinyals", False, {"train": 1028, "val": 172, "test": 423, "trainval": 1200}),
        ("vinyals", True, {"train": 4112, "val": 688, "test": 1692, "trainval": 4800}),
    ],
)
def test_real_split_sizes_cover_1623_disjoint_characters(split_scheme, rotations, counts):
    splits = {
        s: load_dataset("omniglot", s, root=REAL, split_scheme=split_scheme, rotations=rotations)
        for s in counts
    }
    assert {s: ds.num_classes for s, ds in splits.items()} == counts
    chars = {s: base_names(splits[s].class_names) for s in ("train", "val", "test")}
    assert sum(len(c) for c in chars.values()) == 1623
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    assert base_names(splits["trainval"].class_names) == chars["train"] | chars["val"]


@pytest.mark.data
@needs_real
def test_real_images_are_28x28_nonempty_ink_255():
    for split in ("trainval", "test"):
        ds = load_dataset("omniglot", split, root=REAL)
        assert ds.images.shape == (ds.num_classes * 20, 1, 28, 28)
        assert ds.class_counts.tolist() == [20] * ds.num_classes
        ink = ds.images.flatten(1).float()
        assert bool((ink.amax(dim=1) > 100).all()), "an empty drawing"
        assert 0.03 < float(ink.mean()) / 255 < 0.2  # strokes on a background of 0
        assert float(ink[:, 0].mean()) < 5  # corners are background


@pytest.mark.data
@needs_real
def test_real_vinyals_test_split_is_the_published_one():
    test = load_dataset("omniglot", "test", root=REAL, split_scheme="vinyals", rotations=False)
    gurmukhi = sorted(n for n in test.class_names if n.startswith("Gurmukhi/"))
    assert gurmukhi == [f"Gurmukhi/character{i}" for i in range(42, 46)]
    val = load_dataset("omniglot", "val", root=REAL, split_scheme="vinyals", rotations=False)
    assert {n.split("/")[0] for n in val.class_names} == {
        "Armenian",
        "Bengali",
        "Early_Aramaic",
        "Hebrew",
        "Mkhedruli_(Georgian)",
    }


@pytest.mark.data
@needs_real
def test_real_png_zips_match_the_npz(tmp_path):
    for name in ("images_background_small1.zip", "images_background_small2.zip"):
        (tmp_path / name).symlink_to(REAL / name)
    (png,) = files.read_sets(files.find_source([tmp_path]))
    npz = files.read_sets(files.find_source([REAL]))[0]
    assert len(png.ids) == 242  # two overlapping subsets of the 964 background characters
    rows = [cid - 1 for cid in png.ids]  # background character id -> npz index
    assert np.array_equal(png.ink, npz.ink[rows])
    assert png.alphabets == tuple(npz.alphabets[r] for r in rows)
    assert png.characters == tuple(npz.characters[r] for r in rows)
    ds = load_dataset("omniglot", "trainval", root=tmp_path)
    assert ds.num_classes == 242 and ds.image_shape == (1, 28, 28)


@pytest.mark.data
@needs_real
def test_real_npz_without_csv_uses_builtin_id_table(tmp_path):
    for kind in ("background", "evaluation"):
        (tmp_path / f"images_{kind}.npz").symlink_to(REAL / f"images_{kind}.npz")
    bare = files.read_sets(files.find_source([tmp_path]))
    full = files.read_sets(files.find_source([REAL]))
    for b, f in zip(bare, full, strict=True):
        assert (b.ids, b.alphabets, b.characters) == (f.ids, f.alphabets, f.characters)


@pytest.mark.data
@needs_real
def test_real_tasks():
    ds = load_dataset("omniglot", "train", root=REAL, split_scheme="vinyals")
    batch = TaskSampler(ds, 20, 1, 15, seed=0).sample(8)
    assert batch.support_x.shape == (8, 20, 1, 28, 28) and batch.query_x.shape == (
        8,
        300,
        1,
        28,
        28,
    )
    assert bool((batch.query_x.flatten(2).amax(dim=2) > 0.3).all())
