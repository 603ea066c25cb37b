"""One rank of a 2-process gloo run, launched by test_distributed.py (not a test module)."""

import datetime
import json
import os
import sys
import time

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import nethessian as nh  # noqa: E402
import dist_scenarios  # noqa: E402

SCENARIOS = {
    "disagree": dist_scenarios.disagreements,
    "empty": dist_scenarios.empty_data,
    "options": dist_scenarios.other_options,
}


def problem():
    """MLP with cross-entropy(ignore_index): unequal shards, and the global count matters."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    g = torch.Generator().manual_seed(1)
    X = torch.randn(15, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (15,), generator=g)
    y[[0, 1, 5]] = -100
    sizes = [3, 4, 2, 5, 1]  # round-robin over 2 ranks: rank 0 gets 6 samples, rank 1 gets 9
    batches, i = [], 0
    for s in sizes:
        batches.append((X[i : i + s], y[i : i + s]))
        i += s
    return model, nn.CrossEntropyLoss(ignore_index=-100), batches


def results(model, loss_fn, data):
    """Everything compared between 1 and 2 processes."""
    from nethessian.linalg._density import spectral_density
    from nethessian.linalg._lanczos import eigenvalues
    from nethessian.linalg._trace import trace

    op = nh.HessianOperator(model, loss_fn, data)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    eig = eigenvalues(op, k=3, which="largest", tol=1e-10, seed=0)
    return {
        "dense": nh.hessian(model, loss_fn, data).dense,
        "hv": op @ v,
        "J": torch.tensor(nh.Objective(model, loss_fn, data).value()),
        "eig": eig.eigenvalues,
        "trace": torch.tensor(trace(op, method="hutchinson", num_matvecs=20, seed=3).value),
        "density": spectral_density(op, num_probes=2, lanczos_steps=10, seed=4).density,
    }


def main():
    rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=float(os.environ.get("NH_TIMEOUT", 10)))
    )
    model, loss_fn, batches = problem()
    if mode == "compare":
        res = results(model, loss_fn, nh.shard(batches))
        torch.save(res, f"{out}.{rank}")
    elif mode in ("die", "hang"):
        op = nh.HessianOperator(model, loss_fn, nh.shard(batches))
        v = torch.ones(op.shape[0], dtype=torch.float64)
        op @ v
        if rank == 1:
            if mode == "die":
                os._exit(3)
            time.sleep(600)
        t0 = time.time()
        try:
            for _ in range(1000):
                op @ v
        except nh.NetHessianError as exc:
            print(f"ELAPSED {time.time() - t0:.1f}", file=sys.stderr)
            print(f"ERROR {exc}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)  # a hung peer leaves gloo work pending: skip its teardown (it aborts)
    elif mode == "mismatch":
        if rank == 1:
            model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
        try:
            nh.HessianOperator(model, loss_fn, nh.shard(batches))
        except nh.NetHessianError as exc:
            print(f"ERROR {exc}", file=sys.stderr)
            sys.stderr.flush()
            os._exit(1)  # as the CLI does after a distributed fault: gloo's teardown may abort
    elif mode in SCENARIOS:
        found = SCENARIOS[mode](rank)
        with open(f"{out}.{rank}", "w") as f:
            json.dump(found, f)
        os._exit(0)  # ranks whose collectives fell out of step: skip gloo's teardown (it may abort)
    elif mode == "seed":
        torch.save(dist_scenarios.seed_none_run(rank, problem), f"{out}.{rank}")
    elif mode == "choices":
        torch.save(dist_scenarios.local_choices_run(rank, problem), f"{out}.{rank}")
    nh.distributed.finish()  # no rank tears gloo down while the other is still in a collective


if __name__ == "__main__":
    main()
