"""Timing, ratio and report helpers shared by the benchmark scripts.

Times are taken round-robin ("interleaved") so that drift on a shared machine
hits every method alike; costs are reported as ratios to one gradient.
"""

from __future__ import annotations

import datetime as _dt
import gc
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

import nethessian as nh

THREADS = len(os.sched_getaffinity(0))
CONTENDED = 0.3  # cores used by other processes above which a measurement is flagged

__all__ = [
    "THREADS",
    "time_calls",
    "median_time",
    "rotated",
    "bench_interleaved",
    "gradient_ratios",
    "make_log",
    "base_meta",
    "finish_meta",
    "write_json",
    "exit_status",
    "fmt_t",
    "fmt_b",
    "yesno",
    "flag",
    "table_head",
]


def time_calls(fn, n):
    """Seconds per call of ``fn`` over ``n`` back-to-back calls, garbage collector off."""
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


def median_time(fn, reps, before=None):
    """Median seconds of ``reps`` calls of ``fn``, ``before()`` (a barrier, a cache flush) run untimed ahead of each."""
    ts = []
    for _ in range(reps):
        if before is not None:
            before()
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def rotated(names, r):
    """``names`` rotated left by ``r`` places: round ``r`` of a round-robin order."""
    names = list(names)
    s = r % len(names)
    return names[s:] + names[:s]


def bench_interleaved(fns, reps, sample_s, log=None):
    """Median seconds per call of each fn, sampled round-robin so drift hits all alike.

    Each fn is warmed up (2 calls), then given an inner count so one sample lasts
    about ``sample_s``; every repetition times one sample of each fn, in a rotating order.

    Returns:
        ``(medians, samples, inner_counts, paired)`` where ``paired[name]`` is the median over
        repetitions of ``sample / gradient sample of the same round`` (None without "gradient").
    """
    inner = {}
    for name, fn in fns.items():
        fn()
        fn()
        t = time_calls(fn, 1)
        inner[name] = max(1, int(math.ceil(sample_s / max(t, 1e-7))))
    samples = {name: [] for name in fns}
    for r in range(reps):
        gc.collect()
        for name in rotated(fns, r):
            samples[name].append(time_calls(fns[name], inner[name]))
    med = {name: statistics.median(s) for name, s in samples.items()}
    paired = (
        {name: statistics.median(x / g for x, g in zip(s, samples["gradient"])) for name, s in samples.items()}
        if "gradient" in samples
        else None
    )
    if log:
        log(" ".join(f"{n}={med[n] * 1e3:.3f}ms" for n in fns))
    return med, samples, inner, paired


def gradient_ratios(med, samples, paired):
    """Costs in gradients three ways: ratio of medians, median paired ratio, ratio of minima."""
    gm = med["gradient"]
    return {
        "in_gradients": {k: v / gm for k, v in med.items()},
        "in_gradients_paired_median": paired,
        "in_gradients_of_minima": {k: min(v) / min(samples["gradient"]) for k, v in samples.items()},
    }


def make_log(t_start):
    """A logger that prints ``[elapsed] message`` on stderr."""

    def log(msg):
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    return log


def _loadavg():
    with open("/proc/loadavg") as fh:
        return fh.read().split()[:3]


def base_meta(**extra):
    """The run's environment (versions, threads, load, BLAS/OpenMP settings) plus ``extra``."""
    meta = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "nethessian": nh.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_affinity": THREADS,
        "loadavg_start": _loadavg(),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
    }
    meta.update(extra)
    return meta


def finish_meta(meta, t_start):
    """Record the wall time and the load average at the end of the run."""
    meta["wall_s"] = time.perf_counter() - t_start
    meta["loadavg_end"] = _loadavg()


def write_json(out_path, obj, log, **kw):
    """Write ``obj`` as indented JSON to ``out_path`` (creating its folder) and say so."""
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(obj, indent=1, **kw))
    log(f"wrote {out_path}")


def exit_status(ok, log, failure):
    """0 if ``ok``, else log ``failure`` and return 1."""
    if ok:
        return 0
    log(failure)
    return 1


def fmt_t(s):
    return f"{s:.2f} s" if s >= 1 else f"{s * 1e3:.2f} ms"


def fmt_b(b):
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def yesno(ok, correct=True):
    if not correct:
        return "WRONG RESULT"
    return "yes" if ok else "**no**"


def flag(r, text):
    """``text``, marked as contended when others used over 0.3 cores during ``r``'s section."""
    load = r.get("others_cpu_cores_during")
    if load is not None and load > CONTENDED:
        return f"{text} (contended: others {load:.1f} cores)"
    return text


def table_head(head):
    """The header and rule lines of a markdown table with columns ``head``."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
