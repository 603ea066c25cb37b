"""``--fsdp``: the command line on a model sharded with FSDP2 across torchrun's ranks.

With ``--fsdp`` the problem's model is sharded as FSDP users shard it
(``fully_shard`` on every block of every ``nn.ModuleList``, then on the root;
``operators._sharded.fully_shard_blocks``) and its Hessian products are central
differences of the model's own gradients (``method="finite-difference"``): FSDP has
no double backward. The data is sharded too (``nh.shard``: each rank its own
batches), as in FSDP training, which is data-parallel as well; the sharded operator
sums the gradient over every rank's batches, so the cost is that of the whole data
set. Vectors are sharded (``vectors="local"``): Krylov memory per rank is k·P/world.

The order of the stencil is the library's advice: 4 (4-point stencil) for float32
parameters, 2 for float64 (``--fd-order`` overrides); the error estimate
(``fd_error=True``, the operator's default) is on, so every product costs 4
gradients, and its largest value ``op.fd_error`` (per unit ‖v‖, in the units of
eigenvalues) is printed and put in ``--json``/``--save``.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import torch

from .. import distributed as dist
from ..errors import InputError

__all__ = [
    "SUPPORTED",
    "check_args",
    "check_gather",
    "default_order",
    "device",
    "fd_summary",
    "gathered_eigenvectors",
    "gradients_per_product",
    "shard_problem",
]

#: the commands that run on finite-difference products of sharded vectors
SUPPORTED = ("eig", "trace", "density")

_RUN = "torchrun --nproc-per-node 2 -m nethessian {cmd} problem.py --fsdp"


def check_args(args) -> None:
    """Refuse, before any work, what ``--fsdp`` cannot do (every rank reaches the same verdict)."""
    cmd = args.command
    if cmd not in SUPPORTED:
        raise InputError(
            f"`nethessian {cmd}` cannot run with --fsdp: it needs exact products or identity columns, "
            "and a model sharded with FSDP has only finite-difference products of sharded vectors. "
            f"--fsdp works with {', '.join(SUPPORTED)}; drop --fsdp to run {cmd} on one process"
        )
    if args.checkpoint:
        raise InputError(
            "--checkpoint is not supported with --fsdp yet (each rank holds its own slice of the "
            "Krylov vectors, and a resumed run would need every rank's state from the same step); "
            "drop --checkpoint"
        )
    if cmd == "trace" and (args.exact or args.by_block):
        flag = "--exact" if args.exact else "--by-block"
        raise InputError(
            f"trace {flag} is not available with --fsdp ({flag} needs "
            f"{'identity columns' if args.exact else 'whole parameter blocks on one rank'}); "
            "use an estimate: --method hutch++ (default), hutchinson or xtrace"
        )
    if dist.world_size() < 2:
        raise InputError(
            "--fsdp shards the model across the processes of torchrun and needs at least 2 of them "
            f"(this is {'one process' if not dist.is_active() else 'a 1-process group'}): run "
            f"`{_RUN.format(cmd=cmd)}` (gloo on CPUs, NCCL on GPUs; across nodes add --nnodes and "
            "--rdzv-endpoint). On one process drop --fsdp: the exact products are cheaper and exact"
        )


def device(args) -> Optional[str]:
    """``--device``, or on NCCL this rank's GPU (``cuda:LOCAL_RANK``): FSDP needs the model there."""
    name = args.device
    local = int(os.environ.get("LOCAL_RANK", 0))
    if name is None and torch.distributed.get_backend() == "nccl":
        name = "cuda"
    if name == "cuda":
        name = f"cuda:{local}"
    if name is not None and name.startswith("cuda"):
        torch.cuda.set_device(torch.device(name))
    return name


def default_order(dtype: torch.dtype) -> int:
    """The stencil the library advises: 4 points for float32 (truncation dominates), 2 for float64."""
    return 2 if dtype == torch.float64 else 4


