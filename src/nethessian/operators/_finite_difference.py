"""Finite-difference Hessian-vector products from the model's own gradients.

    H v ≈ D_h = (g(θ + h v) − g(θ − h v)) / 2h                       (``fd_order=2``)
    H v ≈ (4 D_h − D_2h) / 3                                          (``fd_order=4``)

Each gradient g is computed exactly as in training: the model's own forward and
``loss.backward()`` on every batch (so FSDP's hooks and communication, mixed-precision
policies, ``torch.compile`` and fused kernels without a second derivative all run),
with nethessian's batch weights (``J = Σ_b c_b L_b / Σ_b c_b`` for a mean). The model's
parameters are written in place under ``torch.no_grad()`` and restored *bit for bit*
from a saved copy afterwards (never ``θ + hv − hv`` arithmetic); ``.grad`` fields
(``None`` included) and buffers (batch-norm running statistics) are restored too, and
the train/eval mode is never touched.

**Step.** With ``u`` the unit roundoff of the parameters' dtype (float64 1.1e-16,
float32 6.0e-8) the step along ``v`` is

    h = u^(1/3) · max(1, rms(θ)) / ‖v‖

for both orders, so the perturbation ``h v`` has norm ``u^(1/3) · max(1, rms(θ))``:
for the central difference the balance of its truncation error (∝ h² ∇³J) and the
rounding error of the gradients (∝ u / h). The textbook step of the 4-point stencil,
``u^(1/5)``, balances h⁴ ∇⁵J against u / h only when the higher derivatives are of
order one; along the sharp directions of a transformer they are not (measured on a
6-layer GPT-2 in float32, along its top eigenvector: 15 % error at ``u^(1/5)``, 0.4 %
for order 2 at ``u^(1/3)``, 2e-5 for order 4 at 0.003). At the shared step order 4's
truncation error is O(h⁴), far below order 2's, and its rounding error 1.5× order 2's
(stencil weights (1 + 8 + 8 + 1)/12): it never loses to order 2 by much and gains where
truncation dominates. ``fd_step`` overrides the norm of the perturbation
(``h = fd_step / ‖v‖``).

The rule assumes the gradients are as precise as the parameters. A model that
computes its own loss in a lower precision (a float64 Hugging Face model with
``loss_fn=None`` computes it in float32) meets float32 noise at a float64 step:
measured 0.6 % error on a tiny GPT-2, which the estimate below reports (1.6 %); pass
``fd_step`` ≈ 1e-3 there, or a ``loss_fn`` (``nh.losses.causal_lm()``) that keeps
the model's precision.

**Error estimate.** With ``fd_error=True`` (default) every product also has D at the
step 2h (order 4 needs it anyway; order 2 pays two more gradients) and its error is
estimated per column as ``2 ‖D_h − D_2h‖ / ‖v‖``, in the units of eigenvalues (an
estimate of ‖(H̃ − H) v̂‖ for the unit direction v̂). Where truncation dominates,
``D_h − D_2h ≈ −3ch²`` is 3× the truncation error of D_h (and far more than that of
the order-4 result); where rounding dominates it is the difference of two roughly
independent noises, hence the factor 2.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .._checks import all_finite
from .._objective_helpers import _output_tensor, _with_labels
from ..errors import InputError, NonFiniteError
from ..losses import ModelLoss

__all__ = ["FDErrors", "FDProducts", "default_step", "preserved"]

SAFETY = 2.0  # where rounding dominates, D_h − D_2h (two noises partly cancelling) can be below either


def default_step(dtype: torch.dtype, theta: torch.Tensor, order: int, rms: Optional[float] = None) -> float:
    """The norm of the perturbation ``h v``: ``u^(1/3) · max(1, rms(θ))`` for either ``order``.

    ``rms`` given: the rms of the whole θ (for a sharded θ, from all-reduced sums). The
    module docstring says why order 4 does not take the larger ``u^(1/5)``.
    """
    if order not in (2, 4):
        raise InputError(f"fd_order must be 2 or 4, got {order!r}")
    u = torch.finfo(dtype).eps / 2
    if rms is None:
        rms = float(theta.detach().double().pow(2).mean().sqrt()) if theta.numel() else 0.0
    return u ** (1.0 / 3.0) * max(1.0, rms)


@dataclass
class FDErrors:
    """Error estimates of an operator's finite-difference products (per unit ‖v‖).

    Attributes:
        products: columns computed so far (with an estimate).
        max: the largest estimate so far, ``max_j ‖D_h v_j − D_2h v_j‖ / ‖v_j‖``: how far
            any eigenvalue or Rayleigh quotient built from these products can be trusted.
        last: the estimates of the last product's columns, ``(k,)``; None before any.
    """

    products: int = 0
    max: float = 0.0
    last: Optional[torch.Tensor] = field(default=None, repr=False)

    def record(self, est: torch.Tensor) -> None:
        self.products += int(est.numel())
        self.last = est
        if est.numel():
            self.max = max(self.max, float(est.max()))


@contextlib.contextmanager
def preserved(model: torch.nn.Module):
    """Restore every parameter's value and ``.grad`` and every buffer exactly on exit.

    Values are saved as copies and copied back (bit for bit); ``.grad`` objects (or None)
    are put back as they were, so a training loop's accumulated gradients survive.
    """
    params = list(model.parameters())
    values = [p.detach().clone() for p in params]
    grads = [p.grad for p in params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        for p in params:
            p.grad = None
        yield
    finally:
        with torch.no_grad():
            for p, v, g in zip(params, values, grads):
                p.copy_(v)
                p.grad = g
            for b, v in buffers:
                b.copy_(v)


def model_output(model: torch.nn.Module, inputs):
    """``model(*inputs)``, ``model(**inputs)`` or ``model(inputs)`` as the batch holds them."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


