"""Every recipe in configs/ parses, and each paper recipe trains 2 iterations on generated data
of its dataset's shape (standard class counts and image sizes), so the recipes cannot rot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mrmeta._factory import resolved
from mrmeta.cli import main
from mrmeta.config import TrainConfig, read_toml
from test_data_formats import cifar_split, dump, marked_images

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER = sorted((CONFIGS / "paper").glob("*.toml"))
CLASSES = {
    "cifar-fs": (64, 16, 20),
    "fc100": (60, 20, 20),
    "mini-imagenet": (64, 16, 20),
    "tiered-imagenet": (351, 97, 160),
}
SPLITS = ("train", "val", "test")
# Fast, but every shape setting (ways, shots, queries, image size, backbone, K, N) is the recipe's.
SMOKE = ["--iterations", "2", "--val-every", "2", "--val-tasks", "2", "--test-tasks", "2",
         "--meta-batch", "2", "--hidden", "2", "--threads", "1", "--quiet"]  # fmt: skip


def write_tiered_split(folder: Path, split: str, n_classes: int, per_class: int) -> None:
    """tieredImageNet's ``{split}_images.npz`` + ``{split}_labels.pkl`` (as ``write_tiered`` of
    test_data_formats, whose marked images hold labels < 256 only) with random pixels."""
    folder.mkdir(parents=True, exist_ok=True)
    labels = np.repeat(np.arange(n_classes), per_class)
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), 84, 84, 3), dtype=np.uint8)
    np.savez(folder / f"{split}_images.npz", images=pixels)
    content = {
        "label_specific": labels.astype(np.int64),
        "label_general": np.zeros(len(labels), dtype=np.int64),
        "label_specific_str": [f"c{c}" for c in range(n_classes)],
    }
    dump(content, folder / f"{split}_labels.pkl")


def write_dataset(name: str, root: Path, per_class: int) -> None:
    """Generated files in the layout and with the class counts of the real ``name``."""
    first = 0
    for split, n_classes in zip(SPLITS, CLASSES[name], strict=True):
        labels = [first + c for c in range(n_classes) for _ in range(per_class)]
        if name in ("cifar-fs", "fc100"):
            prefix = {"cifar-fs": "CIFAR_FS", "fc100": "FC100"}[name]
            dump(cifar_split(n_classes, per_class, first), root / name / f"{prefix}_{split}.pickle")
        elif name == "mini-imagenet":
            local = [c - first for c in labels]
            rows = {c: [i for i, lab in enumerate(local) if lab == c] for c in range(n_classes)}
            index = {f"n{c:08d}": r for c, r in rows.items()}
            content = {"image_data": marked_images(local, 84), "class_dict": index}
            dump(content, root / name / f"mini-imagenet-cache-{split}.pkl", protocol=4)
        else:
            write_tiered_split(root / name, split, n_classes, per_class)
        first += n_classes


def test_the_paper_lower_level_is_one_flag_away():
    """``--config configs/mrml-paper.toml`` over the defaults: the paper's K = 20 fixed steps
    from zero without L2 and N = 20 CG steps for v; nothing else changes."""
    given = read_toml(CONFIGS / "mrml-paper.toml")
    config = TrainConfig.from_dict(given)
    want = {"inner_solver": "gd", "inner_steps": 20, "inner_lr": 0.1, "l2": 0.0}
    assert {k: getattr(config, k) for k in want} == want
    assert (config.cg_iters, config.exact_v) == (20, False)
    assert set(given) == {"algo", *want, "cg_iters", "exact_v"}  # a lower level, not a run


def test_there_is_a_recipe_per_table_1_setting():
    names = {p.stem for p in PAPER}
    want = {f"{d}-5way-{k}shot" for d in CLASSES for k in (1, 5)}
    assert names == want
    assert (CONFIGS / "omniglot-best.toml").is_file()


@pytest.mark.parametrize("path", [*PAPER, CONFIGS / "omniglot-best.toml"], ids=lambda p: p.stem)
def test_recipe_parses_with_the_paper_settings(path: Path):
    config = TrainConfig.from_dict(read_toml(path), source=str(path))
    text = path.read_text()
    if path.parent.name != "paper":
        # The defaults for now, with the algorithm's defaults written out.
        names = (
            "inner_solver", "inner_steps", "inner_tol", "inner_lr", "cg_iters", "l2", "lr",
            "exact_v",
        )  # fmt: skip
        unset = dict.fromkeys(names)
        assert config.replace(**unset) == TrainConfig()
        assert all(resolved(config, n) == resolved(TrainConfig(), n) for n in unset)
        return
    dataset, shots = path.stem.rsplit("-5way-", 1)
    assert (config.dataset, config.ways, config.shots) == (dataset, 5, int(shots[0]))
    large = dataset in ("mini-imagenet", "tiered-imagenet")
    assert (config.backbone, config.hidden) == ("conv4", 32 if large else 64)
    assert (config.queries, config.meta_batch, config.inner_steps, config.cg_iters) == (
        5,
        32,
        20,
        20,
    )
    assert (config.inner_lr, config.lr) == ((0.05, 1e-3) if large else (0.1, 1e-4))
    assert (config.eval_protocol, config.test_tasks) == ("frozen-backbone", 640)
    assert config.inner_solver == "gd" and config.l2 == 0.0  # the paper's lower level
    assert config.exact_v is False  # and its v: N CG steps
    assert "accuracy" in text and "Not measured here" in text


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_recipe_trains_two_iterations_on_generated_data(tmp_path: Path, capsys, path: Path):
    config = TrainConfig.from_dict(read_toml(path))
    root, out = tmp_path / "data", tmp_path / "run"
    write_dataset(config.dataset, root, per_class=config.shots + config.queries)
    args = ["train", "--config", str(path), "--data-root", str(root), "--out", str(out), *SMOKE]
    assert main(args) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    for key in ("dataset", "ways", "shots", "queries", "inner_steps", "cg_iters", "inner_lr"):
        assert saved[key] == getattr(config, key), key
    result = json.loads((out / "result.json").read_text())
    assert result["test_protocol"] == "frozen-backbone" and np.isfinite(result["test_accuracy"])
    train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in train if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in train if r["kind"] == "train")
