"""Lower-level solvers: K gradient steps on ``φ``, kept without a graph or unrolled.

``loss_fn(phi) -> scalar`` is the lower-level objective ``g(θ, ·)`` with ``θ`` already bound.
With ``batched=True`` the first dimension of every tensor of ``phi`` indexes tasks whose losses
are summed by ``loss_fn``, and ``lr`` may be a per-task tensor ``(T,)``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from mrmeta._tree import TensorDict, expand_like

PhiLoss = Callable[[TensorDict], Tensor]


def _step(phi: TensorDict, grads: tuple[Tensor, ...], lr: Tensor | float) -> TensorDict:
    """``φ − lr · ∇g`` key by key (``lr`` broadcast over a task dimension when a tensor)."""
    return {
        k: p - expand_like(lr, p, isinstance(lr, Tensor)) * g
        for (k, p), g in zip(phi.items(), grads, strict=True)
    }


def gradient_steps(
    grad_fn: Callable[[TensorDict], Mapping[str, Tensor]],
    phi0: Mapping[str, Tensor],
    *,
    steps: int,
    lr: Tensor | float,
) -> TensorDict:
    """``steps`` steps ``φ^{k+1} = φ^k − λ · grad_fn(φ^k)`` for a gradient given in closed form.

    Args:
        grad_fn: ``φ ↦ ∇_φ g(φ)``, shaped like ``φ``.
        phi0: starting point ``φ⁰`` (detached).
        steps: ``K ≥ 0``.
        lr: a float, or ``(T,)`` per task.
    """
    phi = {k: v.detach() for k, v in phi0.items()}
    for _ in range(steps):
        grads = grad_fn(phi)
        phi = _step(phi, tuple(grads[k] for k in phi), lr)
    return phi


def gradient_descent(
    loss_fn: PhiLoss, phi0: Mapping[str, Tensor], *, steps: int, lr: Tensor | float
) -> TensorDict:
    """``steps`` plain gradient steps ``φ^{k+1} = φ^k − λ ∇_φ g(φ^k)`` keeping no graph.

    Memory is that of a single gradient evaluation, whatever ``steps`` is: each iterate is
    detached before the next step. This is the lower-level solver of Algorithm 1.

    Args:
        loss_fn: ``g(phi) -> scalar`` (sum of per-task losses when ``phi`` is batched).
        phi0: starting point ``φ⁰``.
        steps: number of steps ``K ≥ 0``.
        lr: step size ``λ``: a float, or ``(T,)`` per task.

    Returns:
        ``φ^K`` (detached).
    """

    def autograd_grad(phi: TensorDict) -> TensorDict:
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            grads = torch.autograd.grad(loss_fn(leaves), list(leaves.values()))
        return dict(zip(leaves, grads, strict=True))

    return gradient_steps(autograd_grad, phi0, steps=steps, lr=lr)


def unrolled_gradient_descent(
    loss_fn: PhiLoss,
    phi0: Mapping[str, Tensor],
    *,
    steps: int,
    lr: Tensor | float,
    first_order: bool = False,
) -> TensorDict:
    """``steps`` gradient steps kept in the autograd graph (MAML, ANIL, ITD-BiO).

    ``φ^K`` stays a differentiable function of ``φ⁰`` and of whatever ``loss_fn`` closes over, so
    back-propagating through it costs memory linear in ``steps``. With ``first_order`` the
    gradients are treated as constants (``create_graph=False``): first-order MAML.

    Args:
        loss_fn: ``g(phi) -> scalar``.
        phi0: starting point; must require grad (or be a function of tensors that do) for the
            result to carry a graph.
        steps: number of steps ``K ≥ 0``.
        lr: step size.
        first_order: drop second-order terms.

    Returns:
        ``φ^K``, differentiable with respect to ``φ⁰``.
    """
    phi = dict(phi0)
    for _ in range(steps):
        grads = torch.autograd.grad(loss_fn(phi), list(phi.values()), create_graph=not first_order)
        phi = _step(phi, grads, lr)
    return phi
