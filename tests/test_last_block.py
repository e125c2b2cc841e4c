"""Adapting the last block: the (backbone, head) split, per-task BatchNorm, mrml's meta-gradient
against a reference written here with plain autograd (float64), its memory in K, the CLI."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from mrmeta import Conv4, ResNet12, TaskBatch, measure_peak_memory
from mrmeta._per_task import batched_head_forward
from mrmeta.algorithms.anil import ANIL
from mrmeta.algorithms.itd_bio import ITDBiO
from mrmeta.algorithms.memory_reduced import MemoryReduced
from mrmeta.cli import main
from mrmeta.models import TaskBatchedBlocks, split_model

F64 = torch.float64
DATA_ROOT = Path(os.environ.get("MRMETA_DATA") or "/nonexistent/mrmeta-data")
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="no real Omniglot copy in $MRMETA_DATA/omniglot",
)


def _models() -> list[nn.Module]:
    torch.manual_seed(0)
    return [
        Conv4(ways=3, in_channels=1, hidden=6, image_size=28),
        ResNet12(ways=3, in_channels=1, widths=(4, 6, 8, 10), image_size=28),
    ]


@pytest.mark.parametrize("index", [0, 1], ids=["conv4", "resnet12"])
def test_last_block_split_shapes_and_it_composes_to_the_model(index: int) -> None:
    model = _models()[index].eval()
    backbone, head = split_model(model, "last-block")
    x = torch.randn(2, 5, 1, 28, 28)
    features = backbone(x)
    last = model.backbone.blocks[-1]
    # 28 -> 14 -> 7 -> 3 after three blocks: the task dimension and the feature maps are kept.
    channels = last.conv.in_channels if index == 0 else last.convs[0].in_channels
    assert isinstance(backbone, TaskBatchedBlocks) and backbone.supports_task_batches
    assert features.shape == (2, 5, channels, 3, 3)
    assert head(features[0]).shape == (5, 3)
    for t in range(2):  # backbone then head is the model, task by task
        torch.testing.assert_close(head(features[t]), model(x[t]), rtol=1e-5, atol=1e-6)
    # The split shares the model's parameters, every one of them exactly once.
    split_ids = [id(p) for p in [*backbone.parameters(), *head.parameters()]]
    assert sorted(split_ids) == sorted(id(p) for p in model.parameters())


def test_head_split_is_the_models_own_parts() -> None:
    model = _models()[0]
    assert split_model(model, "head") == (model.backbone, model.head)


def test_split_refuses_an_unknown_choice_a_foreign_model_and_dropblock() -> None:
    with pytest.raises(ValueError, match="adapt must be one of head, last-block"):
        split_model(_models()[0], "last-two-blocks")
    with pytest.raises(TypeError, match="Conv4 or a ResNet12"):
        split_model(nn.Linear(2, 2), "last-block")
    dropping = ResNet12(3, 1, (4, 6, 8, 10), 28, drop_rate=0.1)
    with pytest.raises(ValueError, match="drop_rate=0"):
        split_model(dropping, "last-block")


@pytest.mark.parametrize("index", [0, 1], ids=["conv4", "resnet12"])
def test_batchnorm_stays_per_task_in_the_backbone_and_the_head(index: int) -> None:
    """A task batch gives each task what it gets alone: the backbone's BatchNorm and the head's
    (applied per task with per-task parameters, vmapped or, for one task, called directly)."""
    backbone, head = split_model(_models()[index], "last-block")
    x = torch.randn(3, 5, 1, 28, 28)
    x[1] = 10 * x[1] + 3  # other statistics: a batch-wide BatchNorm would mix them
    features = backbone(x)
    for t in range(3):
        torch.testing.assert_close(features[t], backbone(x[t]), rtol=1e-5, atol=1e-5)
    torch.manual_seed(1)
    params = {k: p.detach() + 0.1 * torch.randn(3, *p.shape) for k, p in head.named_parameters()}
    together = batched_head_forward(head, params, features)
    for t in range(3):
        alone = functional_call(head, {k: v[t] for k, v in params.items()}, (features[t],))
        torch.testing.assert_close(together[t], alone, rtol=1e-5, atol=1e-5)
        one_task = {k: v[t : t + 1] for k, v in params.items()}
        single = batched_head_forward(head, one_task, features[t : t + 1])
        torch.testing.assert_close(single[0], alone, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- mrml's meta-gradient
def _tiny_split() -> tuple[Conv4, nn.Module, nn.Module]:
    """Conv4 on 16×16 images (last block: 2×2 → 1×1), float64; φ has 4·4·9 + 4 + 8 + 15 = 171
    entries."""
    torch.manual_seed(0)
    model = Conv4(ways=3, in_channels=1, hidden=4, image_size=16).to(F64)
    return (model, *split_model(model, "last-block"))


def _tiny_batch() -> TaskBatch:
    torch.manual_seed(1)
    labels = torch.arange(3).repeat_interleave(2)
    return TaskBatch(
        torch.randn(2, 6, 1, 16, 16, dtype=F64),
        labels.repeat(2, 1),
        torch.randn(2, 6, 1, 16, 16, dtype=F64),
        labels.repeat(2, 1),
    )


def _reference_meta_gradient(
    backbone: nn.Module, head: nn.Module, batch: TaskBatch, *, steps: int, lr: float, l2: float
) -> list[Tensor]:
    """``(1/B) Σ_t [∇_θ f_t − ∇_θ ⟨∇_φ g_t, v_t⟩]`` at ``φ^K`` of ``K`` gradient steps from
    the head's parameters, with ``v_t`` from a dense Hessian solve; autograd throughout."""
    names = [k for k, _ in head.named_parameters()]
    start = [p.detach() for _, p in head.named_parameters()]
    theta = list(backbone.parameters())
    total = [torch.zeros_like(p) for p in theta]

    def g(phi: list[Tensor], zs: Tensor, ys: Tensor) -> Tensor:
        logits = functional_call(head, dict(zip(names, phi, strict=True)), (zs,))
        return F.cross_entropy(logits, ys) + 0.5 * l2 * sum(p.pow(2).sum() for p in phi)

    for t in range(batch.num_tasks):
        zs, zq = backbone(batch.support_x[t]), backbone(batch.query_x[t])
        ys, yq = batch.support_y[t], batch.query_y[t]
        phi = start
        for _ in range(steps):
            leaves = [p.clone().requires_grad_(True) for p in phi]
            grads = torch.autograd.grad(g(leaves, zs.detach(), ys), leaves)
            phi = [p - lr * d for p, d in zip(leaves, grads, strict=True)]
        phi = [p.detach().requires_grad_(True) for p in phi]

        def g_flat(vec: Tensor, zs: Tensor, ys: Tensor, like: list[Tensor]) -> Tensor:
            parts = [
                c.view_as(p)
                for c, p in zip(vec.split([p.numel() for p in like]), like, strict=True)
            ]
            return g(parts, zs.detach(), ys)

        flat = torch.cat([p.reshape(-1) for p in phi]).detach()
        hessian = torch.autograd.functional.hessian(partial(g_flat, zs=zs, ys=ys, like=phi), flat)
        query = F.cross_entropy(
            functional_call(head, dict(zip(names, phi, strict=True)), (zq,)), yq
        )
        grad_f_phi = torch.autograd.grad(query, phi, retain_graph=True)
        v = torch.linalg.solve(hessian, torch.cat([d.reshape(-1) for d in grad_f_phi]))
        grad_g = torch.autograd.grad(g(phi, zs, ys), phi, create_graph=True)
        mixed = torch.cat([d.reshape(-1) for d in grad_g]) @ v
        direct = torch.autograd.grad(query, theta, allow_unused=True)
        implicit = torch.autograd.grad(mixed, theta, allow_unused=True)
        for i, (a, b) in enumerate(zip(direct, implicit, strict=True)):
            total[i] += (0 if a is None else a) - (0 if b is None else b)
    return [p / batch.num_tasks for p in total]


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "one-pass"])
def test_mrml_meta_gradient_with_the_last_block_matches_the_reference(recompute: bool) -> None:
    """float64, CG with dim φ = 171 steps: the learner's backbone gradient equals the reference's.

    The last block's lower level is not convex (its Hessian at φ⁰ here has eigenvalues down to
    about -7.6 with l2 = 1, from the products of BatchNorm scales and head weights), so CG would
    break down; l2 = 20 makes it positive definite and the IFT formula exact."""
    _, backbone, head = _tiny_split()
    batch = _tiny_batch()
    options = {"inner_solver": "gd", "inner_steps": 4, "inner_lr": 0.02, "l2": 20.0}
    learner = MemoryReduced(backbone, head, cg_iters=171, **options)
    learner.recompute_features = recompute
    stats = learner.meta_step(batch, torch.optim.SGD(learner.meta_parameters(), lr=0.0))
    assert stats.cg_breakdowns == 0.0
    got = [p.grad for p in backbone.parameters()]
    want = _reference_meta_gradient(backbone, head, batch, steps=4, lr=0.02, l2=20.0)
    assert all(p.grad is None for p in head.parameters())  # φ⁰ is not learned
    assert max(float(w.abs().max()) for w in want) > 1e-3  # a real gradient, not zeros
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-7, atol=1e-10)


