"""spectral_density(): stochastic Lanczos quadrature against exact eigenvalues (float64)."""

import json

import pytest
import torch

from nethessian._checkpoint import Checkpoint
from nethessian.errors import CheckpointError, InputError, NonFiniteError, NotSymmetricError
from nethessian.linalg._density import SpectralDensity, spectral_density
from helpers import CrashAfter, NaNAfter, sym


@pytest.fixture(scope="module")
def hessian_like():
    """A bulk near 0 and ten outliers: the shape of a trained network's Hessian spectrum."""
    g = torch.Generator().manual_seed(0)
    lam = torch.cat([0.3 * torch.randn(190, generator=g, dtype=torch.float64), torch.linspace(5, 20, 10)])
    return sym(lam, seed=1), lam


def wasserstein1(cdf, lam, grid):
    """∫ |F(t) - F_true(t)| dt on ``grid``, F_true the empirical CDF of the eigenvalues."""
    true = (lam[None, :] <= grid[:, None]).double().mean(dim=1)
    return float(torch.trapezoid((cdf - true).abs(), grid))


def test_quadrature_matches_eigenvalue_distribution(hessian_like):
    A, lam = hessian_like
    sd = spectral_density(A, num_probes=8, lanczos_steps=40)
    spread = float(lam.max() - lam.min())
    grid = torch.linspace(float(lam.min()) - 1, float(lam.max()) + 1, 4001, dtype=torch.float64)
    atoms, mass = sd.nodes.reshape(-1), sd.weights.reshape(-1) / sd.nodes.shape[0]
    slq_cdf = ((atoms[None, :] <= grid[:, None]).double() * mass).sum(dim=1)
    assert wasserstein1(slq_cdf, lam, grid) < 0.015 * spread  # measured ≈ 0.0065 · spread
    dens_cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumulative_trapezoid(sd.density, sd.grid)])
    assert wasserstein1(dens_cdf, lam, sd.grid) < 0.015 * spread  # + σ-broadening ≈ 0.0081 · spread
    # a wrong answer is far: eigenvalues spread evenly over the same range
    even = torch.linspace(float(lam.min()), float(lam.max()), 200, dtype=torch.float64)
    assert wasserstein1((even[None, :] <= grid[:, None]).double().mean(dim=1), lam, grid) > 0.2 * spread
    # outliers: about 10/200 of the mass above 4
    assert float(mass[atoms > 4].sum()) == pytest.approx(0.05, abs=0.03)


def test_full_steps_give_exact_nodes_and_unit_weights():
    lam = torch.tensor([-3.0, -1.0, 0.5, 2.0, 7.0, 11.0], dtype=torch.float64)
    sd = spectral_density(sym(lam, seed=2), num_probes=3, lanczos_steps=50)  # clamped to P = 6
    assert sd.nodes.shape == sd.weights.shape == (3, 6)
    torch.testing.assert_close(sd.nodes, lam.expand(3, 6), rtol=0, atol=1e-9)
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert (sd.weights >= 0).all() and sd.num_matvecs == 2 + 18  # symmetry check + 3 probes
    # SLQ with exact nodes: Σ τ θ = vᵀAv / vᵀv, unbiased for tr(A)/P
    assert float((sd.weights * sd.nodes).sum(dim=1).mean()) == pytest.approx(float(lam.mean()), abs=2.0)


def test_density_integrates_to_one_and_default_sigma(hessian_like):
    A, _ = hessian_like
    sd = spectral_density(A, num_probes=2, lanczos_steps=20)
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-12)
    spread = float(sd.nodes.max() - sd.nodes.min())
    assert sd.sigma == pytest.approx(spread / 100)
    assert sd.grid.shape == sd.density.shape == (1000,) and (sd.density >= 0).all()
    assert float(sd.grid[0]) == pytest.approx(float(sd.nodes.min()) - 5 * sd.sigma)
    wide = spectral_density(A, num_probes=2, lanczos_steps=20, sigma=0.5, grid=torch.linspace(-10, 30, 801))
    assert wide.sigma == 0.5 and float(torch.trapezoid(wide.density, wide.grid)) == pytest.approx(1.0, abs=1e-12)
    part = spectral_density(A, num_probes=2, lanczos_steps=20, sigma=0.5, grid=torch.linspace(-3, 3, 301))
    assert float(torch.trapezoid(part.density, part.grid)) == pytest.approx(0.95, abs=0.04)  # bulk only


