"""CIFAR-FS, FC100, miniImageNet, tieredImageNet loaders on small generated files; safe pickles."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from mrmeta.data import (
    DataError,
    DataNotFoundError,
    TaskSampler,
    available_datasets,
    canonical_dataset_name,
    load_dataset,
    load_pickle,
)


def marked_images(labels: list[int], side: int) -> np.ndarray:
    """``(N, side, side, 3)`` uint8 whose pixel [0, 0, 0] is the row index, [0, 0, 1] the label."""
    images = np.zeros((len(labels), side, side, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(len(labels))
    images[:, 0, 0, 1] = labels
    return images


def dump(obj: object, path: Path, protocol: int = 2) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return path


def cifar_split(n_classes: int, per_class: int, first_label: int = 0) -> dict[str, object]:
    labels = [first_label + c for c in range(n_classes) for _ in range(per_class)]
    return {"data": marked_images(labels, 32), "labels": labels}


class Evil:
    """A pickle payload that would create a file if unpickled with plain ``pickle``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------ restricted unpickler


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_numpy_arrays_and_containers_round_trip(tmp_path, protocol):
    payload = {
        "f": np.linspace(0, 1, 7, dtype=np.float32).reshape(7, 1),
        "u": np.arange(12, dtype=np.uint8).reshape(3, 4),
        "scalar": np.int64(3),
        "nested": [1, (2.5, "x"), {"k": b"bytes"}],
        "set": {1, 2},
    }
    path = dump(payload, tmp_path / "ok.pkl", protocol)
    loaded = load_pickle(path)
    assert np.array_equal(loaded["f"], payload["f"]) and loaded["f"].dtype == np.float32
    assert np.array_equal(loaded["u"], payload["u"])
    assert (
        loaded["scalar"] == 3 and loaded["nested"] == payload["nested"] and loaded["set"] == {1, 2}
    )


def test_pickle_that_runs_code_is_refused_without_running(tmp_path):
    marker = tmp_path / "pwned"
    path = dump(Evil(marker), tmp_path / "evil.pkl")
    with pytest.raises(DataError, match="refused to load '(posix|os|nt)\\.system'"):
        load_pickle(path)
    assert not marker.exists()
    pickle.loads(path.read_bytes())  # control: plain pickle does run the payload
    assert marker.exists()


def test_evil_dataset_file_is_refused_by_the_loader(tmp_path):
    marker = tmp_path / "pwned"
    dump({"data": Evil(marker), "labels": []}, tmp_path / "CIFAR_FS_train.pickle")
    with pytest.raises(DataError, match="refused"):
        load_dataset("cifar-fs", "train", root=tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "payload",
    [np.array([1, "a"], dtype=object), [eval], {"x": torch.zeros(2)}],
    ids=["object-array", "builtin-eval", "torch-tensor"],
)
def test_anything_but_plain_arrays_is_refused(tmp_path, payload):
    path = dump(payload, tmp_path / "bad.pkl", protocol=4)
    with pytest.raises(DataError, match="refused"):
        load_pickle(path)


def _object_flagged_void_pickle(flags: int, protocol: int) -> bytes:
    """A pickled ``V8`` array whose dtype state (the tuple its BUILD hands to
    ``dtype.__setstate__``) carries ``flags``; numpy accepts object flags there, so without a
    check the array is built as an object array over raw bytes (no code of ours runs)."""
    raw = pickle.dumps(np.zeros(2, dtype="V8"), protocol=protocol)
    # (version 3, '|', subarray, names, fields, elsize 8, alignment 1, flags 0): BININT1 8, 1, 0
    clean = b"K\x08K\x01K\x00t"
    assert raw.count(clean) == 1
    return raw.replace(clean, b"K\x08K\x01K" + bytes([flags]) + b"t")


