"""Thick-restart Lanczos against torch.linalg.eigvalsh on matrices with known spectra (float64)."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch

from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError, InputError, NonFiniteError, NotSymmetricError
from nethessian.linalg._lanczos import EigenResult, eigenvalues
from nethessian._params import ParamLayout

CLUSTER = [0.291, 0.289, 0.285, 0.281, 0.276]  # the top five of an MLP Hessian (W3)


@functools.lru_cache(maxsize=None)
def rotation(P: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    return Q


def with_spectrum(lam, seed: int = 0) -> torch.Tensor:
    lam = torch.as_tensor(lam, dtype=torch.float64)
    Q = rotation(lam.numel(), seed)
    A = (Q * lam) @ Q.T
    return (A + A.T) / 2


def f64(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def uniform(n: int, lo: float, hi: float, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)


def clustered(P: int, seed: int = 1) -> torch.Tensor:
    """CLUSTER on top of 50 outliers below 0.272, a bulk near 0 and some negative curvature."""
    mid = uniform(50, -0.2, 0.272, seed)
    bulk = 0.01 * torch.randn(P - 55, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.cat([f64(*CLUSTER), mid, bulk])


class Reflected:
    """``A = H diag(λ) H`` with one Householder reflection ``H = I - 2uuᵀ``: O(P) products, known spectrum.

    Lanczos with a Gaussian start only sees the spectrum (Qᵀv0 is Gaussian for any orthogonal Q),
    so this is as hard as a dense random rotation at a fraction of the cost.
    """

    def __init__(self, lam, seed: int = 0):
        self.lam = torch.as_tensor(lam, dtype=torch.float64)
        u = torch.randn(self.lam.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.u = u / u.norm()
        self.shape, self.dtype, self.device = (self.lam.numel(),) * 2, torch.float64, torch.device("cpu")

    def _h(self, v):
        u = self.u if v.ndim == 1 else self.u[:, None]
        return v - 2 * u * (self.u @ v)

    def __matmul__(self, v):
        lam = self.lam if v.ndim == 1 else self.lam[:, None]
        return self._h(lam * self._h(v))


class MatOp:
    """A matrix behind the minimal operator interface, counting columns and able to misbehave."""

    def __init__(self, A, layout=None, nan_at_call=None, fail_after=None):
        self.A, self.layout = A, layout
        self.shape, self.dtype, self.device = tuple(A.shape), A.dtype, A.device
        self.calls, self.columns = 0, 0
        self.nan_at_call, self.fail_after = nan_at_call, fail_after

    def __matmul__(self, v):
        self.calls += 1
        self.columns += 1 if v.ndim == 1 else v.shape[1]
        if self.fail_after is not None and self.columns > self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        out = self.A @ v
        if self.calls == self.nan_at_call:
            out = out.clone()
            out[0] = float("nan")
        return out


def true_residuals(A, res: EigenResult) -> torch.Tensor:
    V = res.eigenvectors.double()
    return (A.double() @ V - V * res.eigenvalues).norm(dim=0)


def assert_honest(A, res: EigenResult, atol: float = 1e-11) -> None:
    scale = float(torch.linalg.matrix_norm(A.double(), 2))
    torch.testing.assert_close(res.residuals, true_residuals(A, res), rtol=1e-6, atol=atol * scale)
    V = res.eigenvectors.double()
    eye = torch.eye(V.shape[1], dtype=torch.float64)
    assert float((V.T @ V - eye).abs().max()) < (1e-12 if res.eigenvectors.dtype == torch.float64 else 1e-5)


# ---------------------------------------------------------------- accuracy


def test_well_separated_matches_eigvalsh():
    A = with_spectrum(torch.cat([f64(10.0, 8.0, 6.0, 5.0, 4.0), uniform(195, -1.0, 2.0)]))
    res = eigenvalues(A, k=5, tol=1e-10)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert res.converged and res.eigenvalues.dtype == torch.float64
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-10, atol=0)
    assert res.eigenvectors.shape == (200, 5) and res.eigenvectors.dtype == torch.float64
    assert_honest(A, res)
    assert float(res.residuals.max()) < 1e-4


@pytest.mark.parametrize("tol", [1e-3, 1e-8])
def test_clustered_top_reaches_relative_tol(tol):
    lam = clustered(400)
    A = with_spectrum(lam)
    res = eigenvalues(A, k=5, tol=tol)
    ref = torch.linalg.eigvalsh(A).flip(0)[:5]
    assert res.converged
    assert float(((res.eigenvalues - ref).abs() / ref).max()) <= tol
    assert_honest(A, res)


LAM_SIGNED = torch.cat([f64(3.0, 2.5, 2.2, -4.0, -3.5, -2.9), uniform(114, -2.0, 2.0)])


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude", "both"])
@pytest.mark.parametrize("k", [1, 4, 5])
def test_which_selects_and_orders(which, k):
    A = with_spectrum(LAM_SIGNED)
    ref = torch.linalg.eigvalsh(A)  # ascending
    expected = {
        "largest": ref.flip(0)[:k],
        "smallest": ref[:k],
        "magnitude": ref[torch.argsort(ref.abs(), descending=True)][:k],
        "both": torch.cat([ref[: k // 2], ref[len(ref) - (k - k // 2) :]]),
    }[which]
    res = eigenvalues(A, k=k, which=which, tol=1e-10)
    assert res.converged and res.which == which
    torch.testing.assert_close(res.eigenvalues, expected, rtol=1e-9, atol=1e-12)
    assert_honest(A, res)


def test_smallest_finds_negative_curvature_of_a_saddle():
    lam = torch.cat([f64(-0.05), uniform(299, 0.0, 1.0)])
    res = eigenvalues(with_spectrum(lam), k=1, which="smallest", tol=1e-6)
    assert res.converged and abs(float(res.eigenvalues[0]) + 0.05) < 1e-6 * 0.05


def test_eigenvalues_near_zero_terminate():
    """An exact zero eigenvalue: 'smallest' stops on the absolute floor, not at 0 relative accuracy."""
    lam = torch.cat([f64(0.0, 0.3), uniform(198, 0.5, 2.0)])
    res = eigenvalues(with_spectrum(lam), k=2, which="smallest", tol=1e-6)
    assert res.converged
    assert abs(float(res.eigenvalues[0])) < 1e-10 and abs(float(res.eigenvalues[1]) - 0.3) < 1e-6 * 0.3


def test_float32_operator_gives_float64_eigenvalues():
    lam = torch.cat([f64(3.0, 2.5, 2.0, 1.8), uniform(396, -0.5, 1.0)])
    A = with_spectrum(lam)
    # tol=1e-5: the verified residuals of float32 products sit near 1e-6 (eps32 · ‖A‖ · √P),
    # so tol=1e-6 is at the rounding floor and is not claimed (see the next test)
    res = eigenvalues(A.float(), k=4, tol=1e-5)
    ref = torch.linalg.eigvalsh(A).flip(0)[:4]
    assert res.converged
    assert res.eigenvalues.dtype == torch.float64 and res.eigenvectors.dtype == torch.float32
    torch.testing.assert_close(res.eigenvalues, ref, rtol=1e-6, atol=0)
    # the Krylov relation holds to float32 rounding: residuals honest to about eps32 * ‖A‖
    assert_honest(A, res, atol=10 * torch.finfo(torch.float32).eps)


# ---------------------------------------------------------------- repeated eigenvalues, blocks

REPEATED = torch.cat([f64(1.2, 1.2, 1.2, 1.1, 1.05), uniform(295, 0.0, 1.0)])


def test_block_finds_every_copy_of_a_repeated_eigenvalue():
    A = with_spectrum(REPEATED)
    res = eigenvalues(A, k=5, tol=1e-6, block_size=3)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, REPEATED[:5], rtol=1e-6, atol=0)
    assert_honest(A, res)


def test_single_vector_sees_true_eigenvalues_but_may_miss_copies():
    """A single Krylov vector spans one direction of each eigenspace; further copies only appear
    through rounding. Every value returned is an eigenvalue, but copies of 1.2 can be missing."""
    A = with_spectrum(REPEATED)
    res = eigenvalues(A, k=5, tol=1e-6)
    assert res.converged
    dist = (res.eigenvalues[:, None] - REPEATED[None, :]).abs().min(dim=1).values
    assert float(dist.max()) < 1e-5
    copies = int(((res.eigenvalues - 1.2).abs() < 1e-5).sum())
    assert 1 <= copies <= 3
    assert bool((res.eigenvalues[:-1] >= res.eigenvalues[1:]).all())


def test_block_rank_deficiency_few_distinct_eigenvalues():
    """Only three distinct eigenvalues: the block Krylov space becomes invariant and restarts randomly."""
    lam = torch.cat([torch.full((3,), 4.0), torch.full((3,), 3.0), torch.ones(194)])
    A = with_spectrum(lam)
    res = eigenvalues(A, k=5, tol=1e-8, block_size=3)
    assert res.converged
    torch.testing.assert_close(res.eigenvalues, f64(4.0, 4, 4, 3, 3), rtol=1e-10, atol=0)
    assert_honest(A, res)


@pytest.mark.parametrize("block_size", [2, 4])
def test_block_agrees_with_single(block_size):
    A = with_spectrum(torch.cat([f64(10.0, 8.0, 6.0, 5.0, 4.0), uniform(195, -1.0, 2.0)]))
    single = eigenvalues(A, k=5, tol=1e-10)
    block = eigenvalues(A, k=5, tol=1e-10, block_size=block_size)
    assert single.converged and block.converged
    torch.testing.assert_close(block.eigenvalues, single.eigenvalues, rtol=1e-10, atol=0)
    overlap = (single.eigenvectors.T @ block.eigenvectors).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones(5, dtype=torch.float64), rtol=0, atol=1e-8)


def test_block_products_go_through_the_operator_as_blocks():
    A = with_spectrum(torch.cat([f64(10.0, 8.0, 6.0), uniform(97, -1.0, 2.0)]))
    op = MatOp(A)
    res = eigenvalues(op, k=3, tol=1e-8, block_size=4, check_symmetry=False)
    # blocks of 4, then one product of the k = 3 returned vectors that verifies their residuals
    assert res.num_matvecs == op.columns == 4 * (op.calls - 1) + 3


# ---------------------------------------------------------------- budgets and counting


@pytest.mark.parametrize("check", [True, False])
def test_num_matvecs_counts_every_product(check):
    A = with_spectrum(clustered(300))
    op = MatOp(A)
    res = eigenvalues(op, k=5, tol=1e-6, check_symmetry=check)
    assert res.num_matvecs == op.columns


def test_budget_exhausted_warns_and_stays_honest():
    A = with_spectrum(clustered(300))
    with pytest.warns(UserWarning, match="did not reach tol"):
        res = eigenvalues(A, k=5, tol=1e-12, max_matvecs=25)
    assert not res.converged and res.num_matvecs <= 25
    assert_honest(A, res)


def test_small_problem_is_solved_densely():
    A = with_spectrum(uniform(12, -1.0, 1.0))
    op = MatOp(A)
    res = eigenvalues(op, k=3, which="both")
    ref = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(res.eigenvalues, torch.cat([ref[:1], ref[-2:]]), rtol=1e-12, atol=1e-14)
    assert res.converged and res.num_matvecs == op.columns == 2 + 12
    assert float(res.residuals.max()) < 1e-12


def test_same_seed_same_answer():
    A = with_spectrum(clustered(300))
    a, b = eigenvalues(A, k=5, seed=3), eigenvalues(A, k=5, seed=3)
    assert torch.equal(a.eigenvalues, b.eigenvalues) and a.num_matvecs == b.num_matvecs


def test_unseeded_run_works():
    res = eigenvalues(with_spectrum(LAM_SIGNED), k=2, seed=None, tol=1e-8)
    torch.testing.assert_close(res.eigenvalues, f64(3.0, 2.5))


def test_doc_example_diagonal_closed_form():
    res = eigenvalues(
        torch.diag(torch.arange(1.0, 101.0, dtype=torch.float64)), k=3, which="smallest", tol=1e-10, max_matvecs=2000
    )
    torch.testing.assert_close(res.eigenvalues, f64(1.0, 2.0, 3.0))


def test_clustered_top_of_a_2000_matrix_in_few_products():
    """The benchmark shape: top five clustered (0.291 ... 0.276) above 50 outliers. Over 40 starts
    scipy's eigsh (tol=1e-3) needs 50-62 products, mean 57; this needs 45-55, mean 50 (2 of them
    for the symmetry check)."""
    A = Reflected(clustered(2000))
    ref = f64(*CLUSTER)
    for seed in (0, 1):
        res = eigenvalues(A, k=5, tol=1e-3, seed=seed)
        assert res.converged and res.num_matvecs <= 56, res.num_matvecs
        assert float(((res.eigenvalues - ref).abs() / ref).max()) <= 1e-3


# ---------------------------------------------------------------- names, JSON, progress


def test_eigenvectors_by_name_round_trip():
    layout = ParamLayout(("a", "b"), ((3, 4), (5,)))
    A = with_spectrum(torch.cat([f64(5.0, 4.0, 3.0), uniform(14, -1.0, 1.0)]))
    res = eigenvalues(MatOp(A, layout=layout), k=3, tol=1e-10)
    assert res.layout == layout
    named = res.eigenvectors_by_name()
    assert len(named) == 3
    for i, parts in enumerate(named):
        assert parts["a"].shape == (3, 4) and parts["b"].shape == (5,)
        torch.testing.assert_close(layout.flatten(parts), res.eigenvectors[:, i], rtol=0, atol=0)


def test_eigenvectors_by_name_needs_a_layout():
    res = eigenvalues(with_spectrum(uniform(30, 0.0, 1.0)), k=2)
    with pytest.raises(InputError, match="no parameter names"):
        res.eigenvectors_by_name()


def test_to_dict_is_json():
    layout = ParamLayout(("a", "b"), ((3, 4), (5,)))
    res = eigenvalues(MatOp(with_spectrum(uniform(17, 0.0, 1.0)), layout=layout), k=2)
    d = json.loads(json.dumps(res.to_dict(eigenvectors=True)))
    assert d["eigenvalues"] == [float(x) for x in res.eigenvalues]
    assert d["converged"] is True and d["num_matvecs"] == res.num_matvecs and d["parameters"] == ["a", "b"]
    assert len(d["eigenvectors"]) == 2 and len(d["eigenvectors"][0]) == 17
    assert "eigenvectors" not in res.to_dict()
    assert "EigenResult(which='largest'" in repr(res)


def test_progress_bar_on_stderr(capsys):
    eigenvalues(with_spectrum(clustered(200)), k=2, progress=True)
    captured = capsys.readouterr()
    assert "eigenvalues" in captured.err and captured.out == ""


# ---------------------------------------------------------------- checkpoints


def test_checkpoint_resume_equals_uninterrupted(tmp_path):
    A = with_spectrum(clustered(300))
    kw = dict(k=3, tol=1e-8, ncv=10, seed=5)
    whole = eigenvalues(A, **kw)
    settings = {"problem": "clustered-300"}
    with pytest.raises(KeyboardInterrupt):
        eigenvalues(MatOp(A, fail_after=40), checkpoint=Checkpoint(tmp_path / "ck.pt", settings, every=0.0), **kw)
    op = MatOp(A)
    resumed = eigenvalues(op, checkpoint=Checkpoint(tmp_path / "ck.pt", settings, every=0.0), **kw)
    assert 0 < op.columns < whole.num_matvecs  # it really resumed
    assert resumed.num_matvecs == whole.num_matvecs
    torch.testing.assert_close(resumed.eigenvalues, whole.eigenvalues, rtol=1e-13, atol=0)
    torch.testing.assert_close(resumed.residuals, whole.residuals, rtol=1e-6, atol=1e-14)
    # a finished checkpoint answers again without new products
    again = MatOp(A)
    done = eigenvalues(again, checkpoint=Checkpoint(tmp_path / "ck.pt", settings), **kw)
    assert again.columns == 0 and torch.equal(done.eigenvalues, resumed.eigenvalues)


def test_checkpoint_from_other_arguments_is_refused(tmp_path):
    A = with_spectrum(clustered(300))
    path = tmp_path / "ck.pt"
    eigenvalues(A, k=3, ncv=10, checkpoint=Checkpoint(path, {"p": 1}))
    with pytest.raises(CheckpointError, match="original arguments"):
        eigenvalues(A, k=4, ncv=10, checkpoint=Checkpoint(path, {"p": 1}))


# ---------------------------------------------------------------- bad inputs


def test_k_too_large_or_small():
    A = with_spectrum(uniform(6, 0.0, 1.0))
    with pytest.raises(InputError, match=r"P = 6.*eigvalsh"):
        eigenvalues(A, k=6)
    with pytest.raises(InputError, match="1 <= k"):
        eigenvalues(A, k=0)


def test_unknown_which_lists_the_choices():
    with pytest.raises(InputError, match="'largest', 'smallest', 'both', 'magnitude'"):
        eigenvalues(with_spectrum(uniform(30, 0.0, 1.0)), k=2, which="top")


def test_non_square_is_refused():
    with pytest.raises(InputError, match="square"):
        eigenvalues(torch.zeros(5, 4, dtype=torch.float64), k=2)


def test_bad_options():
    A = with_spectrum(uniform(60, 0.0, 1.0))
    for kw, msg in [
        (dict(tol=0.0), "tol"),
        (dict(ncv=4, k=3, block_size=2), "ncv"),
        (dict(block_size=0), "block_size"),
        (dict(max_matvecs=3, k=5), "max_matvecs"),
    ]:
        with pytest.raises(InputError, match=msg):
            eigenvalues(A, **{"k": 2, **kw})


def test_non_symmetric_is_refused_with_two_products():
    A = with_spectrum(uniform(60, 0.0, 1.0))
    A[0, 1] += 1.0
    op = MatOp(A)
    with pytest.raises(NotSymmetricError, match="not symmetric"):
        eigenvalues(op, k=2)
    assert op.columns == 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        eigenvalues(A, k=2, check_symmetry=False, max_matvecs=40)  # the user's call: no check


def test_nan_mid_run_names_the_product():
    op = MatOp(with_spectrum(uniform(100, 0.0, 1.0)), nan_at_call=7)
    with pytest.raises(NonFiniteError, match="product 7"):
        eigenvalues(op, k=2, check_symmetry=False)
