"""bench_core's part 3: the dense W2 Hessian, each method in a fresh subprocess.

torch's CPU allocations are invisible to ``tracemalloc``, so the extra peak memory
is read from the kernel: the worker warms torch up on a tiny problem, resets the
RSS high-water mark (``/proc/self/clear_refs``), runs the method once and reports
``VmHWM − VmRSS-at-reset``. The worker is ``bench_core.py --dense-worker METHOD``,
so that bench_core's environment set-up (threads, OpenMP wait policy) runs first.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.func import functional_call

import nethessian as nh

from _timing import rotated
from _workloads import make_workload, rel_err

DENSE_METHODS = ["nethessian", "torch.func.hessian", "autograd.functional.hessian", "raw chunked 256"]
TOL_DENSE = 1e-3  # nethessian dense vs torch.func.hessian (both float32), Frobenius and max-abs
SCRIPT = Path(__file__).resolve().parent / "bench_core.py"

__all__ = ["DENSE_METHODS", "TOL_DENSE", "dense_worker", "run_dense"]


# ----------------------------------------------------------------------------------------
# the worker (one method, one process)
# ----------------------------------------------------------------------------------------
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


def _maxrss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _flat_loss(model, loss_fn, X, y):
    """``f(θ)``: the loss as a function of the flat parameter vector, and θ itself."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [tuple(p.shape) for _, p in model.named_parameters()]
    numels = [p.numel() for _, p in model.named_parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def f_flat(t):
        named = {n: p.reshape(s) for n, p, s in zip(names, torch.split(t, numels), shapes)}
        return loss_fn(functional_call(model, named, (X,)), y)

    return f_flat, theta


def _raw_chunked(f_flat, theta, chunk=256):
    """Plain-torch dense Hessian: ``chunk`` identity columns at a time through a kept graph."""
    P = theta.numel()
    t = theta.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        (g,) = torch.autograd.grad(f_flat(t), t, create_graph=True)
    H = torch.empty(P, P, dtype=theta.dtype)
    for s in range(0, P, chunk):
        e = min(P, s + chunk)
        E = torch.zeros(e - s, P, dtype=theta.dtype)
        E[torch.arange(e - s), torch.arange(s, e)] = 1
        H[:, s:e] = torch.autograd.grad(g, t, E, retain_graph=True, is_grads_batched=True)[0].T
    return H


def _dense_method(method, model, loss_fn, X, y):
    """The zero-argument callable computing the dense Hessian with ``method``."""
    f_flat, theta = _flat_loss(model, loss_fn, X, y)
    return {
        "nethessian": lambda: nh.hessian(model, loss_fn, (X, y)).dense,
        "torch.func.hessian": lambda: torch.func.hessian(f_flat)(theta),
        "autograd.functional.hessian": lambda: torch.autograd.functional.hessian(f_flat, theta, vectorize=True),
        "raw chunked 256": lambda: _raw_chunked(f_flat, theta),
    }[method]


def _warm_up(model, loss_fn, X, y):
    """Warm up torch (autograd, functional_call, vmap/jvp machinery) on a tiny problem."""
    tiny = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    Xt, yt = torch.randn(5, 3), torch.tensor([0, 1, 0, 1, 1])
    nh.hessian(tiny, torch.nn.CrossEntropyLoss(), (Xt, yt))
    tiny_f, tt = _flat_loss(tiny, torch.nn.functional.cross_entropy, Xt, yt)
    torch.func.hessian(tiny_f)(tt)
    torch.autograd.functional.hessian(tiny_f, tt, vectorize=True)
    loss = loss_fn(model(X), y)
    torch.autograd.grad(loss, list(model.parameters()))


def _measure(fn):
    """Run ``fn`` once: its result, seconds, and the memory counters around it."""
    gc.collect()
    hwm_reset = _reset_hwm()
    rss0, hwm0, maxrss0 = _status_kb("VmRSS"), _status_kb("VmHWM"), _maxrss()
    t0 = time.perf_counter()
    H = fn()
    dt = time.perf_counter() - t0
    hwm1, maxrss1 = _status_kb("VmHWM"), _maxrss()
    # baseline: the RSS when the high-water mark was reset (else the high-water mark before)
    extra = hwm1 - (rss0 if hwm_reset else hwm0)
    return H, {
        "time_s": dt,
        "extra_peak_bytes": extra,
        "hwm_reset": hwm_reset,
        "rss_baseline_bytes": rss0,
        "hwm_before_bytes": hwm0,
        "hwm_after_bytes": hwm1,
        "ru_maxrss_delta_bytes": maxrss1 - maxrss0,
    }


def dense_worker(method, out_path, save_path, threads):
    """Compute W2's dense Hessian with ``method``; write timings, memory and a probe as JSON."""
    torch.set_num_threads(threads)
    model, loss_fn, X, y = make_workload("W2")
    P = sum(p.numel() for p in model.parameters())
    fn = _dense_method(method, model, loss_fn, X, y)
    _warm_up(model, loss_fn, X, y)
    H, mem = _measure(fn)
    U = torch.randn(P, 4, generator=torch.Generator().manual_seed(99), dtype=H.dtype)
    res = {
        "method": method,
        **mem,
        "shape": list(H.shape),
        "dtype": str(H.dtype),
        "probe": (H.double() @ U.double()).tolist(),  # fingerprint of this run's result
        "asymmetry": float((H - H.T).abs().max() / H.abs().max()),
    }
    if save_path:
        torch.save(H, save_path)
    Path(out_path).write_text(json.dumps(res))


# ----------------------------------------------------------------------------------------
# the parent: rounds of fresh workers, then the correctness checks
# ----------------------------------------------------------------------------------------
def _run_worker(method, out_path, save, threads):
    omp = "passive" if os.environ.get("OMP_WAIT_POLICY") == "PASSIVE" else "default"
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--dense-worker",
        method,
        "--worker-out",
        out_path,
        "--threads",
        str(threads),
        "--omp-wait",
        omp,
    ]
    if save:
        cmd += ["--worker-save", save]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dense worker {method} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(Path(out_path).read_text())


