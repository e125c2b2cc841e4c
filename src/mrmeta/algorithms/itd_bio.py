"""ITD-BiO (Ji et al., 2021): iterative differentiation of a head-only lower level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mrmeta.algorithms._head_learner import HeadUnrolledLearner, UnrolledHeadOptions


@dataclass(frozen=True, kw_only=True)
class ITDBiOOptions(UnrolledHeadOptions):
    """:class:`ITDBiO`'s options and their defaults (documented there)."""

    meta_lr: float = 0.003  # tuned
    inner_steps: int = 20
    inner_lr: float | Literal["auto"] = "auto"
    l2: float = 0.03  # tuned


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

    The defaults of the keyword options are the fields of :class:`ITDBiOOptions`.

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

    Example (a meta-step and a prediction as for any :class:`~mrmeta.MetaLearner`):
        >>> from mrmeta import Conv4
        >>> model = Conv4(ways=5, hidden=8, image_size=28, zero_head=True)
        >>> learner = ITDBiO(model.backbone, model.head, inner_steps=5)
        >>> learner.options.inner_lr, learner.options.l2
        ('auto', 0.03)
    """

    options_type: ClassVar[type[ITDBiOOptions]] = ITDBiOOptions
    options: ITDBiOOptions
