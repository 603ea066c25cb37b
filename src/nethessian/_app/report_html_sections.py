"""HTML of the report's main sections, from the summary to the reproduce section.

Summary, problem, Hessian, eigenvalues, trace, density, quadratic model, gradient and reproduce:
one renderer per section id of ``report_html.SECTIONS`` (``RENDER`` maps the id to it);
each takes the report dict ``R`` and the images (data URIs by key) and returns one ``<section>``.
The structure sections (blocks, eigenvectors, GGN, input Hessian) are in ``report_html_more.py``.
"""

from __future__ import annotations

from typing import Any, Dict, List

import torch

from .report_html import _card, _e, _entry_names, _f, _fig, _matrix, _num, _table

__all__ = ["RENDER"]


def _extremes(R: Dict[str, Any]) -> List[float]:
    if R["eigenvalues"] is None:
        return []
    if R["mode"] == "dense":
        return R["eigenvalues"]["all"]
    return R["eigenvalues"]["smallest"]["eigenvalues"] + R["eigenvalues"]["largest"]["eigenvalues"]


def _free_note(R: Dict[str, Any]) -> str:
    if R["mode"] == "dense":
        return ""
    st = R["settings"]
    trace = (
        f"Hutch++ ({st['trace_matvecs']} products, ± standard error)"
        if R["trace"] is not None
        else "Hutch++ (not computed)"
    )
    steps = min(st["lanczos_steps"], R["num_parameters"])
    return (
        f'<div class="banner"><b>Matrix-free mode.</b> P = {R["num_parameters"]:,} parameters is above '
        f'<span class="mono">dense_max_params = {st["dense_max_params"]:,}</span>, so the dense '
        f"P × P Hessian is not formed: eigenvalues come from thick-restart Lanczos, the trace from "
        f"{trace} and the density from stochastic Lanczos quadrature ({st['density_probes']} probes × "
        f"{steps} steps). Raise dense_max_params for the exact dense sections.</div>"
    )


def _cond_text(v: Dict[str, Any]) -> str:
    return ("≥ " if v["condition_number_is_lower_bound"] else "") + _e(_f(v["condition_number"], 4))


def _trace_text(tr: Dict[str, Any]) -> str:
    return _e(_f(tr["value"], 6)) + ("" if tr["method"] == "exact" else f" ± {_e(_f(tr['stderr'], 2))}")


def _verdict_box(v: Dict[str, Any]) -> str:
    return f'<div class="verdict v-{v["kind"].replace(" ", "-")}"><b>{_e(v["kind"])}</b>{_e(v["message"])}</div>'


def _summary(R: Dict[str, Any], images) -> str:
    dense, P, v, tr, lam = R["mode"] == "dense", R["num_parameters"], R["verdict"], R["trace"], _extremes(R)
    cards = [
        _card("parameters P", _e(f"{P:,}"), "num_parameters", P),
        _card("cost J", _e(_f(R["cost"], 8)), "cost", R["cost"]),
        _card("gradient norm ‖∇J‖", _e(_f(R["gradient_norm"], 4)), "gradient_norm", R["gradient_norm"]),
    ]
    if lam and v is not None:
        cards += [
            _card("largest eigenvalue", _e(_f(max(lam), 5)), "lambda_max", max(lam)),
            _card(
                "smallest eigenvalue",
                _e(_f(min(lam), 5)),
                "lambda_min",
                min(lam),
                "" if dense else "of the computed extremes",
            ),
            _card("condition number", _cond_text(v), "condition_number", v["condition_number"]),
        ]
    if tr is not None:
        cards.append(_card("trace of H", _trace_text(tr), "trace", tr["value"], _e(tr["method"])))
    if v is not None:
        cards.append(
            _card(
                "eigenvalue signs",
                f'<span class="neg">{v["num_negative"]} −</span> · '
                f'<span class="pos">{v["num_positive"]} +</span> · {v["num_zero"]} ≈0',
                "signs",
                None,
                "negative · positive · ~zero" + ("" if dense else ", of the computed extremes"),
                True,
            )
        )
    return (
        f'<section id="summary"><h2>Summary</h2>{_free_note(R)}<div class="cards">{"".join(cards)}</div>'
        f"{_verdict_box(v) if v is not None else ''}</section>"
    )


