"""W6: finite-difference Hessian products, exact vs FD and 1 vs 2 FSDP ranks, on a GPT-2-style model (issue 13).

GPT-2 architecture (``transformers.GPT2LMHeadModel`` from a config, random weights,
eval mode), loss ``nh.losses.causal_lm()``, float32, 4 sequences × 64 tokens as 2
batches of 2 (so 2 ranks get one batch each). Sizes (``CONFIGS``): ``default`` 6
layers, width 384, 6 heads, vocabulary 32,768 (P = 23,255,040; one gradient ≈ 0.45 s
on 2 cores; the whole script ≈ 5 min, estimated); ``large`` the same with GPT-2's
50,257-token vocabulary; ``--tiny`` 2 layers, width 32, 97 tokens (a smoke run, ≈ 15–50 s).

1. **One process, not sharded** (all threads): one gradient (``Objective.gradient``);
   the exact kept-graph product; ``method="finite-difference"`` at order 2 without and
   with the error estimate, and at order 4 — time per product (median of ``--reps``
   after one warm product) ÷ the gradient; for two probes, a random v and the top
   eigenvector of H (from the exact operator), the relative error of the product
   against the float64 exact product of a float64 copy of the model, and the
   operator's own estimate next to it (``op.last_error · ‖v‖ / ‖Hv‖``).
2. **1 vs 2 ranks sharded with FSDP2** (``fully_shard_blocks``, gloo on 127.0.0.1,
   spawned processes; all threads for 1 rank, 1 thread per rank for 2): per rank, the
   memory of the set-up (``ru_maxrss`` after the model was built whole and sharded and
   the data sharded, minus before) and the peak above that mark (a high-water mark: the
   freed unsharded model's pages can hide part of the products' work memory), the
   Krylov basis memory the estimator states (``EigenResult.memory_bytes``), the time of
   one order-4 FD product (median of ``--reps``, a barrier before each) and the top-1
   eigenvalue with a few products (``ncv=6``, at most 15, ``tol=1e-2``) with the
   largest FD error estimate.

Prints two markdown tables and writes ``benchmarks/results/fsdp.json`` (other sizes:
``fsdp_<size>.json``) with the date, torch version and load average.

Usage::

    .venv/bin/python benchmarks/bench_fsdp.py [--tiny | --size large] [--reps 3] [--out FILE]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import multiprocessing as mp
import os
import pathlib
import queue as queue_mod
import resource
import socket
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

from _timing import median_time  # noqa: E402

CONFIGS = {
    "tiny": dict(vocab_size=97, n_layer=2, n_embd=32, n_head=2),
    "default": dict(vocab_size=32768, n_layer=6, n_embd=384, n_head=6),  # P = 23,255,040
    "large": dict(vocab_size=50257, n_layer=6, n_embd=384, n_head=6),  # GPT-2's vocabulary, P ≈ 29.8 M
}
DEFAULT = "default"
BATCHES, SEQS, TOKENS = 2, 2, 64  # 2 batches × 2 sequences × 64 tokens = 4 × 64
FD = "finite-difference"
ENGINES = {  # part 1: name -> HessianOperator keywords
    "exact (kept graph)": dict(cache=True),
    "FD order 2, no estimate": dict(method=FD, fd_order=2, fd_error=False),
    "FD order 2 + estimate": dict(method=FD, fd_order=2),
    "FD order 4 (+ estimate)": dict(method=FD, fd_order=4),
}
# check_symmetry=False: finite-difference products are symmetric only to their error
# (float32, order 4: up to ~1e-2 relative), above Lanczos's 1e-3 symmetry test (reported)
EIG = dict(k=1, ncv=6, max_matvecs=15, tol=1e-2, seed=0, check_symmetry=False)


def problem(cfg, dtype=torch.float32):
    """(model, loss, data): a random-weight GPT-2 in eval mode, and ``BATCHES`` token batches."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nethessian.losses import causal_lm

    torch.manual_seed(0)
    conf = GPT2Config(n_positions=TOKENS, bos_token_id=0, eos_token_id=0, use_cache=False, **cfg)
    model = GPT2LMHeadModel(conf).to(dtype).eval()
    g = torch.Generator().manual_seed(1)
    data = []
    for _ in range(BATCHES):
        ids = torch.randint(0, cfg["vocab_size"], (SEQS, TOKENS), generator=g)
        data.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return model, causal_lm(), data


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _norm(x) -> float:
    return float(x.double().norm())


# -- part 1: one process ---------------------------------------------------------------------------
def _reference(model, loss, data, V):
    """The float64 exact products ``H V`` of a float64 copy of the model (same vectors)."""
    import nethessian as nh

    m64 = copy.deepcopy(model).double()
    return (nh.HessianOperator(m64, loss, data, cache=True) @ V.double()).detach()


