"""Exact Hessian-vector products of a chain by second-order forward and backward passes (R-operator).

For a chain of ``nn.Linear`` layers and element-wise activations ending in a loss that is a
sum over samples (``_loss``), ``H v`` is one forward pass of directional derivatives and one
backward pass of their gradients (Pearlmutter 1994), on per-batch quantities computed once:
each Linear's input ``a`` and output gradient ``g_z``, each activation's ``σ'(x)`` and
``g_y ⊙ σ''(x)`` (read off autograd on the activation itself, so every element-wise module
of ``_rules`` is exact without a hand-written derivative), and the loss's per-sample Hessian.

    forward   Rz = Ra Wᵀ + a Vᵀ + v_b          (Linear: weight tangent V, bias tangent v_b)
              Ry = σ'(x) ⊙ Rx                  (activation)
    loss      Rg_out,n = ∂²ℓ/∂z_n² · Rz_n       (per sample)
    backward  Rg_x = σ' ⊙ Rg_y + (g_y σ'') ⊙ Rx  (activation)
              (H v)_W = Rg_zᵀ a + g_zᵀ Ra,  (H v)_b = Σ_n Rg_z,  Rg_a = Rg_z W + g_z V

The matrix products are those of autograd's double backward through a kept graph (two per
weight, one each way at the first layer), without the graph's per-node bookkeeping: on the
MLP benchmark (784-128-64-10, N = 1024) a product takes ~0.8x the kept graph's time. Blocks
of ``k`` columns run as one pass with a leading column axis. Batches combine through
``Objective.local_sum`` / ``finish`` (weights, term counts, the all-reduce), as every engine.
"""

from __future__ import annotations

from typing import Any, Dict, List, Tuple

import torch
from torch import nn

from ._factors import chain_reason
from ._graph import Unsupported, build_plan
from ._loss import loss_derivatives, loss_reason

__all__ = ["ChainHVP", "MAX_OUTPUTS", "offer_hvp"]

MAX_OUTPUTS = 256  # per-sample outputs of the loss's Hessian (N·D² entries are kept per batch)


