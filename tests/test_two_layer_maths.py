"""The closed-form Hessian of docs/two-layer-hessian.md, tested.

The NumPy code is not copied here: it is extracted from the fenced ``python``
blocks of the page between ``<!-- NAME:begin -->`` / ``<!-- NAME:end -->``
markers and executed, so the maths on the page cannot drift from what is
tested. It is checked against

* an independent reference: ``torch.autograd.functional.hessian`` (float64) of
  a hand-written J(theta) of the flat 9-vector, at random weights, including
  large ones far from any minimum where the residual terms matter;
* the page's own claims: matrix forms, H = G + R, G PSD of rank <= 3,
  indefiniteness away from a minimum, the exact-fit minimum, the quadratic
  model, finite differences of the tutorial's gradient;
* nethessian itself (``nh.examples.two_layer`` + ``nh.hessian``), skipped only
  while that API does not exist yet.
"""

from __future__ import annotations

import importlib
import pathlib
import re

import numpy as np
import pytest
import torch

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "two-layer-hessian.md"
BLOCKS = ("closed-form", "matrix-form", "fd-check")  # executed in this order, one namespace

X_RAW = np.array([[3, 5], [5, 1], [10, 2]], dtype=np.float64)
X_TUT = X_RAW / X_RAW.max(axis=0)
Y_TUT = np.array([[75], [82], [93]], dtype=np.float64) / 100

SEEDS = (0, 1, 2, 3, 4)
SCALES = (0.5, 1.0, 3.0)  # 3.0: saturated units, far from any minimum
RTOL = 1e-10


# --------------------------------------------------------------------------- helpers


def _marked_block(text: str, name: str) -> str:
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    assert text.count(begin) == 1 and text.count(end) == 1, f"need exactly one {begin} ... {end} in {DOC}"
    inner = text.split(begin, 1)[1].split(end, 1)[0]
    fences = re.findall(r"```python\n(.*?)```", inner, flags=re.S)
    assert len(fences) == 1, f"need exactly one ```python block between the {name} markers"
    return fences[0]


@pytest.fixture(scope="module")
def doc():
    """Namespace holding everything the page's marked code blocks define."""
    text = DOC.read_text(encoding="utf-8")
    ns: dict = {"__name__": "two_layer_hessian_doc"}
    for name in BLOCKS:
        exec(compile(_marked_block(text, name), f"{DOC.name}[{name}]", "exec"), ns)
    return ns


def _weights(seed, scale):
    rng = np.random.default_rng(seed)
    return scale * rng.standard_normal((2, 3)), scale * rng.standard_normal((3, 1))


def _theta(W1, W2):
    return np.concatenate([np.ravel(W1), np.ravel(W2)])


def _assemble(a, b, c):
    return np.block([[a, b], [b.T, c]])


def _cost_torch(theta, X, y):
    """J(theta) written independently of the page: torch.sigmoid, row-major reshape."""
    W1 = theta[:6].reshape(2, 3)
    W2 = theta[6:].reshape(3, 1)
    yhat = torch.sigmoid(torch.sigmoid(X @ W1) @ W2)
    return 0.5 * ((y - yhat) ** 2).sum()


def _autograd_hessian(X, y, W1, W2):
    Xt, yt = torch.as_tensor(X, dtype=torch.float64), torch.as_tensor(y, dtype=torch.float64)
    theta = torch.as_tensor(_theta(W1, W2), dtype=torch.float64)
    return torch.autograd.functional.hessian(lambda t: _cost_torch(t, Xt, yt), theta).numpy()


def _cost_np(theta, X, y):
    W1, W2 = theta[:6].reshape(2, 3), theta[6:].reshape(3, 1)
    yhat = 1 / (1 + np.exp(-(1 / (1 + np.exp(-(X @ W1)))) @ W2))
    return 0.5 * float(((y - yhat) ** 2).sum())


def _assert_close(actual, expected, what, rtol=RTOL):
    actual, expected = np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-300)
    err = np.abs(actual - expected).max()
    assert err <= rtol * scale, f"{what}: max abs error {err:.3e} > {rtol:g} * {scale:.3e}"


# --------------------------------------------------------------------------- the page itself


def test_doc_blocks_define_the_functions(doc):
    for fn in ("f", "closed_form_blocks", "matrix_form", "gradient", "fd_hessian"):
        assert callable(doc.get(fn)), f"{DOC.name} no longer defines {fn}()"
    a, b, c = doc["closed_form_blocks"](X_TUT, Y_TUT, *_weights(0, 1.0))
    assert (a.shape, b.shape, c.shape) == ((6, 6), (6, 3), (3, 3))


