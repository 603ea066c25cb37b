"""What ranks disagree on, and seed=None probes, for 2-process gloo runs (run by dist_worker.py).

Every function runs on each rank; the test compares what the ranks recorded.
"""

import warnings

import torch
from torch import nn

import nethessian as nh
from nethessian import distributed as dist

FIXED_SEED = 918273645  # the seed rank 0 "draws" in the seed=None run (see seed_none_results)


def bn_problem(eval_mode: bool = True, shift: float = 0.0):
    """A batch-norm MLP on contiguous shards of 15 samples (no batch of one)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).double()
    with torch.no_grad():
        model[1].running_mean.copy_(torch.linspace(-0.5, 0.5, 5) + shift)
        model[1].running_var.fill_(2.0)
    model.train(not eval_mode)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(15, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (15,), generator=g)
    return model, nn.CrossEntropyLoss(), nh.shard((X, y))


def _attempt(fn) -> str:
    """``"ok"`` or ``"<ErrorType>: <message>"``: what one scenario did on this rank."""
    try:
        out = fn()
    except Exception as exc:  # noqa: BLE001 — the test reads the type and the message
        return f"{type(exc).__name__}: {exc}"
    return "ok" if out is None else f"ok {out}"


def _objective_then_check(model, loss_fn, data, **options):
    dist.check_state(nh.Objective(model, loss_fn, data, **options))


def _perturbed(one: bool, name: str):
    """The batch-norm problem, with parameter ``name`` changed by 1e-12 on rank 1."""
    model, loss_fn, data = bn_problem()
    if one:
        with torch.no_grad():
            dict(model.named_parameters())[name].view(-1)[0] += 1e-12
    return model, loss_fn, data


def _wider():
    """Rank 1's model: 6 hidden units instead of 5 (other shapes, more parameters)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def disagreements(rank: int) -> dict:
    """Scenarios whose collectives stay in step whether or not the library refuses them."""
    one = rank == 1
    model, loss_fn, data = bn_problem()
    cases = {
        "dtype": lambda: nh.HessianOperator(model.float() if one else model, loss_fn, data),
        "buffers_check_state": lambda: _objective_then_check(*bn_problem(shift=0.25 * one)),
        "mode_check_state": lambda: _objective_then_check(*bn_problem(eval_mode=not one)),
        "loss_check_state": lambda: _objective_then_check(
            bn_problem()[0], nn.CrossEntropyLoss(label_smoothing=0.1 * one), data
        ),
        "fixed_check_state": lambda: _objective_then_check(*_perturbed(one, "3.weight"), params=["0.*"]),
        "values_check_state": lambda: _objective_then_check(*_perturbed(one, "0.bias"), params=["0.*"]),
        "shapes_operator": lambda: nh.HessianOperator(_wider() if one else bn_problem()[0], loss_fn, data),
        "buffers_operator": lambda: nh.HessianOperator(*bn_problem(shift=0.25 * one)),
        "mode_operator": lambda: nh.HessianOperator(*bn_problem(eval_mode=not one)),
        "check_same": lambda: dist.check_same("trace", method="hutchinson", num_matvecs=30 if one else 20),
        "seed_differs": lambda: dist.common_seed(3 + rank),
        "seed_none_on_one_rank": lambda: dist.common_seed(5 if one else None),
        "seed_none": lambda: dist.common_seed(None),
        "common_value_rank0": lambda: dist.common_value(rank == 1),
        "common_value_max": lambda: dist.common_value(10.5 + rank, how="max"),
        "common_value_min": lambda: dist.common_value(7 - rank, how="min"),
        "agree": lambda: dist.agree(nh.InputError("rank one's data are bad") if one else None),
        "agreeing": lambda: _raise_in_agreeing(one),
    }
    return {name: _attempt(fn) for name, fn in cases.items()}


def _raise_in_agreeing(one: bool):
    with dist.agreeing():
        if one:
            raise KeyError("a bug on rank 1")