class ChainHVP:
    """``H V`` of an ``Objective`` whose model is a Linear/activation chain (else ``Unsupported``)."""

    def __init__(self, objective: Any):
        reason = loss_reason(objective.loss_fn)
        if reason is not None:
            raise Unsupported(reason)
        if not objective.data.in_memory:
            raise Unsupported("the data is streamed: the per-batch quantities are kept for data in memory only")
        plan = build_plan(objective.model, objective.layout.names)
        reason = chain_reason(plan)
        if reason is not None:
            raise Unsupported(reason)
        for step in plan.steps:
            if step.kind == "linear" and not isinstance(step.module, nn.Linear):
                raise Unsupported(f"{step.label}: the Hessian-vector pass knows nn.Linear among linear steps")
            if step.kind == "elementwise" and step.params:
                raise Unsupported(f"{step.label}: an element-wise step with parameters")
        first = objective.data.first()
        if not isinstance(first.inputs, torch.Tensor) or first.inputs.ndim < 2:
            raise Unsupported("the inputs are not one (N, ..., features) tensor")
        linears = [s.module for s in plan.steps if s.kind == "linear"]
        if not linears:
            raise Unsupported("no nn.Linear layer")
        outputs = linears[-1].out_features * int(torch.tensor(first.inputs.shape[1:-1]).prod())
        if outputs > MAX_OUTPUTS:  # before any loss Hessian is formed
            raise Unsupported(f"{outputs} outputs per sample: the loss's Hessian would hold N·D² entries")
        self.objective, self.plan = objective, plan
        lay = objective.layout
        self._slices = {n: (o, o + m) for n, o, m in zip(lay.names, lay.offsets, lay.numels)}
        self._cache: List[Tuple[Any, ...]] = []

    # -- per-batch quantities, computed once -------------------------------------------------
    def _state(self) -> Dict[str, torch.Tensor]:
        ob = self.objective
        return {**ob._fixed, **ob.params_dict(ob.theta0)}

    def _batch(self, state: Dict[str, torch.Tensor], batch) -> Tuple[Any, ...]:
        """``(per-step records, loss Hessian (N, D, D), output shape, term count)`` of one batch."""
        obj = self.objective
        x = batch.inputs
        if not isinstance(x, torch.Tensor):
            raise Unsupported(f"batch {batch.index}: the inputs are a {type(x).__name__}, not one tensor")
        outs = []
        with torch.enable_grad():
            h = x.detach().requires_grad_(True)  # a graph through every step (the parameters are constants)
            for step in self.plan.steps:
                h = step.fn([h], state)
                outs.append(h)
            loss = obj._loss(h, batch)
            grads = torch.autograd.grad(loss, outs, allow_unused=True)
        count = obj.count(h.detach(), batch.targets)
        if count != 0 or obj.reduction in (None, "sum"):  # an all-ignored mean batch is 0/0 and weighs 0
            obj.check_finite(loss.detach(), batch.index)
        _, H = loss_derivatives(obj.loss_fn, h.detach(), batch.targets)
        records, prev = [], x
        for step, out, g in zip(self.plan.steps, outs, grads):
            g = torch.zeros_like(out) if g is None else g.detach()
            if step.kind == "linear":
                W = state[step.prefix + "weight"]
                b = state.get(step.prefix + "bias") if step.module.bias is not None else None
                records.append(("linear", step.prefix, prev, g, W, b is not None))
            else:
                s1, r = _activation_derivatives(step, prev, g, state)
                records.append(("activation", s1, r))
            prev = out.detach()
        return records, H, tuple(h.shape), count

    def prepare(self) -> None:
        """Compute every batch's quantities now (``Unsupported`` for a batch the pass cannot take)."""
        self._batches()

    def _batches(self):
        if not self._cache:
            state = self._state()
            self._cache = [self._batch(state, b) for b in self.objective.data.iterate(None)]
        return self._cache

    # -- products ----------------------------------------------------------------------------
    def run(self, V: torch.Tensor) -> torch.Tensor:
        """``H V`` for a ``(P, k)`` block, over the whole data set (all-reduced under torch.distributed).

        One column at a time: two-dimensional matrix products are faster on the CPU than the
        same work with a leading column axis (measured: 5 columns 1.3x slower as one pass).
        """
        it = iter(self._batches())

        def one_batch(_batch):
            entry = next(it)
            cols = [self._column(entry, V[:, i].contiguous()) for i in range(V.shape[1])]
            return torch.stack(cols, dim=1), entry[3]

        return self.objective.finish(*self.objective.local_sum(one_batch), inplace=True)  # local_sum's own sum

    def _tangent(self, v: torch.Tensor, name: str, shape) -> Any:
        """The entries of ``v`` for parameter ``name``, shaped like it; None when it is not chosen."""
        where = self._slices.get(name)
        return None if where is None else v[where[0] : where[1]].view(shape)

    def _column(self, entry, v: torch.Tensor) -> torch.Tensor:
        """``H_b v`` of one batch's loss (as ``loss_fn`` returns it) for one column."""
        records, H, out_shape, _ = entry
        R, rs = None, []  # R: the current activation's tangent; rs: each step's input tangent
        for rec in records:
            rs.append(R)
            if rec[0] == "activation":
                R = None if R is None else rec[1] * R
                continue
            _, prefix, a, _g, W, has_b = rec
            VW = self._tangent(v, prefix + "weight", W.shape)
            vb = self._tangent(v, prefix + "bias", W.shape[:1]) if has_b else None
            z = None if R is None else R @ W.T
            if VW is not None:
                if z is None:
                    z = a @ VW.T
                else:  # leading axes folded: (N, ..., d) inputs
                    z.view(-1, z.shape[-1]).addmm_(a.reshape(-1, a.shape[-1]), VW.T)
            if vb is not None:
                z = vb.expand(*a.shape[:-1], W.shape[0]).clone() if z is None else z.add_(vb)
            R = z
        if R is None:  # nothing chosen reaches the output
            return torch.zeros_like(v)
        # every chosen parameter belongs to a Linear the backward pass below reaches, and each
        # writes its whole slice (``_weight_rows``): no zero fill needed
        out = torch.empty_like(v)
        N = out_shape[0]
        Rg = torch.bmm(H, R.reshape(N, -1, 1)).view(out_shape)
        for i in reversed(range(len(records))):
            rec, Rin = records[i], rs[i]
            if rec[0] == "activation":
                Rg = rec[1] * Rg if Rin is None else (rec[1] * Rg).addcmul_(rec[2], Rin)
                continue
            _, prefix, a, g, W, has_b = rec
            self._weight_rows(out, prefix, a, g, Rg, Rin, has_b)
            if i == 0:  # the model's input: no gradient needed below it
                break
            VW = self._tangent(v, prefix + "weight", W.shape)
            Rg = Rg @ W if VW is None else (Rg @ W).add_(g @ VW)
        return out

    def _weight_rows(self, out, prefix: str, a, g, Rg, Rin, has_b: bool) -> None:
        """``(H v)_W = Rg_zᵀ a + g_zᵀ Ra`` and ``(H v)_b = Σ Rg_z`` into their entries of ``out``."""
        d_out, d_in = g.shape[-1], a.shape[-1]
        where = self._slices.get(prefix + "weight")
        if where is not None:
            hw = out[where[0] : where[1]].view(d_out, d_in)
            torch.mm(Rg.reshape(-1, d_out).T, a.reshape(-1, d_in), out=hw)
            if Rin is not None:
                hw.addmm_(g.reshape(-1, d_out).T, Rin.reshape(-1, d_in))
        where = self._slices.get(prefix + "bias") if has_b else None
        if where is not None:
            torch.sum(Rg.reshape(-1, d_out), dim=0, out=out[where[0] : where[1]])


def _activation_derivatives(step, x: torch.Tensor, g: torch.Tensor, state) -> Tuple[torch.Tensor, torch.Tensor]:
    """``σ'(x)`` and ``g ⊙ σ''(x)`` of an element-wise step, from autograd on the step alone."""
    with torch.enable_grad():
        xl = x.detach().requires_grad_(True)
        y = step.fn([xl], state)
        (s1,) = torch.autograd.grad(y, xl, torch.ones_like(y), create_graph=True)
        if s1.requires_grad:
            (r,) = torch.autograd.grad(s1, xl, g, allow_unused=True)
        else:  # piecewise linear (ReLU): σ'' = 0
            r = None
    return s1.detach(), torch.zeros_like(x) if r is None else r.detach()


def offer_hvp(objective: Any):
    """``(ChainHVP, "")`` for a plain objective the pass supports, else ``(None, why)``.

    A float32/float64 ``nn.Sequential`` of ``nn.Linear`` and activation modules with a loss that is
    a sum over samples; any other model is turned away from its module types, before tracing.
    """
    from .._objective import Objective
    from ._rules import ELEMENTWISE_MODULES

    model = objective.model
    if type(objective) is not Objective or objective.dtype not in (torch.float32, torch.float64):
        return None, "not a plain float32/float64 objective"
    if not isinstance(model, nn.Sequential) or not all(
        isinstance(m, (nn.Linear, *ELEMENTWISE_MODULES)) for m in model.children()
    ):
        return None, "not an nn.Sequential of nn.Linear and activation modules"
    try:
        return ChainHVP(objective), ""
    except Unsupported as exc:
        return None, str(exc)
