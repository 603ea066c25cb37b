"""Curvature with respect to inputs and activations: ``nh.input_hessian``.

For the cost J over the whole data set (``Objective``: batches, term counts and
weights), take the inputs ``x`` — or, with ``at="name"``, the output ``a`` of
that module — as the variables. ``R.per_sample[i] = ∂²J/∂a_i²`` are the
``D × D`` diagonal blocks of the whole ``(N·D) × (N·D)`` Hessian ``R.operator``.

Per-sample blocks cost ``D`` Hessian products of the whole data set, not ``N·D``:
when samples do not couple, the probe ``Σ_i e_{i,d}`` (entry ``d`` of every
sample) returns column ``d`` of every diagonal block at once. When they do couple
within a batch (batch norm in train mode), probe ``(j, d)`` puts ``e_d`` on the
``j``-th sample of every batch (batches never couple: each batch's loss sees
only its own samples), and ``max_b B_b · D`` products give every block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from . import distributed as dist
from ._checks import as_int
from ._columns import column_chunk
from ._input_operator import InputHessianOperator, MixedHessian, Perturbed
from ._objective import Objective
from .errors import DenseTooLargeError, InputError

__all__ = ["InputHessian", "input_hessian"]

DEFAULT_MAX_BYTES = 4 * 2**30


@dataclass(frozen=True)
class InputHessian:
    """The Hessian of the cost with respect to the inputs (or a module's output).

    Attributes:
        per_sample: ``(N, D, D)`` diagonal blocks ``∂²J/∂a_i²``, samples in data order
            (``None`` when ``per_sample=False`` was passed).
        operator: the whole ``(N·D) × (N·D)`` Hessian, matrix-free (``@``, ``to_dense``);
            every estimator (``eigenvalues``, ``trace``, ``diagonal``, ``spectral_density``) takes it.
        block_diagonal: whether ``operator`` is block-diagonal by sample.
        coupling: why it is not (``None`` when it is).
        at: the module whose output is the variable (``None``: the inputs).
        sample_shape: the shape of one sample's entries (``D`` = their number).
        batch_sizes: samples per batch, in data order.
    """

    per_sample: Optional[torch.Tensor]
    operator: InputHessianOperator
    block_diagonal: bool
    coupling: Optional[str]
    at: Optional[str]
    sample_shape: tuple
    batch_sizes: tuple

    @property
    def num_samples(self) -> int:
        return sum(self.batch_sizes)

    @property
    def dim(self) -> int:
        return self.operator.sample_layout.D

    def mixed(self, params: Optional[Sequence[str]] = None) -> MixedHessian:
        """The mixed block ``M = ∂²J/∂θ∂a`` of shape ``(P, N·D)``, matrix-free.

        ``M @ u`` is the change of the parameter gradient when the inputs (or
        activations) move by ``u``; ``M.T @ w`` the change of the input gradient
        when the parameters move by ``w``; ``M.to_dense()`` the whole block. For
        parameters before the module ``at``, moving θ moves the activation, and
        the block is ``(∂²J/∂a²)(∂a/∂θ)``.

        Args:
            params: names or globs among the parameters chosen in ``input_hessian``
                (``None``: all of them).
        """
        return self.operator.mixed(params)

    def top_eigenvalues(self) -> torch.Tensor:
        """``(N,)`` the largest eigenvalue of each per-sample block."""
        blocks = self._blocks()
        return torch.linalg.eigvalsh(blocks.double())[:, -1].to(blocks.dtype)

    def traces(self) -> torch.Tensor:
        """``(N,)`` the trace of each per-sample block."""
        return self._blocks().diagonal(dim1=1, dim2=2).sum(-1)

    def to_dict(self, *, blocks: bool = False) -> dict:
        """Plain numbers: shapes, coupling, per-sample top eigenvalue and trace (and the blocks)."""
        out = {
            "at": self.at,
            "num_samples": self.num_samples,
            "dim": self.dim,
            "sample_shape": list(self.sample_shape),
            "batch_sizes": list(self.batch_sizes),
            "block_diagonal": self.block_diagonal,
            "coupling": self.coupling,
        }
        if self.per_sample is not None:
            out["top_eigenvalue"] = self.top_eigenvalues().tolist()
            out["trace"] = self.traces().tolist()
            if blocks:
                out["per_sample"] = self.per_sample.tolist()
        return out

    def summary(self, limit: int = 20) -> str:
        """A table of each sample's top eigenvalue and trace (the first ``limit`` samples)."""
        limit = as_int("limit", limit, minimum=0)
        where = "the inputs" if self.at is None else f"the output of {self.at!r}"
        shape = "block-diagonal by sample" if self.block_diagonal else "samples couple within a batch"
        lines = [
            f"Hessian of the cost w.r.t. {where} (N = {self.num_samples} samples, D = {self.dim} entries each; {shape})"
        ]
        if self.coupling:
            lines.append(f"  {self.coupling}")
        if self.per_sample is None:
            return "\n".join(lines)
        top, tr = self.top_eigenvalues().tolist(), self.traces().tolist()
        lines.append(f"  {'sample':>8}  {'top eigenvalue':>15}  {'trace':>15}")
        lines += [f"  {i:>8}  {top[i]:>+15.6e}  {tr[i]:>+15.6e}" for i in range(min(limit, len(top)))]
        if len(top) > limit:
            i = max(range(len(top)), key=top.__getitem__)
            lines.append(
                f"  ... {len(top) - limit} more; the largest top eigenvalue is {top[i]:+.6e} "
                f"(sample {i}), the mean trace {sum(tr) / len(tr):+.6e}"
            )
        return "\n".join(lines)

    def _blocks(self) -> torch.Tensor:
        if self.per_sample is None:
            raise InputError("per-sample blocks were not computed; call input_hessian(..., per_sample=True)")
        return self.per_sample

    def __repr__(self) -> str:
        where = "inputs" if self.at is None else f"output of {self.at!r}"
        return f"InputHessian({where}, N={self.num_samples}, D={self.dim}, block_diagonal={self.block_diagonal})"


def input_hessian(
    model: nn.Module,
    loss_fn,
    data,
    *,
    at: Optional[str] = None,
    params=None,
    sample_dim: int = 0,
    per_sample: bool = True,
    reduction=None,
    allow_random: bool = False,
    max_bytes: Optional[int] = None,
) -> InputHessian:
    """Hessian of the whole cost with respect to the inputs, or to a module's output.

    Args:
        model: the network (never changed).
        loss_fn: ``(outputs, targets) -> scalar``.
        data: an ``(inputs, targets)`` pair or a re-iterable of batches.
        reduction: how batches combine (see ``Objective``).
        allow_random: accept a random forward pass (see ``Objective``).
        at: a name from ``model.named_modules()``: the variable is that module's output
            (token models: the embedding module). ``None``: the model's inputs, which
            must hold exactly one floating-point tensor.
        params: the parameters of the mixed block ``R.mixed()`` (names / globs; None: all).
        sample_dim: the sample axis of the activation (1 for sequence-first layers).
        per_sample: compute the ``(N, D, D)`` blocks (``False``: only the operator).
        max_bytes: memory limit of the per-sample blocks (default 4 GiB).

    Returns:
        ``InputHessian`` with ``per_sample``, ``operator``, ``block_diagonal``, ``mixed()``.

    Raises:
        InputError: integer inputs (token ids) without ``at``, an unknown module, a
            module that returns no tensor or runs twice, under torch.distributed.
        DenseTooLargeError: the per-sample blocks would exceed ``max_bytes``.

    >>> X = torch.randn(4, 3, dtype=torch.float64); y = torch.randn(4, 1, dtype=torch.float64)
    >>> model = torch.nn.Linear(3, 1, bias=False).double()
    >>> R = input_hessian(model, torch.nn.MSELoss(reduction="sum"), (X, y))
    >>> w = model.weight.detach()[0]                      # J = Σ (w·x_i − y_i)²: ∂²J/∂x_i² = 2 w wᵀ
    >>> torch.allclose(R.per_sample, (2 * torch.outer(w, w)).expand(4, 3, 3))
    True
    """
    sample_dim = as_int("sample_dim", sample_dim)
    if at is not None and not isinstance(at, str):
        raise InputError(f"at must be a module name (a str from model.named_modules()), got {type(at).__name__}")
    if dist.world_size() > 1:
        raise InputError(
            "input_hessian works on one process's data (its vectors are that data's inputs); "
            "call it outside torch.distributed, or on one rank's data"
        )
    objective = Objective(model, loss_fn, data, params, reduction=reduction, allow_random=allow_random)
    op = InputHessianOperator(Perturbed(objective, at, sample_dim))
    lay = op.sample_layout
    coupled = _coupling(op, model)
    blocks = None
    if per_sample:
        _check_bytes(lay.N, lay.D, op.dtype, max_bytes)
        blocks = _per_sample(op, coupled is not None)
    return InputHessian(blocks, op, coupled is None, coupled, at, lay.sample_shape, lay.batch_sizes)


def _check_bytes(N: int, D: int, dtype: torch.dtype, max_bytes: Optional[int]) -> None:
    limit = DEFAULT_MAX_BYTES if max_bytes is None else as_int("max_bytes", max_bytes, minimum=0)
    need = N * D * D * torch.empty((), dtype=dtype).element_size()
    if need > limit:
        raise DenseTooLargeError(
            f"the per-sample blocks ({N} x {D} x {D}) need {need:,} bytes ({need / 2**30:.1f} GiB), above "
            f"the limit of {limit:,} bytes. Pass max_bytes={need} to allow it, or per_sample=False and use "
            "R.operator with nh.eigenvalues / nh.trace / nh.diagonal"
        )


def _slots(op: InputHessianOperator, coupled: bool) -> torch.Tensor:
    """``(N,)`` each sample's probe slot: 0 for all (no coupling), else its place in its batch."""
    sizes = op.sample_layout.batch_sizes
    if not coupled:
        return torch.zeros(sum(sizes), dtype=torch.long)
    return torch.cat([torch.arange(B) for B in sizes])


def _per_sample(op: InputHessianOperator, coupled: bool) -> torch.Tensor:
    """``(N, D, D)`` diagonal blocks from ``(number of slots) · D`` structured products.

    Probe ``(s, d)`` is 1 at entry ``d`` of every sample in slot ``s``; its product's
    rows of those samples are column ``d`` of their blocks (each ``(sample, d)`` is
    reached by exactly one probe, so the blocks are accumulated with ``index_add_``).
    """
    lay = op.sample_layout
    N, D = lay.N, lay.D
    slots = _slots(op, coupled).to(op.device)
    num = (int(slots.max()) + 1) * D
    out = torch.zeros(N, D, D, dtype=op.dtype, device=op.device)
    chunk = column_chunk(N * D, num)
    for start in range(0, num, chunk):
        probe = torch.arange(start, min(num, start + chunk), device=op.device)
        s, d = probe // D, probe % D
        mask = (slots[:, None] == s[None, :]).to(op.dtype)  # (N, c)
        E = torch.zeros(N, D, len(probe), dtype=op.dtype, device=op.device)
        E[:, d, torch.arange(len(probe), device=op.device)] = mask
        HE = (op @ E.reshape(N * D, -1)).reshape(N, D, -1)
        out.index_add_(2, d, HE * mask[:, None, :])
    return out


def _coupling(op: InputHessianOperator, model: nn.Module) -> Optional[str]:
    """Why the Hessian is not block-diagonal by sample (``None`` when it is).

    One product with a random probe on the first sample of every batch: any entry
    on the batch's other samples above rounding means the samples couple.
    """
    lay = op.sample_layout
    if max(lay.batch_sizes) < 2:
        return None
    g = torch.Generator().manual_seed(0)
    first = torch.zeros(lay.N, dtype=torch.bool)
    first[torch.tensor([0] + list(lay.batch_sizes[:-1])).cumsum(0)] = True
    V = torch.randn(lay.N, lay.D, generator=g, dtype=torch.float64) * first[:, None]
    HV = (op @ V.reshape(-1).to(device=op.device, dtype=op.dtype)).reshape(lay.N, lay.D).double().cpu()
    inside, across = HV[first].abs().max(), HV[~first].abs().max()
    eps = torch.finfo(op.dtype).eps
    if float(across) == 0.0 or float(across) <= 100 * eps * float(inside):
        return None
    norms = [
        n
        for n, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats)
    ]
    why = (
        f"batch norm using batch statistics ({', '.join(n or type(model).__name__ for n in norms)}) "
        if norms
        else "the model or the loss "
    )
    return (
        why + "couples the samples of a batch: the Hessian has cross-sample blocks within each "
        f"batch (largest cross entry {float(across):.3g} for a probe on one sample); per_sample holds "
        "the diagonal blocks, the operator the whole matrix. Call model.eval() for per-sample "
        "statistics"
    )
