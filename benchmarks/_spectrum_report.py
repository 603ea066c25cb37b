"""bench_spectrum's report: the eigenvalue, trace and target tables, and the targets."""

from __future__ import annotations

import statistics

from _spectrum_trace import TRACE_METHODS
from _timing import table_head

TARGET_SPEEDUP = 3.0  # nethessian vs scipy eigsh and PyHessian

__all__ = ["TARGET_SPEEDUP", "eig_table", "trace_table", "targets", "targets_table"]


def _eig_row(wl, n, s):
    if "failed" in s:
        return f"| {wl} | {n} | failed: {s['failed'][:80]} | | | | | |"
    mv = s["matvecs_median"]
    mv = f"{mv:.0f}" if s["matvecs_max"] == mv else f"{mv:.0f} (max {s['matvecs_max']})"
    sp = s.get("nethessian_speedup")
    return (
        f"| {wl} | {n} | {s['time_median_s']:.2f} | {mv} | {s['max_rel_error_worst']:.1e} | "
        f"{'yes' if s['reached_1e-3_all_seeds'] else '**no**'} | {s['seconds_per_matvec'] * 1e3:.1f} ms"
        + (f" ({s['product_s'] * 1e3:.1f} ms)" if "product_s" in s else "")
        + " | "
        + ("—" if n == "nethessian b=1" else (f"{sp:.2f}×" if sp is not None else "n/a"))
        + " |"
    )


def eig_table(res):
    head = (
        "workload",
        "method",
        "time s",
        "matvecs",
        "rel. error of top-5 (worst seed)",
        "reached 1e-3?",
        "s per matvec (1 bare product)",
        "nethessian b=1 speed-up",
    )
    lines = table_head(head)
    for wl, r in res.items():
        lines += [_eig_row(wl, n, s) for n, s in r["summary"].items()]
    return "\n".join(lines)


def _trace_row(wl, meth, tr, d, p):
    ratio = d.get("time_vs_curvlinops_paired_median")
    same = d.get("nethessian_time_same_seeds_median_s")
    return (
        f"| {wl} | {meth} | {d['matvecs']:.0f} | {d['n']} | "
        f"{d['mean_abs_error']:.3g} ({d['mean_abs_error'] / abs(tr):.1%}) | "
        f"{d['mean_stderr']:.3g} | {d['rms_z']:.2f} | {d['within_2_stderr']:.0%} | "
        f"{d['time_median_s']:.2f} s | "
        + (f"{p['n']}" if p else "0")
        + " | "
        + (f"{same:.2f} s" if same is not None else "—")
        + " | "
        + (f"{p['time_median_s']:.2f} s" if p else "—")
        + " | "
        + (f"{p['mean_abs_error']:.3g}" if p else "—")
        + " | "
        + (f"{ratio:.2f}" if ratio is not None else "—")
        + " |"
    )


def trace_table(res):
    head = (
        "workload",
        "method",
        "matvecs",
        "seeds",
        "mean abs error (rel.)",
        "mean reported stderr",
        "RMS z",
        "|z|≤2",
        "nethessian time (all seeds)",
        "curvlinops seeds",
        "nethessian time (same seeds)",
        "curvlinops time",
        "curvlinops mean abs error",
        "nh / curvlinops time (paired)",
    )
    lines = table_head(head)
    for wl, r in res.items():
        if "skipped" in r:
            lines.append(f"| {wl} | skipped: {r['skipped']} |" + " |" * (len(head) - 2))
            continue
        tr = r["reference"]["value"]
        for meth in TRACE_METHODS:
            mine = r["summary"][f"nethessian {meth}"]
            peer = r["summary"].get(f"curvlinops {meth}", {})
            lines += [_trace_row(wl, meth, tr, d, peer.get(b)) for b, d in mine.items()]
    return "\n".join(lines)


def _speedup_target(wl, s, label, pick):
    """nethessian b=1 against the fastest peer configuration that ``pick`` selects."""
    nh1 = s.get("nethessian b=1", {})
    ok_nh = {n: x for n, x in s.items() if n.startswith("nethessian b=") and x.get("reached_1e-3_all_seeds")}
    best = min(ok_nh, key=lambda n: ok_nh[n]["time_median_s"], default=None)
    peers = {n: x for n, x in s.items() if "time_median_s" in x and pick(n, x)}
    if not peers or not nh1.get("time_median_s"):
        return {
            "workload": wl,
            "target": f"≥{TARGET_SPEEDUP:g}× faster than {label}",
            "met": None,
            "measured": "peer unavailable or failed",
        }
    pn = min(peers, key=lambda n: peers[n]["time_median_s"])
    pt = peers[pn]["time_median_s"]
    sp1 = pt / nh1["time_median_s"]
    spb = pt / ok_nh[best]["time_median_s"] if best else None
    return {
        "workload": wl,
        "target": f"top-5 to 1e-3 ≥{TARGET_SPEEDUP:g}× faster than {label}",
        "peer_config": pn,
        "peer_reached_1e-3": peers[pn]["reached_1e-3_all_seeds"],
        "peer_time_s": pt,
        "peer_matvecs": peers[pn]["matvecs_median"],
        "nethessian_time_s": nh1["time_median_s"],
        "nethessian_matvecs": nh1["matvecs_median"],
        "speedup_b1": sp1,
        "speedup_best_block": spb,
        "best_block": best,
        "met": bool(nh1.get("reached_1e-3_all_seeds", False) and sp1 >= TARGET_SPEEDUP),
        "met_with_best_block": bool(spb is not None and spb >= TARGET_SPEEDUP),
    }


