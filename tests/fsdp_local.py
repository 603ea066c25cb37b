"""vectors='local' on an FSDP2 model, one rank's part (run by fsdp_worker.py, checked by test_finite_difference.py)."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import nethessian as nh
from nethessian import distributed as dist

EIG = {"k": 3, "which": "largest", "tol": 1e-10, "seed": 0}
TRACE = {"method": "hutch++", "num_matvecs": 24, "seed": 3}
DENSITY = {"num_probes": 2, "lanczos_steps": 12, "seed": 4, "grid_size": 50}


class LargestBlock(TorchDispatchMode):
    """The bytes of the largest 2-D tensor with ``rows`` rows made while active (the Krylov basis)."""

    def __init__(self, rows):
        super().__init__()
        self.rows, self.bytes = rows, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == self.rows:
            self.bytes = max(self.bytes, out.numel() * out.element_size())
        return out


def estimators(op):
    """Top eigenvalues (and the basis memory), Hutch++ trace, SLQ density; None when linalg can't yet."""
    try:
        with LargestBlock(op.shape[0]) as mem:
            eig = nh.eigenvalues(op, **EIG)
        trace = nh.trace(op, **TRACE)
        density = nh.spectral_density(op, **DENSITY)
    except Exception as exc:  # noqa: BLE001 - recorded: the linalg side of the protocol may not have landed
        return {"linalg_error": f"{type(exc).__name__}: {exc}"}
    return {
        "eig": eig.eigenvalues,
        "basis_bytes": mem.bytes,
        "trace": torch.tensor(float(trace.value)),
        "density": density.density,
        "grid": density.grid,
    }


def _gathered_equal(op, x, full, layout):
    """Gather the local ``x`` on rank 0 and compare with the full name-order ``full`` (exactly)."""
    got = op.gather_vector(x)
    if dist.rank() != 0:
        return got is None
    want = layout.unflatten(full)
    return set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


def run_local(model, loss_fn, data, make_op, local_slice, probe):
    """Local vs replicated products, the global order, gathers, estimators; parameters unchanged."""
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    rep = make_op(model, loss_fn, data, vectors="replicated")
    loc = make_op(model, loss_fn, data)  # the default on a sharded model: local vectors
    P, names = rep.shape[0], rep.names
    v = probe(P)
    V = torch.randn(P, 3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    x = local_slice(model, names, v)
    X = torch.stack([local_slice(model, names, V[:, j]) for j in range(3)], dim=1)
    hv_rep, HV_rep = rep @ v, rep @ V
    hv_loc, HV_loc = loc @ x, loc @ X
    perm = local_slice(model, names, torch.arange(P, dtype=torch.float64))
    perms = [None] * dist.world_size()
    torch.distributed.all_gather_object(perms, perm)
    res = {
        "vectors": loc.vectors,
        "sharded": loc.sharded,
        "n_local": loc.shape[0],
        "P": P,
        "local_range": loc.local_range,
        "global_size": loc.global_size,
        "perm": torch.cat(perms).long(),
        "hv_slice": local_slice(model, names, hv_rep),
        "hv_local": hv_loc,
        "HV_slice": torch.stack([local_slice(model, names, HV_rep[:, j]) for j in range(3)], dim=1),
        "HV_local": HV_loc,
        "fd_error": loc.fd_error,
        "gather_v": _gathered_equal(loc, x, v, rep.layout),
        "gather_V": _gathered_equal(loc, X, V, rep.layout),
        "names_local": list(loc.layout.unflatten(x)),
    }
    gathered_hv = loc.gather_vector(hv_loc)
    if dist.rank() == 0:
        res["hv_gathered"] = torch.cat([gathered_hv[n].reshape(-1) for n in names])
        res["hv_rep"] = hv_rep
    res.update(estimators(loc))
    res["fd_error_after"] = loc.fd_error
    res["params_unchanged"] = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    return res