def _errors(op, V, ref):
    """Per column of ``V``: relative error of ``op @ v`` against ``ref``, and the estimate (per unit v, relative)."""
    out = {}
    for j, what in enumerate(("random", "top")):
        hv = op @ V[:, j]
        out[f"rel_err_{what}"] = _norm(hv.double() - ref[:, j]) / _norm(ref[:, j])
        est = getattr(op, "last_error", None)
        e = None if est is None else float(est.max())
        out[f"estimate_{what}"] = e
        out[f"estimate_rel_{what}"] = None if e is None else e * _norm(V[:, j]) / _norm(ref[:, j])
    return out


def _engine_row(name, op, v, reps, t_grad):
    """Time of ``op @ v`` (median of ``reps``, after one warm product) and its ratio to a gradient."""
    op @ v  # warm: builds the graph / takes the first gradients
    t = median_time(lambda: op @ v, reps)
    return {"engine": name, "time_s": t, "in_gradients": t / t_grad}


def single(cfg, reps, queue):
    """Part 1 in a fresh process: gradient, exact and FD products, their errors.

    The probes: a random v and the top eigenvector of the exact operator (where the third
    derivatives that make finite differences err can be largest); the reference: float64
    exact products.
    """
    import nethessian as nh
    from nethessian._objective import Objective

    model, loss, data = problem(cfg)
    obj = Objective(model, loss, data)
    obj.gradient()
    t_grad = median_time(obj.gradient, reps)
    v = torch.randn(obj.size, generator=torch.Generator().manual_seed(2))
    rows, V, ref = [], None, None
    for name, kw in ENGINES.items():
        op = nh.HessianOperator(model, loss, data, **kw)
        row = _engine_row(name, op, v, reps, t_grad)
        if V is None:  # the exact engine comes first: its top eigenvector is the second probe
            top = nh.eigenvalues(op, k=1, tol=1e-2, max_matvecs=80, progress=False)
            V = torch.stack([v, top.eigenvectors[:, 0].detach()], dim=1)
            ref = _reference(model, loss, data, V)
            row["top_eigenvalue"] = float(top.eigenvalues[0])
        row.update(_errors(op, V, ref))
        rows.append(row)
    queue.put({"P": obj.size, "gradient_s": t_grad, "threads": torch.get_num_threads(), "rows": rows})


# -- part 2: FSDP ranks ----------------------------------------------------------------------------
def _rank_run(cfg, reps, world):
    """One rank's measurements (process group up): products, eigenvalue, memory."""
    import nethessian as nh
    from nethessian.operators._sharded import fully_shard_blocks

    base = _maxrss()
    model, loss, data = problem(cfg)
    blocks = fully_shard_blocks(model)
    data = nh.shard(data)
    mark = _maxrss()  # a high-water mark: the whole model was built on every rank before sharding
    op = nh.HessianOperator(model, loss, data, method=FD, fd_order=4)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(3 + nh.distributed.rank()))
    op @ v
    t = median_time(lambda: op @ v, reps, before=torch.distributed.barrier)
    t0 = time.perf_counter()
    res = nh.eigenvalues(op, progress=False, **EIG)
    return {
        "world": world,
        "threads": torch.get_num_threads(),
        "blocks": blocks,
        "P": op.global_size,
        "n_local": op.shape[0],
        "product_s": t,
        "eig_s": time.perf_counter() - t0,
        "top1": float(res.eigenvalues[0]),
        "eig_products": res.num_matvecs,
        "eig_converged": res.converged,
        "fd_error": op.fd_error,
        "basis_bytes_stated": res.memory_bytes,
        "setup_bytes": mark - base,
        "peak_above_setup_bytes": _maxrss() - mark,
    }