def _problem(R: Dict[str, Any], images) -> str:
    prob, st = R["problem"], R["settings"]
    rows = [
        [f'<td class="mono">{_e(p["name"])}</td>', f'<td class="mono">{_e(tuple(p["shape"]))}</td>', _num(p["numel"])]
        for p in R["parameters"]
    ]
    return (
        f'<section id="problem"><h2>Problem</h2><p><b>{_e(prob["name"])}</b></p>'
        + (f"<p>{_e(prob['description'])}</p>" if prob["description"] else "")
        + f'<p class="muted">model <span class="mono">{_e(prob["model"])}</span>, loss '
        f'<span class="mono">{_e(prob["loss"])}</span> (reduction: {_e(st["reduction"])}), '
        f"{st['num_samples']:,} samples in {st['num_batches']:,} batch(es); J is over the whole data set.</p>"
        + _table(["parameter", "shape", "entries"], rows)
        + f"<details><summary>model</summary><pre>{_e(prob['model_repr'])}</pre></details></section>"
    )


def _hessian(R: Dict[str, Any], images) -> str:
    P = R["num_parameters"]
    if R["mode"] != "dense":
        return (
            '<section id="hessian"><h2>Hessian</h2>' + _free_note(R) + "<p>No heatmap: the matrix is never "
            "formed. Every number below comes from Hessian-vector products.</p></section>"
        )
    h = [
        '<section id="hessian"><h2>Hessian</h2>',
        f"<p>The exact {P} × {P} Hessian H = ∇²J(θ), formed column by column from Hessian-vector "
        "products; parameters flattened row-major in the order above. Red is positive, blue negative; "
        f"heavy lines separate parameter blocks. Relative asymmetry max|H − Hᵀ|/max|H| = "
        f'<span class="mono">{_e(_f(R["hessian"]["asymmetry"], 2))}</span>.</p>',
        _fig(images, "heatmap", "heatmap of the Hessian by parameter block"),
    ]
    blocks = R["hessian"]["blocks"]
    if blocks and P <= 16:
        scale = max(abs(x) for row in R["hessian"]["dense"] for x in row) or 1.0
        shapes = {p["name"]: p["shape"] for p in R["parameters"]}
        h.append('<h3>The blocks</h3><div class="blocks">')
        for key, b in blocks.items():
            h.append(
                f"<div><p><b>{_e(key)}</b> = {_e(b['of'])}</p>"
                + _matrix(
                    b["values"],
                    _entry_names(b["rows"], shapes[b["rows"]]),
                    _entry_names(b["cols"], shapes[b["cols"]]),
                    scale,
                )
                + "</div>"
            )
        h.append("</div>")
    return "".join(h) + "</section>"


def _eigenvalues(R: Dict[str, Any], images) -> str:
    v, lam = R["verdict"], _extremes(R)
    e = [
        f'<section id="eigenvalues"><h2>Eigenvalues and verdict</h2>{_verdict_box(v)}',
        f'<p>Condition number <span class="mono">{_cond_text(v)}</span> <span class="muted">'
        f"({_e(v['condition_number_note'])}; ∞ when an eigenvalue is ~0)</span>. A point is stationary when "
        "‖∇J‖ ≤ 1e-6; only then can it be a minimum or a saddle.</p>",
    ]
    if R["mode"] == "dense":
        e.append(_fig(images, "eigenvalues", "eigenvalues of the Hessian"))
        rows = [[_num(i), _num(x, 10, True, True)] for i, x in enumerate(lam, 1)]
        if len(rows) > 40:
            rows = rows[:10] + [['<td class="num muted">⋯</td>', '<td class="num muted">⋯</td>']] + rows[-10:]
        e.append(_table(["#", "eigenvalue λ"], rows))
    else:
        e.append(_fig(images, "eigenvalues", "extreme eigenvalues of the Hessian"))
        for which in ("largest", "smallest"):
            r = R["eigenvalues"][which]
            e.append(
                f"<h3>{which} ({r['num_matvecs']} products, converged: {r['converged']})</h3>"
                + _table(
                    ["eigenvalue λ", "residual ‖Hv − λv‖"],
                    [
                        [_num(x, 10, True, True), _num(res, 3, sci=True)]
                        for x, res in zip(r["eigenvalues"], r["residuals"])
                    ],
                )
            )
    return "".join(e) + "</section>"


