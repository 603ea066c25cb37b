"""HessianOperator: exact Hessian-vector products of J(θ), matrix-free.

Engines, chosen automatically:

* **structured** (data in memory, an ``nn.Sequential`` of ``nn.Linear`` and activation modules,
  a loss that is a sum over samples): second-order forward and backward passes on per-batch
  quantities kept once (``structured._hvp``); the kept graph's matrix products without its
  per-node bookkeeping (W2: 0.66x its time; W3: 0.9-1.0x).
* **kept graph** (data in memory): the gradient g(θ) is computed once with
  ``create_graph=True`` and kept; each product is one backward pass through it,
  ``Hv = ∂(gᵀv)/∂θ`` — about 1.2–1.4 gradients, the cheapest HVP in PyTorch.
  Many columns go through ``is_grads_batched`` (vmap over the backward), or a
  loop where batching is not measurably faster on this model.
* **streaming** (a DataLoader, or ``cache=False``): per batch, forward-over-reverse
  ``jvp(grad(L_b))`` with ``torch.func`` (vmapped over columns), or double backward for models
  with an op that has no forward-mode rule (tried once, on the first batch, at construction:
  ``op.engine`` and ``op.fallback_reason`` say which).

A third, approximate engine is chosen explicitly: ``method="finite-difference"``,
central differences of the model's own gradients (``_finite_difference``) — for models
with no second derivative (fused kernels, ``torch.compile``) and for models sharded
with FSDP (DTensor parameters, ``_sharded``), where it is the only method.
"""

from __future__ import annotations

from typing import List, Literal, Optional

import torch
from torch.func import grad as func_grad, jvp, vmap

from ..errors import InputError
from ._base import CurvatureOperator
from ._crosscheck import verify_first_batch, verify_jv
from ._chain_engine import chain_engine
from ._engine import Engine, graph_bytes
from ._finite_difference import FDErrors, FDProducts, PlainAccess, check_options, fd_options
from ._shard_vectors import ShardedVectors, check_vectors
from ._sharded import NO_DOUBLE_BACKWARD, ShardedAccess, ShardedObjective, is_sharded

__all__ = ["HessianOperator"]

Method = Literal["auto", "forward-over-reverse", "double-backward", "finite-difference"]
_METHODS = ("auto", "forward-over-reverse", "double-backward", "finite-difference")
FD = "finite-difference"


def _zeros_if_none(t, like):
    return torch.zeros_like(like) if t is None else t


