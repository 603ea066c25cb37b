"""Report sections added for issue 15: diagonal blocks, eigenvector mass, GGN vs Hessian, input Hessian,
slope reasons, reduction text and the eigenvalue plot's negative ticks; each against float64 references."""

import json

import pytest
import torch
from torch import nn

import nethessian as nh
from nethessian._app.report import build_report, planned_products
from nethessian._app.report_notes import slope_reason
from nethessian.operators._ggn import GGNOperator
from nethessian.operators._hessian import HessianOperator

SMALL = dict(num_eigs=3, trace_matvecs=12, density_probes=2, lanczos_steps=10)
NEW = ["blocks", "eigenvectors", "ggn", "input-hessian"]


def _report(problem, out, **kw):
    model, loss_fn, data = problem
    return json.loads(build_report(model, loss_fn, data, out, **kw).json.read_text())


def _dense(model, loss_fn, data):
    return HessianOperator(model, loss_fn, data).to_dense().double()


def _masses(v, numels):
    return torch.stack([c.square().sum() for c in v.split(list(numels))])


@pytest.fixture(scope="module")
def two_layer(tmp_path_factory):
    problem = nh.examples.two_layer()
    return problem, _report(problem, tmp_path_factory.mktemp("tl"), sections=NEW + ["eigenvalues"])


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):  # 0.weight has 48 entries: Lanczos; the others are formed
    problem = nh.examples.mlp((4, 12, 3), n=40, dtype=torch.float64)
    return problem, _report(problem, tmp_path_factory.mktemp("mlp"), dense_max_params=10, sections=NEW, **SMALL)


@pytest.mark.parametrize("which", ["two_layer", "mlp"])
def test_block_top_eigenvalues_equal_eigvalsh_of_the_dense_block(which, request):
    (model, loss_fn, data), R = request.getfixturevalue(which)
    H = _dense(model, loss_fn, data)
    start = 0
    for name, p in model.named_parameters():
        n = p.numel()
        ref = float(torch.linalg.eigvalsh(H[start : start + n, start : start + n])[-1])
        assert R["blocks"][name]["top_eigenvalue"] == pytest.approx(ref, rel=2e-3 if n > 40 else 1e-9)
        start += n
    if which == "mlp":
        assert R["blocks"]["0.weight"]["method"] == "Lanczos" and R["blocks"]["0.bias"]["method"] == "formed block"


@pytest.mark.parametrize("which", ["two_layer", "mlp"])
def test_eigenvector_mass_sums_to_one_and_matches_the_eigenvectors(which, request):
    (model, loss_fn, data), R = request.getfixturevalue(which)
    lam, vecs = torch.linalg.eigh(_dense(model, loss_fn, data))
    numels = [p.numel() for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    checked = R["eigenvectors"][:1] if which == "mlp" else R["eigenvectors"]  # Lanczos: the converged top one
    for i, entry in enumerate(checked):
        assert sum(entry["by_parameter"].values()) == pytest.approx(1.0, abs=1e-12)
        assert sum(entry["by_layer"].values()) == pytest.approx(1.0, abs=1e-12)
        assert entry["eigenvalue"] == pytest.approx(float(lam[-1 - i]), rel=1e-3)
        ref = _masses(vecs[:, -1 - i], numels)
        got = torch.tensor([entry["by_parameter"][n] for n in names], dtype=torch.float64)
        torch.testing.assert_close(got, ref, atol=1e-9 if which == "two_layer" else 2e-2, rtol=0)
    if which == "mlp":  # layers group a module's weight and bias
        e = R["eigenvectors"][0]
        assert e["by_layer"]["0"] == pytest.approx(e["by_parameter"]["0.weight"] + e["by_parameter"]["0.bias"])


@pytest.mark.parametrize("which", ["two_layer", "mlp"])
def test_ggn_section_against_the_dense_ggn(which, request):
    (model, loss_fn, data), R = request.getfixturevalue(which)
    G = GGNOperator(model, loss_fn, data).to_dense().double()
    H = _dense(model, loss_fn, data)
    g = R["ggn"]
    k = len(g["ggn_top"])
    ref_G = torch.linalg.eigvalsh(0.5 * (G + G.T)).flip(0)[:k]
    torch.testing.assert_close(torch.tensor(g["ggn_top"], dtype=torch.float64), ref_G, rtol=2e-3, atol=1e-12)
    lam, vecs = torch.linalg.eigh(H)
    torch.testing.assert_close(
        torch.tensor(g["hessian_top"], dtype=torch.float64), lam.flip(0)[:k], rtol=2e-3, atol=1e-12
    )
    v = vecs[:, -1]
    ref = float(((H - G) @ v).norm() / (H @ v).norm())
    assert g["residual"][0]["relative"] == pytest.approx(ref, rel=1e-2 if which == "mlp" else 1e-8)
    assert all(r["relative"] > 0 for r in g["residual"])  # a curved model: G ≠ H


def test_input_hessian_section_matches_autograd_and_is_off_by_default(two_layer, tmp_path):
    (model, loss_fn, data), R = two_layer
    X, y = data
    blocks = torch.autograd.functional.hessian(lambda x: loss_fn(model(x), y), X.clone())  # (N, D, N, D)
    per = torch.stack([blocks[i, :, i, :] for i in range(X.shape[0])])
    d = R["input_hessian"]
    torch.testing.assert_close(
        torch.tensor(d["top_eigenvalue"], dtype=torch.float64), torch.linalg.eigvalsh(per)[:, -1], rtol=1e-9, atol=1e-14
    )
    torch.testing.assert_close(
        torch.tensor(d["trace"], dtype=torch.float64), per.diagonal(dim1=1, dim2=2).sum(-1), rtol=1e-9, atol=1e-14
    )
    default = _report((model, loss_fn, data), tmp_path / "d")
    assert "input-hessian" not in default["sections"] and default["input_hessian"] is None
    assert {"blocks", "eigenvectors", "ggn"} <= set(default["sections"])


def test_new_sections_are_counted_in_the_estimate(tmp_path, monkeypatch):
    problem = nh.examples.mlp((4, 6, 3), n=32, dtype=torch.float64)
    seen = []
    orig = HessianOperator._product
    monkeypatch.setattr(HessianOperator, "_product", lambda self, V: (seen.append(V.shape[1]), orig(self, V))[1])
    base = _report(problem, tmp_path / "a", dense_max_params=10, sections=["summary"], **SMALL)
    n0 = sum(seen)
    seen.clear()
    R = _report(problem, tmp_path / "b", dense_max_params=10, sections=["blocks"], **SMALL)
    numels = [p["numel"] for p in R["parameters"]]
    assert sum(seen) - n0 == sum(numels) == sum(b["num_matvecs"] for b in R["blocks"].values())
    S = {**SMALL, "dense_max_params": 10, "sections": R["sections"]}
    assert planned_products(R["num_parameters"], S, numels) == (sum(numels),) * 2
    assert base["blocks"] is None and "blocks" not in base["sections"]
    lo, hi = planned_products(R["num_parameters"], {**S, "sections": ["ggn"]}, numels)
    assert lo > 0 and hi > lo


def _relu_or_tanh(act, out):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), act(), nn.Linear(16, 3)).double()
    g = torch.Generator().manual_seed(1)
    data = (torch.randn(64, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (64,), generator=g))
    return _report(
        (model, nn.CrossEntropyLoss(), data),
        out,
        dense_max_params=10,
        sections=["quadratic"],
        quadratic_radius=1.0,
        **SMALL,
    )


