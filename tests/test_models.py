"""Per-task BatchNorm and the Conv4 model: task batches behave like separate tasks (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from mrmeta import Conv4, Conv4Backbone, TaskBatchNorm2d

F64 = torch.float64


def _manual_batch_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """Training-mode BatchNorm of one task ``(n, C, H, W)`` written out: biased variance."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight.view(1, -1, 1, 1) + bias.view(1, -1, 1, 1)


def test_task_batch_norm_normalises_each_task_with_its_own_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    tasks, n, channels = 3, 4, 5
    norm = TaskBatchNorm2d(channels).double()
    with torch.no_grad():
        norm.weight.copy_(torch.rand(channels, generator=gen, dtype=F64) + 0.5)
        norm.bias.copy_(torch.randn(channels, generator=gen, dtype=F64))
    # Tasks with very different means and scales, so pooled statistics would be far off.
    shift = 10 * torch.randn(tasks, 1, channels, 1, 1, generator=gen, dtype=F64)
    scale = torch.rand(tasks, 1, channels, 1, 1, generator=gen, dtype=F64) * 5 + 0.1
    x = torch.randn(tasks, n, channels, 6, 7, generator=gen, dtype=F64) * scale + shift
    out = norm(x)
    assert out.shape == x.shape
    for t in range(tasks):
        # float64, same formula in a different order of operations: 1e-10.
        torch.testing.assert_close(out[t], norm(x[t]), rtol=1e-10, atol=1e-10)
        want = _manual_batch_norm(x[t], norm.weight, norm.bias, norm.eps)
        torch.testing.assert_close(out[t], want, rtol=1e-10, atol=1e-10)


def test_task_batch_norm_gradients_equal_those_of_separate_tasks() -> None:
    gen = torch.Generator().manual_seed(1)
    norm = TaskBatchNorm2d(3).double()
    x = torch.randn(2, 4, 3, 5, 5, generator=gen, dtype=F64, requires_grad=True)
    cotangent = torch.randn(2, 4, 3, 5, 5, generator=gen, dtype=F64)
    batched = torch.autograd.grad((norm(x) * cotangent).sum(), [x, norm.weight, norm.bias])
    separate = torch.autograd.grad(
        sum((norm(x[t]) * cotangent[t]).sum() for t in range(2)), [x, norm.weight, norm.bias]
    )
    for a, b in zip(batched, separate, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)  # float64


def test_conv4_backbone_on_a_task_batch_equals_each_task_alone() -> None:
    torch.manual_seed(2)
    backbone = Conv4Backbone(in_channels=1, hidden=4, image_size=16).double()
    x = torch.randn(3, 5, 1, 16, 16, dtype=F64) * torch.tensor([1.0, 3.0, 0.2], dtype=F64).view(
        3, 1, 1, 1, 1
    )
    out = backbone(x)
    assert out.shape == (3, 5, backbone.feature_dim)
    want = torch.stack([backbone(x[t]) for t in range(3)])
    torch.testing.assert_close(out, want, rtol=1e-10, atol=1e-10)  # float64
    # Sanity: one pooled task gives something else, so the comparison above can fail.
    pooled = backbone(x.reshape(15, 1, 16, 16)).reshape(3, 5, -1)
    assert not torch.allclose(pooled, want, atol=1e-3)


@pytest.mark.parametrize(
    ("in_channels", "hidden", "image_size", "expected"),
    [(1, 64, 28, 64), (3, 64, 32, 256), (3, 32, 84, 800)],
)
def test_conv4_feature_dim(in_channels: int, hidden: int, image_size: int, expected: int) -> None:
    torch.manual_seed(3)
    backbone = Conv4Backbone(in_channels, hidden, image_size)
    assert backbone.feature_dim == expected  # hidden · (⌊side / 16⌋)²
    x = torch.randn(2, 2, in_channels, image_size, image_size)
    assert backbone(x).shape == (2, 2, expected)


def test_conv4_logits_shape_for_one_task_and_a_task_batch() -> None:
    torch.manual_seed(4)
    model = Conv4(ways=5, in_channels=1, hidden=8, image_size=28, zero_head=True)
    assert model(torch.randn(6, 1, 28, 28)).shape == (6, 5)
    assert model(torch.randn(2, 6, 1, 28, 28)).shape == (2, 6, 5)
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0


def test_conv4_names_the_expected_image_shape() -> None:
    import pytest

    model = Conv4(ways=5, in_channels=1, hidden=8, image_size=28)
    with pytest.raises(ValueError, match=r"\(1, 28, 28\).*got shape \(2, 5, 1, 32, 32\)"):
        model.backbone(torch.randn(2, 5, 1, 32, 32))
    with pytest.raises(ValueError, match="got shape"):
        model(torch.randn(5, 3, 28, 28))
