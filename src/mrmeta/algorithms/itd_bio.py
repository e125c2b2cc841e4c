"""ITD-BiO (Ji et al., 2021): iterative differentiation of a head-only lower level."""

from __future__ import annotations

from typing import Literal

from torch import nn

from mrmeta.algorithms._head_learner import HeadUnrolledLearner


class ITDBiO(HeadUnrolledLearner):
    r"""Bilevel optimisation by iterative differentiation through ``K`` head steps.

    The same bilevel problem as :class:`~mrmeta.MemoryReduced` (docs/method.md §1) with its default
    lower level, but the hypergradient comes from back-propagating through the steps instead
    of the implicit function theorem. For task ``t`` with support features
    ``Z_s = backbone_θ(x_s)`` and query features ``Z_q`` (each computed once)::

        g_t(θ, φ) = L(head_φ(Z_s), y_s) + μ/2 ‖φ‖²
        φ_t⁰ = φ⁰ (the head's parameters, fixed),  φ_t^{k+1} = φ_t^k − λ_t ∇_φ g_t(θ, φ_t^k)
        ∇_θ F ≈ (1/B) Σ_t d/dθ L(head_{φ_t^K(θ)}(Z_q), y_q)

    The head is not meta-learned (``head.requires_grad_(False)``, as in MemoryReduced's default);
    only the backbone receives a gradient. Memory grows linearly with ``K`` on the head's tensors.

    Args:
        backbone: the shared feature extractor ``θ``; maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task head; its current parameters are the fixed start ``φ⁰``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``λ > 0``, or ``"auto"`` (default) for ``λ_t = 1/L_t`` with
            ``L_t = c‖[Z_s, 1]‖₂²/n + μ`` (``nn.Linear`` heads; the step size is not
            differentiated).
        l2: ``μ ≥ 0``, the strong-convexity coefficient of the lower level.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        first_order: treat the inner gradients as constants.

    Example:
        >>> import torch
        >>> from mrmeta import Conv4, TaskBatch
        >>> model = Conv4(ways=5, hidden=8, image_size=28, zero_head=True)
        >>> learner = ITDBiO(model.backbone, model.head, inner_steps=5)
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> stats = learner.meta_step(batch, torch.optim.Adam(learner.meta_parameters(), 1e-3))
        >>> learner.predict(batch).shape
        torch.Size([2, 10, 5])
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        inner_steps: int = 20,
        inner_lr: float | Literal["auto"] = "auto",
        l2: float = 0.01,
        loss: str = "cross_entropy",
        chunk_size: int | None = 1,
        first_order: bool = False,
    ) -> None:
        super().__init__(
            backbone,
            head,
            inner_steps=inner_steps,
            inner_lr=inner_lr,
            loss=loss,
            chunk_size=chunk_size,
            first_order=first_order,
            learn_head_init=False,
            l2=l2,
        )
