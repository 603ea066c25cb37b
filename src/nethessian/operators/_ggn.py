"""GGNOperator: the generalised Gauss–Newton matrix, and the Jacobian sandwich it shares.

Every curvature matrix here has the form of a sum over batches of

    C_b = J_bᵀ M_b J_b,         J_b = ∂f_b/∂θ   (outputs w.r.t. parameters),

with ``M_b`` a symmetric matrix in output space: the loss Hessian ∇²_f L_b
for the GGN, the Fisher of the predictive distribution for the Fisher, the
outer products of output gradients for the empirical Fisher. ``JacobianSandwich``
computes ``C_b V`` matrix-free for a block ``V`` of columns — ``J V`` by
forward mode (``torch.func.jvp``, vmapped), ``M_b (J V)`` in output space,
``Jᵀ(·)`` by reverse mode (``torch.func.vjp``, vmapped) — and combines batches
through ``Objective.sum_over_batches``, so the batch weights are the Hessian's.
Where an op has no forward-mode rule, ``J V`` falls back to the double-vjp trick
``J v = ∂(Jᵀu)ᵀv / ∂u`` with plain autograd. With the data in memory a single
vector goes through a kept graph of ``Jᵀu`` (one double-vjp and one vjp, about
one gradient's cost), checked once against forward mode.

In forward mode only first derivatives of the network are taken (no second-order
rule of any layer is needed); the loss is differentiated twice w.r.t. the outputs only.

References:
    N. N. Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation 14(7), 2002.
    J. Martens, "New insights and perspectives on the natural gradient method",
    JMLR 21(146), 2020.
"""
from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
from torch import nn
from torch.func import jvp, vjp, vmap

from .._data import term_count
from ..errors import InputError
from ._base import CurvatureOperator
from ._hessian import _not_an_ad_gap

__all__ = ["GGNOperator", "JacobianSandwich", "likelihood_of", "loss_scale", "exact_output_fisher"]

OutputOp = Callable[[torch.Tensor], torch.Tensor]  # (k, *out) -> (k, *out)
Method = Literal["auto", "forward", "reverse"]


# -- output-space matrices ---------------------------------------------------------------
def loss_scale(objective, out: torch.Tensor, targets: torch.Tensor) -> Optional[float]:
    """``s`` with ``L_b = s Σ_n ℓ_n`` for the batch loss as ``loss_fn`` returns it.

    ``1`` for a sum, ``1 / c_b`` for a mean (``c_b`` the term count the mean divides by,
    ``0.0`` when every term is ignored), ``None`` when the reduction cannot be known.
    """
    red = getattr(objective.loss_fn, "reduction", None)
    red = objective.reduction if red is None else red
    if red is None:
        return None
    if red == "sum":
        return 1.0
    c = term_count(objective.loss_fn, red, out, targets)
    return 0.0 if c == 0 else 1.0 / c


def likelihood_of(loss_fn) -> Optional[str]:
    """The predictive distribution a loss is the negative log-likelihood of (up to scale), or None.

    ``"categorical"`` for ``CrossEntropyLoss`` (softmax of the outputs), ``"gaussian"``
    for ``MSELoss`` (mean f, variance ½, so that ``(f − y)²`` is the NLL up to a constant),
    ``"bernoulli"`` for ``BCEWithLogitsLoss`` (sigmoid of the outputs). Class or element
    weights change the likelihood, so weighted losses give None.
    """
    kind = type(loss_fn)
    if kind is nn.CrossEntropyLoss and loss_fn.weight is None:
        return "categorical"
    if kind is nn.MSELoss:
        return "gaussian"
    if kind is nn.BCEWithLogitsLoss and loss_fn.weight is None and loss_fn.pos_weight is None:
        return "bernoulli"
    return None


def class_dim(out: torch.Tensor) -> int:
    return 1 if out.ndim > 1 else 0