def rank_main(rank, world, port, cfg, reps, queue):
    from nethessian.distributed import finish

    torch.set_num_threads(1 if world > 1 else max(1, len(os.sched_getaffinity(0))))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    try:
        queue.put({"rank": rank, **_rank_run(cfg, reps, world)})
    finally:
        finish()


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _spawn(target, args_of, n, timeout_s):
    """Run ``n`` spawned processes ``target(*args_of(i), queue)``; their queued results (killed past the timeout)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args_of(i), q)) for i in range(n)]
    for p in procs:
        p.start()
    out, deadline = [], time.time() + timeout_s
    try:
        while len(out) < n and time.time() < deadline:
            try:
                out.append(q.get(timeout=1.0))
            except queue_mod.Empty:
                if any(p.exitcode not in (0, None) for p in procs):
                    break  # a process died: the others may wait on it forever
    finally:
        for p in procs:
            p.join(timeout=max(1.0, deadline - time.time()))
            if p.is_alive():
                p.kill()
    if len(out) < n:
        raise RuntimeError(
            f"benchmark processes failed or timed out ({timeout_s:.0f} s): exit codes {[p.exitcode for p in procs]}"
        )
    return out


def sharded(cfg, reps, world, timeout_s):
    port = _port()
    rows = _spawn(rank_main, lambda r: (r, world, port, cfg, reps), world, timeout_s)
    return sorted(rows, key=lambda r: r["rank"])


# -- report ----------------------------------------------------------------------------------------
def _g(x, fmt=".2e"):
    return "—" if x is None else format(x, fmt)


def table_single(s):
    from _timing import fmt_t, table_head

    head = ["engine", "time / product", "÷ gradient"]
    for what in ("random v", "top eigenvector"):
        head += [f"rel. error, {what}", "estimate (rel.)"]
    lines = table_head(head)
    for r in s["rows"]:
        cells = [r["engine"], fmt_t(r["time_s"]), f"{r['in_gradients']:.2f}"]
        for what in ("random", "top"):
            cells += [_g(r[f"rel_err_{what}"]), _g(r[f"estimate_rel_{what}"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def table_sharded(runs):
    from _timing import fmt_b, fmt_t, table_head

    lines = table_head(
        [
            "ranks",
            "rank",
            "threads",
            "n_r of P",
            "FD product (order 4)",
            "set-up",
            "peak above set-up",
            "Krylov basis (stated)",
            "top-1 (products)",
            "FD error",
        ]
    )
    for rows in runs:
        for r in rows:
            lines.append(
                f"| {r['world']} | {r['rank']} | {r['threads']} | {r['n_local']:,} of {r['P']:,} | "
                f"{fmt_t(r['product_s'])} | {fmt_b(r['setup_bytes'])} | "
                f"{fmt_b(r['peak_above_setup_bytes'])} | {_g(r['basis_bytes_stated'], ',')} B | "
                f"{r['top1']:.6g} ({r['eig_products']}{'' if r['eig_converged'] else ', not converged'}) | "
                f"{_g(r['fd_error'])} |"
            )
    return lines


def _measure(args, cfg, log, contention):
    """Both parts, each after waiting for a quiet machine, with the other processes' CPU use recorded."""
    from _machine import measured_section

    wait = 0 if args.tiny else args.wait
    log(f"part 1: one process, GPT-2 {cfg}")
    one = measured_section(
        "single", lambda: _spawn(single, lambda i: (cfg, args.reps), 1, args.timeout)[0], contention, wait, log
    )
    log(f"  P = {one['P']:,}, gradient {one['gradient_s']:.3f} s")
    runs = []
    for world in (1, 2):
        log(f"part 2: {world} FSDP rank(s)")
        got = measured_section(
            f"ranks{world}", lambda w=world: {"rows": sharded(cfg, args.reps, w, args.timeout)}, contention, wait, log
        )
        runs.append(got["rows"])
    return one, runs


def main(argv=None):
    from _timing import base_meta, finish_meta, make_log, write_json

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run (seconds): a 2-layer, width-32 GPT-2")
    ap.add_argument("--size", default=DEFAULT, choices=list(CONFIGS), help="model size (default %(default)s)")
    ap.add_argument("--reps", type=int, default=3, help="timed products per engine (median)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for a quiet machine before each part")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds before a part's processes are killed")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/fsdp.json)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    log = make_log(t_start)
    size = "tiny" if args.tiny else args.size
    cfg = CONFIGS[size]
    meta = base_meta(size=size, config=cfg, batches=BATCHES, sequences=SEQS, tokens=TOKENS, reps=args.reps)
    contention = {}
    one, runs = _measure(args, cfg, log, contention)
    finish_meta(meta, t_start)
    meta["others_cpu_cores"] = contention
    print(
        f"\n### One process (P = {one['P']:,}, {one['threads']} threads; gradient {one['gradient_s']:.3f} s; "
        f"top eigenvalue {one['rows'][0]['top_eigenvalue']:.6g})\n"
    )
    print("\n".join(table_single(one)))
    print("\n### FSDP2 ranks (gloo on 127.0.0.1, order-4 finite differences)\n")
    print("\n".join(table_sharded(runs)))
    busy = {k: round(v["during"], 2) for k, v in contention.items() if v["during"] > 0.3}
    print(
        f"\nwall {meta['wall_s']:.0f} s; load average {meta['loadavg_start']} -> {meta['loadavg_end']}"
        + (f"; CONTENDED (other processes' cores during): {busy}" if busy else "")
    )
    out = (
        pathlib.Path(args.out)
        if args.out
        else HERE / "results" / ("fsdp.json" if size == DEFAULT else f"fsdp_{size}.json")
    )
    write_json(out, {"meta": meta, "single": one, "sharded": runs}, log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
