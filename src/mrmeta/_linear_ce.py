"""Closed forms for a linear head with softmax cross-entropy and an L2 term, per task.

For task ``t`` with features ``Z (n, d)``, one-hot labels ``Y (n, C)`` and head ``φ = (W, b)``
(``W (C, d)``, ``b (C,)``), ``P = softmax(Z Wᵀ + b)`` and ``R = (P − Y)/n``::

    g(φ) = CE(ZWᵀ + b, y) + μ/2 ‖φ − c‖²
    ∇_W g = Rᵀ Z + μ (W − c_W),        ∇_b g = Σ_i R_i + μ (b − c_b)
    H·(V_W, V_b): with D = Z V_Wᵀ + V_b and J(D) = P ⊙ (D − (P ⊙ D)·1),
                  (J(D)ᵀ Z / n + μ V_W,  Σ_i J(D)_i / n + μ V_b)
    ∂/∂Z ⟨∇_φ g, V⟩ = R V_W + J(D) W / n,    ∂/∂c ⟨∇_φ g, V⟩ = −μ V

Everything is a handful of batched matrix products over the tasks ``(T, …)``, against dozens of
small autograd calls for the same quantities; :class:`~mrmeta.MemoryReduced` uses these when its
head is an ``nn.Linear`` and its loss cross-entropy (the tests check both paths against each
other and against dense references).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mrmeta._tree import TensorDict


def logits(features: Tensor, phi: TensorDict) -> Tensor:
    """``Z Wᵀ + b``: ``(T, n, d)`` features → ``(T, n, C)`` (linear in ``φ``, so also the
    logits' direction ``D = Z V_Wᵀ + V_b`` along ``v``)."""
    return torch.baddbmm(phi["bias"].unsqueeze(1), features, phi["weight"].transpose(1, 2))


def pull_back(features: Tensor, logit_grad: Tensor) -> TensorDict:
    """``(Gᵀ Z, Σ_i G_i)``: a gradient ``G (T, n, C)`` with respect to the logits carried to
    ``φ = (W, b)``."""
    return {"weight": torch.bmm(logit_grad.transpose(1, 2), features), "bias": logit_grad.sum(1)}


def probabilities(features: Tensor, phi: TensorDict) -> Tensor:
    """``softmax(Z Wᵀ + b)``: ``(T, n, d)`` features → ``(T, n, C)``."""
    return logits(features, phi).softmax(-1)


def residual(probs: Tensor, labels: Tensor) -> Tensor:
    """``R = (P − Y)/n`` for labels ``(T, n)``: ``(T, n, C)``."""
    onehot = F.one_hot(labels.long(), probs.shape[-1]).to(probs.dtype)
    return (probs - onehot) / probs.shape[1]


def head_gradient(
    features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict, l2: float
) -> TensorDict:
    """``∇_φ g_t`` of every task (mean CE + ``μ/2‖φ − c‖²``), shaped like ``phi``."""
    grad = pull_back(features, residual(probabilities(features, phi), labels))
    if l2 > 0:
        grad = {k: g + l2 * (phi[k] - center[k]) for k, g in grad.items()}
    return grad


def softmax_jvp(probs: Tensor, direction: Tensor) -> Tensor:
    """``J(D) = P ⊙ (D − ⟨P, D⟩)`` row by row: the softmax Jacobian applied to ``D``."""
    return probs * (direction - (probs * direction).sum(-1, keepdim=True))


def head_hvp(features: Tensor, probs: Tensor, v: TensorDict, l2: float) -> TensorDict:
    """``∇²_φ g_t · v_t`` for every task, with ``probs`` the softmax at the current ``φ``."""
    out = pull_back(features, softmax_jvp(probs, logits(features, v)) / features.shape[1])
    return {k: out[k] + l2 * v[k] for k in out} if l2 > 0 else out


def mixed_product_features(
    features: Tensor, labels: Tensor, phi: TensorDict, probs: Tensor, v: TensorDict
) -> Tensor:
    """``∂/∂Z ⟨∇_φ g_t(Z, φ), v_t⟩ = R V_W + J(D) W / n``: ``(T, n, d)``, with ``probs`` the
    softmax at ``(Z, φ)``."""
    jd = softmax_jvp(probs, logits(features, v)) / features.shape[1]
    return torch.bmm(residual(probs, labels), v["weight"]) + torch.bmm(jd, phi["weight"])


def outer_gradients(features: Tensor, labels: Tensor, phi: TensorDict) -> tuple[Tensor, TensorDict]:
    """For ``f_t = CE(Z_q Wᵀ + b, y_q)``: ``∇_{Z_q} f`` and ``∇_φ f``."""
    r = residual(probabilities(features, phi), labels)
    return torch.bmm(r, phi["weight"]), pull_back(features, r)
