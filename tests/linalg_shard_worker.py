"""One rank of a 2-process gloo run of the linalg estimators on a fake sharded operator.

Launched by test_linalg_sharded.py (not a test module). Each rank holds rows
[lo, hi) of a fixed symmetric matrix and implements the sharded-vector protocol
of ``linalg._operator`` without FSDP: its product all-gathers the vector and
multiplies its rows.
"""

import datetime
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from nethessian._checkpoint import Checkpoint  # noqa: E402
from nethessian.distributed import finish as nh_finish  # noqa: E402
from nethessian.linalg._density import spectral_density  # noqa: E402
from nethessian.linalg._diagonal import diagonal  # noqa: E402
from nethessian.linalg._lanczos import eigenvalues  # noqa: E402
from nethessian.linalg._solve import solve  # noqa: E402
from nethessian.linalg._trace import trace  # noqa: E402

P, SPLIT = 60, 26  # rank 0 holds [0, 26), rank 1 [26, 60): unequal shards


def matrix() -> torch.Tensor:
    """A fixed symmetric 60 x 60 matrix with a well separated top and bottom."""
    g = torch.Generator().manual_seed(11)
    Q, _ = torch.linalg.qr(torch.randn(P, P, generator=g, dtype=torch.float64))
    lam = torch.cat(
        [
            torch.tensor([-7.0, -5.0]),
            torch.linspace(-1.0, 1.0, P - 5, dtype=torch.float64),
            torch.tensor([6.0, 9.0, 12.0]),
        ]
    )
    return (Q * lam) @ Q.T


def rhs() -> torch.Tensor:
    return torch.randn(P, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


class FakeSharded:
    """Rows [lo, hi) of ``A``; ``A @ v`` for the local slice ``v`` of a global vector."""

    sharded = True

    def __init__(self, A: torch.Tensor, lo: int, hi: int, world: int):
        self.rows, self.global_size, self.local_range, self.world = A[lo:hi].clone(), A.shape[0], (lo, hi), world
        self.shape, self.dtype, self.device = (hi - lo, hi - lo), A.dtype, A.device
        self.sizes = [SPLIT, P - SPLIT]

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t)
        return t

    def fingerprint(self) -> str:
        return "fake-sharded-60"

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        v2 = v.reshape(v.shape[0], -1)
        big = max(self.sizes)
        pad = torch.zeros(big, v2.shape[1], dtype=v2.dtype)
        pad[: v2.shape[0]] = v2
        parts = [torch.empty_like(pad) for _ in range(self.world)]
        dist.all_gather(parts, pad)
        full = torch.cat([p[:n] for p, n in zip(parts, self.sizes)])
        out = self.rows @ full
        return out.reshape(-1) if v.ndim == 1 else out


def results(op, lo: int, hi: int, ck_path: str):
    """Everything compared with the single-process run (local slices of vectors)."""
    eig = eigenvalues(
        op, k=3, which="both", tol=1e-10, seed=1, ncv=12, checkpoint=Checkpoint(ck_path, {"test": 1}, every=0.0)
    )
    basis = torch.load(ck_path, weights_only=False)
    small = eigenvalues(op, k=2, which="smallest", tol=1e-10, seed=2, block_size=2, ncv=10)
    out = {
        "eig": eig.eigenvalues,
        "eigvec": eig.eigenvectors,
        "eig_res": eig.residuals,
        "small": small.eigenvalues,
        "eig_memory": torch.tensor(eig.memory_bytes),
        "basis_rows": torch.tensor(_basis_rows(basis)),
        "diag": diagonal(op, method="estimate", num_matvecs=12, seed=4, chunk_size=5).values,
        "density": spectral_density(op, num_probes=2, lanczos_steps=15, seed=5).density,
        "density_plain": spectral_density(op, num_probes=2, lanczos_steps=15, seed=5, reorthogonalize=False).density,
        "cg": solve(op, rhs()[lo:hi], damping=8.0, tol=1e-12).x,
        "minres": solve(op, rhs()[lo:hi], method="minres", damping=0.3, tol=1e-12).x,
    }
    for method in ("hutchinson", "hutch++", "xtrace"):
        est = trace(op, method=method, num_matvecs=21, seed=3, chunk_size=4)
        out[f"trace_{method}"] = torch.tensor([est.value, est.stderr])
    return out


def _basis_rows(state) -> int:
    """Rows of the Lanczos basis the checkpoint holds (the basis actually kept on this rank)."""
    V = state["state"]["V"] if "state" in state else state["V"]
    return int(V.shape[0])


def main():
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    lo, hi = (0, SPLIT) if rank == 0 else (SPLIT, P)
    torch.save(results(FakeSharded(matrix(), lo, hi, world), lo, hi, f"{out}.ck{rank}"), f"{out}.{rank}")
    nh_finish()  # no rank tears gloo down while the other is still in a collective


if __name__ == "__main__":
    main()