class HessianOperator(ShardedVectors, CurvatureOperator):
    """v ↦ H v with H = ∇²J(θ) over the whole data set.

    Args:
        model, loss_fn, data, params: the problem (see ``Objective``).
        method: ``"auto"`` (structured or kept graph when data is in memory, else
            forward-over-reverse with fallback), ``"forward-over-reverse"``,
            ``"double-backward"``, or ``"finite-difference"`` (approximate: central
            differences of the model's own gradients, see ``fd_*``; the only method for
            a model sharded with FSDP).
        fd_order: finite differences only: 2 (``(g(θ+hv) − g(θ−hv))/2h``, 2 gradients per
            product) or 4 (4-point stencil ``(4D_h − D_2h)/3``, 4 gradients; for float32).
        fd_step: the norm of the perturbation ``h v``; None: ``u^(1/(order+1)) ·
            max(1, rms(θ))`` with ``u`` the dtype's unit roundoff.
        fd_error: estimate each product's error from a second step 2h (free at order 4,
            2 more gradients at order 2): ``op.fd_error`` (max so far, per unit ‖v‖) and
            ``op.last_error`` (the last product's columns).
        cache: keep the gradient graph across products (``"auto"``: when the
            data is in memory). Costs the memory of one gradient graph. The kept
            graph is a double-backward engine: ``cache=True`` with
            ``method="forward-over-reverse"`` is refused.
        vectors: sharded (FSDP) models only: ``"local"`` (default; each rank holds its local
            shards of every vector, so Krylov memory per rank is k·P/world — see
            docs/sharded.md) or ``"replicated"`` (full ``(P,)`` vectors on every rank).
        reduction, allow_random, dtype, chunk_size: see ``CurvatureOperator``.

    Attributes:
        engine: ``"structured"``, ``"kept-graph"``, ``"forward-over-reverse"``, ``"double-backward"``
            or ``"finite-difference"``.
        method: the AD method of the products (``"double-backward"`` for the kept graph).
        fd_errors: ``FDErrors`` of a finite-difference operator (None otherwise).

    >>> import torch, nethessian as nh
    >>> X = torch.randn(20, 3, dtype=torch.float64); y = torch.randn(20, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> op = nh.HessianOperator(model, torch.nn.MSELoss(), (X, y))
    >>> torch.allclose(op.to_dense(), 2 * X.T @ X / 20)   # least squares: H = 2 XᵀX / N
    True
    """

    _cross_check = True  # double-backward engines are verified at construction

    def __init__(
        self,
        model,
        loss_fn,
        data,
        params=None,
        *,
        method: Method = "auto",
        cache="auto",
        reduction=None,
        allow_random: bool = False,
        dtype=None,
        chunk_size: Optional[int] = None,
        fd_order: int = 2,
        fd_step: Optional[float] = None,
        fd_error: bool = True,
        vectors: Optional[str] = None,
        _objective=None,
    ):
        if method not in _METHODS:
            raise InputError(f"unknown method {method!r}; valid: {', '.join(_METHODS)}")
        if cache != "auto" and bool(cache) and method in ("forward-over-reverse", FD):
            raise InputError(
                f"cache=True keeps a double-backward graph, which method={method!r} "
                "does not use; pass cache=False, or method='auto' / 'double-backward'"
            )
        check_options(fd_order, fd_step, fd_error)
        if (
            method == FD
            and dtype is not None
            and isinstance(model, torch.nn.Module)
            and any(p.dtype != dtype for p in model.parameters())
        ):
            raise InputError(
                f"method='finite-difference' runs the model's own forward and backward in its own "
                f"dtype, so dtype={dtype} cannot be honoured; convert the model (e.g. "
                "model.double()) and leave dtype=None"
            )
        objective = _objective  # from_objective: an existing Objective, shared
        if objective is None and isinstance(model, torch.nn.Module) and is_sharded(model):
            if method != FD:
                raise InputError(f"method={method!r} is not possible: " + NO_DOUBLE_BACKWARD)
            objective = ShardedObjective(
                model, loss_fn, data, params, reduction=reduction, allow_random=allow_random, vectors=vectors
            )
        elif objective is None:
            check_vectors(vectors, sharded=False)
        self._fd_options = (fd_order, None if fd_step is None else float(fd_step), fd_error)
        super().__init__(
            model,
            loss_fn,
            data,
            params,
            reduction=reduction,
            allow_random=allow_random,
            dtype=dtype,
            chunk_size=chunk_size,
            _objective=objective,
        )
        if cache == "auto":
            cache = self.objective.data.in_memory and method not in ("forward-over-reverse", FD)
        self._requested = (method, bool(cache))
        self._choose_engine()

    @property
    def method(self) -> str:
        return "double-backward" if self.engine == "kept-graph" else self.engine

    @property
    def fd_errors(self) -> Optional[FDErrors]:
        return self._fd.errors if self.engine == FD else None

    @property
    def fd_error(self) -> Optional[float]:
        """Largest estimated error of the finite-difference products so far, per unit ‖v‖."""
        errs = self.fd_errors
        return None if errs is None or not errs.products else errs.max

    @property
    def last_error(self) -> Optional[torch.Tensor]:
        """The estimated errors of the last product's columns, per unit ‖v‖ (``(k,)``)."""
        errs = self.fd_errors
        return None if errs is None else errs.last

    def _fresh_state(self) -> None:
        self._graph = None
        self._fd = None
        self._structured = None  # (engine or None, reason), built on first use of ``structured``

    @property
    def structured(self):
        """This Hessian's second-order backpropagation engine, built once (None: ``structured_reason``).

        ``nethessian.structured.select`` asks only this; ``at(θ)`` builds a new one.
        """
        return self._structured_offer()[0]

    @property
    def structured_reason(self) -> str:
        """Why ``structured`` is None, naming the first unsupported module ("" for an engine)."""
        return self._structured_offer()[1]

    def _structured_offer(self):
        if self._structured is None:
            from ..structured import offer  # the engine's own rules decide; built once

            self._structured = offer(self.objective)
        return self._structured

    def _matrix_options(self):
        return fd_options(*self._fd_options[:2]) if self._requested[0] == FD else {}

    def _fd_run(self, V: torch.Tensor) -> torch.Tensor:
        if self._fd is None:
            obj = self.objective
            access = ShardedAccess(obj) if isinstance(obj, ShardedObjective) else PlainAccess(obj)
            self._fd = FDProducts(obj, access, *self._fd_options)
        return self._fd.run(V)

    def _nonfinite_culprit(self) -> str:
        if self.engine == FD:  # every batch's loss was finite (checked in the pass)
            return (
                "a finite-difference product is NaN or Inf although every batch's loss is finite: "
                "the gradient overflows at θ ± h v; pass a smaller fd_step"
            )
        return super()._nonfinite_culprit()

    def _engines(self) -> List[Engine]:
        method, cache = self._requested
        if method == FD:
            order = self._fd_options[0]
            return [
                Engine(
                    FD,
                    self._fd_run,
                    why=f"method='finite-difference' requested: order-{order} "
                    "central differences of the model's own gradients",
                )
            ]
        streaming = {
            "forward-over-reverse": Engine(
                "forward-over-reverse",
                lambda V: self._streaming(V, True),
                trial=lambda: self._trial(True),
                why="streaming: jvp(grad) per batch",
            ),
            "double-backward": Engine(
                "double-backward",
                lambda V: self._streaming(V, False),
                trial=self._verify_double_backward,
                why="streaming: double backward per batch",
            ),
        }
        if cache:  # double backward can be silently wrong (@once_differentiable): cross-checked first
            kept = Engine(
                "kept-graph",
                self._kept_run,
                trial=lambda: self._verify_double_backward(self._kept_run),
                keeps_graph=True,
                why="data in memory: the gradient graph is kept, one backward per product",
                timed_batching=True,
            )
            return [*chain_engine(self), kept, streaming["forward-over-reverse"]] if method == "auto" else [kept]
        if method == "auto":
            return [streaming["forward-over-reverse"], streaming["double-backward"]]
        chosen = streaming[method]
        chosen.why = f"method={method!r} requested"
        if method == "forward-over-reverse":
            chosen.trial = None  # exact where it runs; its AD gap surfaces at use
        return [chosen]

    def _bytes_per_column(self) -> Optional[float]:
        if self.engine in (FD, "structured"):
            return 0.0  # columns run one after the other: nothing held per column
        if self.cache:
            return self._kept()[3]
        obj = self.objective
        batch = obj.data.first()

        def build():
            theta, named = obj.leaf()
            with torch.enable_grad():
                loss, _ = obj.batch_loss(named, batch)
                torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)

        return float(graph_bytes(build))

    # -- kept graph ---------------------------------------------------------------------
    def _kept(self):
        if self._graph is None:
            obj = self.objective
            built = {}

            def build():
                theta, named = obj.leaf()

                def fn(b):
                    loss, out = obj.batch_loss(named, b)
                    return loss, obj.count(out, b.targets)

                with torch.enable_grad():
                    J, n = obj.local_sum(fn)
                    (g,) = torch.autograd.grad(J, theta, create_graph=True, allow_unused=True)
                built["graph"] = (theta, g, n)

            nbytes = graph_bytes(build)
            self._graph = (*built["graph"], float(nbytes))
        return self._graph

    def _kept_run(self, V: torch.Tensor) -> torch.Tensor:
        theta, g, n, _ = self._kept()
        if g is None or not g.requires_grad:  # J is at most linear in θ: H = 0
            return self.objective.finish(torch.zeros_like(V), n)
        if V.shape[1] == 1:
            (hv,) = torch.autograd.grad(g, theta, V[:, 0], retain_graph=True, allow_unused=True)
            out = _zeros_if_none(hv, theta)[:, None]
        else:
            (hv,) = torch.autograd.grad(
                g, theta, V.T.contiguous(), retain_graph=True, is_grads_batched=True, allow_unused=True
            )
            out = _zeros_if_none(hv, V.T).T
        fresh = out.untyped_storage().data_ptr() != V.untyped_storage().data_ptr()  # not V handed back
        return self.objective.finish(out.detach(), n, inplace=fresh)

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

        if V.shape[1] == 1:
            hv, out = one(V[:, 0])
            hv = hv[:, None]
        else:
            hv, out = vmap(one, in_dims=1, out_dims=(1, None))(V)
        return hv, obj.count(out, batch.targets)

    def _batch_double_backward(self, batch, V):
        obj = self.objective
        theta, named = obj.leaf()
        with torch.enable_grad():
            loss, out = obj.batch_loss(named, batch)
            (g,) = torch.autograd.grad(loss, theta, create_graph=True, allow_unused=True)
            if g is None or not g.requires_grad:
                hv = torch.zeros_like(V)
            elif V.shape[1] == 1:
                hv = _zeros_if_none(torch.autograd.grad(g, theta, V[:, 0], allow_unused=True)[0], theta)[:, None]
            else:
                (hv,) = torch.autograd.grad(g, theta, V.T.contiguous(), is_grads_batched=True, allow_unused=True)
                hv = _zeros_if_none(hv, V.T).T
        count = obj.count(out, batch.targets)
        if count != 0 or obj.reduction in (None, "sum"):  # an all-ignored mean batch is 0/0 and weighs 0
            obj.check_finite(loss.detach(), batch.index)
        return hv.detach(), count

    def _streaming(self, V, forward: bool):
        per_batch = self._batch_forward_over_reverse if forward else self._batch_double_backward
        return self.objective.sum_over_batches(lambda b: per_batch(b, V))

    def _verify_double_backward(self, run=None, what: str = "double backward (H v)") -> None:
        """``EngineRejected`` when double backward disagrees with jvp(grad) or finite differences.

        Over the whole data set when it is in memory, else on the first batch (see
        ``_crosscheck.verify_jv``): an op whose backward is ``@once_differentiable`` cuts the
        double-backward graph without an error.
        ``nh.check`` switches it off (``_cross_check = False`` on a private subclass): it
        measures the raw engine against finite differences itself, and says by how much.
        """
        if not self._cross_check:
            return
        obj = self.objective
        if obj.data.in_memory:  # every batch (a bad op may be hit by some batches only), once
            run = run or (lambda V: self._streaming(V, False))  # the engine's own product (kept graph)
            verify_jv(
                lambda v: run(v[:, None])[:, 0],
                lambda th: obj.gradient(th).detach(),
                obj.theta0,
                exact=lambda v: self._streaming(v[:, None], True)[:, 0],
                what=what,
            )
            return
        verify_first_batch(obj, self._batch_double_backward, self._batch_forward_over_reverse, what)

    def _trial(self, forward: bool) -> None:
        """One column on the first batch: raises where the engine has an AD gap on this model."""
        v = torch.ones(self.shape[0], 1, dtype=self.dtype, device=self.device)
        batch = self.objective.data.first()
        (self._batch_forward_over_reverse if forward else self._batch_double_backward)(batch, v)
