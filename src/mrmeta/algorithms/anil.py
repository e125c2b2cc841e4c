"""ANIL (Raghu et al., 2020): only the head adapted, differentiated through its steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from mrmeta.algorithms._head_learner import HeadUnrolledLearner, UnrolledHeadOptions


@dataclass(frozen=True, kw_only=True)
class ANILOptions(UnrolledHeadOptions):
    """:class:`ANIL`'s options and their defaults (documented there)."""

    meta_lr: float = 0.001  # tuned
    inner_steps: int = 10
    inner_lr: float | Literal["auto"] = 0.05  # tuned
    learn_head_init: bool = field(default=True, init=False)  # the head's start is meta-learned


class ANIL(HeadUnrolledLearner):
    r"""Almost No Inner Loop: MAML restricted to the head, on features computed once per task.

    For task ``t`` with support features ``Z_s = backbone_θ(x_s)`` and query features ``Z_q``::

        φ_t⁰ = φ⁰ (the head's parameters, meta-learned),
        φ_t^{k+1} = φ_t^k − α ∇_φ L(head_{φ_t^k}(Z_s), y_s)      (k < K)
        ∇_{θ, φ⁰} F = (1/B) Σ_t ∇_{θ, φ⁰} L(head_{φ_t^K}(Z_q), y_q)

    back-propagated through the ``K`` head steps (second order unless ``first_order``) into the
    backbone. The support features are computed once per task — not once per step, as in the
    paper's ANIL — so the unrolled graph holds only head-sized tensors per step and memory is
    nearly flat in ``K``.

    The defaults of the keyword options are the fields of :class:`ANILOptions`.

    Args:
        backbone: the shared feature extractor ``θ``; maps ``(n, *input)`` to ``(n, d)``.
        head: the head; its parameters are the meta-learned initialisation ``φ⁰``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``, or ``"auto"`` for ``1/L_t`` per task (``nn.Linear`` heads).
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        first_order: treat the inner gradients as constants (first-order ANIL).

    Example (a meta-step and a prediction as for any :class:`~mrmeta.MetaLearner`):
        >>> from mrmeta import Conv4
        >>> model = Conv4(ways=5, hidden=8, image_size=28)
        >>> learner = ANIL(model.backbone, model.head, inner_steps=5, inner_lr=0.1)
        >>> learner.options.inner_steps, learner.options.learn_head_init
        (5, True)
    """

    options_type: ClassVar[type[ANILOptions]] = ANILOptions
    options: ANILOptions
