"""FisherOperator and EmpiricalFisherOperator: Fisher information, exact, sampled, empirical.

Both are Jacobian sandwiches ``Σ_b w_b J_bᵀ M_b J_b`` (see ``ggn.py``) with an
output-space ``M_b`` built from the gradients ``g_n = ∇_{f_n} ℓ_n`` of the
per-sample losses. Conventions, for a batch loss ``L_b = s Σ_n ℓ_n`` as
``loss_fn`` returns it (``s = 1`` for a sum, ``1/c_b`` for a mean over ``c_b`` terms):

* Fisher:  ``M_b = s Σ_n E_{ŷ ~ p(y|f_n)}[g_n(ŷ) g_n(ŷ)ᵀ]``, the Fisher information of
  the predictive distribution the loss is the negative log-likelihood of
  (softmax categorical for cross-entropy, Gaussian with variance ½ for MSE so
  that ``(f − y)²`` is its NLL up to a constant, Bernoulli for BCE-with-logits).
  In closed form this equals the loss Hessian, so the exact Fisher *equals the
  GGN* for these losses (Martens 2020). With ``mc_samples=m`` the
  expectation is replaced by the mean over m labels sampled per sample.
* Empirical Fisher: ``M_b = s Σ_n g_n(y_n) g_n(y_n)ᵀ`` with the true labels, i.e. for
  ``J = (1/N) Σ_n ℓ_n`` it is ``EF = (1/N) Σ_n ∇ℓ_n ∇ℓ_nᵀ`` (Kunstner, Balles & Hennig,
  "Limitations of the empirical Fisher approximation for natural gradient
  descent", NeurIPS 2019). Its expectation under labels drawn from the model is
  the Fisher; with the true labels it is generally *not* a curvature matrix.

A "sample" n is an index along the outputs' first dimension (the whole output
for an unbatched 1-D cross-entropy input); its gradient g_n spans all of f_n,
e.g. every position of a sequence.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch.nn import functional as F

from .._checks import as_int
from ..errors import InputError
from ._ggn import JacobianSandwich
from ._output_space import class_dim, exact_output_fisher, likelihood_of, loss_scale, term_mask

__all__ = ["FisherOperator", "EmpiricalFisherOperator"]

SUPPORTED = ("CrossEntropyLoss (without class weights)", "MSELoss", "BCEWithLogitsLoss (without weight / pos_weight)")


def _num_samples(loss_fn, out: torch.Tensor) -> int:
    """How many samples the outputs hold: their first dimension (1 for unbatched cross-entropy)."""
    unbatched_ce = out.ndim == 1 and isinstance(loss_fn, (torch.nn.CrossEntropyLoss, torch.nn.NLLLoss))
    if out.ndim == 0 or unbatched_ce:
        return 1
    return out.shape[0]


def outer_op(G: torch.Tensor, scale: float, samples: int):
    """``U ↦ scale Σ_i Σ_n g_{i,n} (g_{i,n}ᵀ U_n)`` for per-sample gradients G of shape ``(m, *out)``."""
    m = G.shape[0]
    Gr = G.reshape(m, samples, -1)

    def apply(U):
        Ur = U.reshape(U.shape[0], samples, -1)
        coef = torch.einsum("mnd,knd->kmn", Gr, Ur)
        return (scale * torch.einsum("kmn,mnd->knd", coef, Gr)).reshape(U.shape)

    return apply


def sample_output_grads(
    kind: str, loss_fn, out: torch.Tensor, targets: torch.Tensor, m: int, generator: torch.Generator
) -> torch.Tensor:
    """``m`` draws per term of the unscaled output gradient ``∇_f ℓ(f, ŷ)``, ``ŷ ~ p(·|f)``: ``(m, *out)``.

    categorical: ``softmax(f) − onehot(ŷ)`` (zero for ignored targets); gaussian:
    ``2 (f − ŷ)`` with ``ŷ ~ N(f, ½)``, i.e. ``√2 z``; bernoulli: ``σ(f) − ŷ``.
    """
    if kind == "gaussian":
        return 2**0.5 * torch.randn((m, *out.shape), generator=generator, dtype=out.dtype, device=out.device)
    if kind == "bernoulli":
        sig = torch.sigmoid(out)
        return sig - torch.bernoulli(sig.expand(m, *out.shape), generator=generator)
    cd = class_dim(out)
    p = torch.softmax(out, dim=cd).movedim(cd, -1)
    rows = p.reshape(-1, p.shape[-1])
    draws = torch.multinomial(rows, m, replacement=True, generator=generator)  # (R, m)
    G = rows - F.one_hot(draws.T, rows.shape[-1]).to(out.dtype)  # (m, R, C)
    mask = term_mask(loss_fn, out, targets)
    if mask is not None:
        G = G * mask.movedim(cd, -1).reshape(1, -1, 1)
    return G.reshape(m, *p.shape).movedim(-1, cd + 1)


class FisherOperator(JacobianSandwich):
    """v ↦ F v with the Fisher information F = Σ_b w_b J_bᵀ M_b J_b of the model's predictive distribution.

    See the module docstring for ``M_b``. Exact (``mc_samples=None``) it equals the GGN;
    with ``mc_samples=m`` it is a Monte-Carlo estimate from m labels per sample drawn
    with a ``torch.Generator`` seeded from ``(seed, batch index)`` — the same labels for
    every product, so the operator is one fixed symmetric PSD matrix (for data read in
    a fixed order). Its error falls like ``1/√m``.

    Args:
        model, loss_fn, data, params: the problem (see ``Objective``); ``loss_fn`` one of
            CrossEntropyLoss (no class weights), MSELoss, BCEWithLogitsLoss (no weights).
        mc_samples: None for the exact Fisher, or the number of sampled labels per sample.
        seed: seed of the label sampling.
        **options: ``method``, ``cache``, ``reduction``, ``allow_random``, ``dtype``,
            ``chunk_size`` (see ``GGNOperator``).

    Raises:
        InputError: for another loss, or an invalid ``mc_samples``.

    >>> import torch
    >>> from nethessian.operators._fisher import FisherOperator
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> F = FisherOperator(model, torch.nn.MSELoss(), (X, y)).to_dense()
    >>> torch.allclose(F, 2 * X.T @ X / 20)   # Gaussian, variance ½: F = 2 XᵀX / N
    True
    """

    def __init__(
        self, model, loss_fn, data, params=None, *, mc_samples: Optional[int] = None, seed: int = 0, **options
    ):
        self.kind = likelihood_of(loss_fn)
        if self.kind is None:
            raise InputError(
                f"FisherOperator does not know the predictive distribution of {type(loss_fn).__name__}; "
                f"supported losses: {', '.join(SUPPORTED)}. Use GGNOperator (any loss) or "
                "EmpiricalFisherOperator instead"
            )
        if mc_samples is not None and (
            isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1
        ):
            raise InputError(f"mc_samples must be None (exact) or a positive integer, got {mc_samples!r}")
        self.mc_samples, self.seed = mc_samples, as_int("seed", seed)
        super().__init__(model, loss_fn, data, params, **options)

    def _matrix_options(self):
        return {"mc_samples": self.mc_samples, "seed": self.seed}

    def _output_op(self, batch, out):
        obj, t = self.objective, batch.targets
        s = loss_scale(obj, out, t)
        if s == 0:
            return None
        if self.mc_samples is None:
            return exact_output_fisher(self.kind, obj.loss_fn, out, t, s)
        g = torch.Generator(device=out.device).manual_seed((self.seed * 1_000_003 + batch.index) % 2**63)
        G = sample_output_grads(self.kind, obj.loss_fn, out, t, self.mc_samples, g)
        return outer_op(G, s / self.mc_samples, _num_samples(obj.loss_fn, out))


class EmpiricalFisherOperator(JacobianSandwich):
    """v ↦ EF v with the empirical Fisher EF = Σ_b w_b s_b Σ_n ∇ℓ_n ∇ℓ_nᵀ (true labels).

    For ``J = (1/C) Σ_n ℓ_n`` this is ``(1/C) Σ_n ∇ℓ_n ∇ℓ_nᵀ``; for a sum, ``Σ_n ∇ℓ_n ∇ℓ_nᵀ``.
    ``C`` is the number of loss terms the mean divides by (the term count that also weights
    batches): ``C = N`` when every sample has one term (cross-entropy, single-output MSE), but
    ``nn.MSELoss()`` on ``(N, d)`` outputs divides by ``N·d``, so its EF is ``d`` times smaller
    than ``(1/N) Σ_n ∇ℓ̃_n ∇ℓ̃_nᵀ`` with per-sample means ``ℓ̃_n = ℓ_n / d``. The EF is not a
    function of J alone: it depends on how J splits into terms, and this is the split the
    loss's own reduction defines.
    Per-sample gradients come from the output gradients: ``∇ℓ_n = J_nᵀ ∂L_b/∂f_n / s_b``,
    valid for any loss that is a sum (or mean) of per-sample terms. ``ℓ_n`` is sample n's
    term as the unreduced loss gives it (class weights included). Any loss with a known
    reduction works (Kunstner, Balles & Hennig 2019).

    Args:
        model, loss_fn, data, params: the problem (see ``Objective``).
        **options: ``method``, ``cache``, ``reduction``, ``allow_random``, ``dtype``,
            ``chunk_size`` (see ``GGNOperator``).

    Raises:
        InputError: when the loss's reduction cannot be known (pass ``reduction=``).

    >>> import torch
    >>> from nethessian.operators._fisher import EmpiricalFisherOperator
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> r = model(X).detach() - y                         # residuals; ∇ℓ_n = 2 r_n x_n
    >>> EF = EmpiricalFisherOperator(model, torch.nn.MSELoss(), (X, y)).to_dense()
    >>> torch.allclose(EF, 4 * (X * r).T @ (X * r) / 20)
    True
    """

    def __init__(self, model, loss_fn, data, params=None, **options):
        super().__init__(model, loss_fn, data, params, **options)
        if getattr(loss_fn, "reduction", None) is None and self.objective.reduction is None:
            raise InputError(
                "the empirical Fisher needs to know how the loss reduces over samples, and loss_fn has no "
                ".reduction attribute: pass reduction='mean' or reduction='sum'"
            )

    def _output_op(self, batch, out):
        obj, t = self.objective, batch.targets
        s = loss_scale(obj, out, t)
        if s == 0:
            return None
        o = out.detach().requires_grad_(True)
        with torch.enable_grad():
            (A,) = torch.autograd.grad(obj.loss_fn(o, t), o, allow_unused=True)
        if A is None:
            return None
        return outer_op(A.detach()[None] / s, s, _num_samples(obj.loss_fn, out))
