"""Every linalg result prints in a few lines; per-block quantities have a .table()."""

import torch

from nethessian._params import ParamLayout
from nethessian.linalg._density import spectral_density
from nethessian.linalg._diagonal import diagonal
from nethessian.linalg._lanczos import eigenvalues
from nethessian.linalg._solve import solve
from nethessian.linalg._trace import trace
from helpers import Blocked, sym


def test_reprs_are_short():
    A = sym(torch.linspace(-1, 2, 60), seed=2)
    results = [
        eigenvalues(A, k=3),
        trace(A, num_matvecs=9),
        diagonal(A),
        spectral_density(A, num_probes=2, lanczos_steps=8),
        solve(A + 3 * torch.eye(60, dtype=A.dtype), torch.ones(60, dtype=A.dtype)),
    ]
    for r in results:
        text = repr(r)
        assert "\n" not in text and len(text) < 300, text
    assert "2 probes x 8 Lanczos steps" in repr(results[3])


def test_both_with_odd_k_says_how_it_split():
    res = eigenvalues(sym(torch.linspace(-1, 2, 60), seed=2), k=5, which="both")
    assert "2 smallest and 3 largest of k=5" in repr(res) and "one more at the top" in res.split()


def test_block_tables_name_value_stderr():
    layout = ParamLayout(("w", "b"), ((4, 5), (10,)))
    A = sym(torch.linspace(0.1, 3.0, 30), seed=5)
    est = trace(Blocked(A, layout), method="hutchinson", num_matvecs=8, by_block=True)
    lines = est.table().splitlines()
    assert [ln.split()[0] for ln in lines] == ["total", "w", "b"] and all("±" in ln for ln in lines)
    assert abs(float(lines[1].split()[1]) - est.blocks["w"].value) <= 1e-5 * max(1.0, abs(est.blocks["w"].value))
    d = diagonal(Blocked(A, layout)).table().splitlines()
    assert d[0].startswith("w: 20 entries") and "exact" in d[0]
    ref = float(torch.diagonal(A)[20:].mean())
    assert abs(float(d[1].split("mean ")[1].split()[0]) - ref) <= 1e-5 * abs(ref)
