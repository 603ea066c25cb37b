"""The cost as a function of perturbed inputs or activations, and its Hessian as operators.

Let ``a`` be the model's input (``at=None``) or the output of the module named
``at``, and let every batch's ``a_b`` be replaced by ``a_b + δ_b``. The cost is

    J(θ, δ) = Σ_b w_b L_b(θ, a_b + δ_b) / n          (n = Σ_b c_b for a mean, 1 for a sum)

with the batch weights of ``Objective`` (its ``local_sum`` and ``finish`` are
reused, not copied). At ``δ = 0``:

* ``∂²J/∂δ²`` is the Hessian with respect to the inputs / activations;
* ``∂²J/∂θ∂δ`` is the mixed block. For parameters *after* the activation it is the
  partial ``∂²J/∂θ∂a``; for parameters *before* it, moving θ moves ``a`` and the
  block is ``(∂²J/∂a²)(∂a/∂θ)`` — in both cases "how ∇_a J changes when θ moves".

One forward pass keeps the graph of ``∇J``; each product is one backward pass
through it (``is_grads_batched`` for many columns, a loop where an op has no
batching rule). The override of an activation is a temporary forward hook that
returns ``output + δ_b``, removed in a ``finally``: nothing is written onto the
user's modules.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._checks import all_finite, check_vector
from ._columns import column_chunk, identity_columns
from ._params import ParamLayout, select_parameters
from .errors import InputError, NonFiniteError

__all__ = ["Perturbed", "InputHessianOperator", "MixedHessian"]


# -- where the perturbation goes -------------------------------------------------------------
def _input_slot(inputs, embeddings: Sequence[str]) -> Tuple[Callable, Callable]:
    """``(get, put)`` for the one floating-point tensor among a batch's inputs."""
    hint = (
        f"; pass at={embeddings[0]!r} (the output of the embedding module) to take the Hessian "
        "with respect to the input embeddings"
        if embeddings
        else "; pass at='<module name>' (a name from model.named_modules()) to take it with respect "
        "to that module's output, e.g. the embedding"
    )
    if isinstance(inputs, torch.Tensor):
        if not inputs.is_floating_point():
            raise InputError(
                f"the inputs are integers ({inputs.dtype}, e.g. token ids): they cannot be differentiated" + hint
            )
        return (lambda x: x), (lambda x, new: new)
    keys = list(inputs) if isinstance(inputs, dict) else list(range(len(inputs)))
    floats = [k for k in keys if isinstance(inputs[k], torch.Tensor) and inputs[k].is_floating_point()]
    if not floats:
        raise InputError("the inputs hold no floating-point tensor (integer token ids cannot be differentiated)" + hint)
    if len(floats) > 1:
        raise InputError(
            f"the inputs hold several floating-point tensors ({floats}); the input Hessian "
            "needs one. Pass at='<module name>' to take it with respect to a module's output"
        )
    key = floats[0]

    def put(x, new):
        if isinstance(x, dict):
            return {**x, key: new}
        return type(x)(new if i == key else t for i, t in enumerate(x))

    return (lambda x: x[key]), put


@contextmanager
def _shifted_output(module: nn.Module, name: str, deltas: List[torch.Tensor]):
    """While active, ``module``'s output ``o`` becomes ``o + δ`` with a fresh leaf ``δ = 0``."""
    calls = []

    def hook(mod, args, output):
        if not isinstance(output, torch.Tensor) or not output.is_floating_point():
            what = type(output).__name__ if not isinstance(output, torch.Tensor) else f"{output.dtype} tensor"
            raise InputError(
                f"module {name!r} returns a {what}, not a floating-point tensor; choose a "
                "module whose output is one tensor (e.g. a submodule, or wrap it)"
            )
        calls.append(1)
        if len(calls) > 1:
            raise InputError(
                f"module {name!r} runs more than once in one forward pass, so 'its output' is "
                "ambiguous; choose a module that runs once"
            )
        d = torch.zeros_like(output).requires_grad_(True)
        deltas.append(d)
        return output + d

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if not calls:
        raise InputError(f"module {name!r} did not run in the forward pass; choose a module the model uses")


