"""Arithmetic on parameter dictionaries (``dict[str, Tensor]``), the currency of the core.

With ``batched=True`` the first dimension of every tensor indexes independent problems
(one per task) and reductions return one value per problem, shape ``(B,)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

TensorDict = dict[str, Tensor]


def tree_dot(a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, batched: bool = False) -> Tensor:
    """Inner product ``Σ_k <a[k], b[k]>``: a 0-d tensor, or ``(B,)`` when ``batched``."""
    total: Tensor | None = None
    for key, a_k in a.items():
        prod = a_k * b[key]
        term = prod.reshape(prod.shape[0], -1).sum(1) if batched else prod.sum()
        total = term if total is None else total + term
    if total is None:
        raise ValueError("cannot take the inner product of empty parameter dicts")
    return total


def tree_norm(a: Mapping[str, Tensor], *, batched: bool = False) -> Tensor:
    """Euclidean norm over all entries (per problem when ``batched``)."""
    return tree_dot(a, a, batched=batched).clamp_min(0).sqrt()


def expand_like(coef: Tensor | float, like: Tensor, batched: bool) -> Tensor | float:
    """Reshape a per-problem coefficient ``(B,)`` so it broadcasts against ``like``."""
    if batched and isinstance(coef, Tensor) and coef.dim() == 1:
        return coef.view(-1, *([1] * (like.dim() - 1)))
    return coef


def tree_axpy(
    alpha: Tensor | float,
    x: Mapping[str, Tensor],
    y: Mapping[str, Tensor],
    *,
    batched: bool = False,
) -> TensorDict:
    """``y + alpha * x`` key by key; ``alpha`` may be a scalar or ``(B,)`` when ``batched``."""
    return {k: y[k] + expand_like(alpha, x[k], batched) * x[k] for k in y}


def tree_where(
    mask: Tensor, a: Mapping[str, Tensor], b: Mapping[str, Tensor], *, batched: bool = False
) -> TensorDict:
    """``a`` where ``mask`` holds, else ``b``; ``mask`` is 0-d, or ``(B,)`` when ``batched``."""
    return {k: torch.where(expand_like(mask, a[k], batched), a[k], b[k]) for k in a}


def tree_sub(a: Mapping[str, Tensor], b: Mapping[str, Tensor]) -> TensorDict:
    """``a - b`` key by key."""
    return {k: a[k] - b[k] for k in a}


def tree_zeros_like(a: Mapping[str, Tensor]) -> TensorDict:
    """A dict of zeros shaped like ``a``."""
    return {k: torch.zeros_like(v) for k, v in a.items()}


def tree_detach(a: Mapping[str, Tensor]) -> TensorDict:
    """Detached copies (sharing storage) of every tensor."""
    return {k: v.detach() for k, v in a.items()}
