"""The HTML page of ``nethessian report``: one self-contained file, inline CSS, images as data URIs."""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Sequence

import torch

__all__ = ["SECTIONS", "render_page"]

SECTIONS = (
    ("summary", "Summary"),
    ("problem", "Problem"),
    ("hessian", "Hessian"),
    ("eigenvalues", "Eigenvalues and verdict"),
    ("eigenvectors", "Where the top eigenvectors live"),
    ("blocks", "Diagonal blocks"),
    ("trace", "Trace"),
    ("ggn", "GGN and Hessian"),
    ("density", "Spectral density"),
    ("quadratic", "Quadratic model"),
    ("input-hessian", "Hessian with respect to the inputs"),
    ("gradient", "Gradient"),
    ("reproduce", "Reproduce"),
)


_CSS = """
:root{--ink:#1d2330;--muted:#5d6678;--line:#e2e6ee;--bg:#f3f5f8;--pos:#c0392b;--neg:#2763b8;
--mono:ui-monospace,SFMono-Regular,Menlo,Consolas,"DejaVu Sans Mono",monospace}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);
font:15px/1.55 -apple-system,BlinkMacSystemFont,"Segoe UI",Roboto,"Helvetica Neue","DejaVu Sans",Arial,sans-serif}
.wrap{max-width:1060px;margin:0 auto;padding:0 28px}
header{background:linear-gradient(120deg,#18233d,#2b426e);color:#fff;padding:30px 0 26px}
header h1{margin:0;font-size:27px;font-weight:650;letter-spacing:-.01em}
header .problem{font-size:17px;margin:6px 0 10px;opacity:.95}
header .meta{font-size:13px;opacity:.75}
.tag{display:inline-block;padding:1px 10px;border-radius:999px;font-size:12px;font-weight:600;
background:rgba(255,255,255,.16);border:1px solid rgba(255,255,255,.35);margin-right:6px}
nav{position:sticky;top:0;z-index:2;background:#fff;border-bottom:1px solid var(--line)}
nav .wrap{display:flex;flex-wrap:wrap;gap:2px 18px;padding-top:9px;padding-bottom:9px;font-size:13.5px}
nav a{color:var(--muted);text-decoration:none}nav a:hover{color:var(--ink)}
section{background:#fff;border:1px solid var(--line);border-radius:12px;padding:22px 28px;margin:20px 0;
box-shadow:0 1px 2px rgba(20,30,50,.04)}
h2{font-size:20px;margin:0 0 12px;font-weight:650}
h3{font-size:15.5px;margin:18px 0 6px}
p{margin:8px 0}.muted{color:var(--muted)}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:12px;margin:4px 0 14px}
.card{border:1px solid var(--line);border-radius:9px;padding:10px 14px;background:#fafbfd}
.card .k{font-size:11.5px;color:var(--muted);text-transform:uppercase;letter-spacing:.05em}
.card .v{font:600 18px/1.35 var(--mono);overflow-wrap:anywhere}
.card .s{font-size:12px;color:var(--muted)}.card .v.small{font-size:15.5px;padding-top:2px}
.verdict{border-left:5px solid;border-radius:6px;padding:11px 16px;margin:10px 0;font-size:15px}
.verdict b{text-transform:uppercase;letter-spacing:.04em;font-size:13px;margin-right:8px}
.v-minimum{border-color:#1e8449;background:#eaf7ef}.v-saddle{border-color:#d68910;background:#fdf3e3}
.v-not-stationary{border-color:#5d6d7e;background:#eef1f5}.v-maximum{border-color:#7d3c98;background:#f4ecf7}
.v-degenerate{border-color:#909497;background:#f2f3f4}
.banner{border:1px solid #f0c36d;background:#fff8e6;border-radius:8px;padding:10px 14px;margin:10px 0;font-size:14px}
table{border-collapse:collapse;font-size:13.5px;margin:8px 0 4px}
th{font-weight:600;color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.04em;
text-align:left;padding:5px 12px;border-bottom:2px solid var(--line)}
td{padding:4px 12px;border-bottom:1px solid var(--line);vertical-align:top}
td.num,.mono{font-family:var(--mono);font-variant-numeric:tabular-nums;white-space:nowrap}
td.num{text-align:right}
table.matrix td{padding:2px 8px;font-size:12.5px}table.matrix th{text-transform:none;font-family:var(--mono)}
.blocks{display:flex;flex-wrap:wrap;gap:8px 30px;align-items:flex-start}
figure{margin:14px 0 6px;text-align:center}
figure img{max-width:100%;height:auto;border-radius:6px}
figcaption{font-size:13px;color:var(--muted);margin-top:4px;text-align:left}
pre{font:12.5px/1.5 var(--mono);background:#f6f8fa;border:1px solid var(--line);border-radius:8px;
padding:10px 14px;overflow-x:auto}
details summary{cursor:pointer;color:var(--muted);font-size:13.5px}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:0 30px}
@media (max-width:800px){.cols{grid-template-columns:1fr}}
footer{color:var(--muted);font-size:12.5px;padding:6px 0 30px}
.pos{color:var(--pos)}.neg{color:var(--neg)}
"""


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, digits: int = 6) -> str:
    if x is None:
        return "—"
    if isinstance(x, float) and math.isinf(x):
        return "∞"
    if isinstance(x, float) and math.isnan(x):
        return "n/a"
    if isinstance(x, int):
        return f"{x:,}"
    return f"{x:.{digits}g}"


