"""W5: curvature of a GPT-2 language model on the CPU (issue 12).

GPT-2 architecture, 12 layers, width 768, vocabulary 50,257 (≈124M parameters,
random weights), one batch of 4 × 128 tokens, float32, loss
``nh.losses.causal_lm()``. Every measurement runs in its own fresh process; memory is
read from the process's ``VmRSS``/``VmHWM`` (Linux), the time is the measured call only:

* one gradient;
* memory: ``peak`` = the whole process above the mark after the model and data were
  built (the operator's set-up included: validation, the double-backward cross-check,
  the kept graph); ``steady`` = what stays resident after set-up plus the measured
  call's own peak (high-water mark reset in between) — the memory a long run needs;
* one Hessian-vector product, for the kept-graph engine (``cache=True``) and the
  streaming engine (``cache=False``: a fresh double-backward graph per product) —
  reported as time and peak memory ÷ the gradient's (targets: ≤ 2 and ≤ 2);
* top-1 and top-5 eigenvalues to ``tol=1e-2`` (products, time, peak memory);
* a Hutch++ trace with 30 products.

``--tiny`` runs the same script on a 2-layer, width-32, 97-token GPT-2 with a 2 × 16
batch: a smoke test of the script, not a measurement.

Usage::

    python benchmarks/bench_llm.py [--tiny] [--out results/bench_llm.json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time

import torch

W5 = dict(vocab_size=50257, n_layer=12, n_embd=768, n_head=12, n_positions=1024, batch=4, tokens=128)
TINY = dict(vocab_size=97, n_layer=2, n_embd=32, n_head=2, n_positions=32, batch=2, tokens=16)
ENGINES = {"kept-graph": True, "streaming": False}
# Lanczos basis sizes: at P = 124M one float32 vector is 0.5 GB, so the default ncv = 20 would hold
# 10 GB of basis; a user of a model this size sets ncv (the result states its memory bound).
NCV = {1: 8, 5: 12}


def problem(cfg):
    """(model, loss, data): random-weight GPT-2 in eval mode and one token batch (all predicted)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from nethessian.losses import causal_lm

    torch.manual_seed(0)
    conf = GPT2Config(
        vocab_size=cfg["vocab_size"],
        n_layer=cfg["n_layer"],
        n_embd=cfg["n_embd"],
        n_head=cfg["n_head"],
        n_positions=cfg["n_positions"],
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(conf).float().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg["vocab_size"], (cfg["batch"], cfg["tokens"]), generator=g)
    return model, causal_lm(), {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def machine() -> dict:
    """When and where: date, torch version, threads, load averages (the machine is shared)."""
    import os

    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "torch": torch.__version__,
        "loadavg": os.getloadavg(),
    }


def _task(name, model, loss, data):
    """The callable measured for ``name``; it returns a dict of extra numbers (products, values)."""
    import nethessian as nh

    if name == "gradient":
        from nethessian._objective import Objective

        obj = Objective(model, loss, data)
        return lambda: (obj.gradient(), {})[1]
    engine, _, what = name.partition(":")
    op = nh.HessianOperator(model, loss, data, cache=ENGINES[engine])
    if what == "hvp":
        v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(2))
        return lambda: (op @ v, {})[1]
    if what.startswith("top"):
        k = int(what[3:])

        def eig():
            r = nh.eigenvalues(op, k=k, tol=1e-2, ncv=NCV[k])
            return {
                "eigenvalues": [float(x) for x in r.eigenvalues],
                "products": r.num_matvecs,
                "converged": bool(r.converged),
                "stated_bound_bytes": r.memory_bytes,
            }

        return eig

    def tr():
        method = "hutchinson" if what == "hutchinson30" else "hutch++"
        t = nh.trace(op, method=method, num_matvecs=30, chunk_size=1)
        return {
            "trace": t.value,
            "stderr": t.stderr,
            "products": t.num_matvecs,
            "stated_bound_bytes": getattr(t, "memory_bytes", None),
        }

    return tr


def _refusals(fn):
    """``fn`` whose ``InputError`` (a refusal before any product) becomes an ``error`` entry."""
    from nethessian.errors import InputError

    def run():
        try:
            return fn()
        except InputError as exc:
            return {"error": f"refused: {exc}"}

    return run


