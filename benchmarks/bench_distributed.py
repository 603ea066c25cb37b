"""1 against 2 processes (torch.distributed, gloo) on the W3 HVP workload.

W3 = MLP 784-128-64-10, tanh, cross-entropy, N=1024 (P=109,386), float32.
Each configuration runs in fresh processes; every rank holds its shard
(``nh.shard``) and each product all-reduces P+1 numbers. Reports the median
steady-state time of one Hessian-vector product and of a block of 32, and
checks that the products agree with the 1-process ones.

    .venv/bin/python benchmarks/bench_distributed.py [--quick]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def worker(rank: int, world: int, port: str, threads: int, reps: int, out: str) -> None:
    import torch

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        torch.distributed.init_process_group(
            "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120)
        )
    import nethessian as nh

    model, loss_fn, data = nh.examples.mlp()
    op = nh.HessianOperator(model, loss_fn, nh.shard(data) if world > 1 else data)
    g = torch.Generator().manual_seed(0)
    v = torch.randn(op.shape[0], generator=g)
    V = torch.randn(op.shape[0], 32, generator=g)
    hv = op @ v  # builds the gradient graph
    op @ V  # chooses batched or looped products

    def median(f, n):
        ts = []
        for _ in range(n):
            if world > 1:
                torch.distributed.barrier()
            t0 = time.perf_counter()
            f()
            ts.append(time.perf_counter() - t0)
        return sorted(ts)[len(ts) // 2]

    t1 = median(lambda: op @ v, reps)
    t32 = median(lambda: op @ V, max(3, reps // 5))
    if rank == 0:
        torch.save({"t1": t1, "t32": t32, "hv": hv}, out)
    if world > 1:
        nh.distributed.finish()


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def run(world: int, threads: int, reps: int, out: str) -> dict:
    import torch

    port = _port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(world), port, str(threads), str(reps), out], env=env
        )
        for r in range(world)
    ]
    for p in procs:
        if p.wait(timeout=1200) != 0:
            raise SystemExit(f"worker failed with exit code {p.returncode}")
    return torch.load(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        r, w, port, th, reps, out = sys.argv[2:8]
        worker(int(r), int(w), port, int(th), int(reps), out)
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    import torch

    reps = 5 if args.quick else 30
    tmp = os.path.join(HERE, "results", ".dist.pt")
    configs = [("1 process, 2 threads", 1, 2), ("1 process, 1 thread", 1, 1), ("2 processes, 1 thread each", 2, 1)]
    res = {name: run(w, th, reps, tmp) for name, w, th in configs}
    os.unlink(tmp)
    base = res[configs[0][0]]
    rows = [
        "| configuration | 1 HVP (ms) | 32 HVPs (ms) | speed-up vs 1 process, 2 threads | max rel. diff of Hv |",
        "|---|---|---|---|---|",
    ]
    out = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "torch": torch.__version__,
        "cores": os.cpu_count(),
        "workload": "W3 MLP 784-128-64-10 tanh CE N=1024 float32",
        "results": {},
    }
    for name, r in res.items():
        diff = float((r["hv"] - base["hv"]).abs().max() / base["hv"].abs().max())
        rows.append(
            f"| {name} | {r['t1'] * 1e3:.1f} | {r['t32'] * 1e3:.0f} | "
            f"{base['t1'] / r['t1']:.2f}× / {base['t32'] / r['t32']:.2f}× | {diff:.1e} |"
        )
        out["results"][name] = {"hvp_s": r["t1"], "hvp32_s": r["t32"], "max_rel_diff": diff}
    table = "\n".join(rows)
    print(table)
    out["table"] = table
    with open(os.path.join(HERE, "results", "distributed.json"), "w") as fh:
        json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
