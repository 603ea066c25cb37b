"""linalg's defences: verified Lanczos residuals, the dense path's memory limit, checkpoints
bound to the operator and validated on load, resumable trace probes, numbers checked by _checks."""

from __future__ import annotations

import warnings

import pytest
import torch

import nethessian as nh
from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError, DenseTooLargeError, InputError
from nethessian.linalg._diagonal import diagonal
from nethessian.linalg._lanczos import eigenvalues
from nethessian.linalg._operator import NotConvergedWarning
from nethessian.linalg._solve import inverse_hvp, solve
from nethessian.linalg._trace import trace
from nethessian.linalg._density import spectral_density
from helpers import Blocked, CrashAfter, sym


def true_residuals(A, res):
    X = res.eigenvectors.double()
    return (A.double() @ X - X * res.eigenvalues).norm(dim=0)


@pytest.mark.parametrize("P,n_big,k,b", [(100, 10, 10, 1), (1000, 10, 3, 1), (60, 10, 10, 2)])
def test_ill_conditioned_float32_smallest_never_claims_a_false_residual(P, n_big, k, b):
    """Issue 9.9: eigenvalues logspace(-7, 3) (plus a 1e-7 bulk) in float32, which="smallest".
    Before: converged=True with residuals 0.0 while the true ones were ~4e-3."""
    lam = torch.cat(
        [torch.logspace(-7, 3, n_big, dtype=torch.float64), torch.full((P - n_big,), 1e-7, dtype=torch.float64)]
    )
    A = torch.diag(lam).float()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        res = eigenvalues(A, k=k, which="smallest", tol=1e-3, block_size=b, max_matvecs=600)
    true = true_residuals(A, res)
    # the reported residuals are the true ones (up to float32 rounding of one product)
    torch.testing.assert_close(res.residuals, true, rtol=0, atol=20 * 1.2e-7 * 1e3)
    if res.converged:  # a claim must hold against the float64 truth: r <= tol * max(|θ|, √eps·‖A‖)
        floor = torch.finfo(torch.float32).eps ** 0.5 * 1e3
        assert bool((true <= 1.01e-3 * torch.clamp(res.eigenvalues.abs(), min=floor)).all())


def test_verification_products_are_counted_and_within_budget():
    A = sym(torch.linspace(0.0, 1.0, 200), seed=3)
    calls = []

    class Counted(Blocked):
        def __matmul__(self, v):
            calls.append(1 if v.ndim == 1 else v.shape[1])
            return self.M @ v

    res = eigenvalues(Counted(A), k=4, tol=1e-6, max_matvecs=300)
    assert res.num_matvecs == sum(calls) <= 300 and calls[-1] == 4  # the last product verifies the 4 pairs
    torch.testing.assert_close(res.residuals, true_residuals(A, res), rtol=1e-6, atol=1e-12)


@pytest.mark.parametrize("tol", [1.0, 5.0, 0.0, -1e-3, "1e-3", float("nan")])
def test_tol_must_be_a_relative_accuracy_below_one(tol):
    with pytest.raises(InputError, match="tol"):
        eigenvalues(sym(torch.linspace(0, 1, 50)), k=2, tol=tol)


def test_dense_path_consults_the_memory_limit():
    """Issue 9.16: k >= P/2 takes the dense path; it must respect max_bytes."""
    A = sym(torch.linspace(-1, 1, 40), seed=1)
    with pytest.raises(DenseTooLargeError, match="max_bytes"):
        eigenvalues(A, k=25, max_bytes=1000)
    res = eigenvalues(A, k=25, max_bytes=40 * 40 * 8)  # exactly enough
    ref = torch.linalg.eigvalsh(A).flip(0)[:25]
    torch.testing.assert_close(res.eigenvalues, ref, rtol=0, atol=1e-12)


# ---------------------------------------------------------------- checkpoints


def _other(A):
    B = A.clone()
    B[0, 0] += 1.0
    return B