class FDProducts:
    """Central-difference products ``V (P, k) -> H V`` for one objective.

    Args:
        objective: an ``Objective`` (or the sharded one): model, loss, data, layout, θ₀.
        access: how to write a flat θ into the model and read its flat gradient
            (``PlainAccess`` or ``sharded.ShardedAccess``).
        order: 2 or 4; step: the norm of ``h v`` (None: ``default_step``); error: estimate it.
    """

    def __init__(self, objective, access, order: int, step: Optional[float], error: bool):
        self.objective, self.access = objective, access
        self.order, self.step, self.error = order, step, error
        self.errors = FDErrors()
        self._norm: Optional[float] = None

    def _step_norm(self) -> float:
        """``‖h v‖``: the user's ``fd_step`` or ``default_step`` with the rms of the whole θ₀."""
        if self.step is not None:
            return self.step
        if self._norm is None:
            theta0 = self.objective.theta0
            (sq,) = self.access.reduce([float(theta0.double().pow(2).sum())])
            size = getattr(self.objective, "global_size", theta0.numel())
            self._norm = default_step(theta0.dtype, theta0, self.order, (sq / size) ** 0.5 if size else 0.0)
        return self._norm

    def run(self, V: torch.Tensor) -> torch.Tensor:
        cols, ests = [], []
        for j in range(V.shape[1]):
            hv, est = self._column(V[:, j])
            cols.append(hv)
            ests.append(est)
        if self.error:
            self.errors.record(torch.tensor(ests, dtype=torch.float64))
        return torch.stack(cols, dim=1)

    def _column(self, v: torch.Tensor):
        """One column and its error estimate; norms over the whole vector (``access.reduce``)."""
        (sq,) = self.access.reduce([float(v.double().pow(2).sum())])
        nv = sq**0.5
        if nv == 0.0:
            return torch.zeros_like(v), 0.0
        theta0 = self.objective.theta0
        h = self._step_norm() / nv
        multiples = (1, 2) if (self.order == 4 or self.error) else (1,)
        thetas = [theta0 + s * m * h * v for m in multiples for s in (1, -1)]
        self._check_displacement(thetas[0] - thetas[1], 2 * h * v)
        g = self.access.gradients(thetas)
        D = [(g[2 * i] - g[2 * i + 1]) / (2 * m * h) for i, m in enumerate(multiples)]
        hv = D[0] if self.order == 2 else (4 * D[0] - D[1]) / 3
        diff = float((D[0] - D[1]).double().pow(2).sum()) if len(D) == 2 else 0.0
        bad = 0.0 if all_finite(hv) else 1.0
        diff, bad = self.access.reduce([diff, bad])
        if bad and getattr(self.access, "collective", False):  # on every rank, not only where it is NaN
            raise NonFiniteError(
                f"a finite-difference product is NaN or Inf on {int(bad)} rank(s): the "
                "gradient overflows at θ ± h v; pass a smaller fd_step"
            )
        est = SAFETY * diff**0.5 / nv
        if self.step is not None and len(D) == 2:
            self._check_user_step(est, hv, nv)
        return hv, est

    def _check_displacement(self, made: torch.Tensor, meant: torch.Tensor) -> None:
        """Refuse a step that rounding swallows: θ ± h v must really move θ by about 2 h v."""
        off, size = self.access.reduce(
            [float((made - meant).double().pow(2).sum()), float(meant.double().pow(2).sum())]
        )
        if size == 0.0 or off > 1e-2**2 * size:
            raise InputError(
                f"fd_step={self._step_norm():.3g} is too small for {str(self.objective.theta0.dtype)[6:]}: "
                f"θ ± h v rounds to a displacement {(off / max(size, 1e-300)) ** 0.5:.0%} off the one meant, "
                "so the difference of gradients would be noise (or zero). Leave fd_step=None (the step "
                "is chosen from the dtype and θ), or use a larger one"
            )

    def _check_user_step(self, est: float, hv: torch.Tensor, nv: float) -> None:
        """A user's ``fd_step`` whose two step sizes disagree by more than 10 % of the product is refused."""
        (norm,) = self.access.reduce([float(hv.double().pow(2).sum())])
        scale = norm**0.5 / nv
        if est > 0.1 * scale and est > 0.0:
            raise InputError(
                f"fd_step={self.step:.3g} gives products whose estimated error ({est:.2g} per unit ‖v‖) is "
                f"{est / max(scale, 1e-300):.0%} of the product itself (truncation or rounding): the numbers "
                "would not be a Hessian's. Leave fd_step=None (chosen from the dtype and θ) or pick a step "
                "between the two regimes"
            )


