"""Few-shot models split into a shared backbone (θ) and a per-task head (φ).

Two backbones, both taking one task ``(n, C, H, W)`` or a task batch ``(T, n, C, H, W)`` with
BatchNorm statistics per task: :class:`Conv4Backbone` (the paper's) and
:class:`ResNet12Backbone` (the ResNet-12 of few-shot learning). :class:`Conv4` and
:class:`ResNet12` put a linear head on them; every algorithm takes either through the same
``model.backbone`` / ``model.head`` split.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

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


def on_images(layer: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Apply a per-image layer (convolution, pooling) to ``([T,] n, C, H, W)``.

    The leading task/example dimensions are folded into one batch dimension for ``layer`` and
    unfolded afterwards: ``([T,] n, C, H, W)`` → ``([T,] n, C', H', W')``.
    """
    lead = x.shape[:-3]
    y = layer(x.reshape(-1, *x.shape[-3:]))
    return y.reshape(*lead, *y.shape[-3:])


class ConvBlock(nn.Module):
    """3×3 convolution (padding 1) → per-task BatchNorm → ReLU → 2×2 max-pool."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.norm = TaskBatchNorm2d(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C_in, H, W)`` → ``([T,] n, C_out, ⌊H/2⌋, ⌊W/2⌋)``."""
        y = F.relu(self.norm(on_images(self.conv, x)))
        return on_images(lambda z: F.max_pool2d(z, 2), y)


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
        self.image_shape = (in_channels, image_size, image_size)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → features ``([T,] n, feature_dim)``."""
        check_image_shape(x, self.image_shape)
        return self.blocks(x).flatten(-3)


def check_image_shape(x: Tensor, expected: tuple[int, int, int]) -> None:
    """A ValueError naming the expected ``(C, H, W)`` when ``x`` is not ``([T,] n, C, H, W)``
    of that shape (the head's input size is fixed by it)."""
    if x.dim() not in (4, 5) or tuple(x.shape[-3:]) != expected:
        raise ValueError(
            f"images must be ([tasks,] n, {', '.join(map(str, expected))}) for this model "
            f"(C, H, W = {expected}); got shape {tuple(x.shape)}: resize the images or build "
            "the model with matching in_channels / image_size"
        )


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


def drop_block(x: Tensor, drop_rate: float, block_size: int) -> Tensor:
    r"""DropBlock (Ghiasi et al., 2018): zero random ``b × b`` squares of each feature map.

    Block centres are drawn with probability
    ``γ = p / b² · HW / ((H − b + 1)(W − b + 1))`` so that about a fraction ``p`` of the units
    is dropped; the kept units are rescaled by ``numel / kept`` (as dropout's ``1 / (1 − p)``).
    ``b`` is clipped to the map's size, so small maps (e.g. ``1 × 1`` on 28×28 Omniglot) work.

    Args:
        x: ``(N, C, H, W)``.
        drop_rate: ``p`` in ``[0, 1)``.
        block_size: ``b ≥ 1``.

    Returns:
        ``(N, C, H, W)``, ``x`` itself when ``p = 0``.
    """
    if drop_rate == 0.0:
        return x
    h, w = x.shape[-2:]
    size = min(block_size, h, w)
    gamma = drop_rate / size**2 * (h * w) / ((h - size + 1) * (w - size + 1))
    centres = (torch.rand_like(x) < gamma).to(x.dtype)
    dropped = F.max_pool2d(centres, size, stride=1, padding=size // 2)[..., :h, :w]
    keep = 1.0 - dropped
    return x * keep * (keep.numel() / keep.sum().clamp_min(1.0))


class ResidualBlock(nn.Module):
    """ResNet-12 block: 3 × [3×3 conv, per-task BatchNorm] with LeakyReLU(0.1) between them,
    a 1×1 conv + BatchNorm shortcut added before the last LeakyReLU, then a 2×2 max-pool.

    Args:
        in_channels: ``C_in``.
        out_channels: ``C_out``.
        drop_rate: DropBlock rate applied to the block's output in training mode (0: off).
        drop_block_size: DropBlock square side.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        drop_rate: float = 0.0,
        drop_block_size: int = 5,
    ) -> None:
        super().__init__()
        widths = [in_channels, out_channels, out_channels, out_channels]
        self.convs = nn.ModuleList(
            nn.Conv2d(a, b, kernel_size=3, padding=1, bias=False)
            for a, b in zip(widths[:-1], widths[1:], strict=True)
        )
        self.norms = nn.ModuleList(TaskBatchNorm2d(out_channels) for _ in range(3))
        self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False)
        self.shortcut_norm = TaskBatchNorm2d(out_channels)
        self.drop_rate, self.drop_block_size = float(drop_rate), int(drop_block_size)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C_in, H, W)`` → ``([T,] n, C_out, ⌊H/2⌋, ⌊W/2⌋)``."""
        y = x
        for i, (conv, norm) in enumerate(zip(self.convs, self.norms, strict=True)):
            y = norm(on_images(conv, y))
            if i < 2:
                y = F.leaky_relu(y, 0.1)
        y = F.leaky_relu(y + self.shortcut_norm(on_images(self.shortcut, x)), 0.1)
        y = on_images(lambda z: F.max_pool2d(z, 2), y)
        if self.training and self.drop_rate > 0:
            y = on_images(lambda z: drop_block(z, self.drop_rate, self.drop_block_size), y)
        return y


def resnet12_widths(hidden: int = 64) -> tuple[int, int, int, int]:
    """Block widths ``(h, 2.5h, 5h, 10h)``: 64-160-320-640 for ``h = 64`` (the standard one).

    The common narrower variant 64-128-256-512 is passed to :class:`ResNet12Backbone` directly.
    """
    return hidden, round(2.5 * hidden), 5 * hidden, 10 * hidden


RESNET12_WIDTHS = resnet12_widths(64)
"""The standard ResNet-12 block widths, 64-160-320-640."""


class ResNet12Backbone(nn.Module):
    """The ResNet-12 of few-shot learning (Oreshkin et al. 2018; Lee et al. 2019), per-task BN.

    Four :class:`ResidualBlock` s (each halving the side), then a global average pool:
    ``([T,] n, C, H, W)`` → ``([T,] n, widths[-1])``. BatchNorm statistics are per task, as in
    :class:`Conv4Backbone` (``supports_task_batches``); no running statistics are kept, so the
    module has no buffers. DropBlock (off by default) acts on the outputs of the last two blocks
    in training mode, as in MetaOptNet.

    Args:
        in_channels: image channels.
        widths: channels of the four blocks (default 64-160-320-640; see :func:`resnet12_widths`).
        image_size: input side; at least 16, so that four 2×2 poolings leave a ``1 × 1`` map
            (28×28 Omniglot: 14, 7, 3, 1; 84×84: 42, 21, 10, 5).
        drop_rate: DropBlock rate (0: off).
        drop_block_size: DropBlock square side (5 in MetaOptNet; clipped to the map).

    Example:
        >>> backbone = ResNet12Backbone(1, widths=(4, 10, 20, 40), image_size=28)
        >>> backbone(torch.randn(3, 5, 1, 28, 28)).shape
        torch.Size([3, 5, 40])
    """

    supports_task_batches = True

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = RESNET12_WIDTHS,
        image_size: int = 84,
        *,
        drop_rate: float = 0.0,
        drop_block_size: int = 5,
    ) -> None:
        super().__init__()
        widths = tuple(int(w) for w in widths)
        if len(widths) != 4 or min(widths) < 1:
            raise ValueError(f"ResNet-12 needs 4 positive block widths, got {widths}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 for four 2x2 poolings, got {image_size}")
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate}")
        channels = (in_channels, *widths)
        self.blocks = nn.Sequential(
            *(
                ResidualBlock(
                    a, b, drop_rate=drop_rate if i >= 2 else 0.0, drop_block_size=drop_block_size
                )
                for i, (a, b) in enumerate(zip(channels[:-1], channels[1:], strict=True))
            )
        )
        self.feature_dim = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → features ``([T,] n, widths[-1])`` (global average pool)."""
        return self.blocks(x).mean(dim=(-2, -1))


class ResNet12(nn.Module):
    """ResNet-12 backbone + linear head, split as :class:`Conv4` (``backbone``, ``head``).

    Args:
        ways: number of classes ``N`` of a task (head outputs).
        in_channels: image channels.
        widths: the four block widths.
        image_size: input side length (>= 16).
        zero_head: start the head at zero (weights and bias) instead of PyTorch's default init.
        drop_rate: DropBlock rate of the backbone (0: off).

    Example:
        >>> model = ResNet12(ways=5, in_channels=1, widths=(4, 10, 20, 40), image_size=28)
        >>> model(torch.randn(10, 1, 28, 28)).shape
        torch.Size([10, 5])
    """

    def __init__(
        self,
        ways: int,
        in_channels: int = 3,
        widths: Sequence[int] = RESNET12_WIDTHS,
        image_size: int = 84,
        *,
        zero_head: bool = False,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone = ResNet12Backbone(in_channels, widths, image_size, drop_rate=drop_rate)
        self.head = nn.Linear(self.backbone.feature_dim, ways)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → logits ``([T,] n, ways)``."""
        return self.head(self.backbone(x))


