"""Algorithm 1 of the paper: memory-reduced meta-learning with an implicit hypergradient."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from mrmeta._heads import (
    batched_head_forward,
    check_inner_lr,
    check_loss_name,
    l2_penalty,
    linear_head_lipschitz,
    task_accuracies,
    task_features,
    task_losses,
)
from mrmeta._tree import TensorDict, tree_norm
from mrmeta._validation import check_finite_number, check_positive_int
from mrmeta.algorithms.base import MetaLearner, StepStats, mean_or_none
from mrmeta.implicit import hypergradient
from mrmeta.inner import gradient_descent
from mrmeta.tasks import TaskBatch


class MemoryReduced(MetaLearner):
    r"""Memory-reduced meta-learning (Algorithm 1; ``mrml`` on the command line).

    The model is split into a shared backbone ``θ`` and a per-task head ``φ``. For each task
    ``i`` with support features ``Z_s = backbone(x_s)`` and query features ``Z_q``:

    * lower level ``g_i(θ, φ) = CE(head_φ(Z_s), y_s) + μ/2 ‖φ − c‖²`` (``c = 0``, or the learned
      head initialisation when ``learn_head_init``), solved by ``K`` gradient steps kept
      without a graph: ``φ^{k+1} = φ^k − λ ∇_φ g_i``;
    * upper level ``f_i(θ, φ) = CE(head_φ(Z_q), y_q)``;
    * the meta-gradient is the implicit hypergradient at ``φ^K`` (see
      :func:`mrmeta.hypergradient`), with ``[∇²_φ g_i]⁻¹ ∇_φ f_i`` from ``N`` CG steps,
      averaged over the batch: ``ĝ = (1/B) Σ_i [∇_θ f_i − ∇²_{θφ} g_i · v_i]``.

    Because ``f`` and ``g`` see ``θ`` only through the features, the hypergradient is taken
    with respect to ``(Z_s, Z_q)`` and sent into the backbone by one ordinary backward pass:
    the memory is one backbone graph per chunk of tasks, independent of ``K`` and ``N``.

    The paper and the authors' code differ (PAPER.md §2); each difference is an option:
    ``warm_start_head`` (start ``φ⁰`` from the previous iteration's ``φ^K`` of the same task
    slot), ``warm_start_cg`` (start CG from the previous ``v`` of the slot), ``l2`` (``μ``; the
    code uses 0), and the outer optimizer (any ``torch.optim`` optimizer, see :meth:`meta_step`).

    Args:
        backbone: the shared feature extractor ``θ``; maps ``(n, *input)`` to ``(n, d)``.
        head: the per-task module ``φ`` (its current parameters are the starting point ``φ⁰``).
        inner_steps: ``K ≥ 0``.
        inner_lr: ``λ``, or ``"auto"`` (default) for ``λ_i = 1/L_i`` from each task's curvature
            bound ``L_i = c‖[Z_s, 1]‖₂²/n + μ`` (linear heads only). A fixed step stops
            converging once the features grow, and training then collapses (DESIGN.md).
        cg_iters: ``N ≥ 0``; ``0`` drops the implicit term (only ``∇_θ f`` at ``φ^K``).
        l2: ``μ ≥ 0``, the strong-convexity coefficient of the lower level.
        loss: ``"cross_entropy"`` (classification) or ``"mse"`` (regression).
        warm_start_head: warm-start ``φ`` per task slot across iterations.
        warm_start_cg: warm-start CG's ``v`` per task slot across iterations.
        learn_head_init: meta-learn ``φ⁰`` too; the lower level is then regularised towards it
            (iMAML-style), which is how it receives a gradient.
        chunk_size: tasks processed together (``1`` = one at a time as in the paper, ``None`` =
            the whole batch); trades memory for speed. BatchNorm stays per task.
        cg_tol: CG stops early once its residual norm is below this.

    Example:
        >>> from mrmeta import Conv4, MemoryReduced
        >>> model = Conv4(ways=5, hidden=8, zero_head=True)
        >>> learner = MemoryReduced(model.backbone, model.head, inner_steps=5, cg_iters=5)
        >>> optimizer = torch.optim.Adam(learner.meta_parameters(), lr=1e-3)
        >>> batch = TaskBatch(torch.randn(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
        ...                   torch.randn(2, 10, 1, 28, 28), torch.arange(5).repeat(2, 2))
        >>> stats = learner.meta_step(batch, optimizer)
    """

    def __init__(
        self,
        backbone: nn.Module,
        head: nn.Module,
        *,
        inner_steps: int = 20,
        inner_lr: float | Literal["auto"] = "auto",
        cg_iters: int = 20,
        l2: float = 0.01,
        loss: str = "cross_entropy",
        warm_start_head: bool = False,
        warm_start_cg: bool = False,
        learn_head_init: bool = False,
        chunk_size: int | None = 1,
        cg_tol: float = 0.0,
    ) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head
        self.inner_steps = check_positive_int("inner_steps", inner_steps, minimum=0)
        self.cg_iters = check_positive_int("cg_iters", cg_iters, minimum=0)
        self.inner_lr = check_inner_lr(inner_lr, head)
        self.l2 = check_finite_number("l2", l2)
        self.loss = check_loss_name(loss)
        self.cg_tol = check_finite_number("cg_tol", cg_tol)
        self.chunk_size = (
            None if chunk_size is None else check_positive_int("chunk_size", chunk_size)
        )
        self.warm_start_head, self.warm_start_cg = bool(warm_start_head), bool(warm_start_cg)
        self.learn_head_init = bool(learn_head_init)
        head.requires_grad_(self.learn_head_init)
        self._slot_heads: TensorDict | None = None
        self._slot_cg: TensorDict | None = None

    # ----------------------------------------------------------------- lower level
    def _head_init(self, tasks: int) -> TensorDict:
        """``φ⁰`` (the head's parameters) repeated per task, detached: ``(T, *shape)``."""
        return {k: p.detach().expand(tasks, *p.shape) for k, p in self.head.named_parameters()}

    def _center(self, tasks: int) -> TensorDict:
        """The L2 centre ``c``: the learned head init, or zero."""
        init = self._head_init(tasks)
        return init if self.learn_head_init else {k: torch.zeros_like(v) for k, v in init.items()}

    def _lower_objective(
        self, features: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> Tensor:
        """``Σ_t g_t(φ_t)`` for support ``features (T, n, d)`` and ``labels (T, n)``."""
        pred = batched_head_forward(self.head, phi, features)
        total = task_losses(pred, labels, self.loss)
        if self.l2 > 0:
            total = total + l2_penalty(phi, center, self.l2)
        return total.sum()

    def _step_size(self, features: Tensor, out_dim: int) -> Tensor | float:
        """``λ`` per task, ``(T,)`` (``1/L_t`` when ``inner_lr == "auto"``)."""
        if self.inner_lr != "auto":
            return float(self.inner_lr)
        return 1.0 / linear_head_lipschitz(features, self.loss, out_dim, self.l2)

    def solve_lower_level(
        self, features: Tensor, labels: Tensor, start: TensorDict, center: TensorDict
    ) -> TensorDict:
        """``K`` gradient steps on each task's lower level from ``start``; returns ``φ^K``."""
        out_dim = self.head.weight.shape[0] if isinstance(self.head, nn.Linear) else 0
        return gradient_descent(
            lambda phi: self._lower_objective(features, labels, phi, center),
            start,
            steps=self.inner_steps,
            lr=self._step_size(features, out_dim),
        )

    def _slot_start(self, offset: int, tasks: int) -> TensorDict:
        """Warm start of the slots ``offset..offset+tasks-1`` when on and available."""
        saved = self._slot_heads
        if self.warm_start_head and saved is not None and _covers(saved, offset + tasks):
            return {k: v[offset : offset + tasks] for k, v in saved.items()}
        return self._head_init(tasks)

    def _slot_v0(self, offset: int, tasks: int) -> TensorDict | None:
        saved = self._slot_cg
        if self.warm_start_cg and saved is not None and _covers(saved, offset + tasks):
            return {k: v[offset : offset + tasks] for k, v in saved.items()}
        return None

    # ----------------------------------------------------------------- meta-gradient
    def _feature_grads(
        self, chunk: TaskBatch, zs: Tensor, zq: Tensor, phi: TensorDict, offset: int
    ) -> tuple[TensorDict, Tensor | None, TensorDict | None]:
        """Hypergradient with respect to ``(Z_s, Z_q, c)`` per task (summed over the chunk);
        also the CG residual ``(T,)`` and solution when CG ran."""
        theta = {"support": zs, "query": zq}
        if self.learn_head_init:
            theta.update({f"center.{k}": v for k, v in self._center(chunk.num_tasks).items()})

        def outer(th: TensorDict, ph: TensorDict) -> Tensor:
            pred = batched_head_forward(self.head, ph, th["query"])
            return task_losses(pred, chunk.query_y, self.loss).sum()

        def inner(th: TensorDict, ph: TensorDict) -> Tensor:
            if self.learn_head_init:
                center = {k: th[f"center.{k}"] for k in ph}
            else:
                center = self._center(chunk.num_tasks)
            return self._lower_objective(th["support"], chunk.support_y, ph, center)

        if self.cg_iters == 0:
            return _direct_grads(outer, theta, phi), None, None
        result = hypergradient(
            outer,
            inner,
            theta,
            phi,
            cg_iters=self.cg_iters,
            tol=self.cg_tol,
            batched=True,
            v0=self._slot_v0(offset, chunk.num_tasks),
        )
        return result.grad, result.residual, result.v

    def _inner_grad_norm(
        self, zs: Tensor, labels: Tensor, phi: TensorDict, center: TensorDict
    ) -> Tensor:
        """``‖∇_φ g_t(φ_t)‖`` per task, ``(T,)``: how far ``φ^K`` is from the minimiser."""
        with torch.enable_grad():
            leaves = {k: v.detach().requires_grad_(True) for k, v in phi.items()}
            grads = torch.autograd.grad(
                self._lower_objective(zs, labels, leaves, center), list(leaves.values())
            )
        return tree_norm(dict(zip(leaves, grads, strict=True)), batched=True)

    def _chunk_meta_gradient(self, chunk: TaskBatch, offset: int, batch_size: int) -> dict:
        """Accumulate one chunk's share of the meta-gradient; return its statistics."""
        tasks = chunk.num_tasks
        zs = task_features(self.backbone, chunk.support_x)
        zq = task_features(self.backbone, chunk.query_x)
        zs_d, zq_d = zs.detach(), zq.detach()
        center = self._center(tasks)
        phi = self.solve_lower_level(zs_d, chunk.support_y, self._slot_start(offset, tasks), center)
        grads, residual, v = self._feature_grads(chunk, zs_d, zq_d, phi, offset)
        torch.autograd.backward(
            [zs, zq], [grads["support"] / batch_size, grads["query"] / batch_size]
        )
        if self.learn_head_init:
            for name, param in self.head.named_parameters():
                share = grads[f"center.{name}"].sum(0) / batch_size
                param.grad = share if param.grad is None else param.grad + share
        with torch.no_grad():
            pred = batched_head_forward(self.head, phi, zq_d)
            stats = {"loss": task_losses(pred, chunk.query_y, self.loss).mean()}
            if self.loss == "cross_entropy":
                stats["accuracy"] = task_accuracies(pred, chunk.query_y).mean()
        stats["inner_grad_norm"] = self._inner_grad_norm(zs_d, chunk.support_y, phi, center).mean()
        if residual is not None:
            stats["cg_residual"] = residual.mean()
        return {"stats": stats, "phi": phi, "v": v}

    def compute_meta_gradient(self, batch: TaskBatch) -> StepStats:
        """Algorithm 1's meta-gradient for ``batch``, accumulated into ``.grad``."""
        sizes, per_chunk, heads, vs = [], [], [], []
        offset = 0
        for chunk in batch.chunks(self.chunk_size):
            out = self._chunk_meta_gradient(chunk, offset, batch.num_tasks)
            sizes.append(chunk.num_tasks)
            per_chunk.append(out["stats"])
            heads.append(out["phi"])
            vs.append(out["v"])
            offset += chunk.num_tasks
        self._slot_heads = _concat_slots(heads) if self.warm_start_head else None
        self._slot_cg = _concat_slots(vs) if self.warm_start_cg and vs[0] is not None else None
        return StepStats(
            **{
                key: mean_or_none([s[key] for s in per_chunk if key in s], sizes)
                for key in ("loss", "accuracy", "inner_grad_norm", "cg_residual")
            }
        )

    # ----------------------------------------------------------------- adaptation
    @torch.no_grad()
    def adapt(self, support_x: Tensor, support_y: Tensor) -> TensorDict:
        """Solve each task's lower level from ``φ⁰``: per-task head parameters ``(T, *shape)``.

        Args:
            support_x: ``(T, n, *input)``.
            support_y: ``(T, n)`` labels (or ``(T, n, out)`` regression targets).
        """
        features = task_features(self.backbone, support_x)
        tasks = features.shape[0]
        return self.solve_lower_level(
            features, support_y, self._head_init(tasks), self._center(tasks)
        )

    @torch.no_grad()
    def predict(self, batch: TaskBatch) -> Tensor:
        """Adapt on the support sets, predict the queries: ``(B, n_query, out)``."""
        outputs = []
        for chunk in batch.chunks(self.chunk_size):
            phi = self.adapt(chunk.support_x, chunk.support_y)
            zq = task_features(self.backbone, chunk.query_x)
            outputs.append(batched_head_forward(self.head, phi, zq))
        return torch.cat(outputs)

    def reset_state(self) -> None:
        """Drop the warm starts (e.g. after a non-finite step)."""
        self._slot_heads = None
        self._slot_cg = None

    # ----------------------------------------------------------------- checkpointing
    def get_extra_state(self) -> dict[str, Any]:
        """The warm-start state per task slot, so that a resumed run continues exactly."""
        return {"slot_heads": self._slot_heads, "slot_cg": self._slot_cg}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self._slot_heads = state.get("slot_heads")
        self._slot_cg = state.get("slot_cg")


def _covers(saved: TensorDict, slots: int) -> bool:
    return next(iter(saved.values())).shape[0] >= slots


def _concat_slots(parts: list[TensorDict]) -> TensorDict:
    return {k: torch.cat([p[k] for p in parts]).detach() for k in parts[0]}


def _direct_grads(outer: Any, theta: TensorDict, phi: TensorDict) -> TensorDict:
    """``∇_θ f(θ, φ)`` alone — the hypergradient without its implicit term (``N = 0``)."""
    leaves = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
    with torch.enable_grad():
        grads = torch.autograd.grad(outer(leaves, phi), list(leaves.values()), allow_unused=True)
    return {
        k: torch.zeros_like(v) if g is None else g
        for (k, v), g in zip(leaves.items(), grads, strict=True)
    }
