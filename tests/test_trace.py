"""trace(): exact, Hutchinson, Hutch++, XTrace on matrices with known spectra (float64)."""

import json
import math

import pytest
import torch

from nethessian.errors import InputError, NonFiniteError
from nethessian.linalg._operator import as_operator
from nethessian.linalg._trace import TraceEstimate, _xtrace_table, trace
from nethessian._params import ParamLayout
from helpers import Blocked, NaNAfter, sym

METHODS = ["hutchinson", "hutch++", "xtrace"]


LAYOUT = ParamLayout(("a", "b"), ((3, 4), (5,)))


@pytest.fixture(scope="module")
def spread():
    """Full-rank, indefinite spectrum: Hutchinson's home ground."""
    return sym(torch.linspace(-1.0, 3.0, 100), seed=1)


@pytest.fixture(scope="module")
def low_rank_plus_noise():
    g = torch.Generator().manual_seed(5)
    lam = torch.cat([torch.linspace(10, 100, 10), 0.1 * torch.rand(190, generator=g)])
    return sym(lam, seed=2)


def test_exact_equals_torch_trace(spread):
    for chunk in (None, 1, 7):
        est = trace(spread, exact=True, chunk_size=chunk)
        assert est.value == pytest.approx(float(torch.trace(spread)), rel=1e-13, abs=1e-12)
        assert (est.stderr, est.num_matvecs, est.method, est.blocks) == (0.0, 100, "exact", None)


@pytest.mark.parametrize("method", METHODS)
def test_unbiased_with_honest_stderr(spread, method):
    true = float(torch.trace(spread))
    runs = [trace(spread, method=method, num_matvecs=30, seed=s) for s in range(200)]
    err = torch.tensor([r.value - true for r in runs])
    covered = sum(abs(r.value - true) <= 2 * r.stderr for r in runs) / len(runs)
    assert 0.85 <= covered <= 0.99, covered
    assert abs(float(err.mean())) <= 4 * float(err.std()) / math.sqrt(len(runs))
    assert all(r.num_matvecs == 30 and r.method == method for r in runs)


def test_hutchinson_stderr_matches_its_variance(spread):
    # Var(zᵀAz) = 2 Σ_{i≠j} A_ij² for Rademacher z
    var = 2 * float(spread.square().sum() - spread.diagonal().square().sum())
    se = torch.tensor([trace(spread, method="hutchinson", num_matvecs=30, seed=s).stderr for s in range(100)])
    assert float(se.square().mean()) == pytest.approx(var / 30, rel=0.1)


def test_hutchpp_beats_hutchinson_and_xtrace_at_least_as_good(low_rank_plus_noise):
    true = float(torch.trace(low_rank_plus_noise))

    def mse(method, seeds):
        return (
            sum(
                (trace(low_rank_plus_noise, method=method, num_matvecs=60, seed=s).value - true) ** 2
                for s in range(seeds)
            )
            / seeds
        )

    hutch, hpp, xtr = mse("hutchinson", 50), mse("hutch++", 200), mse("xtrace", 200)
    assert hpp < hutch / 1000  # measured: 1.2e3 vs 1.8e-2 (400 seeds)
    assert xtr < hpp  # measured: 9.6e-3 vs 1.8e-2


def test_xtrace_downdating_matches_leave_one_out():
    """The QR-downdating formulas equal n separate QRs of A Ω_{-i}."""
    P, n = 40, 8
    A = sym(torch.linspace(-2.0, 5.0, P), seed=3)
    g = torch.Generator().manual_seed(4)
    Om = torch.randn(P, n, generator=g, dtype=torch.float64)
    Om = Om * math.sqrt(P) / Om.norm(dim=0)
    Y = A @ Om
    Q, R = torch.linalg.qr(Y)
    fast = _xtrace_table(as_operator(A), Om, Y, Q, R, A @ Q).sum(dim=0)
    for i in range(n):
        Qi = torch.linalg.qr(torch.cat([Y[:, :i], Y[:, i + 1 :]], dim=1)).Q
        r = Om[:, i] - Qi @ (Qi.T @ Om[:, i])
        slow = torch.trace(Qi.T @ A @ Qi) + (P - n + 1) / r.square().sum() * (r @ A @ r)
        assert float(fast[i]) == pytest.approx(float(slow), rel=1e-10)


def test_closed_forms():
    D = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    est = trace(D, method="hutchinson", num_matvecs=5)
    assert (est.value, est.stderr) == (55.0, 0.0)  # zᵀDz = tr D for sign vectors
    L = sym([5.0, 3.0, 1.0] + [0.0] * 27, seed=6)  # rank 3: the sketches capture it
    for method in ("hutch++", "xtrace"):
        est = trace(L, method=method, num_matvecs=30)
        assert est.value == pytest.approx(9.0, abs=1e-10) and est.stderr < 1e-10
    small = sym([1.0, 2.0, 3.0, 4.0, 5.0], seed=7)  # a sketch larger than P spans everything
    for method in ("hutch++", "xtrace"):
        est = trace(small, method=method, num_matvecs=30)
        assert est.value == pytest.approx(15.0, abs=1e-10) and est.stderr < 1e-10


def test_matvec_counts():
    A = sym(torch.linspace(0.0, 1.0, 20), seed=8)
    assert trace(A, method="hutchinson", num_matvecs=7).num_matvecs == 7
    assert trace(A, method="hutch++", num_matvecs=10).num_matvecs == 10  # k=3, g=4
    assert trace(A, method="xtrace", num_matvecs=11).num_matvecs == 10  # ⌊11/2⌋ · 2


