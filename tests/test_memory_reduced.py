"""MemoryReduced (Algorithm 1) against a reference written here with plain autograd, float64.

Reference per task: features by calling the backbone on that task alone, K gradient steps by hand,
the dense Hessian of g in φ (torch.func.hessian), ``v = H⁻¹ ∇_φ f`` by torch.linalg.solve, the
mixed term ``∇²_{θφ} g · v`` by autograd through the backbone, the mean over tasks, then
``θ − η ĝ`` (SGD). The learner runs CG for dim(φ) steps, so it is exact up to rounding.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import grad, hessian

from mrmeta import Conv4, Conv4Backbone, MemoryReduced, TaskBatch, measure_peak_memory

F64 = torch.float64
WAYS, FEATURES, TASKS, N_SUPPORT, N_QUERY = 3, 4, 4, 6, 6
PHI_DIM = WAYS * (FEATURES + 1)
ETA = 0.5  # SGD step
# float64; CG with dim(φ) steps on a Hessian with condition number ~10-30 is exact to ~1e-12.
TOL = 1e-8


def _setup(
    kind: str = "mlp", seed: int = 0, generic_head: bool = False
) -> tuple[nn.Module, nn.Module, TaskBatch]:
    """A backbone, a head and a batch; ``generic_head`` wraps the linear head in a Sequential,
    so that the learner takes the autograd path instead of the closed forms."""
    torch.manual_seed(seed)
    if kind == "mlp":  # no `supports_task_batches`: the learner calls it once per task
        backbone: nn.Module = nn.Sequential(nn.Linear(3, FEATURES), nn.Tanh())
        shape: tuple[int, ...] = (3,)
    else:
        backbone, shape = Conv4Backbone(in_channels=1, hidden=FEATURES, image_size=16), (1, 16, 16)
    head: nn.Module = nn.Linear(FEATURES, WAYS)
    if generic_head:
        head = nn.Sequential(head)
    return backbone.double(), head.double(), _batch(shape)


def _batch(shape: tuple[int, ...]) -> TaskBatch:
    labels_s = (torch.arange(N_SUPPORT) % WAYS).repeat(TASKS, 1)
    labels_q = torch.randperm(N_QUERY).remainder(WAYS).repeat(TASKS, 1)
    xs, xq = torch.randn(TASKS, N_SUPPORT, *shape), torch.randn(TASKS, N_QUERY, *shape)
    return TaskBatch(xs.double(), labels_s, xq.double(), labels_q)


Phi = list[Tensor]  # [W (WAYS, FEATURES), b (WAYS,)]


def _lower(zs: Tensor, ys: Tensor, l2: float, center: Phi) -> Callable[[Phi], Tensor]:
    """``g(φ) = CE(Z_s Wᵀ + b, y_s) + μ/2 ‖φ − c‖²``."""

    def g(phi: Phi) -> Tensor:
        penalty = sum((p - c).pow(2).sum() for p, c in zip(phi, center, strict=True))
        return F.cross_entropy(zs @ phi[0].T + phi[1], ys) + 0.5 * l2 * penalty

    return g


def _as_phi(vec: Tensor) -> Phi:
    return [vec[: WAYS * FEATURES].view(WAYS, FEATURES), vec[WAYS * FEATURES :]]


def _gd(g: Callable[[Phi], Tensor], phi: Phi, steps: int, lr: float | Tensor) -> Phi:
    """``steps`` plain gradient steps, no graph kept."""
    for _ in range(steps):
        leaves = [p.detach().requires_grad_(True) for p in phi]
        grads = torch.autograd.grad(g(leaves), leaves)
        phi = [(p - lr * d).detach() for p, d in zip(leaves, grads, strict=True)]
    return phi


def _newton(g: Callable[[Phi], Tensor], phi: Phi, iters: int = 100) -> Phi:
    """``argmin g`` by dense Newton steps (halved until ``g`` decreases), to ``‖∇g‖ < 1e-13``."""
    x = torch.cat([p.detach().reshape(-1) for p in phi])
    flat = lambda v: g(_as_phi(v))  # noqa: E731
    for _ in range(iters):
        gradient = grad(flat)(x)
        if gradient.norm() < 1e-13:
            break
        step = torch.linalg.solve(hessian(flat)(x), gradient)
        scale = 1.0
        while flat(x - scale * step) > flat(x) and scale > 1e-6:
            scale /= 2
        x = x - scale * step
    return _as_phi(x)


def _implicit_term(
    zs: Tensor, zq: Tensor, task: tuple, phi: Phi, l2: float, center: Phi, params: list[Tensor]
) -> tuple[Tensor, ...]:
    """``∇²_{θφ} g · v`` with ``v = H⁻¹ ∇_φ f`` from the dense Hessian ``H = ∇²_φ g``."""
    _, ys, _, yq = task
    g_fixed = _lower(zs.detach(), ys, l2, [c.detach() for c in center])
    pv = torch.cat([p.reshape(-1) for p in phi])
    rhs = grad(lambda x: F.cross_entropy(zq.detach() @ _as_phi(x)[0].T + _as_phi(x)[1], yq))(pv)
    v = torch.linalg.solve(hessian(lambda x: g_fixed(_as_phi(x)))(pv), rhs)
    leaves = [p.clone().requires_grad_(True) for p in phi]
    grad_phi = torch.autograd.grad(_lower(zs, ys, l2, center)(leaves), leaves, create_graph=True)
    return torch.autograd.grad(torch.cat([d.reshape(-1) for d in grad_phi]) @ v, params)


def _reference_task(
    backbone: nn.Module,
    head: nn.Module,
    task: tuple,
    phi0: Phi,
    *,
    steps: int | str,
    lr: float | str,
    l2: float,
    cg: int,
    learn_init: bool,
) -> tuple[list[Tensor], Phi, Tensor]:
    """Meta-gradient of one task (list over params), its φ^K and its query loss."""
    xs, ys, xq, yq = task
    params = list(backbone.parameters()) + (list(head.parameters()) if learn_init else [])
    zs, zq = backbone(xs), backbone(xq)  # this task alone: BatchNorm statistics per task
    center = list(head.parameters()) if learn_init else [torch.zeros_like(p) for p in phi0]
    if lr == "auto":  # 1/L, L = ½‖[Z_s, 1]‖₂²/n + μ
        design = torch.cat([zs.detach(), torch.ones(len(zs), 1, dtype=F64)], 1)
        lr = 1.0 / (0.5 * torch.linalg.matrix_norm(design, ord=2) ** 2 / len(zs) + l2)
    g_fixed = _lower(zs.detach(), ys, l2, [c.detach() for c in center])
    phi = _newton(g_fixed, phi0) if steps == "exact" else _gd(g_fixed, phi0, steps, lr)
    query_loss = F.cross_entropy(zq @ phi[0].T + phi[1], yq)
    grads = torch.autograd.grad(query_loss, params, allow_unused=True, retain_graph=True)
    grads = [torch.zeros_like(p) if d is None else d for p, d in zip(params, grads, strict=True)]
    if cg:
        mixed = _implicit_term(zs, zq, task, phi, l2, center, params)
        grads = [d - m for d, m in zip(grads, mixed, strict=True)]
    return grads, phi, query_loss.detach()


def _reference(
    backbone: nn.Module,
    head: nn.Module,
    batch: TaskBatch,
    phi0s: list[Phi] | None = None,
    **kw: Any,
) -> tuple[list[Tensor], list[Phi], float]:
    """Mean meta-gradient over tasks, the φ^K of every slot, the mean query loss."""
    total, phis, losses = None, [], []
    for t in range(batch.num_tasks):
        task = tuple(x[t] for x in batch.fields())
        phi0 = [p.detach() for p in head.parameters()] if phi0s is None else phi0s[t]
        grads, phi, loss = _reference_task(backbone, head, task, phi0, **kw)
        total = grads if total is None else [a + b for a, b in zip(total, grads, strict=True)]
        phis.append(phi)
        losses.append(loss)
    return [t / batch.num_tasks for t in total], phis, float(torch.stack(losses).mean())


def _sgd_reference(
    backbone: nn.Module,
    head: nn.Module,
    batch: TaskBatch,
    phi0s: list[Phi] | None = None,
    **kw: Any,
) -> tuple[list[Tensor], list[Phi], float]:
    """Parameters after one SGD step on the reference meta-gradient (on copies)."""
    backbone, head = copy.deepcopy(backbone), copy.deepcopy(head)
    grads, phis, loss = _reference(backbone, head, batch, phi0s, **kw)
    params = list(backbone.parameters()) + (list(head.parameters()) if kw["learn_init"] else [])
    return [(p - ETA * d).detach() for p, d in zip(params, grads, strict=True)], phis, loss


def _learner_params(learner: MemoryReduced, learn_init: bool) -> list[Tensor]:
    head = list(learner.head.parameters()) if learn_init else []
    return [p.detach().clone() for p in [*learner.backbone.parameters(), *head]]


def _assert_close(got: list[Tensor], want: list[Tensor], before: list[Tensor]) -> None:
    """Updates ``got − before`` and ``want − before`` agree to TOL relative."""
    delta_got = torch.cat([(g - b).reshape(-1) for g, b in zip(got, before, strict=True)])
    delta_want = torch.cat([(w - b).reshape(-1) for w, b in zip(want, before, strict=True)])
    assert delta_want.norm() > 0
    assert float((delta_got - delta_want).norm() / delta_want.norm()) < TOL


def _step_and_compare(
    kind: str,
    *,
    learn_init: bool = False,
    chunk_size: int | None = 1,
    generic_head: bool = False,
    **options: Any,
) -> MemoryReduced:
    """One SGD meta-step of the learner against the reference. ``steps="exact"`` runs the
    learner's Newton solver (to 1e-12) and the reference's dense Newton; a number of steps runs
    both as plain gradient steps."""
    backbone, head, batch = _setup(kind, generic_head=generic_head)
    kw = {"steps": 5, "lr": 0.3, "l2": 0.1, "cg": PHI_DIM} | options
    exact = kw["steps"] == "exact"
    learner = MemoryReduced(
        backbone,
        head,
        inner_solver="newton" if exact else "gd",
        inner_steps=50 if exact else kw["steps"],
        inner_tol=1e-12,
        inner_lr=kw["lr"],
        l2=kw["l2"],
        cg_iters=kw["cg"],
        learn_head_init=learn_init,
        chunk_size=chunk_size,
    )
    before = _learner_params(learner, learn_init)
    want, _, loss = _sgd_reference(
        learner.backbone, learner.head, batch, learn_init=learn_init, **kw
    )
    stats = learner.meta_step(batch, torch.optim.SGD(learner.meta_parameters(), lr=ETA))
    assert not stats.skipped
    assert stats.loss == pytest.approx(loss, rel=1e-12)  # same φ^K, same loss (float64)
    _assert_close(_learner_params(learner, learn_init), want, before)
    return learner


@pytest.mark.parametrize("generic_head", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 2, None])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_meta_step_matches_reference(kind: str, chunk_size: int | None, generic_head: bool) -> None:
    """Both head paths — closed form (LinearHeadProblem) and autograd — against the reference."""
    _step_and_compare(kind, chunk_size=chunk_size, generic_head=generic_head)


@pytest.mark.parametrize("generic_head", [False, True])
@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_newton_meta_step_matches_the_reference_at_the_exact_minimiser(
    kind: str, generic_head: bool
) -> None:
    """The default solver: the learner's φ and meta-gradient against the reference's dense
    Newton minimiser and dense IFT formula (float64, both head paths)."""
    _step_and_compare(kind, steps="exact", l2=0.05, chunk_size=2, generic_head=generic_head)


@pytest.mark.parametrize("generic_head", [False, True])
def test_learn_head_init_on_both_head_paths(generic_head: bool) -> None:
    _step_and_compare("conv4", learn_init=True, chunk_size=2, generic_head=generic_head)


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_auto_inner_lr_matches_reference(kind: str) -> None:
    _step_and_compare(kind, lr="auto", chunk_size=None)


def test_head_is_frozen_unless_learned() -> None:
    learner = _step_and_compare("mlp")
    backbone, head, _ = _setup("mlp")  # same seed: the parameters before the step
    assert torch.equal(learner.head.weight, head.weight) and learner.head.weight.grad is None
    assert not torch.equal(learner.backbone[0].weight, backbone[0].weight)


def test_learn_head_init_sends_the_gradient_to_the_head() -> None:
    learner = _step_and_compare("mlp", learn_init=True, chunk_size=2)
    assert learner.head.weight.grad is not None and learner.head.weight.grad.abs().max() > 0


@pytest.mark.parametrize("generic_head", [False, True])
def test_cg_iters_zero_on_both_head_paths(generic_head: bool) -> None:
    _step_and_compare("conv4", cg=0, l2=0.1, chunk_size=2, generic_head=generic_head)


def test_cg_iters_zero_uses_only_the_direct_gradient() -> None:
    _step_and_compare("mlp", cg=0, l2=0.0)


def test_warm_start_head_starts_from_the_previous_solution_of_the_slot() -> None:
    backbone, head, batch1 = _setup("mlp")
    batch2 = _batch((3,))
    kw = {"steps": 3, "lr": 0.3, "l2": 0.1, "cg": PHI_DIM, "learn_init": False}
    learner = MemoryReduced(
        backbone,
        head,
        inner_solver="gd",
        inner_steps=3,
        inner_lr=0.3,
        l2=0.1,
        cg_iters=PHI_DIM,
        warm_start_head=True,
        chunk_size=3,
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    ref_backbone = copy.deepcopy(backbone)
    _, phis, _ = _sgd_reference(ref_backbone, head, batch1, **kw)
    learner.meta_step(batch1, optimizer)
    ref_backbone.load_state_dict(learner.backbone.state_dict())  # checked by the tests above
    before = _learner_params(learner, False)
    want, _, _ = _sgd_reference(ref_backbone, head, batch2, phi0s=phis, **kw)
    cold, _, _ = _sgd_reference(ref_backbone, head, batch2, **kw)
    learner.meta_step(batch2, optimizer)
    _assert_close(_learner_params(learner, False), want, before)
    diff = max(float((w - c).abs().max()) for w, c in zip(want, cold, strict=True))
    assert diff > 1e-6  # K = 3 is far from converged: the start matters, so the test can fail


def _two_steps(cg_iters: int, warm_start_cg: bool) -> list[Tensor]:
    backbone, head, batch1 = _setup("mlp")
    batch2 = _batch((3,))
    learner = MemoryReduced(
        backbone,
        head,
        inner_solver="gd",
        inner_steps=5,
        inner_lr=0.3,
        l2=0.1,
        cg_iters=cg_iters,
        warm_start_cg=warm_start_cg,
        exact_v=False,
        chunk_size=None,
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    learner.meta_step(batch1, optimizer)
    after_first = _learner_params(learner, False)
    learner.meta_step(batch2, optimizer)
    return [*after_first, *_learner_params(learner, False)]


def test_warm_start_cg_changes_the_start_but_not_the_exact_solution() -> None:
    n_params = 2
    cold, warm = _two_steps(2, False), _two_steps(2, True)
    for a, b in zip(cold[:n_params], warm[:n_params], strict=True):  # first step: no saved v
        assert torch.equal(a, b)
    assert max(float((a - b).abs().max()) for a, b in zip(cold, warm, strict=True)) > 1e-6
    cold, warm = _two_steps(PHI_DIM, False), _two_steps(PHI_DIM, True)
    for a, b in zip(cold, warm, strict=True):  # exact CG: the start does not matter (TOL)
        torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("kind", ["mlp", "conv4"])
def test_predict_returns_the_reference_adapted_logits(kind: str) -> None:
    backbone, head, batch = _setup(kind)
    learner = MemoryReduced(backbone, head, inner_solver="gd", inner_steps=4, l2=0.1, chunk_size=3)
    logits = learner.predict(batch)
    assert logits.shape == (TASKS, N_QUERY, WAYS)
    kw = {"steps": 4, "lr": "auto", "l2": 0.1, "cg": 0, "learn_init": False}
    _, phis, _ = _reference(backbone, head, batch, **kw)
    for t, (weight, bias) in enumerate(phis):
        with torch.no_grad():
            want = backbone(batch.query_x[t]) @ weight.T + bias
        torch.testing.assert_close(logits[t], want, rtol=1e-10, atol=1e-12)  # float64


def test_the_lower_level_solution_carries_no_graph() -> None:
    """φ comes out of the solver detached from the backbone, whatever the features carry."""
    backbone, head, batch = _setup("mlp")
    for solver in ("gd", "newton"):
        learner = MemoryReduced(backbone, head, inner_solver=solver, inner_steps=5, l2=0.1)
        features = torch.stack([backbone(x) for x in batch.support_x])
        assert features.requires_grad
        phi, _ = learner.solve(learner.problem(features, batch.support_y), learner.head_start(4))
        for value in phi.values():
            assert value.grad_fn is None and not value.requires_grad


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_inner_steps() -> None:
    torch.manual_seed(0)
    model = Conv4(ways=5, in_channels=1, hidden=16, image_size=28)
    batch = TaskBatch(
        torch.randn(4, 5, 1, 28, 28),
        torch.arange(5).repeat(4, 1),
        torch.randn(4, 25, 1, 28, 28),
        torch.arange(5).repeat(4, 5),
    )
    peaks = {}
    for steps in (5, 400):
        learner = MemoryReduced(
            model.backbone, model.head, inner_solver="gd", inner_steps=steps, chunk_size=1
        )
        model.zero_grad(set_to_none=True)
        peaks[steps] = measure_peak_memory(lambda lr=learner: lr.compute_meta_gradient(batch))
    assert peaks[5] > 0
    # The K inner steps keep no graph: 80× more steps, same peak within 2% (a graph kept through
    # the steps grows it by about 0.03% a step here, 12% over the 395 extra steps).
    assert peaks[400] == pytest.approx(peaks[5], rel=0.02)


class _FailsOnSecondCall(nn.Module):
    """A backbone that raises on its second call (the second chunk of a batch)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        if self.calls == 3:  # support and query of chunk 1 pass; chunk 2 fails
            raise RuntimeError("planted failure")
        return self.inner(x)


