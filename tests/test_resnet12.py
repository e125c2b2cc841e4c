"""ResNet-12: shapes, per-task BatchNorm, a reference forward, DropBlock, every algorithm on it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from mrmeta import ResNet12, ResNet12Backbone, TaskBatch
from mrmeta._factory import build_learner, build_model, build_optimizer
from mrmeta.cli import main
from mrmeta.config import TrainConfig
from mrmeta.models import drop_block, resnet12_widths

F64 = torch.float64
ALGORITHMS = ("mrml", "anil", "itd-bio", "maml", "fomaml", "imaml")
DATA_ROOT = Path(os.environ.get("MRMETA_DATA", "/nonexistent"))
needs_omniglot = pytest.mark.skipif(
    not (DATA_ROOT / "omniglot" / "images_background.npz").exists(),
    reason="no real Omniglot copy in $MRMETA_DATA/omniglot",
)


@pytest.mark.parametrize(("image_size", "side_after_blocks"), [(28, 1), (32, 2), (84, 5), (16, 1)])
def test_feature_shape_for_one_task_and_a_task_batch(image_size: int, side_after_blocks: int):
    torch.manual_seed(0)
    backbone = ResNet12Backbone(3, widths=(2, 3, 4, 6), image_size=image_size)
    x = torch.randn(2, 4, 3, image_size, image_size)
    assert backbone.blocks(x).shape == (2, 4, 6, side_after_blocks, side_after_blocks)
    assert backbone(x).shape == (2, 4, 6) and backbone(x[0]).shape == (4, 6)
    assert backbone.feature_dim == 6 and backbone.supports_task_batches
    model = ResNet12(5, 3, (2, 3, 4, 6), image_size, zero_head=True)
    assert model(x).shape == (2, 4, 5) and bool((model(x) == 0).all())


def test_standard_widths_and_parameter_count():
    assert resnet12_widths(64) == (64, 160, 320, 640)
    backbone = ResNet12Backbone(3)
    # Per block: 3x3 convs cin->c, c->c, c->c (no bias), 1x1 shortcut, 4 BatchNorms (w, b).
    channels = (3, 64, 160, 320, 640)
    want = sum(
        9 * (a * b + 2 * b * b) + a * b + 8 * b
        for a, b in zip(channels[:-1], channels[1:], strict=True)
    )
    assert sum(p.numel() for p in backbone.parameters()) == want  # 12.42M, the usual figure
    assert 12.4e6 < want < 12.5e6
    assert list(backbone.buffers()) == []  # no running statistics: nothing for a task to leak


def test_small_images_and_bad_widths_are_refused():
    with pytest.raises(ValueError, match="image_size must be >= 16"):
        ResNet12Backbone(1, (2, 2, 2, 2), image_size=15)
    with pytest.raises(ValueError, match="4 positive block widths"):
        ResNet12Backbone(1, (2, 2, 2), image_size=28)


def test_a_task_output_does_not_depend_on_the_other_tasks():
    torch.manual_seed(1)
    backbone = ResNet12Backbone(1, widths=(3, 4, 5, 6), image_size=16).double()
    scale = torch.tensor([1.0, 5.0, 0.1], dtype=F64).view(3, 1, 1, 1, 1)
    x = torch.randn(3, 5, 1, 16, 16, dtype=F64) * scale
    out = backbone(x)
    for t in range(3):
        torch.testing.assert_close(out[t], backbone(x[t]), rtol=1e-10, atol=1e-10)  # float64
    changed = x.clone()
    changed[1:] = 100 * torch.randn_like(changed[1:]) + 7
    torch.testing.assert_close(backbone(changed)[0], out[0], rtol=1e-10, atol=1e-10)


def _reference_block(x: Tensor, block: torch.nn.Module) -> Tensor:
    """One residual block of one task, written out with F.conv2d and training-mode BN."""

    def bn(y: Tensor, norm: torch.nn.Module) -> Tensor:
        return F.batch_norm(y, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)

    y = x
    for i, (conv, norm) in enumerate(zip(block.convs, block.norms, strict=True)):
        y = bn(F.conv2d(y, conv.weight, padding=1), norm)
        y = F.leaky_relu(y, 0.1) if i < 2 else y
    shortcut = bn(F.conv2d(x, block.shortcut.weight), block.shortcut_norm)
    return F.max_pool2d(F.leaky_relu(y + shortcut, 0.1), 2)


def test_forward_matches_a_reference_written_out():
    torch.manual_seed(2)
    backbone = ResNet12Backbone(3, widths=(3, 4, 5, 6), image_size=20).double()
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(0.3 * torch.randn_like(p))  # non-trivial BN weights and biases
    x = torch.randn(2, 4, 3, 20, 20, dtype=F64)
    for t in range(2):
        y = x[t]
        for block in backbone.blocks:
            y = _reference_block(y, block)
        torch.testing.assert_close(backbone(x)[t], y.mean(dim=(-2, -1)), rtol=1e-10, atol=1e-10)


def test_drop_block_drops_about_the_rate_in_blocks_and_is_off_by_default():
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(3)
    x = torch.ones(64, 8, 20, 20)
    out = drop_block(x, 0.2, 5)
    dropped = (out == 0).float().mean().item()
    assert 0.15 < dropped < 0.25  # gamma makes the expected dropped fraction about p
    kept = out[out != 0]
    torch.testing.assert_close(kept, torch.full_like(kept, 1 / (1 - dropped)), rtol=1e-5, atol=0)
    assert drop_block(x, 0.0, 5) is x
    tiny = drop_block(torch.ones(500, 4, 1, 1), 0.3, 5)  # block clipped to a 1x1 map
    assert tiny.shape == (500, 4, 1, 1) and 0.2 < (tiny == 0).float().mean().item() < 0.4
    torch.random.set_rng_state(gen_state)


def test_drop_block_only_in_training_mode():
    torch.manual_seed(4)
    x = torch.randn(2, 5, 1, 28, 28)
    plain = ResNet12Backbone(1, (2, 3, 4, 5), 28)
    assert torch.equal(plain(x), plain(x))
    dropping = ResNet12Backbone(1, (2, 3, 4, 5), 28, drop_rate=0.5)
    dropping.load_state_dict(plain.state_dict())
    assert not torch.equal(dropping(x), plain(x))
    dropping.eval()
    assert torch.equal(dropping(x), plain(x))


def _batch(tasks: int, ways: int, side: int) -> TaskBatch:
    gen = torch.Generator().manual_seed(5)
    labels = torch.arange(ways).repeat(tasks, 1)
    return TaskBatch(
        torch.randn(tasks, ways, 1, side, side, generator=gen),
        labels,
        torch.randn(tasks, 2 * ways, 1, side, side, generator=gen),
        labels.repeat(1, 2),
    )


@pytest.mark.parametrize("algo", ALGORITHMS)
def test_every_algorithm_takes_a_meta_step_on_resnet12(algo: str):
    torch.manual_seed(6)
    config = TrainConfig(
        algo=algo, backbone="resnet12", hidden=2, ways=3, inner_steps=2, cg_iters=2, chunk_size=None
    )
    model = build_model(config, (1, 28, 28))
    assert isinstance(model, ResNet12) and model.backbone.feature_dim == 20
    learner = build_learner(config, model)
    optimizer = build_optimizer(config, learner)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    stats = learner.meta_step(_batch(2, 3, 28), optimizer)
    assert torch.isfinite(torch.tensor(float(stats.loss)))
    moved = [
        not torch.equal(a, p) for a, p in zip(before, model.backbone.parameters(), strict=True)
    ]
    assert all(moved)  # every conv and BatchNorm of every block got a meta-gradient
    assert learner.predict(_batch(2, 3, 28)).shape == (2, 6, 3)


@pytest.mark.data
@needs_omniglot
@pytest.mark.parametrize("algo", ALGORITHMS)
def test_train_resnet12_on_omniglot_from_the_command_line(tmp_path, capsys, algo: str):
    out = tmp_path / "run"
    args = ["train", "--algo", algo, "--backbone", "resnet12", "--hidden", "2",
            "--data-root", str(DATA_ROOT), "--no-download", "--ways", "3", "--shots", "1",
            "--queries", "2", "--meta-batch", "2", "--inner-steps", "2",
            "--iterations", "2", "--val-every", "2", "--val-tasks", "2", "--test-tasks", "2",
            "--threads", "1", "--quiet", "--out", str(out)]  # fmt: skip
    if algo in ("mrml", "imaml"):  # the others take no --cg-iters (refused)
        args += ["--cg-iters", "2"]
    assert main(args) == 0, capsys.readouterr().err
    assert "test accuracy" in capsys.readouterr().out
    assert (out / "best.pt").is_file()
