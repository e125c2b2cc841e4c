"""Per-task heads on a batch of tasks: forward with batched parameters, losses, step sizes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from mrmeta._tree import TensorDict
from mrmeta._validation import check_finite_number

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
        ``(T, n, out)``. A linear head is one batched matmul; any other head is vmapped.
    """
    if isinstance(head, nn.Linear):
        out = torch.bmm(features, params["weight"].transpose(1, 2))
        return out + params["bias"].unsqueeze(1) if "bias" in params else out
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


def l2_penalty(params: TensorDict, center: TensorDict, l2: float) -> Tensor:
    """``μ/2 · ‖φ_t − c_t‖²`` per task, ``(T,)``."""
    total = sum((params[k] - center[k]).pow(2).reshape(len(params[k]), -1).sum(1) for k in params)
    return 0.5 * l2 * total


def linear_head_lipschitz(features: Tensor, loss: str, out_dim: int, l2: float) -> Tensor:
    """Upper bound ``L`` on the curvature of each task's lower level for a linear head.

    With ``A = [Z, 1]`` (``n × (d+1)``) the Hessian of the mean loss in the head's parameters is
    bounded by ``c · ‖A‖₂² / n`` where ``c = ½`` for softmax cross-entropy (the softmax Jacobian
    ``diag(p) − ppᵀ`` has eigenvalues ≤ ½) and ``c = 2 / out_dim`` for the mean squared error.
    The L2 term adds ``μ``. A step ``1/L`` then makes gradient descent converge.

    Args:
        features: ``(T, n, d)`` support features (detached).
        loss: ``"cross_entropy"`` or ``"mse"``.
        out_dim: head outputs.
        l2: the L2 coefficient ``μ``.

    Returns:
        ``(T,)``.
    """
    ones = torch.ones(*features.shape[:-1], 1, dtype=features.dtype, device=features.device)
    design = torch.cat([features, ones], dim=-1)
    spectral_sq = torch.linalg.matrix_norm(design, ord=2).pow(2)
    c = 0.5 if loss == "cross_entropy" else 2.0 / out_dim
    return c * spectral_sq / features.shape[1] + l2


def task_features(backbone: nn.Module, x: Tensor) -> Tensor:
    """Backbone features of a task batch: ``(T, n, *input)`` → ``(T, n, d)``.

    Backbones that declare ``supports_task_batches`` take the whole batch at once (keeping
    BatchNorm statistics per task); any other module is called once per task.
    """
    if getattr(backbone, "supports_task_batches", False):
        return backbone(x)
    return torch.stack([backbone(x_t) for x_t in x])


def check_inner_lr(inner_lr: object, head: nn.Module) -> float | str:
    """``"auto"`` (linear heads only) or a finite positive number."""
    if inner_lr == "auto":
        if not isinstance(head, nn.Linear):
            raise ValueError(
                "inner_lr='auto' needs an nn.Linear head (its curvature bound is known); "
                f"got {type(head).__name__}: pass a number for inner_lr"
            )
        return "auto"
    return check_finite_number("inner_lr", inner_lr, positive=True)