def test_chunking_changes_nothing(spread):
    for method in METHODS:
        a = trace(spread, method=method, num_matvecs=24, seed=3)
        b = trace(spread, method=method, num_matvecs=24, seed=3, chunk_size=5)
        assert a.value == pytest.approx(b.value, rel=1e-12) and a.stderr == pytest.approx(b.stderr, rel=1e-9)


@pytest.mark.parametrize("method,least_coverage", [("hutchinson", 0.88), ("hutch++", 0.85), ("xtrace", 0.65)])
def test_blocks_sum_to_total_and_are_unbiased(method, least_coverage):
    """24 products on P = 17: the sketches hold most of the space, which is where a
    mis-split of tr(P_B A) between the sketch and the residual shows up as bias.
    XTrace's error estimate (std of its correlated exchangeable terms / √n) is
    optimistic when n is close to P, for the total as for the blocks."""
    M = sym(torch.linspace(-1.0, 3.0, 17) + torch.arange(17.0) % 3, seed=9)
    op = Blocked(M, LAYOUT)
    true = {"a": float(torch.trace(M[:12, :12])), "b": float(torch.trace(M[12:, 12:]))}
    runs = [trace(op, method=method, num_matvecs=24, seed=s, by_block=True) for s in range(600)]
    for r in runs[:20]:
        assert sum(b.value for b in r.blocks.values()) == pytest.approx(r.value, rel=1e-12, abs=1e-12)
        assert all(b.num_matvecs == r.num_matvecs and b.method == method for b in r.blocks.values())
    for name in ("a", "b"):
        vals = torch.tensor([r.blocks[name].value for r in runs])
        assert abs(float(vals.mean()) - true[name]) <= 4 * float(vals.std()) / math.sqrt(len(runs))
        covered = sum(abs(r.blocks[name].value - true[name]) <= 2 * r.blocks[name].stderr for r in runs) / len(runs)
        assert least_coverage <= covered <= 0.99, (name, covered)


def test_exact_blocks_are_block_traces():
    M = sym(torch.arange(17.0), seed=10)
    est = trace(Blocked(M, LAYOUT), exact=True, by_block=True)
    assert est.blocks["a"].value == pytest.approx(float(torch.trace(M[:12, :12])), rel=1e-13)
    assert est.blocks["b"].value == pytest.approx(float(torch.trace(M[12:, 12:])), rel=1e-13)
    assert est.blocks["a"].stderr == 0.0 and est.value == pytest.approx(136.0, rel=1e-13)
    json.dumps(est.to_dict())
    assert set(est.to_dict()["blocks"]) == {"a", "b"}


def test_float32_operator():
    M64 = sym(torch.linspace(0.0, 10.0, 50), seed=11)
    M = M64.float()
    true = float(torch.trace(M64))
    assert trace(M, exact=True).value == pytest.approx(true, rel=1e-5)
    for method in METHODS:
        est = trace(M, method=method, num_matvecs=60)
        assert isinstance(est.value, float) and math.isfinite(est.stderr)
        assert abs(est.value - true) <= 5 * est.stderr + 1e-3 * abs(true)


def test_nan_mid_run_raises():
    M = sym(torch.linspace(0.0, 1.0, 10), seed=12)
    for method in METHODS:
        with pytest.raises(NonFiniteError, match="NaN"):
            trace(NaNAfter(M, 2), method=method, num_matvecs=12, chunk_size=4)
    with pytest.raises(NonFiniteError):
        trace(NaNAfter(M, 3), exact=True, chunk_size=2)


def test_bad_inputs():
    A = torch.eye(6, dtype=torch.float64)
    with pytest.raises(InputError, match="'hutchinson', 'hutch\\+\\+', 'xtrace'"):
        trace(A, method="hutch")
    for method, least in (("hutchinson", 2), ("hutch++", 4), ("xtrace", 4)):
        with pytest.raises(InputError, match=f">= {least}"):
            trace(A, method=method, num_matvecs=least - 1)
    with pytest.raises(InputError, match="layout"):
        trace(A, by_block=True)
    with pytest.raises(InputError, match="square"):
        trace(torch.ones(3, 4))
    with pytest.raises(InputError, match="chunk_size"):
        trace(A, method="hutchinson", num_matvecs=4, chunk_size=0)


def test_result_contract_and_progress(capsys):
    est = trace(torch.eye(5, dtype=torch.float64), num_matvecs=6, progress=True)
    assert isinstance(est, TraceEstimate)
    with pytest.raises(Exception):
        est.value = 1.0  # frozen
    assert json.loads(json.dumps(est.to_dict()))["method"] == "hutch++"
    assert "trace" in capsys.readouterr().err


def test_no_symmetry_needed():
    g = torch.Generator().manual_seed(13)
    A = torch.randn(30, 30, generator=g, dtype=torch.float64) + torch.diag(torch.arange(30.0, dtype=torch.float64))
    true = float(torch.trace(A))
    for method in METHODS:
        vals = torch.tensor([trace(A, method=method, num_matvecs=20, seed=s).value for s in range(300)])
        assert abs(float(vals.mean()) - true) <= 4 * float(vals.std()) / math.sqrt(300), method
