"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

The spectral measure μ = (1/P) Σ_i δ(λ - λ_i) satisfies, for a probe v uniform on
the unit sphere (a normalised Gaussian), E[vᵀ f(A) v] = (1/P) Σ_i f(λ_i) = ∫ f dμ.
Lanczos started from v builds T_m = Vᵀ A V; with T_m = U diag(θ) Uᵀ, the Gauss
quadrature vᵀ f(A) v ≈ Σ_j τ_j f(θ_j), τ_j = U_{1j}², is exact for polynomials of
degree < 2m. Averaging the node/weight pairs of ``num_probes`` probes (each
probe's weights sum to 1) and broadening each node with a Gaussian of width σ,

    φ(t) = (1/num_probes) Σ_p Σ_j τ_pj N(t; θ_pj, σ²),

gives a smooth density that integrates to 1.

References: S. Ubaru, J. Chen, Y. Saad, "Fast estimation of tr(f(A)) via
stochastic Lanczos quadrature", SIAM J. Matrix Anal. Appl. 38 (2017);
B. Ghorbani, S. Krishnan, Y. Xiao, "An investigation into neural net
optimization via Hessian eigenvalue density", ICML 2019.

With as many steps as the dimension, the nodes are the eigenvalues exactly:

>>> import torch
>>> A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
>>> sd = spectral_density(A, num_probes=2, lanczos_steps=4)
>>> sd.nodes[0].round(decimals=8).tolist(), round(float(sd.weights.sum(dim=1)[0]), 12)
([1.0, 2.0, 3.0, 4.0], 1.0)
>>> round(float(torch.trapezoid(sd.density, sd.grid)), 12)
1.0
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

import torch

from .. import distributed
from .._checkpoint import Checkpoint
from .._fingerprint import Hasher
from .._checks import as_float, as_int
from .._progress import Progress
from ..errors import CheckpointError, InputError
from ._krylov import lanczos_tridiag
from ._memory import check_memory, density_bytes, size_of
from ._operator import Operator, as_operator, check_symmetric, make_generator, randn
from ._util import loaded_count, loaded_generator, loaded_tensor, resume

__all__ = ["SpectralDensity", "spectral_density"]

_TAIL = 5.0  # the default grid reaches 5σ beyond the extreme nodes


@dataclass(frozen=True)
class SpectralDensity:
    """A smoothed eigenvalue density and the quadrature it came from (all float64, CPU).

    Attributes:
        grid: ``(G,)`` increasing eigenvalue axis.
        density: ``(G,)`` density on ``grid`` (trapezoid integral 1 when the grid
            covers every node ± 5σ).
        nodes: ``(num_probes, m)`` Ritz values, ascending per probe.
        weights: ``(num_probes, m)`` squared first components of the Ritz vectors;
            each row sums to 1 (rows padded with weight 0 after an early
            Lanczos breakdown).
        num_matvecs: products spent, the symmetry check and the products of a
            resumed checkpoint included.
        sigma: the Gaussian broadening width.
        memory_bytes: per-rank bound of the vectors held (see ``linalg._memory``).
        precision_note: the operator's half-precision caveat, or ``None``.
    """

    grid: torch.Tensor
    density: torch.Tensor
    nodes: torch.Tensor
    weights: torch.Tensor
    num_matvecs: int
    sigma: float
    memory_bytes: Optional[int] = None
    precision_note: Optional[str] = None

    def plot(self, path: str | os.PathLike, *, log: bool = True, title: Optional[str] = None, eigenvalues=None) -> str:
        """Write the density as an image (format from the suffix) with ``nethessian._plots.density_plot``."""
        from .. import _plots

        fig = _plots.density_plot(
            self,
            eigenvalues=eigenvalues,
            log=log,
            title=title
            or (
                f"spectral density (SLQ: {self.nodes.shape[0]} probes, {self.nodes.shape[1]} steps, "
                f"σ = {self.sigma:.3g})"
            ),
        )
        return os.fspath(_plots.save(fig, path))

    def __repr__(self) -> str:
        probes, steps = self.nodes.shape
        return (
            f"SpectralDensity({probes} probes x {steps} Lanczos steps, nodes in "
            f"[{float(self.nodes.min()):.4g}, {float(self.nodes.max()):.4g}], sigma={self.sigma:.3g}, "
            f"grid of {self.grid.numel()} points, num_matvecs={self.num_matvecs}"
            + (f", precision_note={self.precision_note!r}" if self.precision_note else "")
            + ")"
        )

    def to_dict(self) -> Dict[str, Any]:
        return {
            "grid": self.grid.tolist(),
            "density": self.density.tolist(),
            "nodes": self.nodes.tolist(),
            "weights": self.weights.tolist(),
            "num_matvecs": self.num_matvecs,
            "sigma": self.sigma,
            "memory_bytes": self.memory_bytes,
            "precision_note": self.precision_note,
        }


def spectral_density(
    op: Any,
    *,
    num_probes: int = 8,
    lanczos_steps: int = 80,
    seed: Optional[int] = 0,
    sigma: Optional[float] = None,
    grid_size: int = 1000,
    grid: Optional[torch.Tensor] = None,
    checkpoint: Optional[Checkpoint] = None,
    progress: bool = False,
    check_symmetry: bool = True,
    reorthogonalize: bool = True,
    max_memory: Optional[int] = None,
) -> SpectralDensity:
    """Eigenvalue density of a symmetric operator by stochastic Lanczos quadrature.

    Args:
        op: a curvature operator or a square symmetric tensor.
        num_probes: independent Gaussian probes (≥ 1); more probes, less noise
            in the weights.
        lanczos_steps: Lanczos steps per probe (clamped to ``P``); m steps
            resolve about m distinct features of the spectrum.
        seed: seed of the CPU generator the probes are drawn from.
        sigma: Gaussian broadening width. Default: 1/100 of the spread of the
            nodes, (max θ - min θ) / 100 — narrow enough to separate the outliers
            of a Hessian spectrum from its bulk, wide enough to merge the nodes
            of a bulk; when the spread is 0 (e.g. A = cI), 1/100 of max |θ|, or
            0.01 when every node is 0.
        grid_size: points of the default grid, which spans
            [min θ - 5σ, max θ + 5σ] evenly.
        grid: an increasing 1-D grid to use instead.
        checkpoint: a ``Checkpoint``, saved after each probe; a resumed run gives
            the same result as an uninterrupted one.
        progress: show a tqdm bar (one tick per probe) on stderr.
        check_symmetry: spend 2 products checking uᵀ(Av) = vᵀ(Au) first (not
            repeated when resuming); Lanczos needs a symmetric operator.
        reorthogonalize: full reorthogonalisation of each probe's Lanczos vectors
            (memory ``P x lanczos_steps``); ``False`` runs the three-term recurrence on
            O(P) memory (the quadrature stays accurate; a few nodes may repeat).
        max_memory: refuse, before any product, a run whose memory bound exceeds this
            many bytes (``memory_bytes`` of the result).

    Returns:
        A ``SpectralDensity``; when the grid covers every node ± 5σ the density
        is renormalised to trapezoid integral exactly 1.

    Raises:
        InputError: bad counts, sigma or grid.
        NotSymmetricError: the symmetry check failed.
        CheckpointError: the checkpoint holds another computation.
        NonFiniteError: a product returned NaN or Inf.
    """
    A = as_operator(op)
    num_probes, steps, sigma, grid_size = _validate(A, num_probes, lanczos_steps, sigma, grid_size, grid)
    distributed.check_same(
        "spectral_density",
        num_probes=num_probes,
        lanczos_steps=steps,
        check_symmetry=bool(check_symmetry),
        reorthogonalize=bool(reorthogonalize),
        sigma=None if sigma is None else float(sigma),
        grid_size=grid_size,
        grid=None if grid is None else Hasher().tensor(torch.as_tensor(grid, dtype=torch.float64)).hexdigest(),
    )
    s = size_of(A.dtype)
    memory = check_memory(
        "spectral_density",
        density_bytes(A.size, steps, reorthogonalize, s),
        max_memory,
        "lower lanczos_steps or pass reorthogonalize=False (O(P) memory)",
        A.device,
    )
    nodes, weights, spent = _quadrature(
        A, num_probes, steps, seed, checkpoint, progress, check_symmetry, bool(reorthogonalize)
    )
    sigma = _default_sigma(nodes) if sigma is None else sigma
    if grid is None:
        lo, hi = float(nodes.min()) - _TAIL * sigma, float(nodes.max()) + _TAIL * sigma
        grid = torch.linspace(lo, hi, grid_size, dtype=torch.float64)
    else:
        grid = torch.as_tensor(grid, dtype=torch.float64).cpu()
    density = _broaden(nodes, weights, sigma, grid)
    covers = grid[0] <= nodes.min() - _TAIL * sigma and grid[-1] >= nodes.max() + _TAIL * sigma
    if covers:
        density = density / torch.trapezoid(density, grid)
    return SpectralDensity(grid, density, nodes, weights, spent, sigma, memory, A.precision_note)


def _validate(A: Operator, num_probes, lanczos_steps, sigma, grid_size, grid):
    """The counts and width as numbers, after refusing bad values (strings, 2.7, non-positive)."""
    num_probes = as_int("num_probes", num_probes, minimum=1)
    steps = as_int("lanczos_steps", lanczos_steps, minimum=1)
    if sigma is not None:
        sigma = as_float("sigma", sigma, positive=True)
    grid_size = as_int("grid_size", grid_size)
    if grid is None and grid_size < 2:
        raise InputError(f"grid_size must be at least 2, got {grid_size}")
    if grid is not None:
        if not isinstance(grid, torch.Tensor) or grid.is_complex() or grid.is_sparse:
            raise InputError("grid must be a real, dense 1-D torch.Tensor")
        g = grid.detach().double()
        if g.ndim != 1 or g.numel() < 2 or not torch.isfinite(g).all() or not (g.diff() > 0).all():
            raise InputError("grid must be a finite, strictly increasing 1-D tensor of at least 2 points")
    return num_probes, min(steps, A.global_size), sigma, grid_size


def _quadrature(
    A: Operator, num_probes: int, steps: int, seed, checkpoint, progress, check_symmetry, reorthogonalize: bool = True
):
    """Gauss quadrature nodes and weights of each probe, ``(num_probes, steps)`` float64."""
    expect = {
        "kind": "spectral-density",
        "operator": A.key(checkpoint),
        "size": A.size,
        "num_probes": num_probes,
        "lanczos_steps": steps,
        "seed": seed,
    }
    if not reorthogonalize:
        expect["reorthogonalize"] = False
    if A.sharded:
        expect.update(global_size=A.global_size, local_range=list(A.local_range))
    gen = make_generator(seed)
    nodes = torch.zeros(num_probes, steps, dtype=torch.float64)
    weights = torch.zeros_like(nodes)
    done, before = 0, 0
    state = resume(checkpoint, expect)
    if state is not None:
        done, before, nodes, weights = _loaded(state, num_probes, steps, gen, checkpoint.path)
    elif check_symmetry:  # its own generator: the probes do not depend on whether it ran
        check_symmetric(A, make_generator(seed))
    with Progress(num_probes, "spectral density", unit="probe", enabled=progress, initial=done) as bar:
        for p in range(done, num_probes):
            nodes[p], weights[p] = _gauss(A, randn(A, A.size, generator=gen), steps, reorthogonalize)
            bar.update(1)
            if checkpoint is not None and (p + 1 == num_probes or checkpoint.due()):
                checkpoint.save(
                    {
                        **expect,
                        "done": p + 1,
                        "nodes": nodes,
                        "weights": weights,
                        "num_matvecs": before + A.num_matvecs,
                        "generator": gen.get_state(),
                    },
                    force=True,
                )
    return nodes, weights, before + A.num_matvecs


def _loaded(state, num_probes: int, steps: int, gen, path: str):
    """``done, num_matvecs, nodes, weights`` of a saved state, each checked (``CheckpointError``)."""
    done = loaded_count(state, "done", 0, num_probes, path)
    before = loaded_count(state, "num_matvecs", 0, 2**62, path)
    nodes = loaded_tensor(state, "nodes", (num_probes, steps), path).double().clone()
    weights = loaded_tensor(state, "weights", (num_probes, steps), path).double().clone()
    sums = weights[:done].sum(dim=1)
    if bool((weights < 0).any()) or (done and not torch.allclose(sums, torch.ones_like(sums), atol=1e-6)):
        raise CheckpointError(
            f"{path!r}: the saved quadrature weights are not a probability per probe; "
            "the file is damaged, delete it to start over"
        )
    loaded_generator(state, gen, path)
    return done, before, nodes, weights


def _gauss(A: Operator, v: torch.Tensor, steps: int, reorthogonalize: bool = True):
    """Ritz values and squared first eigenvector components of one Lanczos run, padded to ``steps``."""
    T = lanczos_tridiag(A, v, steps, keep_basis=False, reorthogonalize=reorthogonalize)
    theta, U = torch.linalg.eigh(T.matrix())
    tau = U[0].square()
    tau = tau / tau.sum()
    pad = steps - theta.numel()  # early breakdown: the Krylov space was invariant
    theta = torch.cat([theta, theta[-1:].expand(pad)])
    tau = torch.cat([tau, tau.new_zeros(pad)])
    return theta, tau


def _default_sigma(nodes: torch.Tensor) -> float:
    spread = float(nodes.max() - nodes.min())
    scale = float(nodes.abs().max())
    if spread > 1e-8 * scale:
        return spread / 100
    return scale / 100 if scale > 0 else 0.01


def _broaden(nodes: torch.Tensor, weights: torch.Tensor, sigma: float, grid: torch.Tensor) -> torch.Tensor:
    """φ(t) = mean over probes of Σ_j τ_j N(t; θ_j, σ²), one probe at a time to bound memory."""
    density = torch.zeros_like(grid)
    norm = 1.0 / (sigma * math.sqrt(2 * math.pi))
    for theta, tau in zip(nodes, weights):
        z = (grid[:, None] - theta[None, :]) / sigma
        density += norm * (torch.exp(-0.5 * z.square()) @ tau)
    return density / nodes.shape[0]