def _num(x, digits: int = 6, signed: bool = False, sci: bool = False) -> str:
    """A right-aligned monospace cell.

    ``signed`` colours it red (> 0) or blue (< 0) like the figures; ``sci`` writes
    ``+d.ddde±xx`` so that a column of numbers lines up.
    """
    finite = isinstance(x, float) and math.isfinite(x)
    sign = "" if not signed or not finite or x == 0 else (" pos" if x > 0 else " neg")
    text = (f"{x:+.{digits - 1}e}" if signed else f"{x:.{digits - 1}e}") if sci and finite else _f(x, digits)
    return f'<td class="num{sign}">{_e(text)}</td>'


def _table(headers: Sequence[str], rows: List[List[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(r) + "</tr>" for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _card(label: str, value: str, key: str, raw=None, sub: str = "", small: bool = False) -> str:
    data = f' data-key="{_e(key)}"' + ("" if raw is None else f' data-value="{_e(repr(raw))}"')
    v = '<div class="v small">' if small else '<div class="v">'
    return (
        f'<div class="card"{data}><div class="k">{_e(label)}</div>{v}{value}</div>'
        + (f'<div class="s">{sub}</div>' if sub else "")
        + "</div>"
    )


def _fig(images: Dict[str, str], key: str, alt: str, caption: str = "") -> str:
    if key not in images:
        return ""
    return (
        f'<figure id="fig-{key}"><img src="{images[key]}" alt="{_e(alt)}">'
        + (f"<figcaption>{caption}</figcaption>" if caption else "")
        + "</figure>"
    )


def _matrix(M: List[List[float]], rows: List[str], cols: List[str], scale: float) -> str:
    flat = [abs(v) for r in M for v in r] or [0.0]
    big = max(flat)
    fmt = "{:+.6f}" if 1e-3 <= big < 1e3 else "{:+.3e}"
    body = []
    for name, r in zip(rows, M):
        cells = []
        for v in r:
            a = 0.55 * math.sqrt(abs(v) / scale) if scale else 0.0
            rgb = "192,57,43" if v > 0 else "39,99,184"
            cells.append(f'<td class="num" style="background:rgba({rgb},{a:.3f})">{_e(fmt.format(v))}</td>')
        body.append(f"<th>{_e(name)}</th>" + "".join(cells))
    return _table([""] + cols, [[b] for b in body], cls="matrix")


def _entry_names(name: str, shape: Sequence[int]) -> List[str]:
    idx = [[]]
    for s in shape:
        idx = [i + [j] for i in idx for j in range(s)]
    return [f"{name}[{','.join(map(str, i))}]" for i in idx]


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


def _head(R: Dict[str, Any]) -> str:
    st, P, name = R["settings"], R["num_parameters"], R["problem"]["name"]
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f'<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(R['title'])} — {_e(name)}</title><style>{_CSS}</style></head><body>\n"
        f'<header><div class="wrap"><h1>{_e(R["title"])}</h1><div class="problem">{_e(name)}</div>'
        f'<div class="meta"><span class="tag">{_e(R["mode"])}</span><span class="tag">P = {P:,}</span>'
        f'<span class="tag">{_e(st["dtype"])} · {_e(st["device"])}</span> {_e(st["date"])}</div></div></header>\n'
        '<nav><div class="wrap">'
        + "".join(f'<a href="#{i}">{_e(t)}</a>' for i, t in SECTIONS if i in R["sections"])
        + '</div></nav>\n<main class="wrap">'
    )


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
        + ",\n".join(f"             {k}={st[k]!r}" for k in _SETTING_KEYS[:9])
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


_RENDER = {
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


def render_page(R: Dict[str, Any], images: Dict[str, str]) -> str:
    """The whole page: head, one ``<section>`` per computed entry of :data:`SECTIONS`, footer."""
    from .report_html_more import RENDER_MORE

    render = {**_RENDER, **RENDER_MORE}
    out = [_head(R)] + [render[sid](R, images) for sid, _ in SECTIONS if sid in R["sections"]]
    out.append(
        f'</main><footer><div class="wrap">Made by nethessian {_e(R["versions"]["nethessian"])} '
        f"on {_e(R['settings']['date'])}.</div></footer></body></html>"
    )
    return "\n".join(out)
