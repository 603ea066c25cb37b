"""The structured engine on an ``Objective``: exact diagonal, blocks and dense Hessian.

Per batch: one forward pass records every node's output (``_graph.run_forward``), the
loss gives ``g`` and the per-sample output Hessians (``_loss``), and the steps are
undone backwards (``_backprop``) on chunks of samples sized so the per-sample
matrices fit a memory budget. Batches combine through ``Objective.local_sum`` /
``finish`` — the same batch weights, term counts and all-reduce as every other
engine, so ragged batches, DataLoaders and torch.distributed need nothing here.

The diagonal of a chain (``nn.Sequential`` and its fx equivalent, no dense residuals)
runs on weighted outer-product factors (``_factors``: BackPACK's square-root factors
with signs as weights, plus a diagonal that becomes factors only where a
non-diagonal Jacobian needs it, and only the diagonal below the last layer that
needs more): K = number of outputs per sample with ReLU, MiB per sample for the small
CNN. Branching graphs, LayerNorm/softmax, blocks and the dense Hessian keep the dense
joint frontier (cross terms between branches, mixed ``K`` blocks).

The dense Hessian of a graph whose chosen parameters all sit in ``nn.Linear`` layers
carries ``K`` in Kronecker factors and contracts over samples with one GEMM per pair
of layers (``_kron``: N·P² multiply-adds); other models carry ``K`` itself, built from
per-sample parameter Jacobians. Measured in ``benchmarks/bench_structured.py``.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from .. import distributed
from ._backprop import Accumulator, Frontier, undo_step
from ._factors import chain_reason, factor_bytes, factor_diagonal
from ._graph import Plan, Unsupported, build_plan, run_forward
from ._kron import KroneckerAccumulator, kron_sizes, linear_forms
from ._loss import loss_derivatives, loss_reason

__all__ = ["StructuredEngine", "WORK_BYTES"]

WORK_BYTES = 512 * 2**20  # per-chunk working memory the sample chunks are sized to
KRON_FLOOR = 32 * 2**20  # the Kronecker dense path's chunks: a quarter of the matrix's size, at least this


def _needs(plan: Plan) -> Dict[str, bool]:
    """Node name → whether a chosen parameter lies on or above it (else it is not propagated into)."""
    needs = {plan.input: False}
    for step in plan.steps:
        needs[step.name] = bool(step.params) or any(needs.get(i, False) for i in step.inputs)
    return needs


class StructuredEngine:
    """Second-order backpropagation for one objective (raises ``Unsupported`` with the reason)."""

    def __init__(self, objective, *, work_bytes: int = WORK_BYTES):
        reason = loss_reason(objective.loss_fn)
        if reason is not None:
            raise Unsupported(reason)
        self.objective = objective
        self.plan = build_plan(objective.model, objective.layout.names)
        self.needs = _needs(self.plan)
        self.chain = chain_reason(self.plan) is None  # diagonal by factors (``_factors``)
        self.forms, self.kron_reason = linear_forms(self.plan, objective.model)  # dense by Kronecker factors
        self.kron = self.kron_reason is None
        self.work_bytes = work_bytes
        first = next(iter(objective.data.iterate(None)))
        if not isinstance(first.inputs, torch.Tensor):
            raise Unsupported(
                f"the inputs are a {type(first.inputs).__name__}; the structured engine takes one input tensor"
            )
        self._per_sample = self._sample_bytes(first.inputs[:1])

    def _state(self) -> Dict[str, torch.Tensor]:
        ob = self.objective
        return {**ob._fixed, **{k: b.clone() for k, b in ob._buffers.items()}, **ob.params_dict(ob.theta0)}

    def _sample_bytes(self, one: torch.Tensor) -> Dict[str, float]:
        """Bytes per sample of the largest frontier matrices, per mode (from a one-sample forward)."""
        env = run_forward(self.plan, self._state(), one)
        size = {k: v[0].numel() for k, v in env.items()}
        kron_cols, k_sample = kron_sizes(self.plan, env, self.forms) if self.kron else ({}, 0)
        live, widest, jac, jac_diag, cols, kron = {self.plan.output}, size[self.plan.output], 0, 0, 0, 0
        for step in reversed(self.plan.steps):
            if step.name not in live:
                continue
            live.discard(step.name)
            live |= {i for i in step.inputs if self.needs.get(i)}
            D = sum(size[n] for n in live) + size[step.name]
            widest = max(widest, D)
            cols += kron_cols.get(step.name, 0)  # the factored columns carried so far (``_kron``)
            kron = max(kron, 4 * D**2 + 3 * D * cols)
            P_step = sum(self.objective.layout.numels[self.objective.layout.index(p)] for p in step.params)
            jac = max(jac, size[step.name] * P_step)
            if not isinstance(step.module, nn.Linear):  # Linear diagonals need no per-sample J_θ
                jac_diag = max(jac_diag, size[step.name] * P_step)
        item = self.item
        base = 4 * widest**2 + 3 * jac
        diagonal = (
            factor_bytes(self.plan, env, self.objective.layout, item)
            if self.chain
            else item * (4 * widest**2 + 3 * jac_diag)
        )
        dense = item * (kron + k_sample) if self.kron else item * (base + 4 * widest * self.objective.size)
        return {"diagonal": diagonal, "blocks": item * base, "dense": dense}

    @property
    def item(self) -> int:
        return torch.empty((), dtype=self.objective.dtype).element_size()

    def _budget(self, mode: str) -> float:
        """Working memory a chunk may use.

        The Kronecker dense path keeps it to a quarter of the matrix's own size (at least
        ``KRON_FLOOR``), so its peak stays near the matrix itself, like the autodiff path's
        column chunks; larger chunks are only slightly faster (each chunk's GEMMs update
        the whole matrix once).
        """
        if mode == "dense" and self.kron:
            own = self.item * float(self.objective.size) ** 2 / 4
            return min(self.work_bytes, max(own, KRON_FLOOR))
        return self.work_bytes

    def check_memory(self, mode: str) -> None:
        """Raise ``Unsupported`` when even one sample's matrices exceed the working-memory budget.

        The frontier is dense per sample (``D × D`` for a live tensor of ``D`` entries), so
        wide feature maps (a convolution's output) can be out of reach where the
        matrix-free autodiff path is not.
        """
        need = self.work_estimate(mode, 1)
        if need > self.work_bytes:
            raise Unsupported(
                f"one sample's per-layer Hessians ({mode}) need about {need / 2**30:.2f} GiB, "
                f"above the structured engine's working budget of {self.work_bytes / 2**30:.2f} "
                "GiB (wide activations such as convolution outputs)"
            )

    def work_estimate(self, mode: str, n: int) -> float:
        """Bytes of working memory for ``n`` samples at once (the per-sample matrices)."""
        return self._per_sample[mode] * n

    def chunk(self, mode: str) -> int:
        """Samples per chunk: as many as fit the working budget (at least one)."""
        return max(1, int(self._budget(mode) // max(self._per_sample[mode], 1.0)))

    def _derivatives(self, batch, state):
        """One batch's forward (every node's output), loss derivatives ``g``, ``H`` and term count."""
        env = run_forward(self.plan, state, batch.inputs)
        out = env[self.plan.output]
        g, H = loss_derivatives(self.objective.loss_fn, out, batch.targets)
        return env, g, H, self.objective.count(out, batch.targets)

    def _backprop(self, mode: str, acc, env, g, H, state) -> None:
        """Undo the steps on chunks of samples, handing parameter rows to ``acc``."""
        ob = self.objective
        N, step = g.shape[0], self.chunk(mode)
        for s in range(0, N, step):
            acc.start_chunk()
            envc = {k: v[s : s + step] for k, v in env.items()}
            if mode == "diagonal" and self.chain:
                factor_diagonal(self.plan, envc, g[s : s + step], H[s : s + step], state, ob.layout, acc.diag)
                continue
            fr = Frontier(self.plan.output, g[s : s + step], H[s : s + step], dense=mode == "dense")
            for st in reversed(self.plan.steps):
                if self.needs[st.name]:
                    undo_step(fr, st, envc, state, self.needs, acc)

    def _run(self, mode: str, pack) -> torch.Tensor:
        ob, state = self.objective, self._state()

        def fn(batch):
            env, g, H, count = self._derivatives(batch, state)
            acc = Accumulator(mode, ob.layout, ob.dtype, ob.device)
            self._backprop(mode, acc, env, g, H, state)
            return pack(acc), count

        total, n = ob.local_sum(fn, what=f"structured Hessian ({mode})")
        return ob.finish(total, n)

    def _kron_dense(self) -> torch.Tensor:
        """The dense Hessian by Kronecker factors, in one ``P × P`` matrix for all batches.

        The Hessian is linear in the loss derivatives, so each batch's ``g``, ``H`` carry
        its weight ``w_b`` (``Objective.local_sum``'s: the term count for a mean, else 1)
        and every batch adds into the same matrix; the all-reduce and the division by
        the term count (``Objective.finish`` of the scalar weight) happen in place. No
        per-batch copies of the matrix: peak memory is the matrix plus one chunk.
        local_sum still checks every batch (a NaN or Inf in g or H names the batch).
        """
        ob, state = self.objective, self._state()
        acc = KroneckerAccumulator(ob.layout, ob.dtype, ob.device, self.forms)
        mean = ob.reduction not in (None, "sum")  # local_sum's batch weight

        def fn(batch):
            env, g, H, count = self._derivatives(batch, state)
            w = count if mean else 1.0
            self._backprop("dense", acc, env, g * w, H * w, state)
            return 0.0 * (g.sum() + H.sum()), count  # finite unless g or H is not

        _, n = ob.local_sum(fn, what="structured Hessian (dense)")
        scale = ob.finish(torch.ones((), dtype=torch.float64) / distributed.world_size(), n)
        total, _ = distributed.reduce_sum(acc.result(), 0.0)
        return total.mul_(float(scale))

    def diagonal(self) -> torch.Tensor:
        """The exact diagonal of the Hessian of J(θ), ``(P,)`` in layout order."""
        return self._run("diagonal", lambda acc: acc.diag)

    def dense(self) -> torch.Tensor:
        """The exact dense Hessian ``(P, P)``, cross-layer blocks included."""
        if self.kron:
            return self._kron_dense()
        return self._run("dense", lambda acc: acc.result())

    def blocks(self) -> Dict[Tuple[str, ...], torch.Tensor]:
        """Each step's dense block (its chosen parameters side by side, e.g. weight then bias)."""
        keys = [s.params for s in self.plan.steps if s.params]
        sizes = [sum(self.objective.layout.numels[self.objective.layout.index(p)] for p in k) for k in keys]

        def pack(acc):
            return torch.cat(
                [
                    acc.blocks.get(tuple(k), torch.zeros(m, m, dtype=acc.diag.dtype, device=acc.diag.device)).reshape(
                        -1
                    )
                    for k, m in zip(keys, sizes)
                ]
            )

        flat = self._run("blocks", pack)
        out, start = {}, 0
        for k, m in zip(keys, sizes):
            out[tuple(k)] = flat[start : start + m * m].reshape(m, m)
            start += m * m
        return out
