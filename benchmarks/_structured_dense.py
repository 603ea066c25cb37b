"""bench_structured's part 4: the dense Hessian of the MLP 64-48-32-10, each method in a fresh process.

Time and extra peak memory as in bench_core's dense part (``_dense_worker``: torch's CPU
allocations are invisible to ``tracemalloc``, so the worker warms torch up, resets the RSS
high-water mark through ``/proc/self/clear_refs`` and reports ``VmHWM − VmRSS-at-reset``).
The worker is ``bench_structured.py --dense-worker METHOD`` so that the script's thread
settings apply first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import nethessian as nh

from _dense_worker import _flat_loss, _measure, _warm_up, summarise
from _timing import rotated

METHODS = ["nh structured", "nh autodiff", "torch.func.hessian"]
TOL_DENSE = 1e-4  # structured vs autodiff (both float32): max |ΔH| / max |H|
SCRIPT = Path(__file__).resolve().parent / "bench_structured.py"

__all__ = ["METHODS", "TOL_DENSE", "dense_problem", "dense_worker", "run_dense"]


def dense_problem(quick):
    """``(description, model, loss_fn, X, y)``: MLP 64-48-32-10 tanh CE N=512 (quick: 32-24-16-10, N=64)."""
    sizes, n = ((32, 24, 16, 10), 64) if quick else ((64, 48, 32, 10), 512)
    model, loss_fn, (X, y) = nh.examples.mlp(sizes, n=n, activation="tanh", seed=0)
    P = sum(p.numel() for p in model.parameters())
    return f"MLP {'-'.join(map(str, sizes))} tanh, CE, N={n} (P={P:,})", model, loss_fn, X, y


def _method(method, model, loss_fn, X, y):
    f_flat, theta = _flat_loss(model, loss_fn, X, y)

    def nh_dense(engine):
        H = nh.hessian(model, loss_fn, (X, y), engine=engine)
        assert H.engine == engine, H.engine_reason
        return H.dense

    return {
        "nh structured": lambda: nh_dense("structured"),
        "nh autodiff": lambda: nh_dense("autodiff"),
        "torch.func.hessian": lambda: torch.func.hessian(f_flat)(theta),
    }[method]


def dense_worker(method, quick, out_path, save_path, threads):
    """One method's dense Hessian in this (fresh) process: time, extra peak RSS, a probe."""
    torch.set_num_threads(threads)
    _, model, loss_fn, X, y = dense_problem(quick)
    fn = _method(method, model, loss_fn, X, y)
    _warm_up(model, loss_fn, X, y)
    tiny, tiny_loss, tiny_data = nh.examples.mlp((3, 4, 2), n=5)
    nh.hessian(tiny, tiny_loss, tiny_data, engine="structured")  # the structured path's first call
    H, mem = _measure(fn)
    U = torch.randn(H.shape[0], 4, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    res = {"method": method, **mem, "shape": list(H.shape), "probe": (H.double() @ U).tolist()}
    if save_path:
        torch.save(H, save_path)
    Path(out_path).write_text(json.dumps(res))


def _run_worker(method, quick, out_path, save, threads):
    cmd = [sys.executable, str(SCRIPT), "--dense-worker", method, "--worker-out", out_path, "--threads", str(threads)]
    cmd += (["--quick"] if quick else []) + (["--worker-save", save] if save else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"dense worker {method} failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(Path(out_path).read_text())


def _check(saved, results, log):
    """Structured vs autodiff in full; every run's probe vs the autodiff run's."""
    Hs = torch.load(saved["nh structured"]).double()
    Ha = torch.load(saved["nh autodiff"]).double()
    maxabs = float((Hs - Ha).abs().max() / Ha.abs().max())
    del Hs, Ha
    ref = torch.tensor(results["nh autodiff"][0]["probe"], dtype=torch.float64)
    probes = {
        m: [float((torch.tensor(r["probe"], dtype=torch.float64) - ref).norm() / ref.norm()) for r in rs]
        for m, rs in results.items()
    }
    worst = max(e for es in probes.values() for e in es)
    log(f"  dense check: structured vs autodiff max-abs rel {maxabs:.1e}; worst probe rel {worst:.1e}")
    check = {"structured_vs_autodiff_maxabs_rel": maxabs, "probe_rel_vs_autodiff": probes}
    return check, maxabs <= TOL_DENSE and worst <= 1e-3


def run_dense(rounds, quick, threads, log):
    """``rounds`` fresh-process runs of each method (rotating order): median time and extra peak RSS."""
    results, saved = {m: [] for m in METHODS}, {}
    with tempfile.TemporaryDirectory(prefix="nh_bench_structured_") as tmp:
        for r in range(rounds):
            for m in rotated(METHODS, r):
                stem = m.replace(" ", "_").replace(".", "_")
                save = None
                if r == 0 and m != "torch.func.hessian":
                    save = saved[m] = os.path.join(tmp, f"{stem}.pt")
                res = _run_worker(m, quick, os.path.join(tmp, f"{stem}_{r}.json"), save, threads)
                results[m].append(res)
                log(
                    f"  dense round {r}: {m:<20} {res['time_s']:7.2f} s  "
                    f"+{res['extra_peak_bytes'] / 2**20:7.0f} MiB (hwm reset: {res['hwm_reset']})"
                )
        check, correct = _check(saved, results, log)
    return {"runs": results, "summary": summarise(results), "check": check, "correct": correct}
