"""CG and MINRES against an independent dense reference (torch.linalg.solve, float64)."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch

from nethessian.errors import InputError, NetHessianError, NonFiniteError, NotConvergedError
from nethessian.linalg._solve import SolveResult, inverse_hvp, solve
from nethessian._params import ParamLayout

D64 = torch.float64


def sym_from_eigs(eigs, seed=0, dtype=D64):
    g = torch.Generator().manual_seed(seed)
    n = len(eigs)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=D64))
    A = Q @ torch.diag(torch.as_tensor(eigs, dtype=D64)) @ Q.T
    return ((A + A.T) / 2).to(dtype)


def spd(n, cond, seed=0):
    return sym_from_eigs(torch.logspace(0, math.log10(cond), n, dtype=D64), seed)


def indefinite(n, seed=0):
    g = torch.Generator().manual_seed(seed + 100)
    mag = torch.logspace(-1, 1, n, dtype=D64)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).to(D64)
    return sym_from_eigs(mag * sign, seed)


def rhs(n, seed=1, dtype=D64):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=D64).to(dtype)


def true_rel(A, x, b, damping=0.0):
    A, x, b = A.double(), x.double(), b.double()
    return float((b - A @ x - damping * x).norm() / b.norm())


def rel_err(x, ref):
    return float((x.double() - ref).norm() / ref.norm())


class Wrapped:
    """A non-tensor operator: only shape, dtype, device, @ (and optionally a layout)."""

    def __init__(self, A, layout=None):
        self.A, self.shape, self.dtype, self.device = A, tuple(A.shape), A.dtype, A.device
        if layout is not None:
            self.layout = layout

    def __matmul__(self, v):
        return self.A @ v


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("cond", [1.0, 1e2, 1e4, 1e6])
@pytest.mark.parametrize("method", ["cg", "minres"])
def test_spd_matches_dense_solve(cond, method):
    A, b = spd(40, cond), rhs(40)
    tol = 1e-12 if cond <= 1e4 else 1e-10  # ~ the attainable accuracy, eps * cond, in float64
    res = solve(A, b, method=method, tol=tol)
    ref = torch.linalg.solve(A, b)
    assert res.converged and res.status == "converged"
    assert res.x.shape == (40,) and res.x.dtype == D64
    assert rel_err(res.x, ref) <= min(10 * cond * tol, 1e-9)  # forward error <= cond * residual
    assert res.final_residual == pytest.approx(true_rel(A, res.x, b), rel=1e-6, abs=1e-15)
    assert res.final_residual <= tol
    assert len(res.residuals) == res.iterations + 1 and res.residuals.dtype == D64
    assert res.residuals[0] == 1.0  # x0 = 0
    assert res.num_matvecs >= res.iterations + 1  # one product per iteration + the final true check


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_damping_shifts_singular_psd(method):
    eigs = torch.cat([torch.zeros(5, dtype=D64), torch.linspace(1, 5, 25, dtype=D64)])
    A, b = sym_from_eigs(eigs, 3), rhs(30)
    res = solve(A, b, damping=0.5, method=method, tol=1e-12)
    ref = torch.linalg.solve(A + 0.5 * torch.eye(30, dtype=D64), b)
    assert res.converged and res.damping == 0.5
    assert rel_err(res.x, ref) < 1e-10
    assert true_rel(A, res.x, b, 0.5) < 1e-11


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_minres_indefinite_matches_dense_solve(seed):
    A, b = indefinite(50, seed), rhs(50, seed)
    res = solve(A, b, method="minres", tol=1e-12)
    assert res.converged, res.message
    assert rel_err(res.x, torch.linalg.solve(A, b)) < 1e-9
    assert true_rel(A, res.x, b) <= 1e-12


def test_minres_residual_history_monotone_and_honest():
    A, b = indefinite(60, 4), rhs(60, 4)
    seen = []
    res = solve(A, b, method="minres", tol=1e-10, callback=lambda k, x, r: seen.append((x, r)))
    h = res.residuals
    assert torch.all(h[1:] <= h[:-1]), h
    # the estimate phibar_k / ||b|| is the true residual of the k-th iterate (up to rounding)
    for x, r in seen[:: max(1, len(seen) // 8)]:
        assert r == pytest.approx(true_rel(A, x, b), rel=1e-6, abs=1e-13)


def test_minres_singular_consistent_and_inconsistent():
    A = torch.diag(torch.tensor([1.0, 2.0, 0.0], dtype=D64))
    ok = solve(A, torch.tensor([1.0, 1.0, 0.0], dtype=D64), method="minres", tol=1e-12)
    assert ok.converged and torch.allclose(ok.x, torch.tensor([1.0, 0.5, 0.0], dtype=D64))
    with pytest.warns(UserWarning, match="singular"):
        bad = solve(A, torch.tensor([1.0, 1.0, 1.0], dtype=D64), method="minres", tol=1e-12)
    assert bad.status == "breakdown" and not bad.converged
    # the least-squares part is still right and the residual reported is the true one
    assert torch.allclose(bad.x[:2], torch.tensor([1.0, 0.5], dtype=D64))
    assert bad.final_residual == pytest.approx(1 / math.sqrt(3), rel=1e-9)
    assert "damping" in bad.message


@pytest.mark.parametrize("method", ["cg", "minres"])
@pytest.mark.parametrize("a_scale, b_scale", [(1e-3, 1e10), (1e8, 1e-9), (1e-6, 1e12)])
def test_scale_invariance(method, a_scale, b_scale):
    A, b = (spd(30, 1e2, 17) if method == "cg" else indefinite(30, 17)), rhs(30, 17)
    base = solve(A, b, method=method, tol=1e-10)
    res = solve(a_scale * A, b_scale * b, method=method, tol=1e-10)
    assert res.converged, res.message
    assert res.iterations == pytest.approx(base.iterations, abs=2)
    assert rel_err(res.x * a_scale / b_scale, base.x) < 1e-8


def test_zero_operator_is_reported():
    Z, b = torch.zeros(4, 4, dtype=D64), rhs(4)
    with pytest.warns(UserWarning, match="singular"):
        assert solve(Z, b, method="minres").status == "breakdown"
    with pytest.warns(UserWarning, match="non-positive curvature"):
        assert solve(Z, b).status == "negative_curvature"


# ------------------------------------------------------------ negative curvature


def test_cg_indefinite_stops_with_negative_curvature():
    A, b = indefinite(30, 5), rhs(30, 5)
    iterates = []
    with pytest.warns(UserWarning, match="minres"):
        res = solve(A, b, tol=1e-12, callback=lambda k, x, r: iterates.append(x))
    assert res.status == "negative_curvature" and not res.converged
    d = res.curvature_direction
    assert d is not None and d.shape == (30,) and float(d.norm()) == pytest.approx(1.0)
    assert float(d @ A @ d) <= 0
    assert "damping" in res.message and "not positive definite" in res.message
    # x is the last iterate before the bad direction, with its true residual reported
    last = iterates[-1] if iterates else torch.zeros(30, dtype=D64)
    assert torch.equal(res.x, last) and len(iterates) == res.iterations
    assert res.final_residual == pytest.approx(true_rel(A, res.x, b), rel=1e-9)
    assert res.num_matvecs == res.iterations + 2  # the detecting product + the true residual


def test_negative_damping_makes_cg_detect_indefiniteness():
    A, b = sym_from_eigs(torch.linspace(1, 10, 20, dtype=D64), 6), rhs(20, 6)
    assert float(torch.linalg.eigvalsh(A)[0]) == pytest.approx(1.0)
    with pytest.warns(UserWarning):
        res = solve(A, b, damping=-2.0)
    assert res.status == "negative_curvature"
    d = res.curvature_direction
    assert float(d @ A @ d - 2.0 * d @ d) <= 0
    # MINRES solves the same shifted (indefinite, non-singular) system
    ok = solve(A, b, damping=-2.0, method="minres", tol=1e-12)
    assert ok.converged
    assert rel_err(ok.x, torch.linalg.solve(A - 2 * torch.eye(20, dtype=D64), b)) < 1e-9


def test_zero_curvature_is_caught():
    A = torch.diag(torch.tensor([1.0, 0.0], dtype=D64))
    with pytest.warns(UserWarning):
        res = solve(A, torch.tensor([0.0, 1.0], dtype=D64))
    assert res.status == "negative_curvature" and res.iterations == 0
    assert torch.equal(res.x, torch.zeros(2, dtype=D64))


# ------------------------------------------------------------- stopping rules


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_maxiter_flag_warning_and_honest_residual(method):
    A, b = spd(40, 1e4, 7), rhs(40, 7)
    with pytest.warns(UserWarning, match="maxiter") as rec:
        res = solve(A, b, method=method, maxiter=5)
    assert res.status == "maxiter" and not res.converged and res.iterations == 5
    assert len(res.residuals) == 6
    honest = true_rel(A, res.x, b)
    assert res.final_residual == pytest.approx(honest, rel=1e-9)
    assert f"{honest:.3e}" in str(rec[0].message) and res.message == str(rec[0].message)
    assert res.final_residual > 1e-6


def test_default_maxiter_is_bounded():
    A, b = spd(12, 1e3, 8), rhs(12, 8)
    with pytest.warns(UserWarning, match="maxiter = 120"):
        res = solve(A, b, tol=0.0)  # unreachable: runs to the default 10 * P
    assert res.iterations == 120


def test_tolerance_below_attainable_accuracy_is_reported():
    A, b = spd(30, 1e3, 9), rhs(30, 9)
    with pytest.warns(UserWarning):
        res = solve(A.float(), b.float(), tol=1e-13)
    assert not res.converged and res.status in ("breakdown", "maxiter")
    # the reported residual is computed in float32: honest up to float32 rounding of b - A x
    slack = (
        4 * torch.finfo(torch.float32).eps * float(torch.linalg.matrix_norm(A, 2) * res.x.double().norm() / b.norm())
    )
    assert res.final_residual == pytest.approx(true_rel(A.float(), res.x, b.float()), abs=slack)
    assert res.final_residual > 1e-13


def test_x0_is_honoured():
    A, b = spd(30, 1e2, 10), rhs(30, 10)
    ref = torch.linalg.solve(A, b)
    exact = solve(A, b, x0=ref, tol=1e-10)
    assert exact.converged and exact.iterations == 0 and exact.num_matvecs == 1
    assert torch.equal(exact.x, ref)
    x0 = ref + 1e-3 * rhs(30, 11)
    res = solve(A, b, x0=x0, tol=1e-12)
    assert res.residuals[0] == pytest.approx(true_rel(A, x0, b), rel=1e-12)
    assert res.residuals[0] < 0.1 and res.converged
    assert rel_err(res.x, ref) < 1e-9


def test_callback_called_every_iteration():
    A, b = spd(25, 1e2, 12), rhs(25, 12)
    calls = []
    res = solve(A, b, tol=1e-10, callback=lambda k, x, r: calls.append((k, x.clone(), r)))
    assert [c[0] for c in calls] == list(range(1, res.iterations + 1))
    assert torch.equal(calls[-1][1], res.x)
    assert [c[2] for c in calls] == res.residuals[1:].tolist()


def test_zero_rhs_gives_zero_without_products():
    A = spd(10, 10.0)
    res = solve(A, torch.zeros(10, dtype=D64), x0=torch.ones(10, dtype=D64))
    assert res.converged and res.num_matvecs == 0 and res.iterations == 0
    assert torch.equal(res.x, torch.zeros(10, dtype=D64))


# ------------------------------------------------------- dtypes and operators


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_float32_operator(method):
    A, b = spd(40, 1e2, 13), rhs(40, 13)
    res = solve(A.float(), b, method=method, tol=1e-5)
    assert res.converged and res.x.dtype == torch.float32
    assert res.residuals.dtype == D64
    assert rel_err(res.x, torch.linalg.solve(A, b)) < 1e-3


def test_non_tensor_operator_and_named_rhs():
    lay = ParamLayout(("a", "b"), ((3, 4), (5,)))
    A, b = spd(17, 1e2, 14), rhs(17, 14)
    op = Wrapped(A, lay)
    res = solve(op, lay.unflatten(b), tol=1e-12)
    assert res.converged and res.x.shape == (17,)
    assert rel_err(res.x, torch.linalg.solve(A, b)) < 1e-10
    assert res.num_matvecs == res.iterations + 1
    x0 = {"a": torch.zeros(3, 4, dtype=D64), "b": torch.zeros(5, dtype=D64)}
    assert solve(op, lay.unflatten(b), x0=x0, method="minres", tol=1e-12).converged
    assert torch.allclose(inverse_hvp(op, lay.unflatten(b)), res.x, atol=1e-9)
    assert solve(Wrapped(A), b, tol=1e-12).converged  # no layout: flat is fine


def test_to_dict_is_json():
    A = spd(6, 10.0)
    d = solve(A, rhs(6)).to_dict()
    json.dumps(d)
    assert d["status"] == "converged" and len(d["x"]) == 6 and d["curvature_direction"] is None
    with pytest.warns(UserWarning):
        d = solve(indefinite(6), rhs(6)).to_dict()
    json.dumps(d)


# ------------------------------------------------------------------ inverse_hvp


def test_inverse_hvp_matches_and_does_not_warn():
    A, v = spd(20, 1e3, 15), rhs(20, 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x = inverse_hvp(A, v, damping=0.1)
    assert rel_err(x, torch.linalg.solve(A + 0.1 * torch.eye(20, dtype=D64), v)) < 1e-7


def test_inverse_hvp_raises_when_not_converged():
    A, v = indefinite(20, 16), rhs(20, 16)
    with pytest.raises(NotConvergedError, match="negative_curvature") as exc:
        inverse_hvp(A, v)
    msg = str(exc.value)
    assert "damping" in msg and "minres" in msg and "residual" in msg
    assert isinstance(exc.value.result, SolveResult)
    with pytest.raises(NetHessianError, match="maxiter"):
        inverse_hvp(spd(20, 1e4), v, maxiter=3)
    assert torch.allclose(inverse_hvp(A, v, method="minres"), torch.linalg.solve(A, v), atol=1e-6)


# ------------------------------------------------------------------ bad input


def test_bad_inputs_have_helpful_messages():
    A, b = spd(12, 10.0), rhs(12)
    nan_b = b.clone()
    nan_b[[2, 5]] = float("nan")
    with pytest.raises(NonFiniteError, match="b contains NaN or Inf"):
        solve(A, nan_b)
    with pytest.raises(InputError, match=r"7 entries .* P = 12"):
        solve(A, b[:7])
    with pytest.raises(InputError, match=r"shape \(12,\)"):
        solve(A, b[:, None])
    with pytest.raises(InputError, match="'cg', 'minres'"):
        solve(A, b, method="gmres")
    with pytest.raises(InputError, match="tol"):
        solve(A, b, tol=-1e-6)
    for bad in (float("nan"), float("inf")):
        with pytest.raises(InputError, match="damping"):
            solve(A, b, damping=bad)
    with pytest.raises(InputError, match="maxiter"):
        solve(A, b, maxiter=-1)
    with pytest.raises(InputError, match="x0 has 3 entries"):
        solve(A, b, x0=torch.zeros(3, dtype=D64))
    with pytest.raises(NonFiniteError, match="x0 contains NaN or Inf"):
        solve(A, b, x0=torch.full((12,), float("nan"), dtype=D64).where(torch.arange(12) == 0, 0.0))
    with pytest.raises(InputError, match="no .layout"):
        solve(A, {"a": b})
    with pytest.raises(InputError, match="callable"):
        solve(A, b, callback=3)
    lay = ParamLayout(("a", "b"), ((3, 4), (5,)))
    with pytest.raises(InputError, match="missing parameter 'b'"):
        solve(Wrapped(spd(17, 10.0), lay), {"a": torch.zeros(3, 4, dtype=D64)})
    with pytest.raises(NonFiniteError, match="non-finite"):
        solve(A.float(), torch.full((12,), 1e300, dtype=D64))  # overflows in the operator's dtype