class PlainAccess:
    """Gradients of a model whose parameters are plain tensors (one process, or data-parallel)."""

    def __init__(self, objective):
        self.objective = objective
        named = dict(objective.model.named_parameters())
        self.params = [named[n] for n in objective.layout.names]

    def write(self, theta: torch.Tensor) -> None:
        for p, part in zip(self.params, self.objective.layout.unflatten(theta).values()):
            p.copy_(part)

    def local_gradient(self) -> torch.Tensor:
        return torch.cat([(torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1) for p in self.params])

    def finish(self, local: torch.Tensor, n: float) -> torch.Tensor:
        return self.objective.finish(local, n)

    def prepare(self) -> None:
        """Nothing to do: plain parameters are always registered as they are."""

    @staticmethod
    def reduce(values: List[float]) -> List[float]:
        """The vectors are whole on this rank: its sums are the sums."""
        return list(values)

    def steps(self) -> int:
        return 0  # no padding: each rank runs only its own batches

    def gradients(self, thetas: List[torch.Tensor]) -> List[torch.Tensor]:
        return gradients(self, thetas)


def gradients(access, thetas: List[torch.Tensor]) -> List[torch.Tensor]:
    """∇J at each θ in ``thetas``, with the model's own backward; the model restored afterwards."""
    obj = access.objective
    out = []
    access.prepare()
    with preserved(obj.model):
        for theta in thetas:
            with torch.no_grad():
                access.write(theta)
            n = _backward_pass(obj, access.steps())
            out.append(access.finish(access.local_gradient().detach().clone(), n))
            for p in obj.model.parameters():
                p.grad = None
    return out


def _backward_pass(obj, steps: int) -> float:
    """``.backward()`` of ``c_b L_b`` (mean) or ``L_b`` (sum) per local batch; returns Σ c_b.

    ``steps`` > the local batch count adds zero-weight passes (FSDP needs every rank to run
    the same number of forward/backward passes: their collectives must pair up).
    """
    mean = obj.reduction not in (None, "sum")
    n, done = 0.0, 0
    snapshot = getattr(obj, "_buffers", None) or {}
    live = dict(obj.model.named_buffers()) if snapshot else {}
    with torch.enable_grad():
        for batch in obj.data:
            with torch.no_grad():  # every forward from the snapshot's buffers, as the objective's are
                for name, value in snapshot.items():
                    if name in live:
                        live[name].copy_(value)
            own = getattr(obj.loss_fn, "uses_model_loss", False)  # loss_fn=None: the model's .loss
            raw = model_output(obj.model, _with_labels(batch) if own else batch.inputs)
            out = _output_tensor(raw)  # the tensor itself, or a Hugging Face output's .logits
            c = obj.count(out.detach(), batch.targets)
            done += 1
            if mean and c == 0:  # every target ignored: no terms; a zero pass keeps collectives paired
                (out.sum() * 0.0).backward()
                continue
            loss = ModelLoss.of(raw) if own else obj.loss_fn(out, batch.targets)
            if not torch.isfinite(loss.detach()).all():
                raise NonFiniteError(
                    f"batch {batch.index}: the loss is NaN or Inf at a finite-difference "
                    "step; pass a smaller fd_step, or check that batch's data"
                )
            (loss * c if mean else loss).backward()
            n += c
        for _ in range(steps - done):
            (_output_tensor(model_output(obj.model, obj.data.first().inputs)).sum() * 0.0).backward()
    return n


def check_options(order, step, error) -> None:
    """Refuse bad ``fd_order`` / ``fd_step`` / ``fd_error`` values with what to pass instead."""
    if order not in (2, 4) or isinstance(order, bool):
        raise InputError(
            f"fd_order must be 2 (central difference, 2 gradients) or 4 (4-point stencil, 4 gradients), got {order!r}"
        )
    if step is not None:
        from .._checks import as_float

        as_float("fd_step", step, positive=True)
    if not isinstance(error, bool):
        raise InputError(f"fd_error must be True or False, got {error!r}")


def fd_options(order: int, step: Optional[float]) -> Dict[str, object]:
    """The finite-difference options that change the numbers (for the fingerprint)."""
    return {"method": "finite-difference", "fd_order": order, "fd_step": step}