def term_mask(loss_fn, out: torch.Tensor, targets: torch.Tensor) -> Optional[torch.Tensor]:
    """For class-index targets, 1 where a term counts and 0 where ``ignore_index``; shaped to broadcast."""
    if targets.is_floating_point():
        return None
    return (targets != loss_fn.ignore_index).to(out.dtype).unsqueeze(class_dim(out))


def exact_output_fisher(kind: str, loss_fn, out: torch.Tensor, targets: torch.Tensor, s: float) -> OutputOp:
    """``U ↦ s F(f) U`` per term: the Fisher of the predictive distribution in output space.

    categorical: ``diag(p) − ppᵀ`` over the class dimension (zero for ignored targets);
    gaussian: ``2 I``; bernoulli: ``σ(f)(1 − σ(f))``. For these losses (without weights)
    this *is* the loss Hessian ∇²_f L_b, so the exact Fisher equals the GGN (Martens 2020). For
    ``MSELoss`` that Hessian is ``2 s I`` (``s = 1/numel`` for a mean): a Gaussian of variance ½.
    """
    if kind == "gaussian":
        return lambda U: (2.0 * s) * U
    if kind == "bernoulli":
        sig = torch.sigmoid(out)
        d = s * sig * (1 - sig)
        return lambda U: d * U
    cd = class_dim(out)
    p = torch.softmax(out, dim=cd)
    mask = term_mask(loss_fn, out, targets)
    w = s if mask is None else s * mask

    def apply(U):
        pU = p * U
        return w * (pU - p * pU.sum(dim=cd + 1, keepdim=True))
    return apply


def _batched_grad(outputs, inputs, grads, like):
    """``[∂⟨outputs, g_i⟩/∂inputs for g_i in grads]`` stacked, graph kept; zeros where unused."""
    try:
        res, = torch.autograd.grad(outputs, inputs, grads, retain_graph=True, is_grads_batched=True,
                                   allow_unused=True)
        if res is None:
            return torch.zeros((grads.shape[0], *like.shape), dtype=like.dtype, device=like.device)
        return res
    except RuntimeError:  # an op without a batching rule for its backward: one column at a time
        cols = [torch.autograd.grad(outputs, inputs, g, retain_graph=True, allow_unused=True)[0]
                for g in grads]
        return torch.stack([torch.zeros_like(like) if c is None else c for c in cols])


def autograd_loss_hessian(loss_fn, out: torch.Tensor, targets: torch.Tensor) -> OutputOp:
    """``U ↦ ∇²_f L(f, y) U`` for any loss, by double backward on the outputs.

    Reverse-over-reverse avoids forward-mode gaps in loss functions (``jvp`` of the
    gradient of ``mse_loss(reduction="mean")`` raises "ZeroTensors are immutable").
    """
    o = out.detach().requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(loss_fn(o, targets), o, create_graph=True)
    if not g.requires_grad:  # the loss is at most linear in the outputs
        return torch.zeros_like

    def apply(U):
        with torch.enable_grad():
            return _batched_grad(g, o, U, o).detach()
    return apply


