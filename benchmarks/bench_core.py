#!/usr/bin/env python
"""Core nethessian benchmark: HVP cost, 32-column products, and the dense Hessian.

Everything is measured side by side, in the same process (the dense Hessian in
fresh subprocesses, one per method, for its peak memory), and reported as
ratios to one plain-autograd gradient of the same model and loss, because these
machines are shared and noisy. See benchmarks/README.md.

    .venv/bin/python benchmarks/bench_core.py            # full run (~5-10 min on 2 cores)
    .venv/bin/python benchmarks/bench_core.py --quick    # smoke test
    .venv/bin/python benchmarks/bench_core.py --only hvp --only batch
"""
from __future__ import annotations

import os
import sys
import time

from _machine import cpu_snapshot, measured_section, others_load

# numpy/scipy OpenBLAS threads starve torch's on these small machines (FACTS.md):
# pin them to one thread before anything imports numpy.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


# On a shared machine torch's OpenMP threads spin at every barrier while a sibling thread
# is descheduled: small kernels then run 10-100x slower (measured: one W2 HVP 0.5 ms ->
# 250-500 ms under a load of 2 other cores). Passive waiting (threads sleep) removes that,
# but on an idle machine it makes small kernels slower (W2 gradient ~0.3 -> ~1.1 ms).
# --omp-wait auto (default): passive only if other processes are busy when we start.
# It must be decided before torch is imported.
def _resolve_omp_wait(argv):
    import argparse as _ap
    pre = _ap.ArgumentParser(add_help=False)
    pre.add_argument("--omp-wait", choices=["auto", "default", "passive"], default="auto")
    pre.add_argument("--dense-worker")
    choice = pre.parse_known_args(argv)[0].omp_wait
    probe = None
    if "OMP_WAIT_POLICY" in os.environ:
        return f"env:{os.environ['OMP_WAIT_POLICY']}", probe
    if choice == "auto":
        a = cpu_snapshot()
        time.sleep(2.0)
        probe = others_load(a, cpu_snapshot())
        choice = "passive" if probe > 0.3 else "default"
    if choice == "passive":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    return choice, probe


OMP_WAIT, OMP_PROBE = _resolve_omp_wait(sys.argv[1:]) if __name__ == "__main__" else ("default", None)
os.environ.setdefault("OMP_NUM_THREADS", str(len(os.sched_getaffinity(0))))

import argparse
import copy
import datetime as _dt
import gc
import json
import math
import platform
import statistics
import subprocess
import tempfile
from pathlib import Path

import torch
from torch.func import functional_call, grad as func_grad, jvp, vmap

import nethessian as nh

HERE = Path(__file__).resolve().parent
THREADS = len(os.sched_getaffinity(0))
K_BATCH = 32

# tolerances for float32 results against references (relative, norm-wise)
TOL_HVP = 1e-3   # vs a float64 double-backward reference
TOL_DENSE = 1e-3  # nethessian dense vs torch.func.hessian (both float32), Frobenius and max-abs


# ----------------------------------------------------------------------------------------
# workloads
# ----------------------------------------------------------------------------------------
def make_workload(name):
    if name == "W2":
        model, loss_fn, (X, y) = nh.examples.mlp((64, 48, 32, 10), n=512, activation="tanh", seed=0)
        P = 5018
    elif name == "W3":
        model, loss_fn, (X, y) = nh.examples.mlp((784, 128, 64, 10), n=1024, activation="tanh", seed=0)
        P = 109386
    elif name == "W4":
        model, loss_fn, (X, y) = nh.examples.cnn(seed=0)
        P = 5258
    else:
        raise ValueError(name)
    got = sum(p.numel() for p in model.parameters())
    assert got == P, (name, got, P)
    return model, loss_fn, X, y


DESCRIPTIONS = {
    "W2": "MLP 64-48-32-10 tanh, CE, N=512 (P=5,018)",
    "W3": "MLP 784-128-64-10 tanh, CE, N=1024 (P=109,386)",
    "W4": "CNN conv 1->8->16, N=256 (P=5,258)",
}


