"""diagonal(): exact identity columns and the Bekas-Kokiopoulou-Saad estimator (float64)."""

import json
import math

import pytest
import torch

from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError, InputError, NonFiniteError
from nethessian.linalg._diagonal import DiagonalEstimate, diagonal
from nethessian._params import ParamLayout
from helpers import Blocked, CrashAfter, NaNAfter, sym


LAYOUT = ParamLayout(("a", "b"), ((3, 4), (5,)))


@pytest.fixture(scope="module")
def A():
    return sym(torch.linspace(-2.0, 4.0, 40), seed=1)


def test_exact_equals_torch_diagonal(A):
    for chunk in (None, 1, 7, 40, 100):
        est = diagonal(A, chunk_size=chunk)
        torch.testing.assert_close(est.values, torch.diagonal(A), rtol=1e-13, atol=1e-13)
        assert (est.stderr, est.num_matvecs, est.method, est.layout) == (None, 40, "exact", None)


def test_estimate_unbiased_with_honest_stderr(A):
    m, seeds = 30, 200
    off = A.square().sum(dim=1) - A.diagonal().square()  # Var((z ⊙ Az)_i) = Σ_{k≠i} A_ik²
    runs = [diagonal(A, method="estimate", num_matvecs=m, seed=s) for s in range(seeds)]
    vals = torch.stack([r.values for r in runs])
    ses = torch.stack([r.stderr for r in runs])
    z = (vals.mean(dim=0) - A.diagonal()) / (off / m / seeds).sqrt()
    assert float(z.abs().max()) < 4.5
    torch.testing.assert_close(ses.square().mean(dim=0), off / m, rtol=0.15, atol=0)
    covered = float(((vals - A.diagonal()).abs() <= 2 * ses).double().mean())
    assert 0.85 <= covered <= 0.99, covered
    assert all(r.num_matvecs == m and r.method == "estimate" for r in runs)


def test_estimate_closed_form_and_chunking():
    D = torch.diag(torch.tensor([3.0, -1.0, 2.0, 0.5], dtype=torch.float64))
    est = diagonal(D, method="estimate", num_matvecs=3)
    assert est.values.tolist() == [3.0, -1.0, 2.0, 0.5] and est.stderr.abs().max() == 0
    M = sym(torch.arange(10.0), seed=2)
    a = diagonal(M, method="estimate", num_matvecs=17, seed=5)
    b = diagonal(M, method="estimate", num_matvecs=17, seed=5, chunk_size=4)
    torch.testing.assert_close(a.values, b.values, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.stderr, b.stderr, rtol=1e-9, atol=1e-12)


def test_by_name_natural_shapes():
    M = sym(torch.arange(17.0), seed=3)
    est = diagonal(Blocked(M, LAYOUT))
    named = est.by_name
    assert {k: tuple(v.shape) for k, v in named.items()} == {"a": (3, 4), "b": (5,)}
    torch.testing.assert_close(named["a"].reshape(-1), M.diagonal()[:12])
    torch.testing.assert_close(named["b"], M.diagonal()[12:])
    d = json.loads(json.dumps(est.to_dict()))
    assert d["layout"] == {"names": ["a", "b"], "shapes": [[3, 4], [5]]} and len(d["values"]) == 17
    with pytest.raises(InputError, match="layout"):
        diagonal(M).by_name


@pytest.mark.parametrize(
    "method,crash_at,kwargs",
    [
        ("exact", 17, {"chunk_size": 4}),
        ("estimate", 12, {"chunk_size": 5, "num_matvecs": 23, "seed": 7}),
    ],
)
def test_checkpoint_resume_equals_uninterrupted(tmp_path, A, method, crash_at, kwargs):
    path = tmp_path / "diag.ckpt"
    ckpt = lambda: Checkpoint(path, {"what": "test"}, every=0)  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        diagonal(CrashAfter(A, crash_at), method=method, checkpoint=ckpt(), **kwargs)
    assert path.exists() and ckpt().load()["done"] < 40
    again = CrashAfter(A, 10**6)
    resumed = diagonal(again, method=method, checkpoint=ckpt(), **kwargs)
    assert 0 < again.columns < (40 if method == "exact" else 23)  # only the rest was computed
    straight = diagonal(A, method=method, **kwargs)
    assert torch.equal(resumed.values, straight.values)
    assert resumed.num_matvecs == straight.num_matvecs
    if method == "estimate":
        assert torch.equal(resumed.stderr, straight.stderr)


def test_checkpoint_of_another_computation_is_refused(tmp_path, A):
    ckpt = Checkpoint(tmp_path / "c.ckpt", {"what": "test"}, every=0)
    diagonal(A, method="estimate", num_matvecs=4, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="num_matvecs"):
        diagonal(A, method="estimate", num_matvecs=6, checkpoint=ckpt)
    with pytest.raises(CheckpointError, match="kind"):
        diagonal(A, checkpoint=ckpt)


def test_float32_operator(A):
    est = diagonal(A.float())
    assert est.values.dtype == torch.float32
    torch.testing.assert_close(est.values.double(), A.diagonal(), rtol=1e-5, atol=1e-5)
    est = diagonal(A.float(), method="estimate", num_matvecs=50)
    assert est.values.dtype == torch.float32 and torch.isfinite(est.stderr).all()


def test_nan_mid_run_raises(A):
    with pytest.raises(NonFiniteError, match="NaN"):
        diagonal(NaNAfter(A, 3), chunk_size=5)
    with pytest.raises(NonFiniteError, match="NaN"):
        diagonal(NaNAfter(A, 2), method="estimate", num_matvecs=10, chunk_size=3)


def test_bad_inputs(A):
    with pytest.raises(InputError, match="'exact' or 'estimate'"):
        diagonal(A, method="hutchinson")
    with pytest.raises(InputError, match="estimate"):
        diagonal(A, num_matvecs=10)
    with pytest.raises(InputError, match=">= 2"):
        diagonal(A, method="estimate", num_matvecs=1)
    with pytest.raises(InputError, match="chunk_size"):
        diagonal(A, chunk_size=0)


def test_result_contract_and_progress(capsys):
    est = diagonal(torch.eye(3, dtype=torch.float64), progress=True)
    assert isinstance(est, DiagonalEstimate)
    with pytest.raises(Exception):
        est.method = "x"  # frozen
    assert "diagonal" in capsys.readouterr().err
    assert math.isclose(sum(est.to_dict()["values"]), 3.0)
