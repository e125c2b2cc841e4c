"""Task sampler: invariants over 1000 tasks, seeding, resuming, ragged classes, bad shapes."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import mrmeta.data._dataset as dataset_module
from mrmeta.data import DataError, FewShotDataset, TaskSampler
from mrmeta.tasks import TaskBatch

N_CLASSES, N_PER = 12, 10


def coded_dataset() -> FewShotDataset:
    """Every pixel of image ``j`` of class ``c`` equals ``c * N_PER + j`` (so images decode)."""
    codes = torch.arange(N_CLASSES * N_PER, dtype=torch.uint8).reshape(N_CLASSES, N_PER, 1, 1, 1)
    images = codes.expand(N_CLASSES, N_PER, 1, 3, 3).contiguous()
    return FewShotDataset.from_class_tensor(images, name="coded")


def decode(x: torch.Tensor) -> torch.Tensor:
    """``(B, n, 1, 3, 3)`` floats back to the integer codes ``(B, n)``."""
    return (x[..., 0, 0, 0] * 255).round().long()


def check_task(batch: TaskBatch, t: int, ways: int, shots: int, queries: int) -> list[int]:
    """Assert the invariants of task ``t``; return the dataset class of each label."""
    s_code, q_code = decode(batch.support_x[t]), decode(batch.query_x[t])
    classes = []
    for label in range(ways):
        s = s_code[batch.support_y[t] == label]
        q = q_code[batch.query_y[t] == label]
        assert s.numel() == shots and q.numel() == queries
        both = torch.cat([s, q])
        cls = both // N_PER
        assert bool((cls == cls[0]).all()), "a label mixes classes"
        assert both.unique().numel() == shots + queries, "support and query share an image"
        classes.append(int(cls[0]))
    assert len(set(classes)) == ways, "two labels share a class"
    return classes


def test_invariants_over_1000_tasks():
    ways, shots, queries = 5, 2, 3
    sampler = TaskSampler(coded_dataset(), ways, shots, queries, seed=0)
    counts = torch.zeros(N_CLASSES)
    first_labels = set()
    for _ in range(10):
        batch = sampler.sample(100)
        assert batch.support_x.shape == (100, ways * shots, 1, 3, 3)
        assert batch.query_x.shape == (100, ways * queries, 1, 3, 3)
        assert batch.support_x.dtype == torch.float32 and batch.support_y.dtype == torch.int64
        assert 0.0 <= float(batch.support_x.min()) and float(batch.query_x.max()) <= 1.0
        for t in range(100):
            classes = check_task(batch, t, ways, shots, queries)
            counts[classes] += 1
            first_labels.add(classes[0])
    # Classes are drawn uniformly: expected 1000 * 5 / 12 = 417 draws each (binomial std ~16).
    assert bool(((counts - 5000 / N_CLASSES).abs() < 80).all()), counts
    # Labels are assigned in random order: label 0 is not always the smallest class.
    assert len(first_labels) == N_CLASSES


def test_indices_and_gather_agree():
    ds = coded_dataset()
    sampler = TaskSampler(ds, 4, 1, 2, seed=3)
    classes, rows = sampler.sample_indices(7)
    assert classes.shape == (7, 4) and rows.shape == (7, 4, 3)
    assert bool((rows // N_PER == classes.unsqueeze(-1)).all())
    batch = sampler.gather(rows)
    assert torch.equal(decode(batch.support_x), rows[:, :, :1].reshape(7, 4))
    assert torch.equal(decode(batch.query_x), rows[:, :, 1:].reshape(7, 8))


def test_same_seed_same_tasks_different_seed_different_tasks():
    ds = coded_dataset()
    a = TaskSampler(ds, 5, 1, 3, seed=11).sample(16)
    b = TaskSampler(ds, 5, 1, 3, seed=11).sample(16)
    c = TaskSampler(ds, 5, 1, 3, seed=12).sample(16)
    for x, y in zip(a.fields(), b.fields(), strict=True):
        assert torch.equal(x, y)
    assert not torch.equal(a.support_x, c.support_x)


def test_consecutive_batches_differ_and_generator_is_shared():
    ds = coded_dataset()
    g = torch.Generator().manual_seed(5)
    sampler = TaskSampler(ds, 5, 1, 1, generator=g)
    first, second = sampler.sample(8), sampler.sample(8)
    assert not torch.equal(first.support_x, second.support_x)
    assert sampler.generator is g


def test_state_dict_resumes_bit_identically():
    ds = coded_dataset()
    sampler = TaskSampler(ds, 3, 2, 2, seed=1)
    sampler.sample(4)
    state = sampler.state_dict()
    expected = sampler.sample(4)
    resumed = TaskSampler(ds, 3, 2, 2, seed=999)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.sample(4).query_x, expected.query_x)
    with pytest.raises(DataError, match="saved for"):
        TaskSampler(ds, 4, 2, 2, seed=0).load_state_dict(state)


def test_ragged_classes_only_pick_real_images():
    counts = [3, 5, 8, 4]
    labels = torch.cat([torch.full((n,), c * 10) for c, n in enumerate(counts)])
    images = torch.arange(labels.numel(), dtype=torch.uint8).reshape(-1, 1, 1, 1)
    ds = FewShotDataset.from_labels(images, labels, name="ragged")
    assert ds.class_counts.tolist() == counts and ds.min_per_class == 3
    assert ds.class_names == ("0", "10", "20", "30")
    sampler = TaskSampler(ds, 3, 1, 2, seed=0)
    classes, rows = sampler.sample_indices(500)
    assert bool((rows >= 0).all())
    assert bool((labels[rows] == (classes * 10).unsqueeze(-1)).all())
    assert bool((rows.sort(dim=-1).values.diff(dim=-1) > 0).all()), "an image drawn twice"
    # Every image of every class is reachable (padding never hides real images).
    assert rows.unique().numel() == labels.numel()


def test_from_labels_keeps_original_rows():
    labels = torch.tensor([2, 0, 2, 1, 0, 1])
    images = torch.arange(6, dtype=torch.uint8).reshape(6, 1, 1, 1)
    ds = FewShotDataset.from_labels(images, labels)
    assert ds.class_rows.tolist() == [[1, 4], [3, 5], [0, 2]]
    assert ds.class_images(2).flatten().tolist() == [0, 2]


@pytest.mark.parametrize(
    ("ways", "shots", "queries", "message"),
    [
        (13, 1, 1, "only 12 classes"),
        (5, 6, 5, "smallest class"),
        (0, 1, 1, "ways must be"),
        (5, 0, 1, "shots must be"),
        (5, 1, -1, "queries must be"),
        (2.5, 1, 1, "ways must be"),
    ],
)
def test_bad_task_shapes_name_the_fix(ways, shots, queries, message):
    with pytest.raises(DataError, match=message):
        TaskSampler(coded_dataset(), ways, shots, queries, seed=0)


def test_bad_batch_size_and_seed_arguments():
    sampler = TaskSampler(coded_dataset(), 2, 1, 1, seed=0)
    with pytest.raises(DataError, match="batch_size"):
        sampler.sample(0)
    with pytest.raises(DataError, match="not both"):
        TaskSampler(coded_dataset(), 2, 1, 1, seed=0, generator=torch.Generator())


def test_zero_queries():
    batch = TaskSampler(coded_dataset(), 2, 3, 0, seed=0).sample(2)
    assert batch.query_x.shape == (2, 0, 1, 3, 3) and batch.support_y.tolist()[0] == [
        0,
        0,
        0,
        1,
        1,
        1,
    ]


def test_dataset_rejects_bad_tables():
    images = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(DataError, match="outside"):
        FewShotDataset(images, torch.tensor([[0, 4]]), ("a",))
    with pytest.raises(DataError, match="no images"):
        FewShotDataset(images, torch.tensor([[0, 1], [-1, -1]]), ("a", "b"))
    with pytest.raises(DataError, match="uint8"):
        FewShotDataset(images.float(), torch.tensor([[0, 1]]), ("a",))
    with pytest.raises(DataError, match="class names"):
        FewShotDataset(images, torch.tensor([[0, 1]]), ("a", "b"))


def test_datasets_do_not_depend_on_the_sampler() -> None:
    """The sampler imports the dataset module, never the reverse (not even lazily inside a
    method or for type hints), so the two modules form no import cycle."""
    tree = ast.parse(Path(dataset_module.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert "mrmeta.data._sampler" not in imported