def _check(results, saved, log):
    """Full matrices nethessian vs torch.func, and every run's probe vs nethessian's."""
    H_nh = torch.load(saved["nethessian"]).double()
    H_fn = torch.load(saved["torch.func.hessian"]).double()
    diff = H_nh - H_fn
    check = {
        "frobenius_rel": float(diff.norm() / H_fn.norm()),
        "maxabs_rel": float(diff.abs().max() / H_fn.abs().max()),
    }
    del H_nh, H_fn, diff
    ref_probe = torch.tensor(results["nethessian"][0]["probe"], dtype=torch.float64)
    probe_errs = {
        m: [rel_err(torch.tensor(r["probe"], dtype=torch.float64), ref_probe) for r in rs] for m, rs in results.items()
    }
    check["probe_rel_vs_nethessian"] = probe_errs
    worst_probe = max(e for es in probe_errs.values() for e in es)
    correct = check["frobenius_rel"] <= TOL_DENSE and check["maxabs_rel"] <= TOL_DENSE and worst_probe <= TOL_DENSE
    log(
        f"  [W2] dense check: nethessian vs torch.func Frobenius rel {check['frobenius_rel']:.1e}, "
        f"max-abs rel {check['maxabs_rel']:.1e}; worst probe rel {worst_probe:.1e}"
    )
    return check, correct


def _rounds(rounds, threads, tmp, log):
    """``rounds`` runs of every method, in rotating order; round 0 saves two full matrices."""
    results = {m: [] for m in DENSE_METHODS}
    saved = {}
    for r in range(rounds):
        for m in rotated(DENSE_METHODS, r):
            stem = m.replace(" ", "_")
            save = None
            if r == 0 and m in ("nethessian", "torch.func.hessian"):
                save = saved[m] = os.path.join(tmp, f"{stem}.pt")
            res = _run_worker(m, os.path.join(tmp, f"{stem}_{r}.json"), save, threads)
            results[m].append(res)
            log(
                f"  [W2] dense round {r}: {m:<28} {res['time_s']:7.2f} s  "
                f"+{res['extra_peak_bytes'] / 2**20:7.0f} MiB (hwm reset: {res['hwm_reset']})"
            )
    return results, saved


def run_dense(rounds, threads, log):
    """The dense W2 Hessian of every method: median time and extra peak RSS, and checks."""
    with tempfile.TemporaryDirectory(prefix="nh_bench_dense_") as tmp:
        results, saved = _rounds(rounds, threads, tmp, log)
        check, correct = _check(results, saved, log)
    return {"runs": results, "summary": summarise(results), "check": check, "correct": correct}


def summarise(results):
    """Per method: median time and extra peak RSS over the rounds (the probes dropped)."""
    for rs in results.values():
        for r in rs:
            r.pop("probe")
    return {
        m: {
            "time_median_s": statistics.median(r["time_s"] for r in rs),
            "extra_peak_median_bytes": statistics.median(r["extra_peak_bytes"] for r in rs),
        }
        for m, rs in results.items()
    }