@pytest.mark.parametrize(
    "run",
    [
        lambda A, ck: eigenvalues(A, k=3, ncv=10, checkpoint=ck),
        lambda A, ck: eigenvalues(A, k=30, checkpoint=ck),  # the dense path
        lambda A, ck: diagonal(A, checkpoint=ck),
        lambda A, ck: diagonal(A, method="estimate", num_matvecs=6, checkpoint=ck),
        lambda A, ck: trace(A, method="hutchinson", num_matvecs=6, checkpoint=ck),
        lambda A, ck: trace(A, method="xtrace", num_matvecs=8, checkpoint=ck),
        lambda A, ck: spectral_density(A, num_probes=2, lanczos_steps=5, checkpoint=ck),
    ],
)
def test_a_checkpoint_of_another_operator_of_the_same_size_is_refused(tmp_path, run):
    """Issue 9.1 (API path): a checkpoint checked only size and seed, so another matrix got the old result."""
    A = sym(torch.linspace(-1, 2, 50), seed=4)
    path = tmp_path / "c.ckpt"
    run(A, Checkpoint(path, {"t": 1}, every=0))
    with pytest.raises(CheckpointError, match="operator"):
        run(_other(A), Checkpoint(path, {"t": 1}, every=0))


def _damage(path, key, value):
    blob = torch.load(path, weights_only=True)
    state = blob["state"]
    if isinstance(value, str) and value == "nan":
        state[key] = state[key].clone()
        state[key].view(-1)[0] = float("nan")
    elif value is None:
        del state[key]
    else:
        state[key] = value
    torch.save(blob, path)


@pytest.mark.parametrize("key,value", [("values", "nan"), ("done", 10**6), ("done", None), ("values", torch.zeros(3))])
def test_damaged_diagonal_checkpoint_is_a_checkpoint_error(tmp_path, key, value):
    A = sym(torch.linspace(-1, 2, 30), seed=4)
    path = tmp_path / "c.ckpt"
    diagonal(A, checkpoint=Checkpoint(path, {"t": 1}, every=0))
    _damage(path, key, value)
    with pytest.raises(CheckpointError):
        diagonal(A, checkpoint=Checkpoint(path, {"t": 1}, every=0))


@pytest.mark.parametrize(
    "key,value", [("V", "nan"), ("j", -1), ("H", torch.zeros(2, 2)), ("generator", None), ("num_matvecs", "x")]
)
def test_damaged_lanczos_checkpoint_is_a_checkpoint_error(tmp_path, key, value):
    A = sym(torch.linspace(-1, 2, 60), seed=4)
    path = tmp_path / "c.ckpt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotConvergedWarning)
        eigenvalues(A, k=3, ncv=10, tol=1e-12, max_matvecs=40, checkpoint=Checkpoint(path, {"t": 1}, every=0))
    _damage(path, key, value)
    with pytest.raises(CheckpointError):
        eigenvalues(A, k=3, ncv=10, tol=1e-12, max_matvecs=40, checkpoint=Checkpoint(path, {"t": 1}, every=0))


@pytest.mark.parametrize("key,value", [("nodes", "nan"), ("weights", torch.zeros(2, 5) - 1), ("done", 7)])
def test_damaged_density_checkpoint_is_a_checkpoint_error(tmp_path, key, value):
    A = sym(torch.linspace(-1, 2, 30), seed=4)
    path = tmp_path / "c.ckpt"
    spectral_density(A, num_probes=2, lanczos_steps=5, checkpoint=Checkpoint(path, {"t": 1}, every=0))
    _damage(path, key, value)
    with pytest.raises(CheckpointError):
        spectral_density(A, num_probes=2, lanczos_steps=5, checkpoint=Checkpoint(path, {"t": 1}, every=0))


@pytest.mark.parametrize("done", [{"sketch": 99}, {"sketch": -1}, {"sketch": True}, "7"])
def test_damaged_count_of_finished_columns_is_a_checkpoint_error(tmp_path, done):
    """A saved block's count of finished columns that does not fit the block is refused, not trusted."""
    A = sym(torch.linspace(-1, 3, 80), seed=6)
    path = tmp_path / "t.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trace(
            CrashAfter(A, 5),
            method="hutch++",
            num_matvecs=21,
            chunk_size=4,
            checkpoint=Checkpoint(path, {"t": 1}, every=0),
        )
    ck = Checkpoint(path, {"t": 1}, every=0)
    state = ck.load()
    ck.save({**state, "done": done}, force=True)  # a consistent file (checksum rewritten) with a bad count
    with pytest.raises(CheckpointError, match="finished columns"):
        trace(
            CrashAfter(A, 10**6),
            method="hutch++",
            num_matvecs=21,
            chunk_size=4,
            checkpoint=Checkpoint(path, {"t": 1}, every=0),
        )


