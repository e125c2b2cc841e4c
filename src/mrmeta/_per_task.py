"""Per-task operations on a batch of tasks ``(T, …)``: features, head forward, losses, accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mrmeta._tree import TensorDict

LOSSES = ("cross_entropy", "mse")


def check_loss_name(loss: str) -> str:
    """``loss`` if it is a known task loss, else a ValueError listing the choices."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {loss!r}")
    return loss


def batched_head_forward(head: nn.Module, params: TensorDict, features: Tensor) -> Tensor:
    """Apply ``head`` with task-specific parameters.

    Args:
        head: the module whose parameter names key ``params``.
        params: each tensor ``(T, *param_shape)`` — one set of head parameters per task.
        features: ``(T, n, d)``.

    Returns:
        ``(T, n, out)``. A linear head is one batched matmul; any other head is vmapped, except
        for a single task (``T = 1``), which is called directly: the same result without
        vmap's overhead (about a third of a small conv block's step, e.g. the last block of
        Conv4 adapted by the head-only methods).
    """
    if isinstance(head, nn.Linear):
        out = torch.bmm(features, params["weight"].transpose(1, 2))
        return out + params["bias"].unsqueeze(1) if "bias" in params else out
    if features.shape[0] == 1:
        single = {k: v[0] for k, v in params.items()}
        return functional_call(head, single, (features[0],)).unsqueeze(0)
    return vmap(lambda p, z: functional_call(head, p, (z,)))(params, features)


def task_losses(pred: Tensor, target: Tensor, loss: str) -> Tensor:
    """Mean loss of each task: ``(T, n, out)`` predictions, ``(T, n)`` labels or ``(T, n, out)``
    regression targets → ``(T,)``."""
    if loss == "cross_entropy":
        per_example = F.cross_entropy(pred.flatten(0, 1), target.flatten(), reduction="none")
        return per_example.view(target.shape).mean(1)
    return F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)


def task_accuracies(pred: Tensor, target: Tensor) -> Tensor:
    """Fraction of correct argmax predictions per task, ``(T,)``."""
    return (pred.argmax(-1) == target).to(pred.dtype).mean(1)


def task_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Backbone features of a task batch: ``(T, n, *input)`` → ``(T, n, d)``.

    Backbones that declare ``supports_task_batches`` take the whole batch at once (keeping
    BatchNorm statistics per task); any other module is called once per task.
    """
    if getattr(backbone, "supports_task_batches", False):
        return backbone(x)
    return torch.stack([backbone(x_t) for x_t in x])