def test_a_batch_that_fails_part_way_leaves_no_warm_start_behind() -> None:
    backbone, head, batch = _setup("conv4")
    learner = MemoryReduced(
        _FailsOnSecondCall(backbone), head, l2=0.1, warm_start_head=True, chunk_size=2
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    with pytest.raises(RuntimeError, match="planted"):
        learner.meta_step(batch, optimizer)
    assert learner.slots.pending == [] and learner.slots.heads is None
    learner.meta_step(batch, optimizer)  # the next batch starts cleanly: slots 0..3, not 2..5
    assert learner.slots.heads["weight"].shape[0] == TASKS
    learner.reset_state()
    assert learner.slots.heads is None and learner.slots.pending == []


def test_non_finite_features_skip_the_step_before_any_linear_algebra() -> None:
    backbone, head, batch = _setup("conv4")
    bad = TaskBatch(batch.support_x * float("nan"), batch.support_y, batch.query_x, batch.query_y)
    for solver in ("newton", "gd"):
        learner = MemoryReduced(backbone, head, inner_solver=solver, l2=0.1, inner_steps=3)
        before = _learner_params(learner, False)
        stats = learner.meta_step(bad, torch.optim.SGD(learner.meta_parameters(), lr=ETA))
        assert stats.skipped
        for a, b in zip(before, _learner_params(learner, False), strict=True):
            assert torch.equal(a, b)


def test_meta_step_names_the_expected_batch_type() -> None:
    backbone, head, batch = _setup("mlp")
    learner = MemoryReduced(backbone, head, l2=0.1)
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    with pytest.raises(TypeError, match="TaskBatch.*got dict"):
        fields = dict(zip(("sx", "sy", "qx", "qy"), batch.fields(), strict=True))
        learner.meta_step(fields, optimizer)


@pytest.mark.parametrize("chunk_size", [1, 2])
def test_warm_starts_come_from_the_same_slot_of_the_previous_batch(
    chunk_size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Chunk k's CG start is slot k's previous v and its φ start slot k's previous φ (a wrong
    slot offset changes no loss much, so it is checked here directly)."""
    from mrmeta.algorithms import memory_reduced as module

    calls: list[tuple[dict | None, dict]] = []
    original_solve = MemoryReduced.solve

    def recording_solve(self, problem, start):  # noqa: ANN001, ANN202
        phi, report = original_solve(self, problem, start)
        calls.append(("solve", {k: v.clone() for k, v in start.items()}))
        return phi, report

    def recording_hypergradient(problem, phi, query, labels, *, v0, **kw):  # noqa: ANN001, ANN003, ANN202
        calls.append(("v0", None if v0 is None else {k: v.clone() for k, v in v0.items()}))
        return original(problem, phi, query, labels, v0=v0, **kw)

    original = module.head_hypergradient
    monkeypatch.setattr(module, "head_hypergradient", recording_hypergradient)
    monkeypatch.setattr(MemoryReduced, "solve", recording_solve)
    backbone, head, batch = _setup("mlp")
    learner = MemoryReduced(
        backbone,
        head,
        inner_solver="gd",
        inner_steps=2,
        inner_lr=0.3,
        l2=0.1,
        cg_iters=1,
        warm_start_head=True,
        warm_start_cg=True,
        exact_v=False,
        chunk_size=chunk_size,
    )
    optimizer = torch.optim.SGD(learner.meta_parameters(), lr=ETA)
    learner.meta_step(batch, optimizer)
    previous_heads, previous_vs = learner.slots.heads, learner.slots.vs
    calls.clear()
    learner.meta_step(_batch((3,)), optimizer)
    starts = [c for kind, c in calls if kind == "solve"]
    v0s = [c for kind, c in calls if kind == "v0"]
    assert len(starts) == len(v0s) == TASKS // chunk_size
    for k, (start, v0) in enumerate(zip(starts, v0s, strict=True)):
        slots = slice(k * chunk_size, (k + 1) * chunk_size)
        for name in start:
            assert torch.equal(start[name], previous_heads[name][slots])
            assert torch.equal(v0[name], previous_vs[name][slots])
