"""Machine-load helpers shared by the benchmarks (no torch import: used before torch loads)."""

from __future__ import annotations

import os
import time

__all__ = ["cpu_snapshot", "others_load", "wait_quiet", "measured_section"]


def cpu_snapshot():
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    total = sum(f[:8])  # user nice system idle iowait irq softirq steal
    idle = f[3] + f[4]
    t = os.times()
    ours = t.user + t.system + t.children_user + t.children_system
    return total, idle, ours, time.perf_counter()


def others_load(a, b):
    """Cores' worth of CPU used by other processes between two snapshots."""
    total, idle = b[0] - a[0], b[1] - a[1]
    if total <= 0:
        return 0.0
    ncpu = os.cpu_count() or 1
    busy_cores = (total - idle) / total * ncpu
    ours_cores = (b[2] - a[2]) / max(b[3] - a[3], 1e-9)
    return max(0.0, busy_cores - ours_cores)


def wait_quiet(max_wait_s, threshold, log):
    """Wait (up to max_wait_s) until other processes use under ``threshold`` cores for 2 s."""
    if max_wait_s <= 0:
        return None
    t0 = time.perf_counter()
    quiet = 0
    while True:
        a = cpu_snapshot()
        time.sleep(1.0)
        load = others_load(a, cpu_snapshot())
        quiet = quiet + 1 if load < threshold else 0
        if quiet >= 2:
            return load
        if time.perf_counter() - t0 > max_wait_s:
            log(
                f"  machine not quiet for 2 s in a row within {max_wait_s:.0f} s (others: {load:.1f} "
                "cores in the last second): measuring anyway"
            )
            return load


def measured_section(key, fn, contention, wait_s, log, threshold=0.3):
    """Run ``fn`` after waiting for a quiet machine; record and flag others' CPU use during it."""
    before = wait_quiet(wait_s, threshold, log)
    a = cpu_snapshot()
    out = fn()
    load = others_load(a, cpu_snapshot())
    contention[key] = {"before": before, "during": load}
    out["others_cpu_cores_during"] = load
    if load > threshold:
        log(f"  WARNING: other processes used {load:.1f} cores during {key}: timings are contended")
    return out