# --------------------------------------------------------------------------- vs autograd


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", SEEDS)
def test_closed_form_matches_autograd(doc, seed, scale):
    W1, W2 = _weights(seed, scale)
    a, b, c = doc["closed_form_blocks"](X_TUT, Y_TUT, W1, W2)
    H_ref = _autograd_hessian(X_TUT, Y_TUT, W1, W2)
    _assert_close(a, H_ref[:6, :6], "a = d2J/dW1^2")
    _assert_close(b, H_ref[:6, 6:], "b = d2J/dW1dW2")
    _assert_close(c, H_ref[6:, 6:], "c = d2J/dW2^2")
    _assert_close(_assemble(a, b, c), H_ref, "H")


@pytest.mark.parametrize("seed", SEEDS)
def test_closed_form_matches_autograd_on_other_data(doc, seed):
    """Nothing in the formulas is specific to the tutorial's data or to 3 samples."""
    rng = np.random.default_rng(100 + seed)
    X, y = rng.uniform(-2, 2, (7, 2)), rng.uniform(0.05, 0.95, (7, 1))
    W1, W2 = _weights(seed, 2.0)
    _assert_close(
        _assemble(*doc["closed_form_blocks"](X, y, W1, W2)), _autograd_hessian(X, y, W1, W2), "H (7 random samples)"
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_residual_terms_matter(doc, seed):
    """At these points, dropping the residual part (Gauss-Newton only) is badly wrong,
    so the autograd comparison really tests the f'' / delta3 terms."""
    W1, W2 = _weights(seed, 1.0)
    H_ref = _autograd_hessian(X_TUT, Y_TUT, W1, W2)
    _, G, R = doc["matrix_form"](X_TUT, Y_TUT, W1, W2)
    assert np.abs(R).max() > 0.2 * np.abs(H_ref).max()
    assert np.abs(G - H_ref).max() > 0.2 * np.abs(H_ref).max()


# --------------------------------------------------------------------------- the page's claims


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("seed", SEEDS)
def test_matrix_form_and_gauss_newton_split(doc, seed, scale):
    W1, W2 = _weights(seed, scale)
    H_closed = _assemble(*doc["closed_form_blocks"](X_TUT, Y_TUT, W1, W2))
    H, G, R = doc["matrix_form"](X_TUT, Y_TUT, W1, W2)
    _assert_close(H, H_closed, "matrix form vs index form")
    _assert_close(G + R, H_closed, "G + R")
    ev_G = np.linalg.eigvalsh(G)
    tol = 1e-12 * max(np.abs(ev_G).max(), 1e-300)
    assert ev_G.min() >= -tol, "Gauss-Newton part must be PSD"
    assert np.sum(ev_G > tol) <= 3, "Gauss-Newton part has rank <= number of samples (3)"
    # H indefinite away from a minimum
    assert np.linalg.eigvalsh(H).min() < 0


def test_exact_fit_minimum(doc):
    """W2 = a2^-1 f^-1(y) fits exactly: R = 0, H = G PSD with >= 6 zero eigenvalues."""
    W1, _ = _weights(0, 1.0)
    a2 = 1 / (1 + np.exp(-(X_TUT @ W1)))
    W2 = np.linalg.solve(a2, np.log(Y_TUT / (1 - Y_TUT)))
    theta = _theta(W1, W2)
    assert _cost_np(theta, X_TUT, Y_TUT) < 1e-25
    assert np.abs(doc["gradient"](theta, X_TUT, Y_TUT)).max() < 1e-12
    H, G, R = doc["matrix_form"](X_TUT, Y_TUT, W1, W2)
    _assert_close(H, _autograd_hessian(X_TUT, Y_TUT, W1, W2), "H at an exact fit")
    assert np.abs(R).max() < 1e-12 * np.abs(H).max()
    ev = np.linalg.eigvalsh(H)
    tol = 1e-12 * np.abs(ev).max()
    assert ev.min() >= -tol
    assert np.sum(np.abs(ev) <= tol) >= 6


def test_quadratic_model_error_is_cubic(doc):
    W1, W2 = _weights(1, 1.0)
    theta = _theta(W1, W2)
    g = doc["gradient"](theta, X_TUT, Y_TUT)
    H = _assemble(*doc["closed_form_blocks"](X_TUT, Y_TUT, W1, W2))
    d = np.random.default_rng(7).standard_normal(9)
    J0 = _cost_np(theta, X_TUT, Y_TUT)

    def model_error(t):
        return abs(_cost_np(theta + t * d, X_TUT, Y_TUT) - (J0 + t * g @ d + 0.5 * t * t * d @ H @ d))

    ratio = model_error(1e-1) / model_error(1e-2)
    assert 500 < ratio < 2000, f"error should shrink ~1000x per 10x smaller step, got {ratio:.1f}"


def test_tutorial_gradient_matches_autograd(doc):
    W1, W2 = _weights(2, 1.0)
    theta = torch.tensor(_theta(W1, W2), dtype=torch.float64, requires_grad=True)
    _cost_torch(theta, torch.as_tensor(X_TUT), torch.as_tensor(Y_TUT)).backward()
    _assert_close(doc["gradient"](_theta(W1, W2), X_TUT, Y_TUT), theta.grad.numpy(), "gradient")


@pytest.mark.parametrize("seed", SEEDS)
def test_finite_differences_of_gradient(doc, seed):
    W1, W2 = _weights(seed, 1.0)
    H_fd = doc["fd_hessian"](_theta(W1, W2), X_TUT, Y_TUT)
    _assert_close(
        _assemble(*doc["closed_form_blocks"](X_TUT, Y_TUT, W1, W2)),
        H_fd,
        "closed form vs finite differences",
        rtol=1e-8,
    )


# --------------------------------------------------------------------------- vs nethessian


def _nethessian():
    """The nethessian module, or skip while the API this page documents does not exist yet."""
    nh = importlib.import_module("nethessian")
    examples = getattr(nh, "examples", None)
    if examples is None:
        try:
            examples = importlib.import_module("nethessian.examples")
        except ModuleNotFoundError as exc:
            if exc.name != "nethessian.examples":
                raise
            pytest.skip("nethessian.examples does not exist yet")
    if not hasattr(examples, "two_layer"):
        pytest.skip("nethessian.examples.two_layer does not exist yet")
    if not hasattr(nh, "hessian"):
        pytest.skip("nethessian.hessian does not exist yet")
    return nh, examples


def _example64(examples, seed):
    """The example at float64 (it may come as float32 or float64), with its weights and data."""
    model, loss_fn, data = examples.two_layer(seed=seed)
    model = model.double()
    data = tuple(t.double() for t in data)
    params = dict(model.named_parameters())
    W1 = params["W1"].detach().cpu().numpy()
    W2 = params["W2"].detach().cpu().numpy()
    X, y = (t.detach().cpu().numpy() for t in data[:2])
    return model, loss_fn, data, X, y, W1, W2


def _np(t):
    return t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def test_nethessian_example_is_the_tutorial_network():
    nh, examples = _nethessian()
    _, _, _, X, y, W1, W2 = _example64(examples, 0)
    assert W1.shape == (2, 3) and W2.shape == (3, 1)
    np.testing.assert_allclose(X, X_TUT, rtol=1e-6)
    np.testing.assert_allclose(y.reshape(3, 1), Y_TUT, rtol=1e-6)


@pytest.mark.parametrize("seed", (0, 1, 2))
def test_nethessian_blocks_match_closed_form(doc, seed):
    nh, examples = _nethessian()
    model, loss_fn, data, X, y, W1, W2 = _example64(examples, seed)
    a, b, c = doc["closed_form_blocks"](X, y.reshape(-1, 1), W1, W2)
    H = nh.hessian(model, loss_fn, data)
    for key, want in ((("W1", "W1"), a), (("W1", "W2"), b), (("W2", "W2"), c)):
        got = _np(H[key])
        assert got.size == want.size, f"H[{key}] has shape {got.shape}, expected {want.shape}"
        _assert_close(got.reshape(want.shape), want, f"nethessian H[{key}] vs closed form")


def test_nethessian_api_as_documented(doc):
    nh, examples = _nethessian()
    model, loss_fn, data, X, y, W1, W2 = _example64(examples, 0)
    a, b, c = doc["closed_form_blocks"](X, y.reshape(-1, 1), W1, W2)
    H_closed = _assemble(a, b, c)
    H = nh.hessian(model, loss_fn, data)
    assert tuple(_np(H.block("W1", "W1")).shape) == (2, 3, 2, 3)
    assert tuple(_np(H["W1", "W2"]).shape) == (6, 3)
    _assert_close(_np(H.block("W1", "W1")).reshape(6, 6), a, "H.block('W1','W1')")
    _assert_close(_np(H.dense), H_closed, "H.dense")
    _assert_close(np.sort(_np(H.eigvalsh())), np.linalg.eigvalsh(H_closed), "H.eigvalsh()", rtol=1e-9)
    assert np.linalg.eigvalsh(H_closed).min() < 0, "the page says seed 0 is an indefinite point"