class Perturbed:
    """``J(θ, δ)`` of an ``Objective`` with the inputs or module ``at``'s output shifted by ``δ``."""

    def __init__(self, objective, at: Optional[str] = None, sample_dim: int = 0):
        self.objective, self.at, self.sample_dim = objective, at, sample_dim
        model = objective.model
        modules = dict(model.named_modules())
        if at is not None and at not in modules:
            names = [n for n in modules if n]
            raise InputError(
                f"no module named {at!r}; names from model.named_modules(): "
                f"{', '.join(names[:40]) or '(none)'}{' ...' if len(names) > 40 else ''}"
            )
        self.module = modules.get(at) if at is not None else None
        self.embeddings = [n for n, m in modules.items() if isinstance(m, nn.Embedding)]

    def batch_loss(self, named, batch, deltas: List[torch.Tensor]):
        """``(loss, outputs)`` of one batch with a fresh ``δ_b`` appended to ``deltas``."""
        obj = self.objective
        if self.module is None:
            get, put = _input_slot(batch.inputs, self.embeddings)
            x = get(batch.inputs)
            d = torch.zeros_like(x).requires_grad_(True)
            deltas.append(d)
            return obj.batch_loss(named, replace(batch, inputs=put(batch.inputs, x + d)))
        with _shifted_output(self.module, self.at, deltas):
            return obj.batch_loss(named, batch)

    def graph(self, with_theta: bool):
        """Forward once over the data; ``(θ leaf or None, [δ_b], [∂J/∂δ_b], ∂J/∂θ or None, n)``.

        Gradients are of the local weighted sum (``finish`` divides products by ``n``).
        """
        obj = self.objective
        theta, named = obj.leaf() if with_theta else (None, obj.params_dict(obj.theta0))
        deltas: List[torch.Tensor] = []

        def fn(b):
            loss, out = self.batch_loss(named, b, deltas)
            return loss, obj.count(out, b.targets)

        with torch.enable_grad():
            J, n = obj.local_sum(fn)
            wrt = deltas + ([theta] if with_theta else [])
            if J.requires_grad:
                grads = list(torch.autograd.grad(J, wrt, create_graph=True, allow_unused=True))
            else:
                grads = [None] * len(wrt)
        g_theta = grads.pop() if with_theta else None
        return theta, deltas, grads, g_theta, n