# -- the sandwich --------------------------------------------------------------------------
class JacobianSandwich(CurvatureOperator):
    """Base of ``Σ_b w_b J_bᵀ M_b J_b`` operators; subclasses give ``_output_op(batch, out)``.

    ``_output_op`` returns ``U ↦ M_b U`` on ``(k, *out.shape)`` blocks, or None for a
    batch that contributes nothing (every term ignored).
    """

    def __init__(self, model, loss_fn, data, params=None, *, method: Method = "auto", cache="auto",
                 reduction=None, allow_random: bool = False, chunk_size: Optional[int] = None):
        if method not in ("auto", "forward", "reverse"):
            raise InputError(f"unknown method {method!r}; valid: auto, forward, reverse")
        super().__init__(model, loss_fn, data, params, reduction=reduction,
                         allow_random=allow_random, chunk_size=chunk_size)
        self.method = "forward" if method == "auto" else method
        self._fallback_ok = method == "auto"
        self.fallback_reason: Optional[str] = None
        self.cache = self.objective.data.in_memory if cache == "auto" else bool(cache)
        self._kept = {}  # batch index -> reverse-mode state (kept graph), when cache
        self._checked = False  # kept graph cross-checked against forward mode once

    def _output_op(self, batch, out: torch.Tensor) -> Optional[OutputOp]:  # pragma: no cover
        raise NotImplementedError

    def _batch_forward(self, batch, V):
        obj = self.objective

        def f_and_loss(theta):
            loss, out = obj.batch_loss(obj.params_dict(theta), batch)
            return out, loss

        out, vjp_fn, _ = vjp(f_and_loss, obj.theta0, has_aux=True)
        out = out.detach()
        count = obj.count(out, batch.targets)
        M = self._output_op(batch, out)
        if M is None:
            return torch.zeros_like(V), count

        def jv(v):
            return jvp(lambda th: obj.forward(obj.params_dict(th), batch.inputs), (obj.theta0,), (v,))[1]

        JV = vmap(jv, in_dims=1)(V)
        JtW = vmap(lambda w: vjp_fn(w)[0])(M(JV))
        return JtW.T.detach(), count

    def _reverse_state(self, batch):
        """One forward pass with ``g = Jᵀu`` kept differentiable in ``u`` (cached when ``cache``)."""
        if batch.index in self._kept:
            return self._kept[batch.index]
        obj = self.objective
        theta, named = obj.leaf()
        with torch.enable_grad():
            _, out = obj.batch_loss(named, batch)
            count = obj.count(out.detach(), batch.targets)
            M = self._output_op(batch, out.detach())
            u = g = None
            if M is not None and out.requires_grad:
                u = torch.zeros_like(out, requires_grad=True)
                g, = torch.autograd.grad(out, theta, u, create_graph=True)
        state = (theta, out, u, g, M, count)
        if self.cache:
            self._kept[batch.index] = state
        return state

    def _batch_reverse(self, batch, V):
        theta, out, u, g, M, count = self._reverse_state(batch)
        if g is None:
            return torch.zeros_like(V), count
        with torch.enable_grad():
            JV = _batched_grad(g, u, V.T, out) if g.requires_grad else torch.zeros(
                (V.shape[1], *out.shape), dtype=out.dtype, device=out.device)
            JtW = _batched_grad(out, theta, M(JV.detach()), theta)
        return JtW.T.detach(), count

    def _matvec(self, v):
        if self.cache:  # one column: a backward through the kept graph is the cheapest product
            try:
                out = self.objective.sum_over_batches(lambda b: self._batch_reverse(b, v[:, None]))[:, 0]
                return out if self._checked or self.method == "reverse" else self._cross_check(v, out)
            except (RuntimeError, NotImplementedError) as exc:  # an op without a double backward
                if self.method == "reverse" or _not_an_ad_gap(exc):
                    raise
                self._note_fallback(exc)
                self.cache, self._kept = False, {}
        return self._matmat(v[:, None])[:, 0]

    def _cross_check(self, v, out):
        """Once: the double-vjp ``J v`` against forward mode.

        An op whose backward is ``@once_differentiable`` (custom extensions) cuts the graph
        of ``Jᵀu`` without an error, so double backward silently drops its contribution.
        """
        self._checked = True
        try:
            ref = self.objective.sum_over_batches(lambda b: self._batch_forward(b, v[:, None]))[:, 0]
        except (RuntimeError, NotImplementedError) as exc:
            if _not_an_ad_gap(exc):
                raise
            return out  # no forward mode to compare with
        tol = 1e3 * torch.finfo(self.dtype).eps * float(ref.norm())
        if float((out - ref).norm()) > tol:
            self.fallback_reason = ("double backward disagrees with forward mode (an op whose backward "
                                    "is @once_differentiable?): products use forward mode")
            self.cache, self._kept = False, {}
        return ref

    def _note_fallback(self, exc):
        self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def _matmat(self, V):
        if self.method == "forward":
            try:
                return self.objective.sum_over_batches(lambda b: self._batch_forward(b, V))
            except (RuntimeError, NotImplementedError) as exc:
                if not self._fallback_ok or _not_an_ad_gap(exc):
                    raise
                self._note_fallback(exc)
                self.method = "reverse"
        return self.objective.sum_over_batches(lambda b: self._batch_reverse(b, V))


