"""Sharded vectors of an FSDP2 model: the global order, the linalg protocol, gathering.

**The local vector.** Rank r's local vector ``x_r`` is the concatenation, in parameter-name
order, of its local shards (``DTensor.to_local()``, flattened row-major). FSDP2 shards
each parameter along dim 0 in chunks of ``ceil(d₀ / world)`` rows (the last ranks may
hold fewer rows, or none), so rank r's shards are *not* one contiguous range of the
name-order flat vector ``θ``.

**The global order.** The global vector is the rank-major concatenation
``x = [x_0, x_1, …, x_{world−1}]``: rank r owns ``x[lo_r:hi_r]`` with
``lo_r = Σ_{s<r} n_s`` (``local_range``), ``global_size = Σ_r n_r = P``. It is a fixed
permutation ``x = Π θ`` of the name-order vector, so ``Π H Πᵀ`` has the eigenvalues,
trace and spectral density of H; eigenvectors map back to named parameters with
``gather_vector`` (which applies ``Πᵀ``).

**The protocol** (read by ``linalg``'s adapter): ``sharded`` (True), ``global_size``,
``local_range``, ``allreduce_(t)`` (in-place sum of a small tensor over the ranks).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch

from .. import distributed as dist
from .._checks import as_int
from ..errors import InputError

__all__ = ["ShardTable", "ShardedVectors", "allreduce_", "gather_vector"]

DEFAULT_MAX_GATHER_BYTES = 8 * 2**30
VECTORS = ("local", "replicated")


def check_vectors(vectors: Optional[str], sharded: bool) -> str:
    """The ``vectors=`` option: None → ``"local"`` on a sharded model; refused on a plain one."""
    if vectors is None:
        return "local" if sharded else "replicated"
    if vectors not in VECTORS:
        raise InputError(
            f"vectors must be 'local' (each rank its shard of the vectors) or 'replicated' "
            f"(the full vector on every rank), got {vectors!r}"
        )
    if vectors == "local" and not sharded:
        raise InputError(
            "vectors='local' needs a model sharded with fully_shard (DTensor parameters); "
            "this model's parameters are plain tensors: leave vectors unset"
        )
    return vectors


def allreduce_(t: torch.Tensor) -> torch.Tensor:
    """In-place sum of ``t`` over the ranks (on the backend's device); returns ``t``."""
    if not dist.is_active():
        return t
    dev = dist._comm_device(t.device)
    buf = t if t.device == dev else t.to(dev)
    dist._collective(lambda: torch.distributed.all_reduce(buf), "an all-reduce of sharded inner products")
    if buf is not t:
        t.copy_(buf)
    return t


class ShardTable:
    """Every rank's local shards: per rank, per parameter, the local shape and its index in the full tensor.

    Gathered once at construction (one ``all_gather_object`` of a few integers per parameter).
    """

    def __init__(self, names: Tuple[str, ...], full_shapes: Tuple[Tuple[int, ...], ...], params: list):
        from ._sharded import _local_index

        mine = []
        for name, p in zip(names, params):
            local = tuple(p.to_local().shape)
            index = _local_index(p)
            if tuple(s.stop - s.start for s in index) != local:
                raise InputError(
                    f"parameter {name!r}: its local shard has shape {local} but its placement "
                    f"{tuple(p.placements)} says {tuple(s.stop - s.start for s in index)}"
                )
            mine.append((local, tuple((s.start, s.stop) for s in index)))
        gathered: List[list] = [None] * dist.world_size()
        dist._collective(
            lambda: torch.distributed.all_gather_object(gathered, mine), "the all-gather of the shard table"
        )
        self.names, self.full_shapes, self.ranks = names, full_shapes, gathered
        self.sizes = [sum(math.prod(shape) for shape, _ in r) for r in gathered]
        P = sum(math.prod(s) for s in full_shapes)
        if sum(self.sizes) != P:
            raise InputError(
                f"the ranks' local shards hold {sum(self.sizes)} values but the parameters have "
                f"{P}: a parameter is replicated (HSDP or Replicate placements). vectors='local' "
                "needs every value on exactly one rank: pass vectors='replicated'"
            )

    @property
    def global_size(self) -> int:
        return sum(self.sizes)

    def local_range(self, rank: int) -> Tuple[int, int]:
        lo = sum(self.sizes[:rank])
        return lo, lo + self.sizes[rank]

    def to_named(self, chunks: List[torch.Tensor], k: Optional[int]) -> Dict[str, torch.Tensor]:
        """Full named tensors from every rank's local vector (``(n_r,)`` or ``(n_r, k)``)."""
        tail = () if k is None else (k,)
        ref = chunks[0]
        out = {
            n: torch.zeros(s + tail, dtype=ref.dtype, device=ref.device) for n, s in zip(self.names, self.full_shapes)
        }
        for chunk, shards in zip(chunks, self.ranks):
            at = 0
            for name, (shape, index) in zip(self.names, shards):
                n = math.prod(shape)
                piece = chunk[at : at + n].reshape(tuple(shape) + tail)
                out[name][tuple(slice(a, b) for a, b in index)] = piece
                at += n
        return out


def gather_vector(
    op, x: torch.Tensor, dst: int = 0, *, max_bytes: Optional[int] = None
) -> Optional[Dict[str, torch.Tensor]]:
    """Gather a sharded vector into full tensors keyed by parameter name, on rank ``dst``.

    Every rank must call it (a collective). ``x`` is this rank's local vector ``(n_r,)``
    or block ``(n_r, k)`` (an eigenvector, a diagonal estimate, a solution) of an operator
    with ``vectors="local"``.

    Args:
        op: a curvature operator of a sharded model (or any operator: full vectors are
            split by its layout with no communication, on every rank).
        x: the local vector or block.
        dst: the rank that receives the tensors.
        max_bytes: refuse (on every rank) a gather whose full tensors exceed this many
            bytes on ``dst`` (default 8 GiB).

    Returns:
        On ``dst``: ``{name: tensor of the parameter's full shape (+ (k,))}``; on other
        ranks: None.
    """
    obj = getattr(op, "objective", None)
    if not getattr(obj, "sharded", False):
        return {n: t.clone() for n, t in op.layout.unflatten(x).items()}
    dst = as_int("dst", dst, minimum=0)
    if dst >= dist.world_size():
        raise InputError(f"dst={dst} is not a rank of this {dist.world_size()}-process group")
    table: ShardTable = obj.shards
    lo, hi = obj.local_range
    if x.ndim not in (1, 2) or x.shape[0] != hi - lo:
        raise InputError(
            f"x must be this rank's local vector ({hi - lo},) or block ({hi - lo}, k), got shape {tuple(x.shape)}"
        )
    k = None if x.ndim == 1 else int(x.shape[1])
    dist.check_same("gather_vector", dst=dst, columns=k, dtype=str(x.dtype))
    need = table.global_size * (k or 1) * x.element_size()
    limit = DEFAULT_MAX_GATHER_BYTES if max_bytes is None else as_int("max_bytes", max_bytes, minimum=0)
    if need > limit:
        raise InputError(
            f"the gathered vector needs {need:,} bytes on rank {dst}, above max_bytes={limit:,}; "
            "keep it sharded (save each rank's local vector) or pass a larger max_bytes"
        )
    width = max(table.sizes) * (k or 1)
    dev = dist._comm_device(x.device)
    mine = torch.zeros(width, dtype=x.dtype, device=dev)
    mine[: x.numel()] = x.detach().reshape(-1).to(dev)
    bufs = [torch.empty_like(mine) for _ in range(dist.world_size())] if dist.rank() == dst else None
    dist._collective(lambda: torch.distributed.gather(mine, bufs, dst=dst), "the gather of a sharded vector")
    if dist.rank() != dst:
        return None
    chunks = [
        b[: n * (k or 1)].reshape((n,) + (() if k is None else (k,))).to(x.device) for b, n in zip(bufs, table.sizes)
    ]
    return table.to_named(chunks, k)


class ShardedVectors:
    """The sharded-vector protocol of a curvature operator, from its objective.

    A mixin for ``CurvatureOperator`` subclasses: ``sharded``, ``global_size``,
    ``local_range``, ``allreduce_`` (read by ``linalg``) and ``gather_vector``.
    Operators whose vectors are full report ``sharded = False``, ``local_range = (0, P)``.
    """

    @property
    def sharded(self) -> bool:
        return bool(getattr(self.objective, "sharded", False))

    @property
    def vectors(self) -> str:
        return getattr(self.objective, "vectors", "replicated")

    @property
    def global_size(self) -> int:
        return self.objective.global_size if self.sharded else self.shape[0]

    @property
    def local_range(self) -> Tuple[int, int]:
        return self.objective.local_range if self.sharded else (0, self.shape[0])

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of ``t`` over the ranks when vectors are sharded (else ``t`` as is)."""
        return allreduce_(t) if self.sharded else t

    def gather_vector(self, x: torch.Tensor, dst: int = 0, *, max_bytes: Optional[int] = None):
        """See ``gather_vector``: full named tensors of a sharded vector on rank ``dst``."""
        return gather_vector(self, x, dst, max_bytes=max_bytes)
