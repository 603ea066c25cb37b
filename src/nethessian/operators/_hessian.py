"""HessianOperator: exact Hessian-vector products of J(θ), matrix-free.

Two engines, chosen automatically:

* **kept graph** (data in memory): the gradient g(θ) is computed once with
  ``create_graph=True`` and kept; each product is one backward pass through it,
  ``Hv = ∂(gᵀv)/∂θ`` — about 1.2–1.4 gradients, the cheapest HVP in PyTorch.
  Many columns go through ``is_grads_batched`` (vmap over the backward) or a
  loop, whichever measured faster on this model.
* **streaming** (a DataLoader, or ``cache=False``): per batch, forward-over-
  reverse ``jvp(grad(L_b))`` with ``torch.func`` (vmapped over columns), falling
  back automatically to double backward for ops without a forward-mode rule.
"""
from __future__ import annotations

import time
from typing import Literal, Optional

import torch
from torch.func import grad as func_grad, jvp, vmap

from ..errors import InputError, NetHessianError
from ._base import CurvatureOperator

__all__ = ["HessianOperator"]

Method = Literal["auto", "forward-over-reverse", "double-backward"]
_METHODS = ("auto", "forward-over-reverse", "double-backward")


def _not_an_ad_gap(exc: BaseException) -> bool:
    """Errors that a change of AD engine cannot cure: ours, and running out of memory."""
    oom = getattr(torch, "OutOfMemoryError", ())
    return isinstance(exc, NetHessianError) or (bool(oom) and isinstance(exc, oom))


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class HessianOperator(CurvatureOperator):
    """v ↦ H v with H = ∇²J(θ) over the whole data set.

    Args:
        model, loss_fn, data, params: the problem (see ``Objective``).
        method: ``"auto"`` (kept graph when data is in memory, else
            forward-over-reverse with fallback), ``"forward-over-reverse"``,
            or ``"double-backward"``.
        cache: keep the gradient graph across products (``"auto"``: when the
            data is in memory). Costs the memory of one gradient graph.
        reduction, allow_random, chunk_size: see ``CurvatureOperator``.

    >>> import torch, nethessian as nh
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> op = nh.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    >>> torch.allclose(op.to_dense(), 2 * X.T @ X / 20)   # least squares: H = 2 XᵀX / N
    True
    """

    def __init__(self, model, loss_fn, data, params=None, *, method: Method = "auto",
                 cache="auto", reduction=None, allow_random: bool = False,
                 chunk_size: Optional[int] = None):
        if method not in _METHODS:
            raise InputError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}")
        super().__init__(model, loss_fn, data, params, reduction=reduction,
                         allow_random=allow_random, chunk_size=chunk_size)
        if cache == "auto":
            cache = self.objective.data.in_memory and method != "forward-over-reverse"
        self.cache = bool(cache)
        if self.cache:
            self.method = "double-backward"
        else:
            self.method = "forward-over-reverse" if method == "auto" else method
        self._fallback_ok = method == "auto"
        self.fallback_reason: Optional[str] = None
        self._graph = None
        self._batched: Optional[bool] = None  # kept graph: vmap'd backward faster than a loop?

    # -- kept graph ---------------------------------------------------------------------
    def _kept(self):
        if self._graph is None:
            obj = self.objective
            theta, named = obj.leaf()

            def fn(b):
                loss, out = obj.batch_loss(named, b)
                return loss, obj.count(out, b.targets)

            with torch.enable_grad():
                J, n = obj.local_sum(fn)
                g, = torch.autograd.grad(J, theta, create_graph=True, allow_unused=True)
            self._graph = (theta, g, n)
        return self._graph

    def _kept_product(self, V: torch.Tensor, batched: bool) -> torch.Tensor:
        theta, g, n = self._kept()
        if g is None or not g.requires_grad:  # J is at most linear in θ: H = 0
            return self.objective.finish(torch.zeros_like(V), n)
        if V.ndim == 1 or not batched:
            cols = V[:, None] if V.ndim == 1 else V
            out = torch.stack([_zeros_if_none(torch.autograd.grad(g, theta, c, retain_graph=True,
                                                                  allow_unused=True)[0], theta)
                               for c in cols.T], dim=1)
            out = out[:, 0] if V.ndim == 1 else out
        else:
            hv, = torch.autograd.grad(g, theta, V.T.contiguous(), retain_graph=True, is_grads_batched=True,
                                      allow_unused=True)
            out = _zeros_if_none(hv, V.T).T
        return self.objective.finish(out.detach(), n)

    # -- streaming ----------------------------------------------------------------------
    def _batch_forward_over_reverse(self, batch, V):
        obj = self.objective

        def loss_of(theta):
            loss, out = obj.batch_loss(obj.params_dict(theta), batch)
            return loss, out.detach()

        gfn = func_grad(loss_of, has_aux=True)

        def one(v):
            _, hv, out = jvp(gfn, (obj.theta0,), (v,), has_aux=True)
            return hv, out

        if V.ndim == 1:
            hv, out = one(V)
        else:
            hv, out = vmap(one, in_dims=1, out_dims=(1, None))(V)
        return hv, obj.count(out, batch.targets)

    def _batch_double_backward(self, batch, V):
        obj = self.objective
        theta, named = obj.leaf()
        with torch.enable_grad():
            loss, out = obj.batch_loss(named, batch)
            g, = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                hv = torch.zeros_like(V)
            elif V.ndim == 1:
                hv = _zeros_if_none(torch.autograd.grad(g, theta, V, allow_unused=True)[0], V)
            else:
                hv, = torch.autograd.grad(g, theta, V.T.contiguous(), is_grads_batched=True, allow_unused=True)
                hv = _zeros_if_none(hv, V.T).T
        return hv.detach(), obj.count(out, batch.targets)

    def _streaming_product(self, V):
        if self.method == "forward-over-reverse":
            try:
                return self.objective.sum_over_batches(lambda b: self._batch_forward_over_reverse(b, V))
            except (RuntimeError, NotImplementedError) as exc:
                if not self._fallback_ok or _not_an_ad_gap(exc):
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                self.method = "double-backward"
        return self.objective.sum_over_batches(lambda b: self._batch_double_backward(b, V))

    # -- the product --------------------------------------------------------------------
    def _matvec(self, v):
        if not self.cache:
            return self._streaming_product(v)
        return self._kept_product(v, batched=False)

    def _matmat(self, V):
        if not self.cache:
            return self._streaming_product(V)
        if V.shape[1] == 1:
            return self._kept_product(V, batched=False)
        if self._batched is None:
            try:
                out = self._kept_product(V, batched=True)  # also the warm-up of the timing below
            except RuntimeError:  # an op without a batching rule for its double backward
                self._batched = False
                return self._kept_product(V, batched=False)
            self._batched = self._batched_is_faster(V[:, :16])
            return out
        return self._kept_product(V, batched=self._batched)

    def _batched_is_faster(self, W: torch.Tensor) -> bool:
        """Batched (vmap'd) backward unless clearly slower per column than a loop (best of 2 each).

        Measured once per operator: vmap over the backward wins on MLPs and loses by
        2x on convolutions (FACTS.md), so neither can be the fixed choice.
        """
        def best(f):
            times = []
            for _ in range(2):
                t0 = time.perf_counter()
                f()
                times.append(time.perf_counter() - t0)
            return min(times)

        per_col = best(lambda: self._kept_product(W, batched=True)) / W.shape[1]
        single = best(lambda: self._kept_product(W[:, 0], batched=False))
        return per_col <= 1.2 * single