def test_zero_spread_spectrum():
    sd = spectral_density(2.0 * torch.eye(30, dtype=torch.float64), num_probes=3, lanczos_steps=10)
    assert sd.num_matvecs == 2 + 3  # symmetry check; Lanczos breaks down after one step
    assert sd.sigma == pytest.approx(0.02)
    torch.testing.assert_close(sd.weights.sum(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.isfinite(sd.density).all()
    assert float(sd.grid[sd.density.argmax()]) == pytest.approx(2.0, abs=1e-3)
    assert float(torch.trapezoid(sd.density, sd.grid)) == pytest.approx(1.0, abs=1e-12)
    assert spectral_density(torch.zeros(4, 4, dtype=torch.float64), num_probes=1).sigma == 0.01


@pytest.mark.parametrize("log", [True, False])
def test_plot_writes_a_png(tmp_path, hessian_like, log):
    import matplotlib.image

    sd = spectral_density(hessian_like[0], num_probes=2, lanczos_steps=15)
    path = sd.plot(tmp_path / "density.png", log=log)
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
    assert float(img[..., :3].std()) > 0  # not a blank canvas


def test_checkpoint_resume_equals_uninterrupted(tmp_path, hessian_like):
    A = hessian_like[0]
    path = tmp_path / "slq.ckpt"
    ckpt = lambda: Checkpoint(path, {"what": "test"}, every=0)  # noqa: E731
    kwargs = dict(num_probes=4, lanczos_steps=12, seed=3)
    with pytest.raises(KeyboardInterrupt):
        spectral_density(CrashAfter(A, 30), checkpoint=ckpt(), **kwargs)  # dies in probe 3
    assert ckpt().load()["done"] == 2
    again = CrashAfter(A, 10**6)
    resumed = spectral_density(again, checkpoint=ckpt(), **kwargs)
    assert again.columns == 24  # the last two probes only
    straight = spectral_density(A, **kwargs)
    for field in ("nodes", "weights", "grid", "density"):
        assert torch.equal(getattr(resumed, field), getattr(straight, field)), field
    assert resumed.num_matvecs == straight.num_matvecs == 2 + 48 and resumed.sigma == straight.sigma
    with pytest.raises(CheckpointError, match="num_probes"):
        spectral_density(A, checkpoint=ckpt(), num_probes=5, lanczos_steps=12, seed=3)


def test_float32_operator(hessian_like):
    A, lam = hessian_like
    sd = spectral_density(A.float(), num_probes=4, lanczos_steps=30)
    assert sd.nodes.dtype == torch.float64 and torch.isfinite(sd.density).all()
    assert float(sd.nodes.max()) == pytest.approx(20.0, rel=1e-3)
    assert float(sd.nodes.min()) >= float(lam.min()) - 1e-3


def test_nan_mid_run_raises(hessian_like):
    with pytest.raises(NonFiniteError, match="NaN"):
        spectral_density(NaNAfter(hessian_like[0], 15), num_probes=2, lanczos_steps=10)


def test_refuses_a_non_symmetric_operator():
    A = torch.triu(torch.ones(6, 6, dtype=torch.float64))
    with pytest.raises(NotSymmetricError, match="symmetric"):
        spectral_density(A)
    assert spectral_density(A, check_symmetry=False, num_probes=1).num_matvecs == 6


def test_bad_inputs():
    A = torch.eye(5, dtype=torch.float64)
    for kwargs, msg in [
        ({"num_probes": 0}, "num_probes"),
        ({"lanczos_steps": 0}, "lanczos_steps"),
        ({"sigma": 0.0}, "sigma"),
        ({"sigma": float("nan")}, "sigma"),
        ({"grid_size": 1}, "grid_size"),
        ({"grid": torch.tensor([1.0, 0.0])}, "increasing"),
        ({"grid": torch.zeros(2, 2)}, "1-D"),
    ]:
        with pytest.raises(InputError, match=msg):
            spectral_density(A, **kwargs)


def test_result_contract_and_progress(capsys):
    sd = spectral_density(
        torch.diag(torch.arange(1.0, 5.0)), num_probes=2, lanczos_steps=4, grid_size=50, progress=True
    )
    assert isinstance(sd, SpectralDensity)
    with pytest.raises(Exception):
        sd.sigma = 1.0  # frozen
    d = json.loads(json.dumps(sd.to_dict()))
    assert len(d["grid"]) == len(d["density"]) == 50 and len(d["nodes"]) == 2
    assert "spectral density" in capsys.readouterr().err
