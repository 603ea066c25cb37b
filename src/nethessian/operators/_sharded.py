"""Models sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``): their objective and gradients.

A sharded model's parameters are DTensors: each rank holds a slice of every tensor.
PyTorch's double backward does not run through FSDP (its hooks serve ``.backward()``
only), so the Hessian of a sharded model is computed with finite differences of its
gradients (``_finite_difference``). Two layouts of the vectors (``vectors=``):

* ``"local"`` (default): the operator acts on this rank's local vector (its local
  shards, concatenated in name order; see ``_shard_vectors`` for the global order);
  each rank writes its shards of ``θ₀ + h v``, runs the model's forward and
  ``.backward()`` on its own data, and reads its reduce-scattered gradient shards:
  no vector is ever whole on one rank. Norms are all-reduced.
* ``"replicated"``: the operator acts on the *full* flat vector ``(P,)``, the same on
  every rank; the gradient shards are all-gathered (``DTensor.full_tensor``).

FSDP averages gradients over the ranks (reduce-scatter divided by the world size);
the gradient of ``J = Σ_b c_b L_b / Σ_b c_b`` over every rank's batches is therefore
``world · ḡ / Σ c`` with the count all-reduced.
"""

from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
from torch import nn

from .. import distributed as dist
from .._data import Batches, resolve_reduction, term_count
from .._fingerprint import Hasher, _name, loss_description
from .._params import ParamLayout, select_parameters
from .._objective_helpers import _output_tensor
from ..errors import InputError, NetHessianError, RandomModelError
from ._finite_difference import gradients, model_output
from ._shard_vectors import ShardTable, allreduce_, check_vectors

__all__ = ["ShardedAccess", "ShardedObjective", "fully_shard_blocks", "is_sharded"]

NO_DOUBLE_BACKWARD = (
    "the model is sharded with FSDP (its parameters are DTensors), and FSDP does not support double "
    "backward (torch.autograd.grad with create_graph=True on sharded parameters fails), nor torch.func "
    "transforms: only method='finite-difference' computes its Hessian products, from the model's own "
    "gradients. Pass method='finite-difference' (and fd_order=4 in float32)"
)


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor

        return DTensor
    except ImportError:  # pragma: no cover - torch without distributed tensors
        return None


def is_sharded(model: nn.Module) -> bool:
    """True when any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``, tensor parallel)."""
    DTensor = _dtensor_type()
    return DTensor is not None and any(isinstance(p, DTensor) for p in model.parameters())


def fully_shard_blocks(model: nn.Module, **fsdp_kwargs) -> int:
    """Shard ``model`` as FSDP users do: ``fully_shard`` on every block, then on the root.

    The blocks are the children of every ``nn.ModuleList`` (transformer layers); a model
    without one is sharded as one unit. Needs torch.distributed initialised and the model
    on this rank's device. Returns the number of blocks sharded separately.
    """
    from torch.distributed.fsdp import fully_shard

    if not dist.is_active():
        raise InputError("fully_shard needs torch.distributed: run under torchrun (init_from_env first)")
    blocks = [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m.children()]
    for block in blocks:
        fully_shard(block, **fsdp_kwargs)
    fully_shard(model, **fsdp_kwargs)
    return len(blocks)


def reshard(model: nn.Module) -> None:
    """Put every FSDP module's parameters back in sharded form (a root keeps them unsharded after forward)."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _local_index(p) -> tuple:
    """The index of ``p``'s local shard inside its full (global) tensor."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
    return tuple(slice(o, o + s) for o, s in zip(offset, shape))


def _check_placements(named) -> None:
    from torch.distributed.tensor import Replicate, Shard

    for name, p in named.items():
        bad = [pl for pl in p.placements if not isinstance(pl, (Shard, Replicate))]
        if bad or p.device_mesh.ndim != 1 or p.device_mesh.size() != dist.world_size():
            raise InputError(
                f"parameter {name!r} is placed {tuple(p.placements)} on a mesh of shape "
                f"{tuple(p.device_mesh.shape)}; nethessian supports fully_shard over all "
                f"{dist.world_size()} ranks (a 1-D mesh of Shard/Replicate placements)"
            )


