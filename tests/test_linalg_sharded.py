"""The sharded-vector protocol: 2 gloo ranks, each holding a slice, give the single-process numbers.

No FSDP here: ``linalg_shard_worker.FakeSharded`` holds rows [lo, hi) of a fixed
symmetric matrix and all-gathers the vector in its product. Every estimator's
inner products go through the adapter, so both ranks must return the numbers of
one process on the whole matrix (float64, rtol 1e-10), and each rank must keep
only its slice of the Lanczos basis.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from linalg_shard_worker import P, SPLIT, matrix, results
from nethessian.errors import InputError
from nethessian.linalg import _operator
from nethessian.linalg._diagonal import diagonal
from nethessian.linalg._memory import lanczos_bytes
from nethessian.linalg._operator import as_operator, draw_columns
from nethessian.linalg._trace import trace

WORKER = os.path.join(os.path.dirname(__file__), "linalg_shard_worker.py")


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("shard") / "res")
    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(r), "2", port, out],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-3000:]
    return [torch.load(f"{out}.{r}") for r in (0, 1)], out


def test_two_sharded_ranks_equal_one_process(sharded_runs, tmp_path):
    got, _ = sharded_runs
    ref = results(matrix(), 0, P, str(tmp_path / "ck"))
    ranges = [(0, SPLIT), (SPLIT, P)]
    sliced = {"eigvec", "diag", "cg", "minres"}  # vectors come back as this rank's slice
    for r, (lo, hi) in enumerate(ranges):
        for key, val in ref.items():
            if key in ("eig_memory", "basis_rows"):
                continue
            want = val[lo:hi] if key in sliced else val
            atol = 1e-9 if key == "eigvec" else 1e-12 * max(1.0, float(val.abs().max()))
            # plain Lanczos (no reorthogonalisation) amplifies the rounding of its inner products, whose
            # order depends on the split, by its loss of orthogonality: 1e-11-1e-10 relative measured
            # for two summation orders (square-and-sum, dot); everything else agrees to 1e-10
            rtol = 1e-8 if key == "density_plain" else 1e-10
            torch.testing.assert_close(got[r][key], want, rtol=rtol, atol=atol, msg=f"rank {r}: {key}")


def test_sharded_results_match_dense_truth(sharded_runs):
    got, _ = sharded_runs
    lam = torch.linalg.eigvalsh(matrix())
    for r in (0, 1):
        torch.testing.assert_close(got[r]["eig"], torch.stack([lam[0], lam[-2], lam[-1]]), rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(got[r]["small"], lam[:2], rtol=1e-9, atol=1e-9)
    A, b, Id = (
        matrix(),
        torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64),
        torch.eye(P, dtype=torch.float64),
    )
    for key, damping in (("cg", 8.0), ("minres", 0.3)):  # the true residual of the gathered solution
        x = torch.cat([g[key] for g in got])
        assert float(((A + damping * Id) @ x - b).norm()) <= 1.01e-12 * float(b.norm()), key


def test_basis_per_rank_is_its_slice(sharded_runs, tmp_path):
    """Measured: the basis each rank keeps has its rows only, (k x P) / world entries in all."""
    got, _ = sharded_runs
    ref = results(matrix(), 0, P, str(tmp_path / "ck"))
    assert int(ref["basis_rows"]) == P
    assert [int(g["basis_rows"]) for g in got] == [SPLIT, P - SPLIT]
    assert [int(g["eig_memory"]) for g in got] == [
        lanczos_bytes(n, 12, 1, 3, torch.float64, torch.float64, False) for n in (SPLIT, P - SPLIT)
    ]
    assert sum(int(g["eig_memory"]) for g in got) == int(ref["eig_memory"])


@pytest.mark.parametrize("kind", ["normal", "rademacher"])
def test_draws_are_slices_of_one_global_vector(kind, monkeypatch):
    """Each rank's draw is its slice of the single-process draw, for any split, across piece borders."""
    monkeypatch.setattr(_operator, "_PIECE", 7)
    n, k = 40, 3
    full = draw_columns(kind, n, (0, n), k, torch.Generator().manual_seed(9))
    for cuts in ([0, 13, 40], [0, 7, 14, 40], [0, 1, 39, 40]):
        parts = [draw_columns(kind, n, (a, b), k, torch.Generator().manual_seed(9)) for a, b in zip(cuts, cuts[1:])]
        assert torch.equal(torch.cat(parts), full)
    one_by_one = torch.Generator().manual_seed(9)
    cols = torch.cat([draw_columns(kind, n, (0, n), 1, one_by_one) for _ in range(k)], dim=1)
    assert torch.equal(cols, full)  # chunk-independent: k columns at once = one at a time


class _BadShard:
    sharded = True
    shape, dtype, device = (5, 5), torch.float64, torch.device("cpu")

    def __init__(self, rng, reducer=True):
        self.global_size, self.local_range = 10, rng
        if reducer:
            self.allreduce_ = lambda t: t


def test_protocol_is_checked():
    with pytest.raises(InputError, match="local_range"):
        as_operator(_BadShard((3, 9)))
    with pytest.raises(InputError, match="allreduce_"):
        as_operator(_BadShard((0, 5), reducer=False))
    ok = as_operator(_BadShard((5, 10)))
    assert ok.sharded and ok.global_size == 10 and ok.local_range == (5, 10)


def test_identity_column_methods_refused_on_a_sharded_operator():
    op = _BadShard((5, 10))
    with pytest.raises(InputError, match="sharded"):
        diagonal(op)
    with pytest.raises(InputError, match="sharded"):
        trace(op, exact=True)