@pytest.mark.parametrize("protocol", [2, 5])
@pytest.mark.parametrize("flags", [0x01, 0x05, 0x3F], ids=["hasobject", "pointer", "all"])
def test_dtype_given_object_flags_by_its_state_is_refused(tmp_path, flags, protocol):
    path = tmp_path / "flags.pkl"
    path.write_bytes(_object_flagged_void_pickle(flags, protocol))
    with pytest.raises(DataError, match=r"refused a pickled numpy dtype with object flags") as err:
        load_pickle(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_truncated_pickle_is_a_clear_error(tmp_path):
    path = tmp_path / "cut.pkl"
    path.write_bytes(pickle.dumps({"a": np.zeros(100)}, protocol=4)[:50])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_pickle(path)


# ------------------------------------------------------------------ CIFAR-FS and FC100


@pytest.mark.parametrize(
    ("name", "prefix", "standard"),
    [("cifar-fs", "CIFAR_FS", (64, 16, 20)), ("fc100", "FC100", (60, 20, 20))],
)
def test_cifar_pickles_standard_class_counts(tmp_path, name, prefix, standard):
    first = 0
    for split, n_classes in zip(("train", "val", "test"), standard, strict=True):
        dump(cifar_split(n_classes, 3, first), tmp_path / name / f"{prefix}_{split}.pickle")
        first += n_classes
    seen = set()
    for split, n_classes in zip(("train", "val", "test"), standard, strict=True):
        ds = load_dataset(name, split, root=tmp_path)
        assert ds.num_classes == n_classes and ds.image_shape == (3, 32, 32)
        assert ds.class_counts.tolist() == [3] * n_classes
        assert not seen & set(ds.class_names)
        seen |= set(ds.class_names)
    assert len(seen) == 100


def test_cifar_fs_images_follow_their_labels(tmp_path):
    content = cifar_split(5, 4)
    order = np.random.default_rng(0).permutation(20)  # classes interleaved in the file
    content = {"data": content["data"][order], "labels": [content["labels"][i] for i in order]}
    dump(content, tmp_path / "CIFAR_FS_val.pickle")
    ds = load_dataset("CIFAR_FS", "val", root=tmp_path, check_classes=False)
    for c in range(ds.num_classes):
        imgs = ds.class_images(c)
        assert bool((imgs[:, 1, 0, 0] == int(ds.class_names[c].split("-")[1])).all())
    batch = TaskSampler(ds, 5, 1, 3, seed=0).sample(4)
    assert batch.support_x.shape == (4, 5, 3, 32, 32)
    assert float(batch.support_x.max()) <= 1.0


def test_python2_style_bytes_keys_are_accepted(tmp_path):
    content = cifar_split(5, 2)
    dump({b"data": content["data"], b"labels": content["labels"]}, tmp_path / "FC100_test.pickle")
    assert load_dataset("fc100", "test", root=tmp_path, check_classes=False).num_classes == 5


def test_protocol5_readonly_arrays_load_without_warning(tmp_path):
    dump(cifar_split(5, 2), tmp_path / "CIFAR_FS_test.pickle", protocol=5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar-fs", "test", root=tmp_path, check_classes=False)
    assert ds.num_images == 10


def test_non_standard_class_count_is_refused_unless_allowed(tmp_path):
    dump(cifar_split(7, 2), tmp_path / "CIFAR_FS_train.pickle")
    with pytest.raises(DataError, match="standard cifar-fs 'train' split has 64"):
        load_dataset("cifar-fs", "train", root=tmp_path)
    assert load_dataset("cifar-fs", "train", root=tmp_path, check_classes=False).num_classes == 7


def test_wrong_image_shape_is_refused(tmp_path):
    dump(
        {"data": np.zeros((4, 28, 28, 3), np.uint8), "labels": [0, 0, 1, 1]},
        tmp_path / "CIFAR_FS_train.pickle",
    )
    with pytest.raises(DataError, match=r"expected uint8 \(N, 32, 32, 3\)"):
        load_dataset("cifar-fs", "train", root=tmp_path, check_classes=False)


def test_label_count_mismatch_is_refused(tmp_path):
    dump(
        {"data": np.zeros((4, 32, 32, 3), np.uint8), "labels": [0, 1]},
        tmp_path / "FC100_train.pickle",
    )
    with pytest.raises(DataError, match="2 labels for 4 images"):
        load_dataset("fc100", "train", root=tmp_path, check_classes=False)


def test_missing_files_name_the_fix(tmp_path):
    for name in ("cifar-fs", "fc100", "mini-imagenet", "tiered-imagenet"):
        with pytest.raises(DataNotFoundError, match="--data-root.*MRMETA_DATA"):
            load_dataset(name, "train", root=tmp_path)


# ------------------------------------------------------------------ miniImageNet


def test_mini_imagenet_cache_pickle(tmp_path):
    labels = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2]
    wnids = ["n01", "n02", "n03"]
    class_dict = {w: [i for i, lab in enumerate(labels) if lab == c] for c, w in enumerate(wnids)}
    content = {"image_data": marked_images(labels, 84), "class_dict": class_dict}
    dump(content, tmp_path / "miniImageNet" / "mini-imagenet-cache-test.pkl", protocol=4)
    ds = load_dataset("miniimagenet", "test", root=tmp_path, check_classes=False)
    assert ds.class_names == tuple(wnids) and ds.image_shape == (3, 84, 84)
    for c in range(3):
        assert ds.class_images(c)[:, 1, 0, 0].tolist() == [c] * 4
    with pytest.raises(DataError, match="has 20"):
        load_dataset("mini-imagenet", "test", root=tmp_path)


def test_mini_imagenet_index_out_of_range(tmp_path):
    content = {"image_data": marked_images([0, 0], 84), "class_dict": {"n01": [0, 5]}}
    dump(content, tmp_path / "mini-imagenet-cache-val.pkl")
    with pytest.raises(DataError, match="within 0..1"):
        load_dataset("mini-imagenet", "val", root=tmp_path, check_classes=False)


# ------------------------------------------------------------------ tieredImageNet


def write_tiered(folder: Path, split: str, labels: list[int], names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / f"{split}_images.npz", images=marked_images(labels, 84))
    content = {
        "label_specific": np.asarray(labels, dtype=np.int64),
        "label_general": np.zeros(len(labels), dtype=np.int64),
        "label_specific_str": names,
    }
    dump(content, folder / f"{split}_labels.pkl")


def test_tiered_imagenet_npz_and_labels(tmp_path):
    labels = [2, 0, 1, 2, 2, 0, 1, 2, 0, 0, 2]  # ragged: 4, 2, 5 images
    write_tiered(tmp_path / "tiered-imagenet", "val", labels, ["a", "b", "c"])
    ds = load_dataset("tiered-imagenet", "val", root=tmp_path, check_classes=False)
    assert ds.class_names == ("a", "b", "c") and ds.class_counts.tolist() == [4, 2, 5]
    for c in range(3):
        assert set(ds.class_images(c)[:, 1, 0, 0].tolist()) == {c}
    batch = TaskSampler(ds, 3, 1, 1, seed=0).sample(50)
    assert batch.query_x.shape == (50, 3, 3, 84, 84)
    with pytest.raises(DataError, match="smallest class"):
        TaskSampler(ds, 3, 2, 1)
    with pytest.raises(DataError, match="has 97"):
        load_dataset("tiered-imagenet", "val", root=tmp_path)


def test_tiered_imagenet_wrong_npz(tmp_path):
    write_tiered(tmp_path, "train", [0, 1], ["a", "b"])
    np.savez(tmp_path / "train_images.npz", pictures=np.zeros((2, 84, 84, 3), np.uint8))
    with pytest.raises(DataError, match="'images' array"):
        load_dataset("tiered-imagenet", "train", root=tmp_path, check_classes=False)


# ------------------------------------------------------------------ registry


def test_registry_names_and_errors(tmp_path):
    assert set(available_datasets()) == {
        "omniglot",
        "cifar-fs",
        "fc100",
        "mini-imagenet",
        "tiered-imagenet",
        "sinusoid",
    }
    images = available_datasets(images_only=True)
    assert images == tuple(n for n in available_datasets() if n != "sinusoid")
    assert canonical_dataset_name(" CIFAR_FS ") == "cifar-fs"
    assert canonical_dataset_name("MiniImageNet") == "mini-imagenet"
    assert canonical_dataset_name("mnist") not in available_datasets()
    with pytest.raises(DataError, match="unknown dataset 'mnist'; choose one of omniglot"):
        load_dataset("mnist", "train")
    with pytest.raises(DataError, match="no option image_size; valid options: check_classes"):
        load_dataset("cifar-fs", "train", root=tmp_path, image_size=32)
    with pytest.raises(DataError, match="no split 'training'; choose one of train, val, test"):
        load_dataset("fc100", "training", root=tmp_path)
    # Every dataset takes download=False (a CLI passes it always); only Omniglot downloads.
    with pytest.raises(DataNotFoundError, match="FC100_train.pickle not found"):
        load_dataset("fc100", "train", root=tmp_path, download=False)
    with pytest.raises(DataError, match="cannot be downloaded.*--data-root"):
        load_dataset("mini-imagenet", "train", root=tmp_path, download=True)
    assert load_dataset("sinusoid", "train", root=tmp_path, download=True).split == "train"