def _child(cfg, name, queue):
    """Set-up (the operator: validation, cross-check, kept graph) and the call, measured apart.

    ``setup_peak_bytes``: the high-water mark of the set-up above the mark after the model
    and data were built; ``steady_peak_bytes``: what the set-up left resident plus the
    call's own peak above that (``VmHWM`` reset before the call) — the memory a run of
    many products needs; ``call_peak_bytes``: the call's own rise above what set-up left
    (an estimator's stated bound plus one product's temporaries); ``extra_peak_bytes``:
    the larger of set-up and steady.
    """
    from _dense_worker import _reset_hwm, _status_kb  # the RSS high-water mark, as bench_core reads it

    from nethessian.errors import InputError

    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    model, loss, data = problem(cfg)
    _reset_hwm()
    base = _status_kb("VmRSS")
    try:
        fn = _task(name, model, loss, data)
        fn = _refusals(fn)
    except InputError as exc:
        queue.put({"name": name, "error": f"refused: {exc}"})
        return
    setup = _status_kb("VmHWM") - base
    reset = _reset_hwm()
    resident = _status_kb("VmRSS")
    t0 = time.perf_counter()
    extra = fn()
    dt = time.perf_counter() - t0
    if "error" in extra:
        queue.put({"name": name, **extra})
        return
    hwm = _status_kb("VmHWM")
    steady = hwm - base if reset else None
    queue.put(
        {
            "name": name,
            "time_s": dt,
            "setup_peak_bytes": setup,
            "resident_after_setup_bytes": resident - base,
            "steady_peak_bytes": steady,
            # the call's own rise above what set-up left: the estimator's vectors plus one product's temporaries
            "call_peak_bytes": hwm - resident if reset else None,
            "extra_peak_bytes": max(setup, steady or 0),
            **extra,
        }
    )


def measure(cfg, name):
    """Run ``name`` in a fresh process; its time and extra peak memory.

    A child that dies (the out-of-memory killer) or refuses (``InputError``: a memory
    bound above what is free) gives a row saying so instead of a hung parent.
    """
    import queue as _queue

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(cfg, name, q))
    p.start()
    while True:
        try:
            res = q.get(timeout=5)
            break
        except _queue.Empty:
            if not p.is_alive():
                res = {"name": name, "error": f"the process died (exit code {p.exitcode}: killed for memory?)"}
                break
    p.join()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke run on a 2-layer, width-32 GPT-2")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument(
        "--runs",
        default=None,
        help="comma-separated subset of runs, e.g. 'gradient,kept-graph:hvp,streaming:hvp' (default: all)",
    )
    args = ap.parse_args(argv)
    cfg = dict(TINY if args.tiny else W5, threads=args.threads)
    names = ["gradient"] + [f"{e}:{w}" for e in ENGINES for w in ("hvp", "top1", "top5", "hutch++30", "hutchinson30")]
    if args.runs:
        wanted = args.runs.split(",")
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"unknown runs {unknown}; choose from {names}")
        names = ["gradient"] + [n for n in names if n in wanted and n != "gradient"]
    rows = {}
    print(
        f"{'run':22s} {'time':>9s} {'÷grad':>7s} {'peak MiB':>9s} {'÷grad':>7s} "
        f"{'steady MiB':>10s} {'÷grad':>7s} {'call MiB':>9s} {'bound MiB':>9s}  extra",
        flush=True,
    )
    for n in names:  # each row printed and saved as soon as it is measured (a W5 run takes long)
        r = rows[n] = measure(cfg, n)
        if "error" in r:
            print(f"{n:22s} {r['error']}", flush=True)
            _save(args, cfg, rows)
            continue
        grad = rows["gradient"]
        extras = {k: v for k, v in r.items() if k not in ("name", "time_s") and not k.endswith("_bytes")}
        steady, gsteady = r["steady_peak_bytes"] or 0, grad["steady_peak_bytes"] or 1
        print(
            f"{n:22s} {r['time_s']:9.3f} {r['time_s'] / grad['time_s']:7.2f} "
            f"{r['extra_peak_bytes'] / 2**20:9.1f} {r['extra_peak_bytes'] / max(grad['extra_peak_bytes'], 1):7.2f}"
            f" {steady / 2**20:10.1f} {steady / gsteady:7.2f} {_mib(r.get('call_peak_bytes'))}"
            f" {_mib(r.get('stated_bound_bytes'))}  {extras}",
            flush=True,
        )
        _save(args, cfg, rows)
    return 0


def _mib(nbytes) -> str:
    return f"{'—':>9s}" if nbytes is None else f"{nbytes / 2**20:9.1f}"


def _save(args, cfg, rows) -> None:
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": cfg, "tiny": args.tiny, "ncv": NCV, "machine": machine(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