def shard_problem(problem, args) -> None:
    """Shard the model per block (``fully_shard_blocks``) and choose finite-difference products."""
    from ..operators._sharded import fully_shard_blocks

    model = problem.model
    if not isinstance(model, torch.nn.Module) or not any(True for _ in model.parameters()):
        raise InputError("--fsdp needs the problem's model to be a torch.nn.Module with parameters")
    dtype = next(model.parameters()).dtype
    order = args.fd_order if args.fd_order is not None else default_order(dtype)
    fully_shard_blocks(model)
    problem.operator_options = {"method": "finite-difference", "fd_order": order, "fd_error": True}


def gradients_per_product(order: int, error: bool = True) -> int:
    """Gradients of one finite-difference product: steps ±h (and ±2h for order 4 or the error estimate)."""
    return 4 if order == 4 or error else 2


#: an estimated product error above this fraction of the spectrum's scale is flagged in the output
LARGE_ERROR = 1e-2


def fd_summary(
    op, options: Dict[str, Any], *, scale: Optional[float] = None, per_probe: bool = False
) -> Tuple[Dict[str, Any], List[str]]:
    """The finite-difference facts of a run (``--json``) and the lines that say them; empty when exact.

    Args:
        op: the operator that served the run (``op.fd_error``: the largest estimate, per unit ‖v‖).
        options: its keywords (``Problem.operator_options``).
        scale: the largest |eigenvalue| seen (eig, density): the error relative to it is recorded,
            and flagged above ``LARGE_ERROR``.
        per_probe: also ``P · fd_error``, about how far one probe ``zᵀHz`` (``‖z‖² = P``) can be off.
    """
    if options.get("method") != "finite-difference":
        return {}, []
    order, err = options["fd_order"], op.fd_error
    grads = gradients_per_product(order, options.get("fd_error", True))
    facts = {"fd_order": order, "gradients_per_product": grads, "fd_error": err}
    facts.update(global_size=op.global_size, world_size=dist.world_size())
    lines = [
        f"  finite-difference products (order {order}, {grads} gradients each) on an FSDP model "
        f"sharded over {dist.world_size()} ranks; estimated product error "
        + ("n/a" if err is None else f"{err:.2e} per unit ‖v‖ (eigenvalues trustworthy to about ± that)")
    ]
    if err is not None and per_probe:
        facts["probe_fd_error"] = err * op.global_size
        lines.append(f"  one probe's zᵀHz (‖z‖² = P) is off by about ≤ P · that = {facts['probe_fd_error']:.2e}")
    if err is not None and scale:
        facts["fd_error_relative"] = err / scale
        if err > LARGE_ERROR * scale:
            lines.append(
                f"  WARNING: that is {err / scale:.1%} of the largest |eigenvalue| ({scale:.4g}): the products "
                "are dominated by finite-difference error (truncation when the step is large for this model's "
                "weights, rounding in float32 at order 2). Try the other --fd-order, or --dtype float64"
            )
    return facts, lines


def check_gather(op, k: int) -> None:
    """Refuse, before the eigensolve, eigenvectors too large to gather on rank 0 for ``--save``."""
    from ..operators._shard_vectors import DEFAULT_MAX_GATHER_BYTES

    need = op.global_size * k * torch.finfo(op.dtype).bits // 8
    if need > DEFAULT_MAX_GATHER_BYTES:
        raise InputError(
            f"--save with --fsdp gathers the {k} eigenvectors on rank 0 ({need:,} bytes, above "
            f"{DEFAULT_MAX_GATHER_BYTES:,}); drop --save (the eigenvalues are printed), or lower -k"
        )


def gathered_eigenvectors(op, res) -> Optional[List[List[float]]]:
    """The eigenvectors gathered on rank 0 as ``k`` lists in parameter-name order (None elsewhere).

    A collective: every rank calls it. The rows are the full parameters flattened in
    name order, as a single process saves them (``EigenResult.to_dict``).
    """
    named = dist.gather_vector(op, res.eigenvectors)
    if named is None:
        return None
    k = res.eigenvectors.shape[1]
    flat = torch.cat([t.reshape(-1, k) for t in named.values()])
    return flat.cpu().double().T.tolist()