class GGNOperator(JacobianSandwich):
    """v ↦ G v with the generalised Gauss–Newton matrix G = Σ_b w_b J_bᵀ (∇²_f L_b) J_b.

    ``J_b = ∂f_b/∂θ`` is the Jacobian of the model's outputs on batch b, ∇²_f L_b the
    Hessian of the batch loss (as ``loss_fn`` returns it) w.r.t. those outputs, and
    ``w_b`` the batch weights of the cost J (Schraudolph 2002; Martens 2020).
    G drops the term Σ (∂L/∂f) ∇²f of the Hessian, so G is positive semi-definite
    whenever the loss is convex in the outputs, and G = H for a model linear in θ.

    Args:
        model, loss_fn, data, params: the problem (see ``Objective``).
        loss_hessian: ``"auto"`` uses closed forms for ``CrossEntropyLoss`` (class-index
            targets), ``MSELoss`` and ``BCEWithLogitsLoss`` without weights, and double
            backward on the outputs for any other loss; ``"autograd"`` always the latter.
        method: ``"auto"`` (forward mode for J v, falling back to reverse mode where an op
            lacks a forward-mode rule), ``"forward"`` or ``"reverse"``: the engine of
            ``op @ V`` for blocks of columns. ``"reverse"`` gets ``J v`` by double backward,
            which an op with an ``@once_differentiable`` backward silently cuts; ``"auto"``
            cross-checks the kept graph against forward mode once and drops it if they differ.
        cache: keep each batch's forward graph, output-space matrix and ``Jᵀu`` graph
            across products (``"auto"``: when the data is in memory). Single vectors then
            cost one double-vjp and one vjp through the kept graph; reverse mode uses it too.
        reduction, allow_random, chunk_size: see ``CurvatureOperator``.

    >>> import torch
    >>> from nethessian.operators._ggn import GGNOperator
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> G = GGNOperator(model, torch.nn.MSELoss(), (X, y)).to_dense()
    >>> torch.allclose(G, 2 * X.T @ X / 20)   # least squares: G = H = 2 XᵀX / N
    True
    """

    def __init__(self, model, loss_fn, data, params=None, *,
                 loss_hessian: Literal["auto", "autograd"] = "auto", method: Method = "auto",
                 cache="auto", reduction=None, allow_random: bool = False,
                 chunk_size: Optional[int] = None):
        if loss_hessian not in ("auto", "autograd"):
            raise InputError(f"unknown loss_hessian {loss_hessian!r}; valid: auto, autograd")
        super().__init__(model, loss_fn, data, params, method=method, cache=cache, reduction=reduction,
                         allow_random=allow_random, chunk_size=chunk_size)
        self.loss_hessian = loss_hessian

    def _output_op(self, batch, out):
        obj, t = self.objective, batch.targets
        s = loss_scale(obj, out, t)
        if s == 0:
            return None  # every term ignored: the mean loss is 0/0 but weighs nothing
        kind = likelihood_of(obj.loss_fn) if self.loss_hessian == "auto" else None
        if kind is not None and not (kind == "categorical" and t.is_floating_point()):
            return exact_output_fisher(kind, obj.loss_fn, out, t, s)
        return autograd_loss_hessian(obj.loss_fn, out, t)