class _OneBatchLoader:
    """A re-iterable of one batch (as a DataLoader would be): ``nh.shard`` leaves rank 1 without one."""

    def __init__(self, batch):
        self.batch = batch

    def __iter__(self):
        yield self.batch


def empty_data(rank: int) -> dict:
    """Rank 1 holds no batch: an empty list, then an empty shard of a loader."""
    model, loss_fn, data = bn_problem()
    whole = nh.shard(data, 0, 1)  # the same 15 samples on both ranks
    return {
        "empty": _attempt(lambda: nh.HessianOperator(model, loss_fn, [] if rank == 1 else [data])),
        "empty_shard": _attempt(lambda: nh.HessianOperator(model, loss_fn, nh.shard(_OneBatchLoader(whole)))),
    }


def other_options(rank: int) -> dict:
    """The ranks ask for other numbers of products / eigenvalues."""
    op = nh.HessianOperator(*bn_problem())
    return {
        "num_matvecs": _attempt(lambda: nh.trace(op, method="hutchinson", num_matvecs=30 if rank else 20)),
        "k": _attempt(lambda: nh.eigenvalues(op, k=4 if rank else 3)),
        "chunk": _attempt(lambda: nh.trace(op, method="hutchinson", num_matvecs=12, chunk_size=7 if rank else 4)),
        "diag_chunk": _attempt(lambda: nh.diagonal(op, method="exact", engine="autodiff", chunk_size=5 if rank else 3)),
        "tol": _attempt(lambda: nh.eigenvalues(op, k=2, tol=1e-2 if rank else 1e-4)),
        "b": _attempt(
            lambda: nh.solve(op, torch.full((op.shape[0],), 2.0 if rank else 1.0, dtype=op.dtype), damping=1.0)
        ),
        "sigma": _attempt(lambda: nh.spectral_density(op, num_probes=2, lanczos_steps=5, sigma=0.2 if rank else 0.1)),
    }


def seed_none_results(model, loss_fn, data, seed=None) -> dict:
    """Hutchinson trace, diagonal estimate and Lanczos eigenvalues, all with the given seed.

    ``early`` stops Lanczos after 8 products (not converged), so its Ritz values
    depend on the random start as much as the estimates do.
    """
    op = nh.HessianOperator(model, loss_fn, data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the early stop warns that it did not converge
        early = nh.eigenvalues(op, k=2, ncv=6, max_matvecs=8, tol=1e-10, seed=seed).eigenvalues
    return {
        "trace": torch.tensor(nh.trace(op, method="hutchinson", num_matvecs=12, seed=seed).value),
        "diagonal": nh.diagonal(op, method="estimate", num_matvecs=12, seed=seed).values,
        "eigenvalues": nh.eigenvalues(op, k=3, tol=1e-10, seed=seed).eigenvalues,
        "early": early,
    }


def seed_none_run(rank: int, problem) -> dict:
    """seed=None on every rank; rank 0's fresh draw is FIXED_SEED, so a 1-process run can repeat it."""
    if rank == 0:
        dist._fresh_seed = lambda: FIXED_SEED
    model, loss_fn, batches = problem()
    return seed_none_results(model, loss_fn, nh.shard(batches))


def block_product(model, loss_fn, data) -> dict:
    """A GGN block product ``G V`` with three columns (the batched-or-loop choice is timed)."""
    op = nh.GGNOperator(model, loss_fn, data)
    V = torch.randn(op.shape[0], 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    return {"GV": op @ V, "batched": torch.tensor(bool(op.batched))}


def local_choices_run(rank: int, problem) -> dict:
    """Rank 0's timing trial always finds batching faster, rank 1's never: one choice must win."""
    from nethessian.operators import _engine

    _engine.MEASURABLY_FASTER = 1e9 if rank == 0 else 0.0
    model, loss_fn, batches = problem()
    return block_product(model, loss_fn, nh.shard(batches))