class ShardedObjective:
    """The objective of a sharded model: its layout, local data and θ₀ in the chosen vectors.

    Duck-types what operators need of ``Objective``: ``model``, ``loss_fn``, ``layout``,
    ``dtype``, ``device``, ``data``, ``reduction``, ``theta0``, ``count``, ``fingerprint``, ``at``.
    With ``vectors="local"``, ``layout`` names the *local* shards (so a local vector
    unflattens into each parameter's local shard) and ``theta0`` is the local vector;
    ``full_layout`` is always the full parameters'. The linalg protocol: ``sharded``,
    ``global_size``, ``local_range``, ``allreduce_``; ``shards`` is every rank's ``ShardTable``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn,
        data,
        params: Optional[Sequence[str]] = None,
        *,
        reduction=None,
        allow_random: bool = False,
        vectors: Optional[str] = None,
    ):
        if not dist.is_active():
            raise InputError(
                "the model's parameters are DTensors but torch.distributed is not initialised; "
                "run under torchrun (or init_process_group) as the model was sharded"
            )
        if not callable(loss_fn):
            raise InputError("loss_fn must be callable as loss_fn(outputs, targets) -> scalar")
        self.model, self.loss_fn = model, loss_fn
        chosen = select_parameters(model, params)
        _check_placements(chosen)
        first = next(iter(chosen.values()))
        self.dtype, self.device = first.dtype, first.device
        if self.dtype in (torch.float16, torch.bfloat16):
            raise InputError(
                "parameters are half floats: finite differences of their gradients drown in "
                "rounding; keep float32 parameters (FSDP's MixedPrecisionPolicy can still "
                "compute in bfloat16, at the cost of the error estimate op.fd_error)"
            )
        self.vectors = check_vectors(vectors, sharded=True)
        self.full_layout = ParamLayout.from_tensors(chosen)
        dist.check_same(
            "the sharded model",
            names=str(self.full_layout.names),
            shapes=str(self.full_layout.shapes),
            dtype=str(self.dtype),
            vectors=self.vectors,
        )
        self._set_vectors(chosen)
        self.data = Batches(data, self.device, self.dtype)
        self.reduction = resolve_reduction(loss_fn=loss_fn, reduction=reduction, multi_batch=True)
        self._fingerprint: Optional[str] = None
        self.local_batches = sum(1 for _ in self.data)
        dist.check_same("the sharded model", reduction=str(self.reduction))
        if not allow_random:
            self._check_deterministic()

    def _set_vectors(self, chosen) -> None:
        """``layout``, ``theta0`` (and for local vectors the shard table and ranges)."""
        params = list(chosen.values())
        if self.vectors == "replicated":
            self.layout, self.shards = self.full_layout, None
            self.theta0 = torch.cat([p.detach().full_tensor().reshape(-1) for p in params]).clone()
            self.global_size, self.local_range = self.layout.size, (0, self.layout.size)
            return
        self.shards = ShardTable(self.full_layout.names, self.full_layout.shapes, params)
        self.layout = ParamLayout.from_tensors({n: p.to_local() for n, p in chosen.items()})
        self.theta0 = torch.cat([p.detach().to_local().reshape(-1) for p in params]).clone()
        self.global_size, self.local_range = self.shards.global_size, self.shards.local_range(dist.rank())

    @property
    def sharded(self) -> bool:
        """True when vectors are this rank's local shard (the linalg adapter all-reduces)."""
        return self.vectors == "local"

    def allreduce_(self, t: torch.Tensor) -> torch.Tensor:
        """In-place sum of a small tensor over the ranks (local vectors), or ``t`` as is."""
        return allreduce_(t) if self.sharded else t

    def _check_deterministic(self) -> None:
        """Two forwards of the first batch must agree (dropout in train mode would not).

        Compares the output tensors (a Hugging Face output's ``.logits``).
        """
        batch = self.data.first()
        with torch.no_grad():
            a, b = (_output_tensor(model_output(self.model, batch.inputs)) for _ in range(2))
        reshard(self.model)
        if not torch.equal(a, b):
            raise RandomModelError(
                "the model's forward pass draws random numbers (dropout in train mode?): "
                "every gradient would be of another cost. Call model.eval(), or pass "
                "allow_random=True"
            )

    @property
    def size(self) -> int:
        return self.layout.size

    def count(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return term_count(self.loss_fn, self.reduction, outputs, targets)

    def at(self, theta: torch.Tensor) -> "ShardedObjective":
        new = copy.copy(self)
        new.theta0 = theta.detach().to(device=self.device, dtype=self.dtype).clone()
        new._fingerprint = None
        return new

    def fingerprint(self) -> str:
        """sha256 of θ₀ (this rank's vector), layouts, vectors, buffers, modes, loss, reduction and this rank's data.

        With local vectors it differs from rank to rank (each rank's θ₀ shard and data).
        """
        if self._fingerprint is None:
            h = Hasher().text("nethessian.ShardedObjective").text(self.vectors).tensor(self.theta0)
            h.value([dist.rank(), dist.world_size()] if self.sharded else [])
            for lay in (self.full_layout, self.layout):
                h.value(list(lay.names)).value([list(s) for s in lay.shapes])
            h.text("buffers").named(sorted((n, b.detach()) for n, b in self.model.named_buffers()))
            h.text("modes").named(tuple((n, m.training) for n, m in self.model.named_modules()))
            loss_description(h.text("loss"), self.loss_fn)
            red = self.reduction
            h.text("reduction").value(red if red is None or isinstance(red, str) else _name(red))
            data = Hasher()
            for _ in self.data.iterate(data):
                pass
            self._fingerprint = h.text("data").text(data.hexdigest()).hexdigest()
        return self._fingerprint


class ShardedAccess:
    """Write θ into the local shards and read the gradient, in the objective's vectors.

    Local vectors: this rank's shards are written and its reduce-scattered gradient
    shards read as they are. Replicated: the full θ's slices are written and the
    gradient shards all-gathered. Norms of local vectors are all-reduced (``reduce``).
    """

    def __init__(self, objective: ShardedObjective):
        self.objective = objective
        self.local = objective.sharded
        self.collective = True  # every rank runs every column: non-finite results are agreed on
        self.prepare()
        self.index = [_local_index(p) for p in self.params]
        self._steps = int(dist.common_value(objective.local_batches, "max"))

    def prepare(self) -> None:
        """Sharded parameters (DTensors) registered, and found by name."""
        reshard(self.objective.model)
        named = dict(self.objective.model.named_parameters())
        self.params = [named[n] for n in self.objective.layout.names]

    def write(self, theta: torch.Tensor) -> None:
        parts = self.objective.layout.unflatten(theta).values()
        for p, ix, part in zip(self.params, self.index, parts):
            p.to_local().copy_(part if self.local else part[ix])

    def local_gradient(self) -> torch.Tensor:
        parts = []
        for p in self.params:
            g = p.grad
            if g is None:
                parts.append(
                    torch.zeros(
                        (p.to_local() if self.local else p).numel(), dtype=p.dtype, device=self.objective.device
                    )
                )
            else:
                parts.append((g.to_local() if self.local else g.full_tensor()).reshape(-1))
        return torch.cat(parts)

    def finish(self, grad: torch.Tensor, n: float) -> torch.Tensor:
        _, n = dist.reduce_sum(torch.zeros(0, dtype=torch.float64, device=grad.device), n)
        grad = grad * dist.world_size()  # undo FSDP's average over ranks: a sum over every rank's batches
        if self.objective.reduction not in (None, "sum"):
            if n <= 0:
                raise InputError("every target is ignored on every rank: the mean cost is undefined")
            grad = grad / n
        return grad

    def reduce(self, values: List[float]) -> List[float]:
        """Sums over the ranks of per-rank numbers (local vectors), else the numbers as they are."""
        if not self.local:
            return list(values)
        t = allreduce_(torch.tensor(values, dtype=torch.float64, device=self.objective.device))
        return [float(x) for x in t.tolist()]

    def steps(self) -> int:
        return self._steps

    def gradients(self, thetas: List[torch.Tensor]) -> List[torch.Tensor]:
        """The gradients; a failed FSDP collective (a rank died or hung) becomes ``DistributedError``."""
        try:
            return gradients(self, thetas)
        except NetHessianError:
            raise
        except RuntimeError as exc:
            if not _comm_failure(exc):
                raise
            err = exc

            def fail():
                raise err

            dist._collective(fail, "a gradient of the sharded model (FSDP's all-gathers and reduce-scatters)")
            raise  # pragma: no cover - _collective always raises here


_COMM_WORDS = ("gloo", "nccl", "c10d", "connection closed", "connection reset", "timed out", "timeout")


def _comm_failure(exc: BaseException) -> bool:
    """True for the error of a failed collective (torch's DistError, or gloo/NCCL's RuntimeError)."""
    dist_error = getattr(torch.distributed, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return any(word in text for word in _COMM_WORDS)
