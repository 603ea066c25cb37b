"""The HTML page of ``nethessian report``: one self-contained file, inline CSS, images as data URIs.

This module holds the page's frame (head, navigation, footer, CSS) and the small HTML
builders the sections share (cells, tables, cards, figures, matrices); the sections
themselves are rendered in ``report_html_sections.py`` and ``report_html_more.py``.
"""

from __future__ import annotations

import html
import math
from typing import Any, Dict, List, Sequence

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


def render_page(R: Dict[str, Any], images: Dict[str, str]) -> str:
    """The whole page: head, one ``<section>`` per computed entry of :data:`SECTIONS`, footer."""
    from .report_html_more import RENDER_MORE
    from .report_html_sections import RENDER

    render = {**RENDER, **RENDER_MORE}
    out = [_head(R)] + [render[sid](R, images) for sid, _ in SECTIONS if sid in R["sections"]]
    out.append(
        f'</main><footer><div class="wrap">Made by nethessian {_e(R["versions"]["nethessian"])} '
        f"on {_e(R['settings']['date'])}.</div></footer></body></html>"
    )
    return "\n".join(out)
