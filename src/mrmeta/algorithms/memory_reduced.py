"""Algorithm 1 of the paper: memory-reduced meta-learning with an implicit hypergradient."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from mrmeta._per_task import batched_head_forward, task_features
from mrmeta._tree import TensorDict
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms._head_learner import (
    HeadLearner,
    HeadOptions,
    non_finite_features,
    solve_stats,
)
from mrmeta.algorithms.base import ChunkStats, accumulate_grad, query_stats
from mrmeta.lower_level import HeadHypergradient, Solver, has_closed_form, head_hypergradient
from mrmeta.tasks import TaskBatch

WARM_CG_NEEDS_CG = (
    "warm_start_cg needs exact_v=False (on the command line: --no-exact-v): it warm-starts "
    "CG's N steps, and exact_v solves for v without CG"
)


@dataclass(frozen=True, kw_only=True)
class MemoryReducedOptions(HeadOptions):
    """:class:`MemoryReduced`'s options and their defaults (documented there)."""

    meta_lr: float = 0.003  # tuned
    inner_solver: Solver = "newton"
    inner_steps: int = 50
    inner_tol: float = 1e-6
    inner_lr: float | Literal["auto"] = "auto"
    cg_iters: int = 20
    cg_tol: float = 0.0
    exact_v: bool = True  # measured: benchmarks/results/fair_cost_*.json
    l2: float = 0.03  # tuned
    warm_start_head: bool = False
    warm_start_cg: bool = False
    learn_head_init: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self._store("cg_iters", check_positive_int("cg_iters", self.cg_iters, minimum=0))
        self._store("cg_tol", check_finite_number("cg_tol", self.cg_tol))
        self._store("warm_start_head", bool(self.warm_start_head))
        self._store("warm_start_cg", bool(self.warm_start_cg))
        self._store("exact_v", bool(self.exact_v))


