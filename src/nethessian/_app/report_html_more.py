"""HTML of the report's structure sections: diagonal blocks, eigenvector mass, GGN, input Hessian."""

from __future__ import annotations

from typing import Any, Dict

from .report_html import _e, _f, _num, _table

__all__ = ["RENDER_MORE"]


def _not_computed(sid: str, title: str, why: str) -> str:
    return f'<section id="{sid}"><h2>{_e(title)}</h2><div class="banner">Not computed: {_e(why)}</div></section>'


def _blocks(R: Dict[str, Any], images) -> str:
    rows = [
        [
            f'<td class="mono">{_e(n)}</td>',
            _num(b["numel"]),
            _num(b["top_eigenvalue"], 8, True, True),
            f"<td>{_e(b['method'])}" + ("" if b.get("converged", True) else " (not converged)") + "</td>",
            _num(b["num_matvecs"]),
        ]
        for n, b in R["blocks"].items()
    ]
    return (
        '<section id="blocks"><h2>Diagonal blocks</h2><p>The largest eigenvalue of each diagonal block '
        "H<sub>bb</sub> = ∂²J/∂θ<sub>b</sub>² (one parameter tensor b, the others fixed): the curvature each "
        "parameter sees alone. By Cauchy interlacing each is at most λ<sub>max</sub>(H).</p>"
        + _table(["parameter b", "entries", "λ_max(H_bb)", "how", "products"], rows)
        + "</section>"
    )


def _eigenvectors(R: Dict[str, Any], images) -> str:
    vecs = R["eigenvectors"]
    layers = list(vecs[0]["by_layer"]) if vecs else []
    head = ["λ"] + layers
    rows = [[_num(v["eigenvalue"], 6, True, True)] + [_num(v["by_layer"][n], 3) for n in layers] for v in vecs]
    params = list(vecs[0]["by_parameter"]) if vecs else []
    prows = [[_num(v["eigenvalue"], 6, True, True)] + [_num(v["by_parameter"][n], 3) for n in params] for v in vecs]
    return (
        '<section id="eigenvectors"><h2>Where the top eigenvectors live</h2><p>For each of the top '
        "eigenvectors v (unit length), the share of its squared length in each layer, "
        "‖v<sub>layer</sub>‖² (each row sums to 1): where the sharpest directions point.</p>"
        + _table(head, rows)
        + "<details><summary>by parameter tensor</summary>"
        + _table(["λ"] + params, prows)
        + "</details></section>"
    )


def _ggn(R: Dict[str, Any], images) -> str:
    g = R["ggn"]
    if "error" in g:
        return _not_computed("ggn", "GGN and Hessian", g["error"])
    k = len(g["hessian_top"])
    rows = [
        [_num(i + 1), _num(h, 8, True, True), _num(x, 8, True, True)]
        for i, (h, x) in enumerate(zip(g["hessian_top"], g["ggn_top"]))
    ]
    rrows = [[f"<td>{_e(r['vector'])}</td>", _num(r["relative"], 3, sci=True)] for r in g["residual"]]
    return (
        '<section id="ggn"><h2>GGN and Hessian</h2><p>The generalised Gauss–Newton matrix '
        "G = Σ J<sub>f</sub>ᵀ ∇²<sub>f</sub>L J<sub>f</sub> drops the residual term "
        "H − G = Σ (∂L/∂f) ∇²f of the Hessian; it is positive semi-definite for a loss convex in the "
        f"outputs. The top {k} eigenvalues of both ({_e(g['method'])}; {g['ggn_matvecs']} GGN "
        "products):</p>"
        + _table(["#", "Hessian λ", "GGN λ"], rows)
        + "<p>Size of the residual term, ‖(H − G) v‖ / ‖H v‖ (0 when G = H along v):</p>"
        + _table(["vector v", "‖(H − G) v‖ / ‖H v‖"], rrows)
        + "</section>"
    )


def _input_hessian(R: Dict[str, Any], images) -> str:
    d = R["input_hessian"]
    if "error" in d:
        return _not_computed("input-hessian", "Hessian with respect to the inputs", d["error"])
    top, tr = d["top_eigenvalue"], d["trace"]
    rows = [[_num(i), _num(t, 6, True, True), _num(x, 6, True, True)] for i, (t, x) in enumerate(zip(top, tr))]
    if len(rows) > 40:
        rows = rows[:20] + [['<td class="num muted">⋯</td>'] * 3] + rows[-10:]
    shape = "block-diagonal by sample" if d["block_diagonal"] else f"samples couple ({d['coupling']})"
    i_max = max(range(len(top)), key=top.__getitem__) if top else None
    return (
        '<section id="input-hessian"><h2>Hessian with respect to the inputs</h2><p>For each sample i, the '
        f"{d['dim']} × {d['dim']} block ∂²J/∂x<sub>i</sub>² of the Hessian of the whole cost with respect to "
        f"the inputs ({d['num_samples']} samples; {_e(shape)}): its largest eigenvalue and its trace. "
        + (f"The largest is {_e(_f(top[i_max], 6))} (sample {i_max})." if i_max is not None else "")
        + "</p>"
        + _table(["sample", "top eigenvalue", "trace"], rows)
        + "</section>"
    )


RENDER_MORE = {"blocks": _blocks, "eigenvectors": _eigenvectors, "ggn": _ggn, "input-hessian": _input_hessian}
