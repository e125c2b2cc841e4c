"""MAML (Finn et al., 2017) and first-order MAML: the whole network unrolled through K steps."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from mrmeta.algorithms._whole_network import (
    WholeNetworkLearner,
    WholeNetworkOptions,
    batched_forward,
)
from mrmeta.algorithms.base import ChunkStats, backward_query_loss
from mrmeta.inner import unrolled_gradient_descent
from mrmeta.tasks import TaskBatch


@dataclass(frozen=True, kw_only=True)
class MAMLOptions(WholeNetworkOptions):
    """:class:`MAML`'s options and their defaults (documented there)."""

    meta_lr: float = 0.003  # tuned
    inner_steps: int = 1  # tuned
    inner_lr: float = 0.4  # tuned
    first_order: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("first_order", bool(self.first_order))


@dataclass(frozen=True, kw_only=True)
class FOMAMLOptions(MAMLOptions):
    """:class:`FOMAML`'s options: :class:`MAMLOptions` less ``first_order``, which is fixed."""

    inner_lr: float = 0.1  # tuned
    inner_steps: int = 10  # tuned
    meta_lr: float = 0.001  # tuned
    first_order: bool = field(default=True, init=False)


class MAML(WholeNetworkLearner):
    r"""Model-agnostic meta-learning: every parameter adapted, differentiated through the steps.

    For task ``t`` with support loss ``L_t^s`` and query loss ``L_t^q`` (means over examples)::

        φ_t⁰ = θ,   φ_t^{k+1} = φ_t^k − α ∇_φ L_t^s(φ_t^k)   (k < K)
        ∇F(θ) = (1/B) Σ_t (∂φ_t^K/∂θ)ᵀ ∇_φ L_t^q(φ_t^K)

    The steps are kept in the autograd graph (``create_graph=True``), so memory grows linearly
    with ``K`` — the whole network's activations are stored once per step. With
    ``first_order=True`` the Jacobian ``∂φ^K/∂θ`` is replaced by the identity (the inner
    gradients are constants): first-order MAML, ``∇F ≈ (1/B) Σ_t ∇_φ L_t^q(φ_t^K)``.

    Each task runs the model through ``torch.func.functional_call`` with its own parameters
    (BatchNorm statistics stay per task); the tasks of a chunk share one autograd call per step.

    The defaults of the keyword options are the fields of :class:`MAMLOptions`.

    Args:
        model: the network ``θ`` (every parameter that requires grad is adapted); maps
            ``(n, *input)`` to ``(n, out)``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
        chunk_size: tasks processed together (``1`` = one at a time, ``None`` = all).
        first_order: drop the second-order terms (first-order MAML).

    Example (a meta-step and a prediction as for any :class:`~mrmeta.MetaLearner`):
        >>> from mrmeta import Conv4
        >>> learner = MAML(Conv4(ways=5, hidden=8, image_size=28), inner_steps=2)
        >>> learner.options.inner_lr, learner.options.first_order
        (0.4, False)
    """

    options_type: ClassVar[type[MAMLOptions]] = MAMLOptions
    options: MAMLOptions

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        theta = self.start_per_task(chunk.num_tasks)
        phi = unrolled_gradient_descent(
            lambda p: self.inner_objective(chunk.support_x, chunk.support_y, p, theta),
            theta,
            steps=self.options.inner_steps,
            lr=self.options.inner_lr,
            first_order=self.options.first_order,
        )
        pred = batched_forward(self.model, phi, chunk.query_x)
        return backward_query_loss(pred, chunk.query_y, self.options.loss, batch_size)


class FOMAML(MAML):
    """First-order MAML: :class:`MAML` with ``first_order=True`` (``fomaml`` by name).

    The defaults of the keyword options are the fields of :class:`FOMAMLOptions`.

    Args:
        model: the network ``θ``.
        inner_steps: ``K ≥ 0``.
        inner_lr: ``α > 0``.
        loss: ``"cross_entropy"`` or ``"mse"``.
        chunk_size: tasks processed together.
    """

    options_type: ClassVar[type[FOMAMLOptions]] = FOMAMLOptions
    options: FOMAMLOptions