def _trace(R: Dict[str, Any], images) -> str:
    tr = R["trace"]
    exact = tr["method"] == "exact"
    how = (
        "exact: the sum of the dense Hessian's diagonal"
        if exact
        else f"Hutch++ with {tr['num_matvecs']} Hessian-vector products; ± one standard error"
    )
    brow = [
        [
            f'<td class="mono">{_e(n)}</td>',
            _num(b["value"], 8, True, True),
            '<td class="num muted">exact</td>' if exact else _num(b["stderr"], 3, sci=True),
            _num(b["value"] / tr["value"] if tr["value"] else float("nan"), 3),
        ]
        for n, b in tr["blocks"].items()
    ]
    return (
        f'<section id="trace"><h2>Trace</h2><p>tr H = <span class="mono">{_trace_text(tr)}</span> '
        f'<span class="muted">({_e(how)})</span>: the sum of the eigenvalues. Per parameter block, the trace '
        "of the diagonal block (the blocks add up to the total):</p>"
        + _fig(images, "trace", "trace of each diagonal block")
        + _table(["block", "trace", "std. error", "share"], brow)
        + "</section>"
    )


def _density(R: Dict[str, Any], images) -> str:
    d = R["density"]
    dtxt = (
        "Each eigenvalue carries weight 1/P, broadened by a Gaussian of width σ = "
        f"{_f(d['sigma'], 3)}; the ticks at the bottom are the eigenvalues."
        if R["mode"] == "dense"
        else f"Stochastic Lanczos quadrature: {d['num_probes']} Gaussian probes × {d['lanczos_steps']} Lanczos "
        f"steps ({d['num_matvecs']} products), broadened with σ = {_f(d['sigma'], 3)}."
    )
    return (
        f'<section id="density"><h2>Spectral density</h2><p>{_e(dtxt)}</p>'
        + _fig(images, "density", "spectral density of the Hessian")
        + "</section>"
    )


def _quadratic(R: Dict[str, Any], images) -> str:
    qd = R["quadratic"]
    qrows = [
        [
            f"<td>{_e(x['label'])}</td>",
            _num(x["g_dot_d"], 5, True),
            _num(x["curvature_dHd"], 5, True),
            _num(x["slope"], 3),
            f"<td>{_e(x['slope_reason']['text'])}</td>",
        ]
        for x in qd["directions"]
    ]
    return (
        '<section id="quadratic"><h2>Quadratic model</h2><p>Along a unit direction d, the true cost '
        "J(θ + αd) against the second-order Taylor model q(αd) = J + α gᵀd + ½ α² dᵀHd, for |α| ≤ "
        f'<span class="mono">{_e(_f(qd["radius"], 3))}</span>. Where they part, third and higher '
        "derivatives matter; the slope of log|J − q| against log|α| is about 3 for a smooth cost.</p>"
        + _fig(images, "quadratic", "true cost against the quadratic model")
        + _table(["direction d", "gᵀd", "dᵀHd", "slope of |J − q|", "why"], qrows)
        + "</section>"
    )