class Problem:
    """One workload with every method's callable, all on the same model/data/vector."""

    def __init__(self, name, seed=0):
        self.name = name
        model, loss_fn, X, y = make_workload(name)
        self.model, self.loss_fn, self.X, self.y = model, loss_fn, X, y
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.P = sum(self.numels)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1234 + seed)
        self.v = torch.randn(self.P, generator=g, dtype=X.dtype)
        self.V = torch.randn(self.P, K_BATCH, generator=g, dtype=X.dtype)
        self.v_dict = self.split(self.v)
        self.V_dict = {n: t.movedim(-1, 0).contiguous() for n, t in self.split(self.V).items()}  # (k, *shape)
        self.v_list = list(self.v_dict.values())

    def split(self, flat):
        tail = tuple(flat.shape[1:])
        return {n: p.reshape(s + tail)
                for n, p, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    # --- the unit: one forward + backward, plain torch.autograd --------------------------
    def gradient(self):
        params = list(self.model.parameters())
        loss = self.loss_fn(self.model(self.X), self.y)
        return torch.autograd.grad(loss, params)

    # --- nethessian ----------------------------------------------------------------------
    def nh_operator(self, **kw):
        op = nh.HessianOperator(self.model, self.loss_fn, (self.X, self.y), **kw)
        assert tuple(op.layout.names) == tuple(self.names), (op.layout.names, self.names)
        return op

    # --- peers ---------------------------------------------------------------------------
    def f_dict(self, p):
        return self.loss_fn(functional_call(self.model, p, (self.X,)), self.y)

    def func_hvp(self, v_dict):
        """torch.func forward-over-reverse: jvp(grad(f))."""
        return jvp(func_grad(self.f_dict), (self.params,), (v_dict,))[1]

    def func_hvp_vmap(self, V_dict):
        return vmap(self.func_hvp)(V_dict)

    def leaves(self):
        return {n: p.detach().clone().requires_grad_(True) for n, p in self.params.items()}

    def db_rebuilt(self, v_list):
        """Plain double backward, gradient graph rebuilt at every call."""
        leaves = self.leaves()
        ps = list(leaves.values())
        loss = self.f_dict(leaves)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        return torch.autograd.grad(g, ps, v_list)

    def raw_kept_graph(self):
        """Plain-torch kept gradient graph (the floor nethessian's kept-graph engine builds on)."""
        leaves = self.leaves()
        ps = list(leaves.values())
        with torch.enable_grad():
            loss = self.f_dict(leaves)
            g = torch.autograd.grad(loss, ps, create_graph=True)
        return ps, g

    # --- references (float64) ------------------------------------------------------------
    def reference_hvp(self, V):
        """float64 double backward of a float64 copy of the model; V (P,) or (P, k)."""
        m64 = copy.deepcopy(self.model).double()
        X64 = self.X.double()
        ps = list(m64.parameters())
        loss = self.loss_fn(m64(X64), self.y)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        cols = V[:, None] if V.ndim == 1 else V
        out = []
        for c in cols.double().T:
            vs = [t.reshape(s) for t, s in zip(torch.split(c, self.numels), self.shapes)]
            out.append(self.flat(torch.autograd.grad(g, ps, vs, retain_graph=True)))
        out = torch.stack(out, dim=1)
        return out[:, 0] if V.ndim == 1 else out


def rel_err(a, ref):
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


# ----------------------------------------------------------------------------------------
# contention: these machines are shared; measure what others use while we run
# ----------------------------------------------------------------------------------------
# ----------------------------------------------------------------------------------------
# timing
# ----------------------------------------------------------------------------------------
def _time_calls(fn, n):
    gc_was = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n
    finally:
        if gc_was:
            gc.enable()


def bench_interleaved(fns, reps, sample_s, log=None):
    """Median seconds per call of each fn, sampled round-robin so drift hits all alike.

    Each fn is warmed up (2 calls), then given an inner count so one sample lasts
    about ``sample_s``; every repetition times one sample of each fn, in a rotating order.
    """
    inner = {}
    for name, fn in fns.items():
        fn(); fn()
        t = _time_calls(fn, 1)
        inner[name] = max(1, int(math.ceil(sample_s / max(t, 1e-7))))
    samples = {name: [] for name in fns}
    order = list(fns)
    for r in range(reps):
        gc.collect()
        rot = order[r % len(order):] + order[:r % len(order)]
        for name in rot:
            samples[name].append(_time_calls(fns[name], inner[name]))
    med = {name: statistics.median(s) for name, s in samples.items()}
    # per-repetition ratios to the gradient sample taken in the same round
    paired = {name: statistics.median(x / g for x, g in zip(s, samples["gradient"]))
              for name, s in samples.items()} if "gradient" in samples else None
    if log:
        log(" ".join(f"{n}={med[n]*1e3:.3f}ms" for n in fns))
    return med, samples, inner, paired


# ----------------------------------------------------------------------------------------
# 1. one HVP vs one gradient
# ----------------------------------------------------------------------------------------
def run_hvp(pb: Problem, reps, sample_s, first_reps, log):
    op = pb.nh_operator()
    ref = pb.reference_hvp(pb.v)
    ps, g = pb.raw_kept_graph()

    def nh_steady():
        return op @ pb.v

    def raw_kept():
        return torch.autograd.grad(g, ps, pb.v_list, retain_graph=True)

    fns = {
        "gradient": pb.gradient,
        "nethessian": nh_steady,
        "torch.func jvp(grad)": lambda: pb.func_hvp(pb.v_dict),
        "double backward rebuilt": lambda: pb.db_rebuilt(pb.v_list),
        "raw kept graph (plain torch)": raw_kept,
    }
    # correctness first: numbers never come from a wrong computation
    errs = {
        "nethessian": rel_err(op @ pb.v, ref),
        "torch.func jvp(grad)": rel_err(pb.flat(pb.func_hvp(pb.v_dict).values()), ref),
        "double backward rebuilt": rel_err(pb.flat(pb.db_rebuilt(pb.v_list)), ref),
        "raw kept graph (plain torch)": rel_err(pb.flat(raw_kept()), ref),
    }
    log(f"  [{pb.name}] hvp rel errors vs float64: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    med, samples, inner, paired = bench_interleaved(fns, reps, sample_s, log=lambda s: log(f"  [{pb.name}] hvp {s}"))

    # first product: builds the kept gradient graph (fresh operator each sample; construction untimed)
    first, construct, grad_first = [], [], []
    for _ in range(first_reps):
        gc.collect()
        t0 = time.perf_counter()
        fresh = pb.nh_operator()
        construct.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        fresh @ pb.v
        first.append(time.perf_counter() - t0)
        del fresh
        grad_first.append(_time_calls(pb.gradient, 3))
    out = {
        "median_s": med, "samples_s": samples, "inner_calls": inner,
        "first_call_s": first, "first_call_median_s": statistics.median(first),
        "construct_s": construct, "construct_median_s": statistics.median(construct),
        "gradient_during_first_s": grad_first,
        "rel_err_vs_float64": errs,
    }
    gm = med["gradient"]
    out["in_gradients"] = {k: v / gm for k, v in med.items()}
    out["in_gradients_paired_median"] = paired
    out["in_gradients_of_minima"] = {k: min(v) / min(samples["gradient"]) for k, v in samples.items()}
    out["first_call_in_gradients"] = out["first_call_median_s"] / statistics.median(grad_first)
    out["construct_in_gradients"] = out["construct_median_s"] / statistics.median(grad_first)
    out["correct"] = all(e <= TOL_HVP for e in errs.values())
    return out


# ----------------------------------------------------------------------------------------
# 2. 32 products at once
# ----------------------------------------------------------------------------------------
def run_batch(pb: Problem, reps, sample_s, log):
    op = pb.nh_operator()
    op @ pb.V  # builds the graph and decides batched-vs-loop (timed inside the operator)
    chosen = {True: "batched (is_grads_batched)", False: "loop", None: "undecided"}[op._batched]
    ref = pb.reference_hvp(pb.V)
    ps, g = pb.raw_kept_graph()
    cols = [pb.V[:, j].contiguous() for j in range(K_BATCH)]
    V_list_batched = [pb.V_dict[n] for n in pb.names]

    def nh_loop():
        return torch.stack([op @ c for c in cols], dim=1)

    def raw_kept_batched():
        return torch.autograd.grad(g, ps, V_list_batched, retain_graph=True, is_grads_batched=True)

    def vmap_out():
        out = pb.func_hvp_vmap(pb.V_dict)
        return torch.cat([t.reshape(K_BATCH, -1) for t in out.values()], dim=1).T

    errs = {
        "nethessian op @ V": rel_err(op @ pb.V, ref),
        "nethessian loop of 32": rel_err(nh_loop(), ref),
        "vmap(jvp(grad))": rel_err(vmap_out(), ref),
        "raw kept graph batched (plain torch)": rel_err(
            torch.cat([t.reshape(K_BATCH, -1) for t in raw_kept_batched()], dim=1).T, ref),
    }
    log(f"  [{pb.name}] batch rel errors vs float64: " + ", ".join(f"{k}={v:.1e}" for k, v in errs.items()))
    fns = {
        "gradient": pb.gradient,
        "nethessian op @ V": lambda: op @ pb.V,
        "nethessian loop of 32": nh_loop,
        "vmap(jvp(grad))": lambda: pb.func_hvp_vmap(pb.V_dict),
        "raw kept graph batched (plain torch)": raw_kept_batched,
    }
    med, samples, inner, paired = bench_interleaved(fns, reps, sample_s, log=lambda s: log(f"  [{pb.name}] batch {s}"))
    gm = med["gradient"]
    return {
        "k": K_BATCH, "nethessian_mode": chosen,
        "median_s": med, "samples_s": samples, "inner_calls": inner,
        "in_gradients": {k: v / gm for k, v in med.items()},
        "in_gradients_paired_median": paired,
        "in_gradients_of_minima": {k: min(v) / min(samples["gradient"]) for k, v in samples.items()},
        "rel_err_vs_float64": errs,
        "correct": all(e <= TOL_HVP for e in errs.values()),
    }


# ----------------------------------------------------------------------------------------
# 3. dense Hessian (each method in a fresh subprocess, for its peak memory)
# ----------------------------------------------------------------------------------------
DENSE_METHODS = ["nethessian", "torch.func.hessian", "autograd.functional.hessian", "raw chunked 256"]


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _reset_hwm():
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def dense_worker(method, out_path, save_path, threads):
    torch.set_num_threads(threads)
    model, loss_fn, X, y = make_workload("W2")
    P = sum(p.numel() for p in model.parameters())
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f_flat(t):
        named = {n: p.reshape(s) for n, p, s in zip(names, torch.split(t, numels), shapes)}
        return loss_fn(functional_call(model, named, (X,)), y)

    def run_nh():
        return nh.hessian(model, loss_fn, (X, y)).dense

    def run_func():
        return torch.func.hessian(f_flat)(theta)

    def run_af():
        return torch.autograd.functional.hessian(f_flat, theta, vectorize=True)

    def run_raw_chunked(chunk=256):
        t = theta.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            g, = torch.autograd.grad(f_flat(t), t, create_graph=True)
        H = torch.empty(P, P, dtype=theta.dtype)
        for s in range(0, P, chunk):
            e = min(P, s + chunk)
            E = torch.zeros(e - s, P, dtype=theta.dtype)
            E[torch.arange(e - s), torch.arange(s, e)] = 1
            H[:, s:e] = torch.autograd.grad(g, t, E, retain_graph=True, is_grads_batched=True)[0].T
        return H

    fn = {"nethessian": run_nh, "torch.func.hessian": run_func,
          "autograd.functional.hessian": run_af, "raw chunked 256": run_raw_chunked}[method]

    # warm up torch (autograd, functional_call, vmap/jvp machinery) on a tiny problem
    tiny = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    Xt, yt = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    nh.hessian(tiny, torch.nn.CrossEntropyLoss(), (Xt, yt))
    tt = torch.cat([p.detach().reshape(-1) for p in tiny.parameters()])
    tn = [n for n, _ in tiny.named_parameters()]
    ts = [tuple(p.shape) for p in tiny.parameters()]
    tk = [p.numel() for p in tiny.parameters()]

    def tiny_f(t):
        named = {n: p.reshape(s) for n, p, s in zip(tn, torch.split(t, tk), ts)}
        return torch.nn.functional.cross_entropy(functional_call(tiny, named, (Xt,)), yt)

    torch.func.hessian(tiny_f)(tt)
    torch.autograd.functional.hessian(tiny_f, tt, vectorize=True)
    loss = loss_fn(model(X), y)
    torch.autograd.grad(loss, list(model.parameters()))
    gc.collect()

    hwm_reset = _reset_hwm()
    rss0 = _status_kb("VmRSS")
    hwm0 = _status_kb("VmHWM")
    maxrss0 = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    H = fn()
    dt = time.perf_counter() - t0
    hwm1 = _status_kb("VmHWM")
    maxrss1 = __import__("resource").getrusage(__import__("resource").RUSAGE_SELF).ru_maxrss * 1024
    # baseline: the RSS when the high-water mark was reset (else the high-water mark before)
    extra = hwm1 - (rss0 if hwm_reset else hwm0)
    g = torch.Generator().manual_seed(99)
    U = torch.randn(P, 4, generator=g, dtype=H.dtype)
    res = {
        "method": method, "time_s": dt, "extra_peak_bytes": extra, "hwm_reset": hwm_reset,
        "rss_baseline_bytes": rss0, "hwm_before_bytes": hwm0, "hwm_after_bytes": hwm1,
        "ru_maxrss_delta_bytes": maxrss1 - maxrss0,
        "shape": list(H.shape), "dtype": str(H.dtype),
        "probe": (H.double() @ U.double()).tolist(),  # fingerprint of this run's result
        "asymmetry": float((H - H.T).abs().max() / H.abs().max()),
    }
    if save_path:
        torch.save(H, save_path)
    Path(out_path).write_text(json.dumps(res))


def run_dense(rounds, threads, log):
    results = {m: [] for m in DENSE_METHODS}
    tmp = tempfile.mkdtemp(prefix="nh_bench_dense_")
    saved = {}
    for r in range(rounds):
        order = DENSE_METHODS[r % len(DENSE_METHODS):] + DENSE_METHODS[:r % len(DENSE_METHODS)]
        for m in order:
            out_path = os.path.join(tmp, f"{m.replace(' ', '_')}_{r}.json")
            save = None
            if r == 0 and m in ("nethessian", "torch.func.hessian"):
                save = saved[m] = os.path.join(tmp, f"{m.replace(' ', '_')}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--dense-worker", m, "--worker-out", out_path,
                   "--threads", str(threads),
                   "--omp-wait", "passive" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "default"]
            if save:
                cmd += ["--worker-save", save]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"dense worker {m} failed:\n{proc.stdout}\n{proc.stderr}")
            res = json.loads(Path(out_path).read_text())
            results[m].append(res)
            log(f"  [W2] dense round {r}: {m:<28} {res['time_s']:7.2f} s  "
                f"+{res['extra_peak_bytes'] / 2**20:7.0f} MiB (hwm reset: {res['hwm_reset']})")

    # correctness: full matrices nethessian vs torch.func, and every run's probe vs nethessian's
    H_nh = torch.load(saved["nethessian"])
    H_fn = torch.load(saved["torch.func.hessian"])
    diff = (H_nh.double() - H_fn.double())
    check = {
        "frobenius_rel": float(diff.norm() / H_fn.double().norm()),
        "maxabs_rel": float(diff.abs().max() / H_fn.double().abs().max()),
    }
    del H_nh, H_fn, diff
    for f in saved.values():
        os.remove(f)
    ref_probe = torch.tensor(results["nethessian"][0]["probe"], dtype=torch.float64)
    probe_errs = {m: [rel_err(torch.tensor(r["probe"], dtype=torch.float64), ref_probe) for r in rs]
                  for m, rs in results.items()}
    check["probe_rel_vs_nethessian"] = probe_errs
    worst_probe = max(e for es in probe_errs.values() for e in es)
    correct = check["frobenius_rel"] <= TOL_DENSE and check["maxabs_rel"] <= TOL_DENSE and worst_probe <= TOL_DENSE
    log(f"  [W2] dense check: nethessian vs torch.func Frobenius rel {check['frobenius_rel']:.1e}, "
        f"max-abs rel {check['maxabs_rel']:.1e}; worst probe rel {worst_probe:.1e}")
    for p in Path(tmp).iterdir():
        p.unlink()
    os.rmdir(tmp)
    for rs in results.values():
        for r in rs:
            r.pop("probe")
    summary = {
        m: {"time_median_s": statistics.median(r["time_s"] for r in rs),
            "extra_peak_median_bytes": statistics.median(r["extra_peak_bytes"] for r in rs)}
        for m, rs in results.items()
    }
    return {"runs": results, "summary": summary, "check": check, "correct": correct}


# ----------------------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------------------
def fmt_t(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def fmt_b(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def yesno(ok, correct=True):
    if not correct:
        return "WRONG RESULT"
    return "yes" if ok else "**no**"


def _flag(r, text):
    load = r.get("others_cpu_cores_during")
    if load is not None and load > 0.3:
        return f"{text} (contended: others {load:.1f} cores)"
    return text


def build_table(res):
    rows = []
    for wl, r in res.get("hvp", {}).items():
        g = r["in_gradients"]
        target = wl in ("W2", "W3")
        x = g["nethessian"]
        rows.append((wl, "1 HVP, steady state (kept graph)",
                     f"{fmt_t(r['median_s']['nethessian'])} = {x:.2f} grads",
                     f"jvp(grad) {g['torch.func jvp(grad)']:.2f}; db rebuilt {g['double backward rebuilt']:.2f}; "
                     f"raw kept graph {g['raw kept graph (plain torch)']:.2f} (grad = {fmt_t(r['median_s']['gradient'])})",
                     f"{x:.2f} grads", "≤ 2 grads" if target else "info",
                     _flag(r, yesno(x <= 2, r["correct"]) if target else ("—" if r["correct"] else "WRONG RESULT"))))
        y = r["first_call_in_gradients"]
        rows.append((wl, "1 HVP, first call (builds graph)",
                     f"{fmt_t(r['first_call_median_s'])} = {y:.2f} grads",
                     f"db rebuilt {g['double backward rebuilt']:.2f}; construction {r['construct_in_gradients']:.2f} grads (untimed above)",
                     f"{y / g['double backward rebuilt']:.2f}× db rebuilt", "info", _flag(r, "—")))
    for wl, r in res.get("batch", {}).items():
        g = r["in_gradients"]
        target = wl in ("W2", "W3")
        x = g["nethessian op @ V"]
        rows.append((wl, f"{K_BATCH} HVPs, op @ V ({r['nethessian_mode']})",
                     f"{fmt_t(r['median_s']['nethessian op @ V'])} = {x:.1f} grads",
                     f"loop of 32 {g['nethessian loop of 32']:.1f}; vmap(jvp(grad)) {g['vmap(jvp(grad))']:.1f}; "
                     f"raw batched kept {g['raw kept graph batched (plain torch)']:.1f}",
                     f"{x:.1f} grads", "≤ 35 grads" if target else "info",
                     _flag(r, yesno(x <= 35, r["correct"]) if target else ("—" if r["correct"] else "WRONG RESULT"))))
    if "dense" in res:
        s = res["dense"]["summary"]
        a, b = s["nethessian"], s["torch.func.hessian"]
        speed = b["time_median_s"] / a["time_median_s"]
        mem = a["extra_peak_median_bytes"] / b["extra_peak_median_bytes"]
        peers = "; ".join(f"{m} {fmt_t(v['time_median_s'])} +{fmt_b(v['extra_peak_median_bytes'])}"
                          for m, v in s.items() if m != "nethessian")
        rows.append(("W2", "dense Hessian: time, extra peak RSS",
                     f"{fmt_t(a['time_median_s'])}, +{fmt_b(a['extra_peak_median_bytes'])}", peers,
                     f"{speed:.2f}× faster, {mem:.2f}× memory (vs torch.func)",
                     "≥ 2× faster, ≤ 0.25× memory",
                     _flag(res["dense"], yesno(speed >= 2 and mem <= 0.25, res["dense"]["correct"]))))
    head = ("workload", "measurement", "nethessian", "peers (in gradients unless said)", "ratio", "target", "met?")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few repetitions (smoke test)")
    ap.add_argument("--only", action="append", choices=["hvp", "batch", "dense"],
                    help="run only this part (repeatable)")
    ap.add_argument("--workloads", default="W2,W3,W4", help="HVP/batch workloads (default W2,W3,W4)")
    ap.add_argument("--out", default=None, help="JSON output (default benchmarks/results/core.json, "
                                                "core_quick.json with --quick)")
    ap.add_argument("--threads", type=int, default=THREADS,
                    help=f"torch threads (default: the cores this process may use, {THREADS})")
    ap.add_argument("--wait-quiet", type=float, default=20.0, metavar="S",
                    help="before each section wait up to S seconds for other processes to use "
                         "under 0.3 cores (default 20; 0: don't wait)")
    ap.add_argument("--omp-wait", choices=["auto", "default", "passive"], default="auto",
                    help="OpenMP wait policy: passive (threads sleep at barriers: robust on a busy "
                         "machine), default (torch's), auto (passive if others are busy at start); "
                         "an OMP_WAIT_POLICY in the environment wins")
    ap.add_argument("--dense-worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    ap.add_argument("--worker-save", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.dense_worker:
        dense_worker(args.dense_worker, args.worker_out, args.worker_save, args.threads)
        return 0

    torch.set_num_threads(args.threads)
    parts = args.only or ["hvp", "batch", "dense"]
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    if args.quick:
        reps, sample_s, first_reps, breps, bsample_s, rounds = 3, 0.02, 2, 2, 0.05, 1
    else:
        reps, sample_s, first_reps, breps, bsample_s, rounds = 15, 0.1, 7, 9, 0.2, 3
    out_path = Path(args.out) if args.out else HERE / "results" / ("core_quick.json" if args.quick else "core.json")

    t_start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    res = {}
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__, "nethessian": nh.__version__, "python": platform.python_version(),
        "platform": platform.platform(), "machine": platform.machine(),
        "torch_threads": torch.get_num_threads(), "cpu_affinity": THREADS, "cpu_count": os.cpu_count(),
        "loadavg_start": open("/proc/loadavg").read().split()[:3],
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "omp_wait_choice": OMP_WAIT, "others_cpu_cores_at_start": OMP_PROBE,
        "quick": args.quick, "parts": parts, "workloads": workloads,
        "settings": {"reps": reps, "sample_s": sample_s, "first_reps": first_reps,
                     "batch_reps": breps, "batch_sample_s": bsample_s, "dense_rounds": rounds},
        "workload_descriptions": DESCRIPTIONS,
    }
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, OpenMP wait policy "
        f"{os.environ.get('OMP_WAIT_POLICY', 'default')} ({OMP_WAIT}; others used "
        f"{'?' if OMP_PROBE is None else f'{OMP_PROBE:.1f}'} cores at start), parts {parts}")
    problems = {}
    contention = meta["others_cpu_cores"] = {}

    def section(key, fn):
        return measured_section(key, fn, contention, args.wait_quiet, log)

    if "hvp" in parts:
        res["hvp"] = {}
        for wl in workloads:
            pb = problems.setdefault(wl, Problem(wl))
            res["hvp"][wl] = section(f"hvp/{wl}", lambda: run_hvp(pb, reps, sample_s, first_reps, log))
    if "batch" in parts:
        res["batch"] = {}
        for wl in workloads:
            pb = problems.setdefault(wl, Problem(wl))
            res["batch"][wl] = section(f"batch/{wl}", lambda: run_batch(pb, breps, bsample_s, log))
    problems.clear()
    gc.collect()
    if "dense" in parts:
        res["dense"] = section("dense/W2", lambda: run_dense(rounds, args.threads, log))
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    table = build_table(res)
    print(table)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps({"meta": meta, "results": res, "table": table}, indent=1))
    log(f"wrote {out_path}")
    ok = all(r["correct"] for part in ("hvp", "batch") for r in res.get(part, {}).values())
    ok = ok and res.get("dense", {}).get("correct", True)
    if not ok:
        log("CORRECTNESS CHECK FAILED: see rel_err fields in the JSON")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