def test_slope_reason_names_kinks_for_relu_not_for_tanh(tmp_path):
    relu = [d["slope_reason"] for d in _relu_or_tanh(nn.ReLU, tmp_path / "r")["quadratic"]["directions"]]
    tanh = [d["slope_reason"] for d in _relu_or_tanh(nn.Tanh, tmp_path / "t")["quadratic"]["directions"]]
    assert any(r["cause"] == "kinks" for r in relu) and all("ReLU" in r["text"] for r in relu if r["cause"])
    assert not any(r["cause"] == "kinks" for r in tanh)


def _case(diff_fn, value=1.0, eps=2.2e-16):
    a = torch.arange(-20, 21, dtype=torch.float64) / 20
    diff = diff_fn(a)
    from nethessian._quadratic import _loglog_slope

    model = torch.zeros_like(a)
    c = {
        "alphas": a.tolist(),
        "true": diff.tolist(),
        "model": model.tolist(),
        "slope": _loglog_slope(a, diff, value, eps),
    }
    return slope_reason(c, value, eps, [])


def test_slope_reason_closed_forms():
    assert _case(lambda a: 0.3 * a**3)["cause"] is None  # exactly cubic: slope 3
    big = _case(lambda a: 1e-3 * a**3 + a**8)  # higher-order terms take over at the largest steps
    assert big["cause"] == "step range" and big["large_end"] > 3.5
    eps = 1.2e-7  # float32: the small-step differences sit on rounding noise of J
    noisy = _case(lambda a: 1e-4 * a**3 + 3 * eps * torch.cos(1e3 * a).abs() + 1e3 * eps * (a != 0), eps=eps)
    assert noisy["cause"] == "rounding" and noisy["smallest_difference_over_rounding"] < 1e4


def test_function_loss_reduction_is_explained(tmp_path):
    model, _, data = nh.examples.two_layer()
    R = _report((model, lambda out, y: 0.5 * ((out - y) ** 2).sum(), data), tmp_path, sections=["summary"])
    assert R["settings"]["reduction"] == "none known (a plain function): one batch, its value as returned"
    assert (
        "inferred from the loss's .reduction"
        in _report(nh.examples.two_layer(), tmp_path / "b", sections=["summary"])["settings"]["reduction"]
    )


def test_eigenvalue_plot_labels_its_negative_side():
    from nethessian._plots import eigenvalue_plot

    for lam, smallest in [
        (torch.tensor([-3e-3, -2e-4, 1e-5, 2e-3, 0.3, 12.0]), None),
        (torch.tensor([0.5, 2.0, 12.0]), torch.tensor([-4e-3, -1e-3, 3e-4])),
    ]:
        fig = eigenvalue_plot(lam, smallest=smallest)
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_ylim()
        neg = [t for t, lab in zip(ax.get_yticks(), ax.get_yticklabels()) if lo <= t < 0 and lab.get_text()]
        assert neg, "no labelled tick below 0"
