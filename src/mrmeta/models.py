"""Few-shot models split into a shared backbone (θ) and a per-task head (φ)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class TaskBatchNorm2d(nn.Module):
    """BatchNorm that always normalises with the statistics of each task's own batch.

    Meta-learners use batch statistics at both training and test time (as MAML, ANIL and the
    paper do), so no running statistics are kept. Given a task batch ``(T, n, C, H, W)`` the mean
    and variance are taken over ``(n, H, W)`` separately for every task ``t`` — identical to
    running each task through its own BatchNorm call; a plain ``(n, C, H, W)`` input is one task.

    Args:
        channels: number of channels ``C``.
        eps: added to the variance.
    """

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        """``(n, C, H, W)`` or ``(T, n, C, H, W)`` → same shape, normalised per task."""
        if x.dim() == 4:
            return F.batch_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)
        tasks, n, c, h, w = x.shape
        # View tasks as extra channels, so one fused batch_norm gives per-(task, channel) stats.
        folded = x.transpose(0, 1).reshape(n, tasks * c, h, w)
        out = F.batch_norm(
            folded,
            None,
            None,
            self.weight.repeat(tasks),
            self.bias.repeat(tasks),
            True,
            0.0,
            self.eps,
        )
        return out.reshape(n, tasks, c, h, w).transpose(0, 1)


class ConvBlock(nn.Module):
    """3×3 convolution (padding 1) → per-task BatchNorm → ReLU → 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = TaskBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C_in, H, W)`` → ``([T,] n, C_out, ⌊H/2⌋, ⌊W/2⌋)``."""
        lead = x.shape[:-3]
        y = self.conv(x.reshape(-1, *x.shape[-3:]))
        y = y.reshape(*lead, *y.shape[-3:])
        y = F.relu(self.norm(y))
        out = F.max_pool2d(y.reshape(-1, *y.shape[-3:]), 2)
        return out.reshape(*lead, *out.shape[-3:])


class Conv4Backbone(nn.Module):
    """The paper's feature extractor: 4 × [3×3 conv, BatchNorm, ReLU, 2×2 max-pool], flattened.

    Accepts one task ``(n, C, H, W)`` or a task batch ``(T, n, C, H, W)``; BatchNorm statistics
    are per task either way (``supports_task_batches``).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for CIFAR-FS / miniImageNet).
        hidden: filters per conv layer (64 on CIFAR-FS/FC100/Omniglot, 32 on miniImageNet).
        image_size: input height = width, used to compute ``feature_dim``.
    """

    supports_task_batches = True

    def __init__(self, in_channels: int = 1, hidden: int = 64, image_size: int = 28) -> None:
        super().__init__()
        channels = [in_channels, hidden, hidden, hidden, hidden]
        pairs = zip(channels[:-1], channels[1:], strict=True)
        self.blocks = nn.Sequential(*(ConvBlock(a, b) for a, b in pairs))
        side = image_size
        for _ in range(4):
            side //= 2
        if side < 1:
            raise ValueError(f"image_size must be >= 16 for four 2x2 poolings, got {image_size}")
        self.feature_dim = hidden * side * side

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → features ``([T,] n, feature_dim)``."""
        return self.blocks(x).flatten(-3)


class Conv4(nn.Module):
    """Conv4 backbone + linear head, the model of the paper's experiments.

    Args:
        ways: number of classes ``N`` of a task (head outputs).
        in_channels: image channels.
        hidden: filters per conv layer.
        image_size: input side length.
        zero_head: start the head at zero (weights and bias) instead of PyTorch's default init.

    Example:
        >>> model = Conv4(ways=5, in_channels=1, hidden=8, image_size=28)
        >>> model(torch.randn(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 1,
        hidden: int = 64,
        image_size: int = 28,
        *,
        zero_head: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = Conv4Backbone(in_channels, hidden, image_size)
        self.head = nn.Linear(self.backbone.feature_dim, ways)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → logits ``([T,] n, ways)``."""
        return self.head(self.backbone(x))