def test_features_are_recomputed_by_default_for_a_head_larger_than_the_backbone() -> None:
    model, backbone, head = _tiny_split()  # Conv4: last block + head 171 < backbone 360
    assert not MemoryReduced(backbone, head, inner_solver="gd", inner_lr=0.1).recomputes_features()
    assert not MemoryReduced(model.backbone, model.head).recomputes_features()
    resnet = ResNet12(ways=5, in_channels=1, widths=(4, 8, 16, 32), image_size=28)
    big_head = MemoryReduced(*split_model(resnet, "last-block"), inner_solver="gd", inner_lr=0.1)
    assert big_head.recomputes_features()  # the last block holds most of ResNet-12's weights
    big_head.recompute_features = False
    assert not big_head.recomputes_features()


def _memory_setup(steps: int, recompute: bool | None = None) -> tuple[MemoryReduced, TaskBatch]:
    torch.manual_seed(0)
    model = ResNet12(ways=5, in_channels=1, widths=(4, 8, 16, 32), image_size=28)
    backbone, head = split_model(model, "last-block")
    learner = MemoryReduced(
        backbone, head, inner_solver="gd", inner_steps=steps, inner_lr=0.1, cg_iters=5
    )
    learner.recompute_features = recompute
    labels = torch.arange(5).repeat(2, 1)
    batch = TaskBatch(
        torch.randn(2, 5, 1, 28, 28), labels, torch.randn(2, 10, 1, 28, 28), labels.repeat(1, 2)
    )
    return learner, batch


