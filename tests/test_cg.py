"""conjugate_gradient against dense linear algebra (torch.linalg.solve), all in float64.

The operator is a dense SPD matrix ``A`` over the concatenation of a two-key dict
(``"w"`` of shape ``(2, m)`` and ``"b"`` of shape ``(dim - 2m,)``), so the solver sees the same
parameter-dict layout as in the hypergradient while the reference is a plain matrix solve.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from mrmeta import conjugate_gradient

F64 = torch.float64


def _shapes(dim: int) -> dict[str, tuple[int, ...]]:
    m = max(dim // 4, 1)
    return {"w": (2, m), "b": (dim - 2 * m,)}


def _to_dict(vec: Tensor, shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
    """``(..., dim)`` → dict of ``(..., *shape)`` (leading dims kept, e.g. a system index)."""
    out, start = {}, 0
    for key, shape in shapes.items():
        size = math.prod(shape)
        out[key] = vec[..., start : start + size].reshape(*vec.shape[:-1], *shape)
        start += size
    return out


def _to_vec(tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
    return torch.cat([t.flatten(batch_dims) for t in tensors.values()], dim=-1)


def _spd(dim: int, cond: float, gen: torch.Generator) -> Tensor:
    """Random SPD matrix with eigenvalues log-spaced in ``[1, cond]``."""
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    eig = torch.logspace(0, math.log10(cond), dim, dtype=F64)
    a = (q * eig) @ q.T
    return (a + a.T) / 2


def _system(dim: int, cond: float, seed: int) -> tuple[Tensor, Tensor, dict, object]:
    gen = torch.Generator().manual_seed(seed)
    a = _spd(dim, cond, gen)
    b_vec = torch.randn(dim, generator=gen, dtype=F64)
    shapes = _shapes(dim)
    return a, b_vec, shapes, lambda v: _to_dict(a @ _to_vec(v), shapes)


def _rel(x: Tensor, ref: Tensor) -> float:
    return float(torch.linalg.vector_norm(x - ref) / torch.linalg.vector_norm(ref))


@pytest.mark.parametrize("dim", [5, 20, 50])
def test_matches_dense_solve_within_dim_iterations(dim: int) -> None:
    # cond 10: in float64 CG then keeps its finite termination (~1e-14 after dim steps); with
    # log-spaced eigenvalues and cond 100 rounding delays it (1e-4 left after 20 steps).
    a, b_vec, shapes, hvp = _system(dim, cond=10.0, seed=dim)
    result = conjugate_gradient(hvp, _to_dict(b_vec, shapes), iters=dim)
    assert set(result.solution) == {"w", "b"}
    assert result.solution["w"].shape == shapes["w"] and result.solution["b"].shape == shapes["b"]
    # float64: 1e-8 relative leaves a wide margin over the ~1e-14 reached.
    assert _rel(_to_vec(result.solution), torch.linalg.solve(a, b_vec)) < 1e-8
    assert result.iterations <= dim and result.breakdown is None


def test_warm_start_near_solution_needs_fewer_iterations() -> None:
    dim = 50
    a, b_vec, shapes, hvp = _system(dim, cond=1e3, seed=1)
    x_ref = torch.linalg.solve(a, b_vec)
    noise = torch.randn(dim, generator=torch.Generator().manual_seed(2), dtype=F64)
    x0 = x_ref + 1e-6 * noise * x_ref.norm() / noise.norm()
    tol = 1e-10 * float(b_vec.norm())
    b = _to_dict(b_vec, shapes)
    cold = conjugate_gradient(hvp, b, iters=5 * dim, tol=tol)
    warm = conjugate_gradient(hvp, b, _to_dict(x0, shapes), iters=5 * dim, tol=tol)
    assert cold.converged and warm.converged
    assert warm.iterations < cold.iterations
    # The warm start is used, not discarded: its first residual is ‖b − A x0‖, not ‖b‖.
    assert float(warm.residual_norms[0]) == pytest.approx(float((b_vec - a @ x0).norm()), rel=1e-8)
    # Residual ≤ 1e-10‖b‖ and ‖A⁻¹‖ = 1 ⇒ error ≤ 1e-10‖b‖; relative to x: allow 1e-8.
    assert _rel(_to_vec(warm.solution), x_ref) < 1e-8


@pytest.mark.parametrize("iters", [4, 20])
def test_batched_equals_independent_solves(iters: int) -> None:
    dim, systems = 20, 3
    gen = torch.Generator().manual_seed(3)
    mats = torch.stack([_spd(dim, cond=2.0 + 4 * t, gen=gen) for t in range(systems)])
    b_vec = torch.randn(systems, dim, generator=gen, dtype=F64)
    shapes = _shapes(dim)

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return _to_dict(torch.einsum("tij,tj->ti", mats, _to_vec(v, 1)), shapes)

    batched = conjugate_gradient(hvp, _to_dict(b_vec, shapes), iters=iters, batched=True)
    assert batched.residual_norms.shape == (batched.iterations + 1, systems)
    assert batched.solution["w"].shape == (systems, *shapes["w"])
    x_batched = _to_vec(batched.solution, 1)
    for t in range(systems):
        single = conjugate_gradient(
            lambda v, t=t: _to_dict(mats[t] @ _to_vec(v), shapes),
            _to_dict(b_vec[t], shapes),
            iters=iters,
        )
        # Same arithmetic up to summation order: 1e-10 (float64). With iters=4 no system has
        # converged, so one shared step size across systems would fail this by O(1).
        assert _rel(x_batched[t], _to_vec(single.solution)) < 1e-10
        # Residuals once converged (~1e-12) are pure rounding: absolute floor 1e-10.
        assert batched.residual_norms[:, t] == pytest.approx(
            single.residual_norms, rel=1e-10, abs=1e-10
        )
    if iters == dim:  # dim steps: every system solved (cond ≤ 10; 1e-8 relative)
        ref = torch.linalg.solve(mats, b_vec)
        assert max(_rel(x_batched[t], ref[t]) for t in range(systems)) < 1e-8


def test_batched_accepts_a_per_system_scalar_key() -> None:
    """A key of shape ``(B,)`` (one scalar per system) is a valid batched dict.

    Batched CG reduces every key over all but its first (system) axis; a 1-D key has no other
    axis, and its per-system inner products must still be the plain products ``a_t · b_t``
    (a ``flatten(1)`` there would raise IndexError). Checked on ``H_t = scale_t · I``, where one
    CG step is exact.
    """
    gen = torch.Generator().manual_seed(4)
    scale = torch.rand(3, generator=gen, dtype=F64) + 1.0  # H = diag(scale_t) on every key
    b = {
        "s": torch.randn(3, generator=gen, dtype=F64),
        "w": torch.randn(3, 2, generator=gen, dtype=F64),
    }

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"s": scale * v["s"], "w": scale[:, None] * v["w"]}

    result = conjugate_gradient(hvp, b, iters=3, batched=True)
    # H_t is a multiple of the identity: CG is exact after one step (float64: 1e-12).
    torch.testing.assert_close(result.solution["s"], b["s"] / scale, rtol=1e-12, atol=0)
    torch.testing.assert_close(result.solution["w"], b["w"] / scale[:, None], rtol=1e-12, atol=0)


def test_breakdown_on_negative_curvature_is_reported_without_nan() -> None:
    dim = 20
    gen = torch.Generator().manual_seed(5)
    shapes = _shapes(dim)
    b = _to_dict(torch.randn(dim, generator=gen, dtype=F64), shapes)
    negative = -_spd(dim, cond=10.0, gen=gen)  # pᵀAp < 0 at the very first step
    result = conjugate_gradient(lambda v: _to_dict(negative @ _to_vec(v), shapes), b, iters=dim)
    assert isinstance(result.breakdown, str) and "curvature" in result.breakdown
    assert not result.converged and result.iterations == 0
    assert torch.equal(_to_vec(result.solution), torch.zeros(dim, dtype=F64))

    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=F64))
    eig = torch.linspace(-1.0, 1.0, dim, dtype=F64) + 0.05  # indefinite, non-singular
    indefinite = (q * eig) @ q.T
    result = conjugate_gradient(lambda v: _to_dict(indefinite @ _to_vec(v), shapes), b, iters=dim)
    assert isinstance(result.breakdown, str)
    assert not result.converged and result.iterations < dim
    assert len(result.residual_norms) == result.iterations + 1
    assert torch.isfinite(_to_vec(result.solution)).all()
    assert torch.isfinite(result.residual_norms).all()


def test_non_finite_operator_is_reported_without_nan() -> None:
    gen = torch.Generator().manual_seed(6)
    b = {"w": torch.randn(2, 3, generator=gen, dtype=F64)}
    result = conjugate_gradient(lambda v: {"w": v["w"] * float("nan")}, b, iters=5)
    assert isinstance(result.breakdown, str) and "non-finite" in result.breakdown
    assert not result.converged and torch.isfinite(result.solution["w"]).all()


def test_tol_stops_early_and_reports_true_residuals() -> None:
    dim = 50
    a, b_vec, shapes, hvp = _system(dim, cond=10.0, seed=7)
    tol = 1e-6 * float(b_vec.norm())
    result = conjugate_gradient(hvp, _to_dict(b_vec, shapes), iters=dim, tol=tol)
    assert result.converged and result.breakdown is None
    assert 0 < result.iterations < dim  # cond 10: about 15 steps for 1e-6
    norms = result.residual_norms
    assert norms.shape == (result.iterations + 1,)
    assert float(norms[-1]) <= tol < float(norms[-2])  # stopped at the first step under tol
    assert float(result.residual) == float(norms[-1])
    assert float(norms[0]) == pytest.approx(float(b_vec.norm()), rel=1e-12)
    # The recursive residual tracks the true one ‖b − A x‖ (float64, 15 steps: 1e-10 · ‖b‖).
    true = float((b_vec - a @ _to_vec(result.solution)).norm())
    assert true == pytest.approx(float(norms[-1]), abs=1e-10 * float(b_vec.norm()))


def test_fixed_budget_runs_every_iteration_and_residual_decreases_overall() -> None:
    dim, iters = 50, 12
    _, b_vec, shapes, hvp = _system(dim, cond=100.0, seed=8)
    result = conjugate_gradient(hvp, _to_dict(b_vec, shapes), iters=iters)
    assert result.iterations == iters and not result.converged and result.breakdown is None
    norms = result.residual_norms
    assert norms.shape == (iters + 1,)
    assert torch.isfinite(norms).all()
    # The 2-norm of the CG residual need not fall at every step (CG minimises the A-norm of the
    # error), so check the trend: each block of 4 steps ends lower than it started.
    assert all(float(norms[i + 4]) < float(norms[i]) for i in range(0, iters - 3, 4))
    assert float(norms[-1]) < 0.5 * float(norms[0])


def test_batched_breakdown_freezes_only_the_failing_system() -> None:
    """One indefinite and one SPD system solved together: the SPD one still converges
    (to 1e-10 of the dense solve, float64) and ``failed`` names the other."""
    gen = torch.Generator().manual_seed(11)
    dim = 6
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=torch.float64))
    indefinite = q @ torch.diag(torch.linspace(-1.0, 2.0, dim, dtype=torch.float64)) @ q.T
    m = torch.randn(dim, dim, generator=gen, dtype=torch.float64)
    spd = m @ m.T + dim * torch.eye(dim, dtype=torch.float64)
    mats = torch.stack([indefinite, spd])
    rhs = torch.randn(2, dim, generator=gen, dtype=torch.float64)
    out = conjugate_gradient(
        lambda v: {"x": torch.einsum("bij,bj->bi", mats, v["x"])},
        {"x": rhs},
        iters=3 * dim,
        batched=True,
    )
    assert out.breakdown is not None and "not positive definite" in out.breakdown
    assert out.failed.tolist() == [True, False]
    assert torch.isfinite(out.solution["x"]).all()
    expected = torch.linalg.solve(spd, rhs[1])
    assert torch.allclose(out.solution["x"][1], expected, rtol=1e-10, atol=1e-10)


def _diag_hvp(calls: list[dict[str, Tensor]]) -> object:
    """``H = 2 I`` on the dict ``{"w": (2, 3), "b": (3,)}``, recording every argument."""

    def hvp(v: dict[str, Tensor]) -> dict[str, Tensor]:
        calls.append(v)
        return {k: 2.0 * t for k, t in v.items()}

    return hvp


def _rhs(batch: tuple[int, ...] = ()) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(12)
    return {
        "w": torch.randn(*batch, 2, 3, generator=gen, dtype=F64),
        "b": torch.randn(*batch, 3, generator=gen, dtype=F64),
    }


@pytest.mark.parametrize("value, kind", [(float("nan"), "NaN"), (float("inf"), "inf")])
@pytest.mark.parametrize("where", ["b", "x0"])
def test_non_finite_b_or_x0_is_a_breakdown_naming_its_cause(
    where: str, value: float, kind: str
) -> None:
    """A NaN/inf in ``b`` or ``x0`` stops the solve before any step, says which argument, which
    key and which value, and never hands a NaN to ``hvp`` or back in the solution."""
    b, x0 = _rhs(), {k: torch.zeros_like(t) for k, t in _rhs().items()}
    (b if where == "b" else x0)["b"][1] = value
    calls: list[dict[str, Tensor]] = []
    result = conjugate_gradient(_diag_hvp(calls), b, x0, iters=5)
    assert result.breakdown is not None
    assert f"{where}['b'] holds {kind}" in result.breakdown
    assert "Hessian-vector product" not in result.breakdown  # the hvp is not to blame
    assert result.iterations == 0 and not result.converged and bool(result.failed)
    assert all(torch.isfinite(t).all() for t in result.solution.values())
    assert all(torch.isfinite(t).all() for call in calls for t in call.values())


def test_non_finite_b_of_one_system_freezes_only_that_system() -> None:
    """Batched: system 1's ``b`` holds an inf; systems 0 and 2 are solved as if alone
    (``H = 2 I``: exact after one step, float64 to 1e-12)."""
    b = _rhs((3,))
    b["w"][1, 0, 2] = float("inf")
    result = conjugate_gradient(_diag_hvp([]), b, iters=3, batched=True)
    assert result.failed.tolist() == [False, True, False]
    assert "b['w'] holds inf" in result.breakdown
    for key in b:
        torch.testing.assert_close(
            result.solution[key][[0, 2]], b[key][[0, 2]] / 2, rtol=1e-12, atol=0
        )
        assert torch.equal(result.solution[key][1], torch.zeros_like(b[key][1]))
    assert torch.isfinite(result.residual[[0, 2]]).all() and not torch.isfinite(result.residual[1])


def test_non_finite_product_at_the_warm_start_blames_the_hvp() -> None:
    b, x0 = _rhs(), _rhs()
    result = conjugate_gradient(lambda v: {k: t * float("inf") for k, t in v.items()}, b, x0)
    assert result.breakdown is not None and "Hessian-vector product H x0" in result.breakdown
    assert result.iterations == 0 and torch.isfinite(result.solution["w"]).all()


def test_wrong_shaped_or_keyed_hvp_result_names_the_argument() -> None:
    b = _rhs()
    flat = {"w": lambda v: {"w": v["w"].reshape(-1), "b": v["b"]}}
    with pytest.raises(
        ValueError, match=r"hvp\(v\) must be shaped like b .*'w': \(2, 3\).*got .*'w': \(6,\)"
    ):
        conjugate_gradient(flat["w"], b)
    with pytest.raises(
        ValueError, match=r"hvp\(v\) must have the keys of b \['b', 'w'\], got \['w'\]"
    ):
        conjugate_gradient(lambda v: {"w": v["w"]}, b)
    with pytest.raises(TypeError, match="hvp\\(v\\) must be a dict of str -> Tensor.*got Tensor"):
        conjugate_gradient(lambda v: v["w"], b)


def test_mismatched_x0_or_batch_sizes_name_the_argument() -> None:
    b = _rhs()
    with pytest.raises(
        ValueError, match=r"x0 must have the keys of b \['b', 'w'\], got \['b', 'v'\]"
    ):
        conjugate_gradient(_diag_hvp([]), b, {"v": b["w"], "b": b["b"]})
    with pytest.raises(ValueError, match=r"x0 must be shaped like b"):
        conjugate_gradient(_diag_hvp([]), b, {"w": b["w"].T, "b": b["b"]})
    with pytest.raises(TypeError, match="x0 must be a dict"):
        conjugate_gradient(_diag_hvp([]), b, b["w"])
    with pytest.raises(ValueError, match="batched=True needs every tensor of b to share"):
        conjugate_gradient(_diag_hvp([]), b, batched=True)  # first dims 2 and 3