@pytest.mark.parametrize(
    "method,m,crash",
    # hutch++ at 5: killed inside its sketch (a block kept whole, saved with its count of finished columns)
    [("hutchinson", 20, 9), ("hutch++", 21, 10), ("hutch++", 21, 5), ("xtrace", 20, 13), ("xtrace", 20, 6)],
)
def test_trace_probes_resume_from_a_checkpoint(tmp_path, method, m, crash):
    """Issue 9.13 (API): a killed trace resumes without redoing finished products, same estimate."""
    A = sym(torch.linspace(-1, 3, 80), seed=6)
    whole = trace(A, method=method, num_matvecs=m, seed=2, chunk_size=4)
    path = tmp_path / "t.ckpt"
    with pytest.raises(KeyboardInterrupt):
        trace(
            CrashAfter(A, crash),
            method=method,
            num_matvecs=m,
            seed=2,
            chunk_size=4,
            checkpoint=Checkpoint(path, {"t": 1}, every=0),
        )
    again = CrashAfter(A, 10**6)
    resumed = trace(
        again, method=method, num_matvecs=m, seed=2, chunk_size=4, checkpoint=Checkpoint(path, {"t": 1}, every=0)
    )
    assert 0 < again.columns < whole.num_matvecs
    assert resumed.num_matvecs == whole.num_matvecs
    assert resumed.value == pytest.approx(whole.value, rel=1e-12, abs=1e-12)
    assert resumed.stderr == pytest.approx(whole.stderr, rel=1e-10, abs=1e-12)
    assert abs(whole.value - float(torch.linspace(-1, 3, 80).sum())) < 6 * whole.stderr + 1e-8


# ---------------------------------------------------------------- numbers and vectors

A50 = sym(torch.linspace(0.5, 2.0, 50), seed=1)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: trace(A50, method="hutchinson", num_matvecs=2.7), "num_matvecs"),
        (lambda: trace(A50, num_matvecs="30"), "num_matvecs"),
        (lambda: trace(A50, seed="abc"), "seed"),
        (lambda: trace(A50, chunk_size=0), "chunk_size"),
        (lambda: diagonal(A50, method="estimate", num_matvecs=4.5), "num_matvecs"),
        (lambda: diagonal(A50, method="estimate", num_matvecs=4, seed=1.5), "seed"),
        (lambda: eigenvalues(A50, k=2.0000001), "k"),
        (lambda: eigenvalues(A50, k=2, max_matvecs=100.5), "max_matvecs"),
        (lambda: eigenvalues(A50, k=2, max_bytes="1e9"), "max_bytes"),
        (lambda: spectral_density(A50, num_probes=2.5), "num_probes"),
        (lambda: spectral_density(A50, sigma="0.1"), "sigma"),
        (lambda: solve(A50, torch.ones(50, dtype=torch.float64), tol="1e-3"), "tol"),
        (lambda: solve(A50, torch.ones(50, dtype=torch.float64), maxiter=3.5), "maxiter"),
    ],
)
def test_numbers_are_numbers(call, match):
    with pytest.raises(InputError, match=match):
        call()


@pytest.mark.parametrize(
    "b,match",
    [
        (torch.ones(50, dtype=torch.complex128), "complex"),
        (torch.ones(50, dtype=torch.float64).to_sparse(), "sparse"),
        (torch.ones(50, dtype=torch.float64, device="meta"), "meta"),
        (torch.ones(50, dtype=torch.int64), "floating"),
        ([1.0] * 50, "torch.Tensor"),
    ],
)
def test_solve_and_inverse_hvp_refuse_vectors_they_cannot_use(b, match):
    for fn in (solve, inverse_hvp):
        with pytest.raises(InputError, match=match):
            fn(A50, b)


def test_non_convergence_convention():
    """Results with a converged flag warn; a function returning a bare tensor raises with the result."""
    b = torch.ones(50, dtype=torch.float64)
    with pytest.warns(NotConvergedWarning):
        assert not solve(A50, b, maxiter=1).converged
    with pytest.warns(NotConvergedWarning):
        assert not eigenvalues(sym(torch.linspace(0, 1, 300)), k=5, tol=1e-12, max_matvecs=30).converged
    with pytest.raises(nh.NotConvergedError) as info:
        inverse_hvp(A50, b, maxiter=1)
    assert info.value.result is not None and not info.value.result.converged