EIG_COMPARATORS = (
    (
        "scipy eigsh on curvlinops (fastest tol that reached 1e-3)",
        lambda n, x: n.startswith("eigsh") and "on curvlinops" in n and x["reached_1e-3_all_seeds"],
    ),
    ("PyHessian at its defaults", lambda n, x: n == "PyHessian defaults"),
)


def _trace_targets(wl, r):
    """Honest stderrs per method; nethessian no slower than curvlinops at equal products."""
    out = []
    for meth, d in r["honesty"].items():
        honest = d["rms_z"] is not None and d["rms_z"] <= 1.5 and d["within_2_stderr"] >= 0.8
        out.append(
            {
                "workload": wl,
                "target": f"{meth} stderr honest (RMS z ≤ 1.5, ≥80% within 2 stderr)",
                "rms_z": d["rms_z"],
                "within_2_stderr": d["within_2_stderr"],
                "n": d["n"],
                "met": honest,
            }
        )
    ratios = [
        (meth, b, d["time_vs_curvlinops_paired_median"])
        for meth in TRACE_METHODS
        for b, d in r["summary"][f"nethessian {meth}"].items()
        if "time_vs_curvlinops_paired_median" in d
    ]
    if ratios:
        worst = max(ratios, key=lambda t: t[2])
        out.append(
            {
                "workload": wl,
                "target": "trace no slower than curvlinops at equal matvecs",
                "worst_ratio": worst[2],
                "worst_at": f"{worst[0]} {worst[1]}",
                "median_ratio": statistics.median(t[2] for t in ratios),
                "n_slower": sum(t[2] > 1.0 for t in ratios),
                "n": len(ratios),
                "met": worst[2] <= 1.0,
            }
        )
    return out


def _own_work_target(wl, ow):
    """The eigensolver's own work (everything but products, instrumented) under 20 % of its products' time."""
    return {
        "workload": wl,
        "target": f"eigensolver's own work < {ow['target']:.0%} of its products' time (nethessian b=1)",
        "own_fraction": ow["own_over_products_median"],
        "own_s": ow["own_s_median"],
        "products_s": ow["products_s_median"],
        "met": bool(ow["met"]),
    }


def targets(res_eig, res_trace):
    """The issue's targets, evaluated from the measurements.

    Eigenvalues: nethessian b=1 (the default) must reach 1e-3 on every seed and be
    ≥ 3x faster than (i) every eigsh configuration that reached 1e-3 (so the loosest
    eigsh tol that still got there is the comparator) and (ii) PyHessian at its
    defaults (the issue's definition, although PyHessian's defaults do not reach 1e-3);
    the fastest block size that reached 1e-3 is reported beside it.
    """
    out = [
        _speedup_target(wl, r["summary"], label, pick) for wl, r in res_eig.items() for label, pick in EIG_COMPARATORS
    ]
    out += [_own_work_target(wl, r["own_work"]) for wl, r in res_eig.items() if "own_work" in r]
    for wl, r in res_trace.items():
        if "skipped" not in r:
            out += _trace_targets(wl, r)
    return out


def targets_table(ts):
    lines = ["| workload | target | measured | met? |", "|---|---|---|---|"]
    for t in ts:
        if "speedup_b1" in t:
            m = (
                f"b=1 {t['nethessian_time_s']:.2f} s / {t['nethessian_matvecs']:.0f} Av vs {t['peer_config']} "
                f"{t['peer_time_s']:.2f} s / {t['peer_matvecs']:.0f} Av"
                + ("" if t["peer_reached_1e-3"] else " (did not reach 1e-3)")
                + f": **{t['speedup_b1']:.2f}×**"
            )
            if t["best_block"] and t["best_block"] != "nethessian b=1":
                m += f"; fastest block ({t['best_block']}): {t['speedup_best_block']:.2f}×"
            met = "yes" if t["met"] else ("**no** (yes with block)" if t["met_with_best_block"] else "**no**")
        elif "own_fraction" in t:
            m = f"{t['own_s']:.3f} s own vs {t['products_s']:.3f} s products: **{t['own_fraction']:.1%}**"
            met = "yes" if t["met"] else "**no**"
        elif "rms_z" in t:
            m = f"RMS z {t['rms_z']:.2f}, {t['within_2_stderr']:.0%} within 2 stderr (n={t['n']})"
            met = "yes" if t["met"] else "**no**"
        elif "worst_ratio" in t:
            m = (
                f"nh/curvlinops time: median {t['median_ratio']:.2f}, worst {t['worst_ratio']:.2f} "
                f"({t['worst_at']}); slower in {t['n_slower']} of {t['n']}"
            )
            met = "yes" if t["met"] else "**no**"
        else:
            m, met = t.get("measured", ""), "n/a"
        lines.append(f"| {t['workload']} | {t['target']} | {m} | {met} |")
    return "\n".join(lines)