def _gradient(R: Dict[str, Any], images) -> str:
    prow = [[f'<td class="mono">{_e(n)}</td>', _num(x, 6)] for n, x in R["gradient_norm_by_parameter"].items()]
    stationary = " (not a stationary point)." if (R["verdict"] or {}).get("kind") == "not stationary" else "."
    gr = [
        f'<section id="gradient"><h2>Gradient</h2><p>‖∇J‖ = <span class="mono">{_e(_f(R["gradient_norm"], 8))}'
        "</span>" + stationary + "</p>",
        _table(["parameter", "‖∂J/∂parameter‖"], prow),
    ]
    if R["gradient"] and R["num_parameters"] <= 40:
        gr.append('<div class="blocks">')
        for p in R["parameters"]:
            vals = torch.tensor(R["gradient"][p["name"]], dtype=torch.float64).reshape(-1).tolist()
            shape = p["shape"] if len(p["shape"]) == 2 else [len(vals), 1]
            rows_ = [vals[i * shape[1] : (i + 1) * shape[1]] for i in range(shape[0])]
            gr.append(
                f'<div><p class="mono">∂J/∂{_e(p["name"])}</p>'
                + _matrix(
                    rows_,
                    [str(i) for i in range(shape[0])],
                    [str(j) for j in range(shape[1])],
                    max(max(abs(x) for x in vals), 1e-300),
                )
                + "</div>"
            )
        gr.append("</div>")
    return "".join(gr) + "</section>"


_SETTING_KEYS = (
    "seed",
    "dense_max_params",
    "num_eigs",
    "trace_matvecs",
    "density_probes",
    "lanczos_steps",
    "ncv",
    "quadratic_radius",
    "params",
    "sections",
    "num_samples",
    "num_batches",
    "reduction",
    "dtype",
    "device",
    "hvp_method",
    "model_training_mode",
    "world_size",
    "date",
)


def _call(R: Dict[str, Any]) -> str:
    prob, st = R["problem"], R["settings"]
    if prob.get("builtin"):
        make = f"model, loss_fn, data = nh.examples.BUILTINS[{prob['builtin']!r}](seed={prob['seed']!r})\n"
    else:
        where = f" ({prob['source']})" if prob.get("source") else ""
        make = f"model, loss_fn, data = ...  # the same problem{where}\n"
    return (
        "import nethessian as nh\nfrom nethessian._app.report import build_report\n"
        + make
        + 'build_report(model, loss_fn, data, "report",\n'
        + ",\n".join(f"             {k}={st[k]!r}" for k in _SETTING_KEYS[:10])
        + ")"
    )


def _reproduce(R: Dict[str, Any], images) -> str:
    st = R["settings"]
    srows = [[f'<td class="mono">{_e(k)}</td>', f'<td class="mono">{_e(st.get(k))}</td>'] for k in _SETTING_KEYS]
    vrows = [[f'<td class="mono">{_e(k)}</td>', f'<td class="mono">{_e(x)}</td>'] for k, x in R["versions"].items()]
    trows = [[f"<td>{_e(k)}</td>", _num(x, 3)] for k, x in R["timings_s"].items()]
    return (
        '<section id="reproduce"><h2>Reproduce</h2><p>Settings, data size and versions of this run; '
        'every number on this page is also in <span class="mono">report.json</span> next to it.</p>'
        '<div class="cols"><div><h3>Settings</h3>'
        + _table(["setting", "value"], srows)
        + "</div><div><h3>Versions</h3>"
        + _table(["package", "version"], vrows)
        + "<h3>Time</h3>"
        + _table(["stage", "seconds"], trows)
        + "</div></div>"
        + f"<h3>Call</h3><pre>{_e(_call(R))}</pre></section>"
    )


RENDER = {
    "summary": _summary,
    "problem": _problem,
    "hessian": _hessian,
    "eigenvalues": _eigenvalues,
    "trace": _trace,
    "density": _density,
    "quadratic": _quadratic,
    "gradient": _gradient,
    "reproduce": _reproduce,
}