ADAPTS = ("head", "last-block")
"""What the head-only methods adapt per task: the linear head, or the last block and the head."""


class TaskBatchedBlocks(nn.Module):
    """A stack of blocks as a backbone that keeps the task dimension and its feature maps.

    ``([T,] n, C, H, W)`` → ``([T,] n, C', H', W')``, BatchNorm statistics per task
    (``supports_task_batches``); nothing is pooled or flattened (the head does that).

    Args:
        blocks: the blocks, applied in order (shared with the model they come from).
    """

    supports_task_batches = True

    def __init__(self, blocks: Sequence[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """``([T,] n, C, H, W)`` → ``([T,] n, C', H', W')``."""
        return self.blocks(x)


class GlobalAveragePool(nn.Module):
    """``(…, C, H, W)`` → ``(…, C)``: the mean over the spatial dimensions (ResNet-12's pool)."""

    def forward(self, x: Tensor) -> Tensor:
        """``(…, C, H, W)`` → ``(…, C)``."""
        return x.mean(dim=(-2, -1))


def split_model(model: Conv4 | ResNet12, adapt: str = "head") -> tuple[nn.Module, nn.Module]:
    """The ``(backbone, head)`` split of ``model`` for the head-only methods.

    * ``"head"``: ``(model.backbone, model.head)``; features ``([T,] n, d)``.
    * ``"last-block"``: the backbone is every block but the last
      (:class:`TaskBatchedBlocks`, ``([T,] n, C, H, W)`` → ``([T,] n, C', H', W')``, BatchNorm per
      task), the head is ``Sequential(last block, flatten (Conv4) or global average pool
      (ResNet-12), model.head)``: ``(n, C', H', W')`` → ``(n, ways)``. The head's BatchNorm sees
      one task at a time (the head-only methods apply it per task through ``torch.func.vmap``).

    Both parts share their modules (and parameters) with ``model``, so training the split
    trains ``model``.

    Args:
        model: a :class:`Conv4` or :class:`ResNet12`.
        adapt: ``"head"`` or ``"last-block"``.

    Returns:
        ``(backbone, head)``.

    Example:
        >>> model = Conv4(ways=5, hidden=8, image_size=28)
        >>> backbone, head = split_model(model, "last-block")
        >>> features = backbone(torch.randn(2, 5, 1, 28, 28))
        >>> features.shape, head(features[0]).shape
        (torch.Size([2, 5, 8, 3, 3]), torch.Size([5, 5]))
    """
    if adapt not in ADAPTS:
        raise ValueError(f"adapt must be one of {', '.join(ADAPTS)}; got {adapt!r}")
    if not isinstance(model, Conv4 | ResNet12):
        raise TypeError(f"split_model takes a Conv4 or a ResNet12; got {type(model).__name__}")
    if adapt == "head":
        return model.backbone, model.head
    *first, last = model.backbone.blocks
    if isinstance(model, ResNet12) and last.drop_rate > 0:
        raise ValueError(
            "adapt='last-block' needs a deterministic last block (the lower level is solved "
            "on it); build the ResNet12 with drop_rate=0"
        )
    pool = nn.Flatten(-3) if isinstance(model, Conv4) else GlobalAveragePool()
    return TaskBatchedBlocks(first), nn.Sequential(last, pool, model.head)
