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
The output-space matrices ``M_b`` live in ``_output_space.py``.

References:
    N. N. Schraudolph, "Fast curvature matrix-vector products for second-order
    gradient descent", Neural Computation 14(7), 2002.
    J. Martens, "New insights and perspectives on the natural gradient method",
    JMLR 21(146), 2020.
"""

from __future__ import annotations

from typing import List, Literal, Optional

import torch
from torch.func import jvp, vjp, vmap

from ..errors import InputError
from ._base import CurvatureOperator
from ._crosscheck import verify_jv
from ._engine import Engine, graph_bytes
from ._output_space import (  # the output-space matrices; re-exported here, where they used to live
    OutputOp,
    _batched_grad,
    autograd_loss_hessian,
    class_dim,
    exact_output_fisher,
    likelihood_of,
    loss_scale,
    term_mask,
    verify_loss_hessian,
)

__all__ = [
    "GGNOperator",
    "JacobianSandwich",
    "likelihood_of",
    "loss_scale",
    "exact_output_fisher",
    # re-exported from ._output_space
    "OutputOp",
    "class_dim",
    "term_mask",
    "autograd_loss_hessian",
    "verify_loss_hessian",
]

Method = Literal["auto", "forward", "reverse"]


# -- the sandwich --------------------------------------------------------------------------
class JacobianSandwich(CurvatureOperator):
    """Base of ``Σ_b w_b J_bᵀ M_b J_b`` operators; subclasses give ``_output_op(batch, out)``.

    ``_output_op`` returns ``U ↦ M_b U`` on ``(k, *out.shape)`` blocks, or None for a
    batch that contributes nothing (every term ignored). Subclasses set the attributes
    ``_output_op`` reads before calling this ``__init__`` (the engine trial runs in it).

    Engines (``op.engine``): ``"kept-graph"`` (reverse mode through graphs kept across
    products), ``"forward"`` (``J V`` by forward mode), ``"reverse"`` (double-vjp, graphs
    rebuilt per product). ``op.method`` is ``"forward"`` or ``"reverse"``.
    """

    def __init__(self, model, loss_fn, data, params=None, *, method: Method = "auto", cache="auto", **options):
        """``options``: ``reduction``, ``allow_random``, ``dtype``, ``chunk_size`` (see ``CurvatureOperator``)."""
        if method not in ("auto", "forward", "reverse"):
            raise InputError(f"unknown method {method!r}; valid: auto, forward, reverse")
        if cache != "auto" and bool(cache) and method == "forward":
            raise InputError(
                "cache=True keeps a reverse-mode graph, which method='forward' does not use; "
                "pass cache=False, or method='auto' / 'reverse'"
            )
        super().__init__(model, loss_fn, data, params, **options)
        if cache == "auto":
            cache = self.objective.data.in_memory and method != "forward"
        self._requested = (method, bool(cache))
        self._choose_engine()

    @property
    def method(self) -> str:
        return "forward" if self.engine == "forward" else "reverse"

    def _fresh_state(self) -> None:
        self._kept = {}  # batch index -> reverse-mode state (kept graph)

    def _output_op(self, batch, out: torch.Tensor) -> Optional[OutputOp]:  # pragma: no cover
        raise NotImplementedError

    def _engines(self) -> List[Engine]:
        method, cache = self._requested
        forward = Engine(
            "forward",
            self._forward_run,
            trial=self._forward_trial,
            why="J V by forward mode (jvp), Jᵀ by reverse mode, per batch",
        )
        check = self._verify_reverse
        if cache:
            kept = Engine(
                "kept-graph",
                lambda V: self._reverse_run(V, keep=True),
                trial=check,
                why="data in memory: graphs kept, one double-vjp and one vjp per product",
                keeps_graph=True,
                timed_batching=True,
            )
            return [kept, forward] if method == "auto" else [kept]
        reverse = Engine(
            "reverse",
            lambda V: self._reverse_run(V, keep=False),
            trial=check,
            why="J V by double backward (double-vjp), per batch",
        )
        if method == "auto":
            return [forward, reverse]
        chosen = forward if method == "forward" else reverse
        chosen.why = f"method={method!r} requested"
        if method == "forward":
            chosen.trial = None  # the only candidate: its AD gap surfaces at the first product
        return [chosen]

    def _bytes_per_column(self) -> Optional[float]:
        obj = self.objective
        batches = [obj.data.first()] if not self.cache else list(obj.data)

        def build():
            for b in batches:
                theta, named = obj.leaf()
                with torch.enable_grad():
                    _, out = obj.batch_loss(named, b)
                    if out.requires_grad:
                        u = torch.zeros_like(out, requires_grad=True)
                        torch.autograd.grad(out, theta, u, create_graph=True)

        return float(graph_bytes(build))

    # -- forward mode ---------------------------------------------------------------------
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

        if V.shape[1] == 1:
            JtW = vjp_fn(M(jv(V[:, 0])[None])[0])[0][None]
        else:
            JtW = vmap(lambda w: vjp_fn(w)[0])(M(vmap(jv, in_dims=1)(V)))
        return JtW.T.detach(), count

    def _forward_run(self, V):
        return self.objective.sum_over_batches(lambda b: self._batch_forward(b, V))

    def _forward_trial(self) -> None:
        v = torch.ones(self.shape[0], 1, dtype=self.dtype, device=self.device)
        self._batch_forward(self.objective.data.first(), v)

    # -- reverse mode -------------------------------------------------------------------------
    def _reverse_state(self, batch, keep: bool):
        """One forward pass with ``g = Jᵀu`` kept differentiable in ``u`` (kept when ``keep``)."""
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
                (g,) = torch.autograd.grad(out, theta, u, create_graph=True)
        state = (theta, out, u, g, M, count)
        if keep:
            self._kept[batch.index] = state
        return state

    def _batch_reverse(self, batch, V, keep: bool):
        theta, out, u, g, M, count = self._reverse_state(batch, keep)
        if g is None:
            return torch.zeros_like(V), count
        with torch.enable_grad():
            JV = (
                _batched_grad(g, u, V.T, out)
                if g.requires_grad
                else torch.zeros((V.shape[1], *out.shape), dtype=out.dtype, device=out.device)
            )
            JtW = _batched_grad(out, theta, M(JV.detach()), theta)
        return JtW.T.detach(), count

    def _reverse_run(self, V, keep: bool):
        return self.objective.sum_over_batches(lambda b: self._batch_reverse(b, V, keep))

    def _verify_reverse(self) -> None:
        """Cross-check the double-vjp ``J v`` on the first batch (see ``_crosscheck``)."""
        obj = self.objective
        batch = obj.data.first()

        def f(theta):
            return obj.forward(obj.params_dict(theta), batch.inputs)

        def reverse_jv(v):
            theta, named = obj.leaf()
            with torch.enable_grad():
                out = obj.forward(named, batch.inputs)
                if not out.requires_grad:
                    return torch.zeros_like(out)
                u = torch.zeros_like(out, requires_grad=True)
                (g,) = torch.autograd.grad(out, theta, u, create_graph=True)
                if not g.requires_grad:
                    return torch.zeros_like(out)
                return torch.autograd.grad(g, u, v)[0]

        def forward_jv(v):
            return jvp(f, (obj.theta0,), (v,))[1]

        verify_jv(reverse_jv, f, obj.theta0, forward_jv)


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
        **options: ``method`` and ``cache`` (below), and ``reduction``, ``allow_random``,
            ``dtype``, ``chunk_size`` (see ``CurvatureOperator``).

    Options:
        method: ``"auto"`` (kept graph with the data in memory, else forward mode for J v,
            falling back to reverse mode where an op lacks a forward-mode rule), ``"forward"``
            or ``"reverse"``. Reverse mode gets ``J v`` by double backward, which an op with an
            ``@once_differentiable`` backward silently cuts: before it is used, one ``J v`` is
            cross-checked against forward mode, or against central differences of the outputs
            where forward mode is missing; a reverse route that disagrees is dropped (``"auto"``)
            or refused with ``InputError``.
        cache: keep each batch's forward graph, output-space matrix and ``Jᵀu`` graph
            across products (``"auto"``: when the data is in memory and the method is not
            ``"forward"``). A product then costs one double-vjp and one vjp through the kept
            graph. ``cache=True`` with ``method="forward"`` is refused (forward mode keeps no graph).

    >>> import torch
    >>> from nethessian.operators._ggn import GGNOperator
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> G = GGNOperator(model, torch.nn.MSELoss(), (X, y)).to_dense()
    >>> torch.allclose(G, 2 * X.T @ X / 20)   # least squares: G = H = 2 XᵀX / N
    True
    """

    def __init__(
        self, model, loss_fn, data, params=None, *, loss_hessian: Literal["auto", "autograd"] = "auto", **options
    ):
        if loss_hessian not in ("auto", "autograd"):
            raise InputError(f"unknown loss_hessian {loss_hessian!r}; valid: auto, autograd")
        self.loss_hessian = loss_hessian
        self._loss_hessian_checked = False
        super().__init__(model, loss_fn, data, params, **options)

    def _matrix_options(self):
        return {"loss_hessian": self.loss_hessian}

    def _output_op(self, batch, out):
        obj, t = self.objective, batch.targets
        s = loss_scale(obj, out, t)
        if s == 0:
            return None  # every term ignored: the mean loss is 0/0 but weighs nothing
        kind = likelihood_of(obj.loss_fn) if self.loss_hessian == "auto" else None
        if kind is not None and not (kind == "categorical" and t.is_floating_point()):
            return exact_output_fisher(kind, obj.loss_fn, out, t, s)
        M = autograd_loss_hessian(obj.loss_fn, out, t)
        if not self._loss_hessian_checked:  # once, on the first batch (inside the engine trial)
            self._loss_hessian_checked = True
            verify_loss_hessian(obj.loss_fn, out, t, M)
        return M