@pytest.mark.slow
def test_mrml_peak_memory_with_the_last_block_is_flat_in_k() -> None:
    peaks = {}
    for steps in (5, 50):
        learner, batch = _memory_setup(steps)
        peaks[steps] = measure_peak_memory(lambda lr=learner, b=batch: lr.compute_meta_gradient(b))
    assert peaks[5] > 0
    # The K gradient steps of the block keep no graph: 10× more steps, the same peak within 2%.
    assert peaks[50] == pytest.approx(peaks[5], rel=0.02)


def test_recomputing_the_features_lowers_the_peak() -> None:
    """The lower level's memory (the block's double-backward graph, CG's copies of φ) no longer
    adds to the backbone's graph."""
    peaks = {}
    for recompute in (False, True):
        learner, batch = _memory_setup(3, recompute)
        peaks[recompute] = measure_peak_memory(
            lambda lr=learner, b=batch: lr.compute_meta_gradient(b)
        )
    assert peaks[True] < 0.9 * peaks[False]


@pytest.mark.parametrize("cls", [ANIL, ITDBiO], ids=["anil", "itd-bio"])
def test_unrolled_head_methods_take_the_last_block(cls: type) -> None:
    _, backbone, head = _tiny_split()
    learner = cls(backbone, head, inner_steps=2, inner_lr=0.1)
    learner.compute_meta_gradient(_tiny_batch())
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in backbone.parameters())


# --------------------------------------------------------------------------- the command line
TINY = [
    "--dataset", "omniglot", "--data-root", str(DATA_ROOT), "--ways", "3", "--shots", "1",
    "--queries", "2", "--meta-batch", "2", "--hidden", "8", "--inner-steps", "3",
    "--val-every", "2", "--val-tasks", "4", "--test-tasks", "4",
    "--threads", "1", "--iterations", "2", "--quiet",
]  # fmt: skip


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize(
    ("algo", "backbone"),
    [("mrml", "conv4"), ("anil", "conv4"), ("itd-bio", "conv4"), ("mrml", "resnet12")],
)
def test_last_block_trains_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], algo: str, backbone: str
) -> None:
    out = tmp_path / "run"
    args = ["train", "--algo", algo, "--backbone", backbone, "--adapt", "last-block", *TINY]
    if algo == "mrml":
        args += ["--cg-iters", "3"]
    code = main([*args, "--out", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "test accuracy" in captured.out
    saved = json.loads((out / "config.json").read_text())
    assert saved["adapt"] == "last-block" and saved["backbone"] == backbone
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["inner_grad_norm"] > 0 for r in train if r["kind"] == "train")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--algo", "maml"], "adapt last-block applies to mrml, anil, itd-bio only"),
        (["--inner-lr", "auto"], "'auto' needs the linear head's curvature bound"),
        (["--inner-solver", "newton"], "use --inner-solver gd"),
        (["--eval-protocol", "frozen-backbone"], "use --eval-protocol native"),
    ],
)
def test_last_block_choices_that_cannot_work_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    out = tmp_path / "run"
    code = main(["train", "--adapt", "last-block", *extra, *TINY, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()