# -- layout of the flat (N·D,) vectors -------------------------------------------------------
class SampleLayout:
    """Batches of per-sample entries, flattened sample by sample in data order."""

    def __init__(self, shapes: Sequence[Tuple[int, ...]], sample_dim: int):
        shapes = [tuple(s) for s in shapes]
        ndim = len(shapes[0])
        if not -ndim <= sample_dim < ndim:
            raise InputError(f"sample_dim={sample_dim} is out of range for tensors of shape {shapes[0]}")
        self.sample_dim = sample_dim % ndim
        per = [s[: self.sample_dim] + s[self.sample_dim + 1 :] for s in shapes]
        for b, p in enumerate(per):
            if p != per[0]:
                raise InputError(
                    f"batch {b} has per-sample shape {p} but batch 0 has {per[0]}; the input "
                    "Hessian needs one shape per sample (pad sequences to one length)"
                )
        self.shapes = shapes
        self.sample_shape = per[0]
        self.batch_sizes = tuple(s[self.sample_dim] for s in shapes)
        self.D = 1
        for d in self.sample_shape:
            self.D *= d
        self.N = sum(self.batch_sizes)
        self.size = self.N * self.D

    def split(self, V: torch.Tensor) -> List[torch.Tensor]:
        """``(N·D, k)`` → per batch ``(k, *shape_b)``."""
        out, start = [], 0
        for B in self.batch_sizes:
            part = V[start : start + B * self.D].T.reshape((V.shape[1], B) + self.sample_shape)
            out.append(part.movedim(1, 1 + self.sample_dim))
            start += B * self.D
        return out

    def join(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per batch ``(k, *shape_b)`` → ``(N·D, k)``."""
        flat = [p.movedim(1 + self.sample_dim, 1).reshape(p.shape[0], -1) for p in parts]
        return (flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)).T


def _grads(outputs, inputs, grad_outputs, k: int, batched: bool):
    """``Σ_o ∂(outputs_o · grad_outputs_o)/∂inputs`` for k stacked columns (zeros where unused)."""
    pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if o is not None and o.requires_grad]
    if not pairs:
        return [torch.zeros((k,) + tuple(x.shape), dtype=x.dtype, device=x.device) for x in inputs]
    outs, gouts = [p[0] for p in pairs], [p[1] for p in pairs]
    if batched and k > 1:
        res = torch.autograd.grad(outs, inputs, gouts, retain_graph=True, is_grads_batched=True, allow_unused=True)
    else:
        cols = [
            torch.autograd.grad(outs, inputs, [g[j] for g in gouts], retain_graph=True, allow_unused=True)
            for j in range(k)
        ]
        res = [None if c[0] is None else torch.stack(c) for c in zip(*cols)]
    return [
        torch.zeros((k,) + tuple(x.shape), dtype=x.dtype, device=x.device) if r is None else r.detach()
        for r, x in zip(res, inputs)
    ]


class _Engine:
    """The kept graph of ``∇J(θ, δ)`` and the three products through it."""

    def __init__(self, perturbed: Perturbed, with_theta: bool):
        self.theta, self.deltas, self.g_delta, self.g_theta, self.n = perturbed.graph(with_theta)
        self.objective = perturbed.objective
        self.layout = SampleLayout([tuple(d.shape) for d in self.deltas], perturbed.sample_dim)
        self._batched = True

    def _run(self, outputs, inputs, grad_outputs, k):
        if self._batched and k > 1:
            try:
                return _grads(outputs, inputs, grad_outputs, k, True)
            except RuntimeError as exc:  # an op without a batching rule for its double backward
                if isinstance(exc, getattr(torch, "OutOfMemoryError", ())):
                    raise
                self._batched = False
        return _grads(outputs, inputs, grad_outputs, k, False)

    def hessian(self, V: torch.Tensor) -> torch.Tensor:
        """``∂²J/∂δ² V`` for ``V`` of shape ``(N·D, k)``."""
        parts = self._run(self.g_delta, self.deltas, self.layout.split(V), V.shape[1])
        return self.objective.finish(self.layout.join(parts), self.n)

    def mixed(self, V: torch.Tensor) -> torch.Tensor:
        """``∂²J/∂θ∂δ V`` (all parameters) for ``V`` of shape ``(N·D, k)``: ``(P, k)``."""
        (out,) = self._run(self.g_delta, [self.theta], self.layout.split(V), V.shape[1])
        return self.objective.finish(out.T, self.n)

    def mixed_t(self, W: torch.Tensor) -> torch.Tensor:
        """``∂²J/∂δ∂θ W`` for ``W`` of shape ``(P, k)``: ``(N·D, k)``."""
        parts = self._run([self.g_theta], self.deltas, [W.T.contiguous()], W.shape[1])
        return self.objective.finish(self.layout.join(parts), self.n)


# -- operators -------------------------------------------------------------------------------
class _Matrix:
    """``shape``/``dtype``/``device``, ``@`` on ``(n,)`` and ``(n, k)`` in chunks, ``to_dense``, ``to_scipy``."""

    def __init__(self, shape, dtype, device, apply: Callable[[torch.Tensor], torch.Tensor]):
        self.shape, self.dtype, self.device, self._apply = tuple(shape), dtype, device, apply

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        check_vector(v, self.shape[1], "the vector")
        V = v.to(device=self.device, dtype=self.dtype)
        V = V[:, None] if v.ndim == 1 else V
        c = column_chunk(max(self.shape), V.shape[1])
        if V.shape[1] == 0:
            out = torch.zeros(self.shape[0], 0, dtype=self.dtype, device=self.device)
        elif V.shape[1] <= c:
            out = self._apply(V)
        else:
            out = torch.cat([self._apply(V[:, i : i + c]) for i in range(0, V.shape[1], c)], dim=1)
        if not all_finite(out):
            raise NonFiniteError(
                "the product is NaN or Inf: a second derivative of the cost with respect to "
                "the inputs / activations is not finite here (e.g. sqrt or log at 0, "
                "overflow in float32); check the data and the model"
            )
        return out[:, 0] if v.ndim == 1 else out

    matmul = __matmul__

    def to_dense(self, *, progress: Optional[bool] = False, checkpoint=None) -> torch.Tensor:
        """The dense matrix from products with identity columns (square ones: checkpointed, resumable)."""
        rows, cols = self.shape
        fingerprint = getattr(self, "fingerprint", None)
        if rows == cols and fingerprint is not None:
            return identity_columns(
                self._apply,
                rows,
                dtype=self.dtype,
                device=self.device,
                chunk=column_chunk(rows),
                checkpoint=checkpoint,
                identity={"operator": fingerprint()},
                progress=progress,
            )
        if checkpoint is not None:
            raise InputError(
                "checkpoints are for the square operators (R.operator); call to_dense() without checkpoint="
            )
        c, parts = column_chunk(max(rows, cols)), []
        for start in range(0, cols, c):
            E = torch.zeros(cols, min(c, cols - start), dtype=self.dtype, device=self.device)
            E[torch.arange(start, start + E.shape[1]), torch.arange(E.shape[1])] = 1
            parts.append(self._apply(E))
        return torch.cat(parts, dim=1)

    def to_scipy(self):
        """A ``scipy.sparse.linalg.LinearOperator`` (float64 numpy in and out)."""
        import numpy as np
        from scipy.sparse.linalg import LinearOperator

        def mv(x):
            t = torch.from_numpy(np.ascontiguousarray(x)).to(device=self.device, dtype=self.dtype)
            return (self @ t).detach().cpu().double().numpy()

        return LinearOperator(self.shape, matvec=mv, matmat=mv, dtype=np.float64)


class InputHessianOperator(_Matrix):
    """``∂²J/∂a²``: the whole ``(N·D) × (N·D)`` Hessian w.r.t. the inputs / activations, matrix-free.

    Vectors are flat ``(N·D,)``: sample after sample in data order, each sample's
    entries row-major (the activation's sample axis ``sample_dim`` moved first).
    """

    def __init__(self, perturbed: Perturbed):
        self._engine = _Engine(perturbed, with_theta=False)
        self._perturbed = perturbed
        self.sample_layout = self._engine.layout
        obj = perturbed.objective
        n = self.sample_layout.size
        super().__init__((n, n), obj.dtype, obj.device, self._engine.hessian)
        self._mixed_engine: Optional[_Engine] = None

    def fingerprint(self) -> str:
        """sha256 of the class, ``at``, ``sample_dim`` and the objective's fingerprint."""
        p = self._perturbed
        text = f"{type(self).__name__}|{p.at!r}|{p.sample_dim}|{p.objective.fingerprint()}"
        return hashlib.sha256(text.encode()).hexdigest()

    def mixed(self, params=None) -> "MixedHessian":
        """The mixed block ``∂²J/∂θ∂a`` for ``params`` (names / globs among the objective's; None: all)."""
        if self._mixed_engine is None:
            self._mixed_engine = _Engine(self._perturbed, with_theta=True)
        return MixedHessian(self._mixed_engine, params, self)

    def __repr__(self) -> str:
        lay = self.sample_layout
        return (
            f"InputHessianOperator(N={lay.N}, D={lay.D}, at={self._perturbed.at!r}, "
            f"dtype={str(self.dtype).replace('torch.', '')}, device={self.device})"
        )


class MixedHessian(_Matrix):
    """``M = ∂²J/∂θ∂a``, shape ``(P, N·D)``: ``M @ u`` (input direction → change of ∇_θ J), ``M.T @ w``.

    ``M @ u`` is how the parameter gradient moves when the inputs / activations
    move by ``u`` (influence of a data perturbation); ``M.T @ w`` is how the
    input gradient moves when the parameters move by ``w``. ``layout`` names the
    rows (``layout.unflatten(M @ u)`` gives them per parameter).
    """

    def __init__(self, engine: _Engine, params, square: InputHessianOperator):
        obj = engine.objective
        self.layout: ParamLayout = obj.layout
        if params is not None:
            wanted = select_parameters(obj.model, params)
            names = [n for n in obj.layout.names if n in wanted]
            if not names:
                raise InputError(
                    f"none of {params!r} is among the objective's parameters "
                    f"({', '.join(obj.layout.names)}); pass params= to input_hessian too"
                )
            self.layout = obj.layout.subset(names)
        self._rows = obj.layout.indices(self.layout.names).to(obj.device)
        self._engine, self._square = engine, square
        P, n = self.layout.size, engine.layout.size
        super().__init__((P, n), obj.dtype, obj.device, lambda V: engine.mixed(V)[self._rows])

    @property
    def T(self) -> _Matrix:
        """``Mᵀ = ∂²J/∂a∂θ``, shape ``(N·D, P)``."""
        full = self._engine.objective.layout.size

        def apply(W):
            Wf = torch.zeros(full, W.shape[1], dtype=W.dtype, device=W.device)
            Wf[self._rows] = W
            return self._engine.mixed_t(Wf)

        return _Matrix((self.shape[1], self.shape[0]), self.dtype, self.device, apply)

    def fingerprint(self) -> str:
        text = f"MixedHessian|{self.layout.names}|{self._square.fingerprint()}"
        return hashlib.sha256(text.encode()).hexdigest()