class MemoryReduced(HeadLearner):
    r"""Memory-reduced meta-learning (Algorithm 1; ``mrml`` on the command line).

    The model is split into a shared backbone ``θ`` and a per-task head ``φ``. For each task
    ``i`` with support features ``Z_s = backbone(x_s)`` and query features ``Z_q``:

    * lower level ``g_i(θ, φ) = L(head_φ(Z_s), y_s) + μ/2 ‖φ − c‖²`` (``c = 0``, or the learned
      head initialisation when ``learn_head_init``), solved without a graph by
      :func:`mrmeta.lower_level.solve_lower_level`: Newton's method to ``‖∇_φ g_i‖ ≤
      inner_tol`` (default), or ``K`` plain gradient steps (``inner_solver="gd"``, the paper's);
    * upper level ``f_i(θ, φ) = L(head_φ(Z_q), y_q)``;
    * the meta-gradient is the implicit hypergradient at that ``φ_i``
      (:func:`mrmeta.lower_level.head_hypergradient`), with ``v_i = [∇²_φ g_i]⁻¹ ∇_φ f_i``
      (solved exactly for a linear head by default, else from ``N`` CG steps), averaged over
      the batch: ``ĝ = (1/B) Σ_i [∇_θ f_i − ∇²_{θφ} g_i · v_i]``.

    Because ``f`` and ``g`` see ``θ`` only through the features, the hypergradient is taken
    with respect to ``(Z_s, Z_q)`` and sent into the backbone by one ordinary backward pass:
    the memory is one backbone graph per chunk of tasks, independent of ``K`` and ``N``.
    A meta-step reads: features → solve → hypergradient → one backward.

    Why Newton by default: the implicit formula is exact only at the minimiser ``φ*``. With the
    former default of 200 gradient steps of size ``1/L`` the head's gradient norm at ``φ^K`` was
    still about 0.12 (Omniglot 5-way 1-shot) and 0.4 (20-way); Newton with exact directions
    (the head problem's Hessian is ``μI`` plus a term of rank ≤ n·C) reaches ``1e-6`` in about
    3–5 iterations from its ray start (5–8 from zero; :func:`mrmeta.lower_level.newton_solve`;
    ``inner_iterations`` and ``inner_grad_norm`` in the step's statistics).
    The paper's configuration is ``inner_solver="gd", inner_steps=20, cg_iters=20,
    exact_v=False`` with a fixed ``inner_lr`` (0.1 or 0.05) and ``l2=0`` in the authors' code
    (docs/method.md §6.1).

    The paper and the authors' code differ in more ways (docs/method.md §6); each is an option:
    ``warm_start_head`` (start ``φ`` from the previous iteration's solution of the same task
    slot), ``warm_start_cg`` (start CG from the previous ``v`` of the slot), ``l2`` (``μ``),
    and the outer optimizer (any ``torch.optim`` optimizer, see :meth:`meta_step`). Warm starts
    are off by default: the tasks change every iteration, so a slot's previous solution belongs
    to another task with permuted labels; on a fixed task set they cut the hypergradient error
    24–31× and remove the floor of a cold start (benchmarks/results/convergence.md).

    The defaults of the keyword options are the fields of :class:`MemoryReducedOptions`.

    Args:
        backbone: the shared feature extractor ``θ``; maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task module ``φ`` (its current parameters are the starting point ``φ⁰``).
        inner_solver: ``"newton"`` (needs ``l2 > 0``) or ``"gd"``.
        inner_steps: ``K ≥ 0``: Newton's cap on iterations, or the number of gradient steps.
        inner_tol: Newton stops once every task's ``‖∇_φ g_i‖ ≤ inner_tol``.
        inner_lr: the gradient step ``λ`` (``"gd"`` only), or ``"auto"`` (default) for
            ``λ_i = 1/L_i`` from each task's curvature bound ``L_i = c‖[Z_s, 1]‖₂²/n + μ``
            (linear heads only). A fixed step stops converging once the features grow, and
            training then collapses (docs/design.md §4).
        cg_iters: ``N ≥ 0``; ``0`` drops the implicit term (only ``∇_θ f`` at ``φ``).
        cg_tol: CG stops early once its residual norm is below this.
        l2: ``μ ≥ 0``, the strong-convexity coefficient of the lower level.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
        warm_start_head: warm-start ``φ`` per task slot across iterations.
        warm_start_cg: warm-start CG's ``v`` per task slot across iterations (with a linear
            head it needs ``exact_v=False``: the exact solve uses no CG).
        exact_v: solve ``[∇²_φ g_i] v_i = ∇_φ f_i`` exactly where the head has a closed form
            (``nn.Linear``: one Woodbury solve, as for a Newton direction) instead of ``N`` CG
            steps (default; other heads always use CG). At μ = 0.1 the two agree to about
            1e-6 relative at 5-way; the exact solve is cheaper than 20 CG iterations and
            stays exact when the features grow (CG's error reached 1% at 20-way on features ×10).
            ``cg_iters = 0`` still drops the implicit term.
        learn_head_init: meta-learn ``φ⁰`` too; the lower level is then regularised towards it
            (iMAML-style), which is how it receives a gradient.
        chunk_size: tasks processed together (``1`` = one at a time as in the paper, ``None`` =
            the whole batch); trades memory for speed. BatchNorm stays per task.

    An ``nn.Linear`` head gets closed forms for every derivative and an exact Newton direction
    (:class:`mrmeta.lower_level.LinearHeadProblem`); any other head is handled by autograd
    (Newton-CG; :class:`mrmeta.lower_level.AutogradHeadProblem`).

    Example:
        >>> from mrmeta import Conv4, MemoryReduced
        >>> model = Conv4(ways=5, hidden=8, zero_head=True)
        >>> learner = MemoryReduced(model.backbone, model.head, cg_iters=5)
        >>> optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> stats = learner.meta_step(batch, optimizer)
        >>> stats.inner_grad_norm_max < 1e-4
        True
    """

    options_type: ClassVar[type[MemoryReducedOptions]] = MemoryReducedOptions
    options: MemoryReducedOptions

    def __init__(self, backbone: nn.Module, head: nn.Module, **options: Any) -> None:
        super().__init__(backbone, head, **options)
        if self.options.warm_start_cg and self.options.exact_v and has_closed_form(head):
            raise ValueError(WARM_CG_NEEDS_CG)
        self.slots = SlotWarmStarts()

    recompute_features: bool | None = None
    """Compute the features twice to keep the lower level's memory apart from the backbone's
    (see :meth:`recomputes_features`); ``None``: for large heads other than ``nn.Linear``."""

    def reset_state(self) -> None:
        """Drop the warm starts (e.g. after a non-finite step)."""
        self.slots.clear()

    def _chunk_meta_gradient(self, chunk: TaskBatch, batch_size: int) -> ChunkStats:
        """Features → lower-level solve → hypergradient → one backward pass of the backbone."""
        recompute = self.recomputes_features()
        zs, zq = self._features(chunk, graph=not recompute)
        if (skip := non_finite_features(zs, zq)) is not None:
            return skip
        tasks = chunk.num_tasks
        problem = self.problem(zs, chunk.support_y)
        start = self.slots.heads_for(tasks) if self.options.warm_start_head else None
        phi, report = self.solve(problem, self.head_start(tasks) if start is None else start)
        v0 = self.slots.v_for(tasks) if self.options.warm_start_cg else None
        cg_iters, cg_tol = self.options.cg_iters, self.options.cg_tol
        result = head_hypergradient(
            problem,
            phi,
            zq.detach(),
            chunk.query_y,
            cg_iters=cg_iters,
            v0=v0,
            tol=cg_tol,
            exact_v=self.options.exact_v,
        )
        if recompute:  # the same features (same random numbers), now in the backbone's graph
            zs, zq = self._features(chunk, graph=True)
        torch.autograd.backward([zs, zq], [result.support / batch_size, result.query / batch_size])
        if self.options.learn_head_init:
            params = dict(self.head.named_parameters())
            accumulate_grad(params, {k: result.center[k].sum(0) / batch_size for k in params})
        self.slots.record(phi, result.v)
        pred = batched_head_forward(self.head, phi, zq.detach())
        return {
            **query_stats(pred, chunk.query_y, self.options.loss),
            **solve_stats(report),
            **_implicit_stats(result),
        }

    def recomputes_features(self) -> bool:
        """Whether a chunk's features are computed twice: first without a graph for the solve
        and the hypergradient, then in the backbone's graph for its backward pass.

        ``recompute_features``, or when it is ``None``: for a head that is not ``nn.Linear``
        and has more parameters than the backbone. Such a head (ResNet-12's last block,
        :func:`mrmeta.models.split_model`) makes the solve and CG hold its double-backward
        graph and several copies of ``φ``; computed twice, they never coexist with the
        backbone's graph, so the peak is the larger of the two instead of their sum, for one
        more forward pass of the backbone without a graph. Measured (benchmarks/results/
        memory_scale_*.md): ResNet-12 at 84×84, 1.27× → 1.01× the plain step's memory; Conv4's
        last block (a third of its parameters) stays at 1.03× in one pass, where the extra
        forward would cost 0.35–0.6× a plain step of time (benchmarks/results/last_block_speed.md).
        """
        if self.recompute_features is None:
            head_size = sum(p.numel() for p in self.head.parameters())
            backbone_size = sum(p.numel() for p in self.backbone.parameters())
            return not isinstance(self.head, nn.Linear) and head_size > backbone_size
        return bool(self.recompute_features)

    def _features(self, chunk: TaskBatch, *, graph: bool) -> tuple[Tensor, Tensor]:
        """Support and query features ``(T, n, d)``; without ``graph`` the random state is
        restored afterwards, so that the pass in the graph draws the same numbers (DropBlock)."""
        if graph:
            return (
                task_features(self.backbone, chunk.support_x),
                task_features(self.backbone, chunk.query_x),
            )
        device = chunk.support_x.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            return (
                task_features(self.backbone, chunk.support_x),
                task_features(self.backbone, chunk.query_x),
            )

    def _end_batch(self) -> None:
        """Keep this batch's ``φ`` and ``v`` per slot for the next iteration's warm starts."""
        keep_heads, keep_v = self.options.warm_start_head, self.options.warm_start_cg
        self.slots.end_batch(keep_heads=keep_heads, keep_v=keep_v)

    def _discard_batch(self) -> None:
        """A batch that failed part-way leaves no half-recorded warm starts behind."""
        self.slots.drop_pending()

    # ----------------------------------------------------------------- checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        """The warm-start state per task slot, so that a resumed run continues exactly."""
        return {"slot_heads": self.slots.heads, "slot_cg": self.slots.vs}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the warm starts, on the device and dtype of the head."""
        ref = next(self.head.parameters())

        def move(saved: TensorDict | None) -> TensorDict | None:
            return None if saved is None else {k: v.to(ref) for k, v in saved.items()}

        self.slots = SlotWarmStarts(move(state.get("slot_heads")), move(state.get("slot_cg")))


def _implicit_stats(result: HeadHypergradient) -> ChunkStats:
    """``cg_residual`` (‖H v − ∇_φ f‖, mean) and, for CG, ``cg_breakdowns``."""
    if result.residual is None:
        return {}
    stats = {"cg_residual": result.residual.mean()}
    if result.cg is not None:
        stats["cg_breakdowns"] = result.cg.failed.to(result.cg.residual.dtype).mean()
    return stats


@dataclass
class SlotWarmStarts:
    """The warm starts of MemoryReduced, per task slot of a batch (slot = position in it).

    Attributes:
        heads: the last batch's ``φ`` per slot, ``(B, *shape)`` per name, or ``None``.
        vs: the last batch's CG solution ``v`` per slot, or ``None``.
        pending: this batch's ``(φ, v)`` per chunk so far; the next chunk's slots start at
            :attr:`offset`.
    """

    heads: TensorDict | None = None
    vs: TensorDict | None = None
    pending: list[tuple[TensorDict, TensorDict | None]] = field(default_factory=list)

    @property
    def offset(self) -> int:
        """The slot of the next chunk's first task."""
        return sum(next(iter(phi.values())).shape[0] for phi, _ in self.pending)

    def _slots(self, saved: TensorDict | None, tasks: int) -> TensorDict | None:
        start = self.offset
        if saved is None or next(iter(saved.values())).shape[0] < start + tasks:
            return None
        return {k: v[start : start + tasks] for k, v in saved.items()}

    def heads_for(self, tasks: int) -> TensorDict | None:
        """The previous ``φ`` of the next ``tasks`` slots (``None`` when there is none)."""
        return self._slots(self.heads, tasks)

    def v_for(self, tasks: int) -> TensorDict | None:
        """The previous ``v`` of the next ``tasks`` slots (``None``: CG starts from zero)."""
        return self._slots(self.vs, tasks)

    def record(self, phi: TensorDict, v: TensorDict | None) -> None:
        """One chunk's ``φ`` and ``v``, in slot order."""
        self.pending.append(({k: t.detach() for k, t in phi.items()}, v))

    def end_batch(self, *, keep_heads: bool, keep_v: bool) -> None:
        """Make this batch's ``φ`` (and ``v``) the warm starts of the next one."""
        heads, vs = zip(*self.pending, strict=True) if self.pending else ((), ())
        self.heads = _concat(list(heads)) if keep_heads and heads else None
        self.vs = _concat(list(vs)) if keep_v and vs and vs[0] is not None else None
        self.pending = []

    def drop_pending(self) -> None:
        """Forget a batch that did not finish."""
        self.pending = []

    def clear(self) -> None:
        """No warm starts at all."""
        self.heads = self.vs = None
        self.pending = []


def _concat(parts: list[TensorDict]) -> TensorDict:
    return {k: torch.cat([p[k] for p in parts]).detach() for k in parts[0]}
