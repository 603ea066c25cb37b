"""BlockHessian: the dense Hessian with named blocks, and ``hessian()`` that builds it."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .errors import InputError
from .operators._base import check_dense_size
from .operators._hessian import HessianOperator
from .structured import select as select_engine
from ._params import ParamLayout

__all__ = ["BlockHessian", "hessian"]

Key = Union[str, Tuple[str, str]]


class BlockHessian:
    """A dense symmetric matrix whose rows and columns are grouped by parameter name.

    ``dense`` is ``P × P`` with parameters flattened row-major in ``names``
    order. ``H["W1", "W2"]`` is the ``numel(W1) × numel(W2)`` block,
    ``H["W1"]`` the diagonal block, ``H.block("W1", "W2")`` the same block in
    natural shape ``W1.shape + W2.shape``.
    """

    def __init__(self, dense: torch.Tensor, layout: ParamLayout):
        P = layout.size
        if tuple(dense.shape) != (P, P):
            raise InputError(f"dense matrix has shape {tuple(dense.shape)}, layout needs ({P}, {P})")
        self.dense = dense
        self.layout = layout
        self.engine: str = "autodiff"  # who computed it: "structured" or "autodiff" (set by hessian())
        self.engine_reason: Optional[str] = None

    @property
    def names(self) -> Tuple[str, ...]:
        return self.layout.names

    @property
    def shape(self) -> Tuple[int, int]:
        return tuple(self.dense.shape)

    def _key(self, key: Key) -> Tuple[str, str]:
        if isinstance(key, str):
            return key, key
        if isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, str) for k in key):
            return key
        raise InputError(f"index a BlockHessian with a name or a pair of names, e.g. H['W1', 'W2'], got {key!r}")

    def __getitem__(self, key: Key) -> torch.Tensor:
        r, c = self._key(key)
        return self.dense[self.layout.slice(r), self.layout.slice(c)]

    def block(self, row: str, col: Optional[str] = None) -> torch.Tensor:
        """Block in natural shape: ``shape(row) + shape(col)``."""
        col = row if col is None else col
        return self[row, col].reshape(self.layout.shape(row) + self.layout.shape(col))

    def blocks(self) -> Dict[Tuple[str, str], torch.Tensor]:
        return {(r, c): self[r, c] for r in self.names for c in self.names}

    def by_module(self) -> "BlockHessian":
        """Regroup so that each module's parameters (e.g. weight and bias) form one block.

        Group names are the module paths (``"0"`` for ``"0.weight"``, ``"0.bias"``);
        a parameter owned by the root module keeps its own name.
        """
        groups: Dict[str, List[str]] = {}
        for n in self.names:
            groups.setdefault(n.rsplit(".", 1)[0] if "." in n else n, []).append(n)
        order = self.layout.indices([n for g in groups.values() for n in g]).to(self.dense.device)
        dense = self.dense.index_select(0, order).index_select(1, order)
        sizes = [sum(self.layout.numels[self.layout.index(n)] for n in g) for g in groups.values()]
        return BlockHessian(dense, ParamLayout(tuple(groups), tuple((s,) for s in sizes)))

    def eigvalsh(self) -> torch.Tensor:
        """All eigenvalues, ascending (``torch.linalg.eigvalsh`` of the symmetrised matrix)."""
        return torch.linalg.eigvalsh(self.symmetric())

    def eigh(self):
        return torch.linalg.eigh(self.symmetric())

    def symmetric(self) -> torch.Tensor:
        return 0.5 * (self.dense + self.dense.T)

    @property
    def asymmetry(self) -> float:
        """Max |H - Hᵀ| / max |H|: rounding-level for an exact Hessian."""
        scale = float(self.dense.abs().max()) or 1.0
        return float((self.dense - self.dense.T).abs().max()) / scale

    def to(self, *args, **kwargs) -> "BlockHessian":
        return BlockHessian(self.dense.to(*args, **kwargs), self.layout)

    def __repr__(self) -> str:
        blocks = ", ".join(f"{n}{list(s)}" for n, s in zip(self.names, self.layout.shapes))
        return f"BlockHessian(P={self.shape[0]}, blocks: {blocks})"


def hessian(
    model,
    loss_fn,
    data,
    params: Optional[Sequence[str]] = None,
    *,
    max_bytes: Optional[int] = None,
    progress: bool = False,
    checkpoint=None,
    engine: str = "auto",
    **operator_options,
) -> BlockHessian:
    """The exact dense Hessian of J(θ) over the whole data set, by named blocks.

    Computed column chunk by column chunk through ``HessianOperator`` (vectorised
    Hessian-vector products), so peak memory stays near one chunk of products.

    Args:
        model: the network (never changed).
        loss_fn: ``(outputs, targets) -> scalar``.
        data: an ``(inputs, targets)`` pair or a re-iterable of batches.
        params: names or globs of the parameters (default: all trainable).
        max_bytes: refuse (with the bytes needed) a P × P matrix above this (default 4 GiB).
        progress: show a progress bar on stderr.
        checkpoint: a ``nethessian._checkpoint.Checkpoint`` to resume long runs.
        engine: ``"auto"`` (second-order backpropagation, ``nethessian.structured``, when
            every chosen parameter sits in a dense layer — ``nn.Linear``, ``F.linear``,
            ``x @ W`` — and every module and the loss are supported: Kronecker factors,
            several times faster than products; else products), ``"structured"``
            (refused, naming the first unsupported module, otherwise) or ``"autodiff"``.
            With a ``checkpoint``, ``"auto"`` takes the resumable column loop and
            ``"structured"`` is refused. ``H.engine`` and ``H.engine_reason`` say which ran
            and why; the structured path shows no progress bar (it has no columns).
        **operator_options: passed to ``HessianOperator`` (method, cache, reduction, ...).

    Returns:
        A ``BlockHessian``.

    >>> import torch, nethessian as nh
    >>> model, loss_fn, data = nh.examples.two_layer(seed=0)
    >>> H = nh.hessian(model, loss_fn, data)
    >>> H.names, tuple(H["W1", "W2"].shape), tuple(H.block("W1", "W2").shape)
    (('W1', 'W2'), (6, 3), (2, 3, 3, 1))
    """
    op = HessianOperator(model, loss_fn, data, params, **operator_options)
    structured, why = select_engine(op, engine, "dense", checkpoint=checkpoint, what="the dense Hessian")
    if structured is not None:
        work = structured.work_estimate("dense", structured.chunk("dense"))
        check_dense_size(op.layout.size, op.dtype, max_bytes, work_bytes=work)
        dense = structured.dense()
    else:
        dense = op.to_dense(max_bytes=max_bytes, progress=progress, checkpoint=checkpoint)
    H = BlockHessian(dense, op.layout)
    H.engine, H.engine_reason = ("structured" if structured is not None else "autodiff"), why
    return H
