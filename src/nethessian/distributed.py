"""Data parallelism through torch.distributed (gloo on CPU, NCCL on GPU).

When a process group is initialised, every process holds a shard of the data;
``Objective.finish`` all-reduces each local weighted sum together with its term
count, so batch weights use the *global* count and every rank gets the same
product. Every rank must therefore run the same computation on the same
numbers; this module is where ranks make sure of that:

* ``check_state(objective)`` at start-up: parameter names, shapes, dtype, device type
  and values, fixed parameters, buffers, every module's train/eval mode, loss settings;
* ``common_seed(seed)``: one seed for every rank (``None``: drawn on rank 0, broadcast);
* ``check_same(what, **values)``: the same options (``k``, ``num_matvecs`` ...) on every
  rank, before the first collective they decide;
* ``agree(error)``: a rank whose validation failed stops every rank, naming it;
* ``finish()``: the clean end (barriers before gloo's teardown).

Every disagreement raises ``DistributedError`` on *every* rank, naming what
differs and each rank's value. All are no-ops without torch.distributed.

Cost: one all-reduce of P (+1) numbers per matrix-vector product (k·P for a
block of k vectors); the checks gather a few kilobytes of text, once.
"""

from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ._checks import as_float, as_int, as_seed
from ._shard_data import shard_batches
from ._state_facts import plain, state_facts
from .errors import DistributedError, InputError

__all__ = [
    "gather_vector",
    "DistributedError",
    "is_active",
    "rank",
    "world_size",
    "is_main",
    "reduce_sum",
    "common_seed",
    "common_value",
    "check_same",
    "check_state",
    "agree",
    "agreeing",
    "shard",
    "init_from_env",
]

_ABSENT = "(absent)"
_SHOWN = 6  # differences spelled out in one message; the rest are counted


def is_active() -> bool:
    """True when a torch.distributed process group is initialised."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return torch.distributed.get_rank() if is_active() else 0


def world_size() -> int:
    """The number of processes (1 without torch.distributed)."""
    return torch.distributed.get_world_size() if is_active() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that prints and writes files."""
    return rank() == 0


def _collective(fn, what: str):
    try:
        return fn()
    except Exception as exc:  # gloo / NCCL raise RuntimeError or DistBackendError
        raise DistributedError(
            f"rank {rank()}: {what} across {world_size()} processes failed — another rank died, "
            f"hung past the process group's timeout, or left early ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Set the timeout with "
            "init_process_group(timeout=datetime.timedelta(seconds=...))"
        ) from None


def _comm_device(hint: Optional[torch.device] = None) -> torch.device:
    """Where collective buffers live: the CPU for gloo, this rank's GPU for NCCL."""
    if torch.distributed.get_backend() != "nccl":
        return torch.device("cpu")
    if hint is not None and hint.type == "cuda":
        return hint
    return torch.device("cuda", torch.cuda.current_device())


def reduce_sum(total: torch.Tensor, count: float) -> Tuple[torch.Tensor, float]:
    """All-reduce a local sum and its term count (identity without torch.distributed)."""
    if not is_active():
        return total, count
    if total is None:
        raise InputError(f"rank {rank()} has no batches: every rank needs at least one (see nh.shard)")
    flat = torch.cat(
        [total.detach().reshape(-1).to(torch.float64), torch.tensor([count], dtype=torch.float64, device=total.device)]
    )
    _collective(lambda: torch.distributed.all_reduce(flat), "all-reduce of a curvature product")
    return flat[:-1].reshape(total.shape).to(total.dtype), float(flat[-1])


# -- gathering and comparing plain facts ---------------------------------------------------------
def _gather_text(text: str, what: str, device: Optional[torch.device] = None) -> List[str]:
    """Every rank's ``text``, in rank order (two all-gathers: lengths, then padded UTF-8 bytes)."""
    dev = _comm_device(device)
    raw = list(text.encode("utf-8"))
    n = torch.tensor([len(raw)], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(n) for _ in range(world_size())]
    _collective(lambda: torch.distributed.all_gather(sizes, n), what)
    buf = torch.zeros(max(1, max(int(s) for s in sizes)), dtype=torch.uint8, device=dev)
    buf[: len(raw)] = torch.tensor(raw, dtype=torch.uint8, device=dev)
    bufs = [torch.zeros_like(buf) for _ in range(world_size())]
    _collective(lambda: torch.distributed.all_gather(bufs, buf), what)
    return [bytes(b[: int(s)].tolist()).decode("utf-8") for b, s in zip(bufs, sizes)]


def _short(value: str, limit: int = 160) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."


def _per_rank(values: Sequence[str]) -> str:
    """``rank 0 a, rank 1 b`` — ranks that agree are grouped: ``ranks 0,2 a, rank 1 b``."""
    groups: Dict[str, List[int]] = {}
    for r, v in enumerate(values):
        groups.setdefault(v, []).append(r)
    return ", ".join(
        f"rank{'s' if len(rs) > 1 else ''} {','.join(map(str, rs))} {_short(v)}" for v, rs in groups.items()
    )


def _differences(per_rank: List[Dict[str, str]]) -> List[str]:
    """``"key: rank 0 a, rank 1 b"`` for every key whose value is not the same on every rank."""
    keys = list(dict.fromkeys(k for facts in per_rank for k in facts))
    out = []
    for k in keys:
        values = [facts.get(k, _ABSENT) for facts in per_rank]
        if len(set(values)) > 1:
            out.append(f"{k}: {_per_rank(values)}")
    return out


def _compare(facts: Dict[str, str], header: str, fix: str, device: Optional[torch.device] = None) -> None:
    """Gather ``facts`` from every rank; on any difference raise on every rank, naming each one."""
    if not is_active():
        return
    per_rank = [json.loads(t) for t in _gather_text(json.dumps(facts), header, device)]
    diffs = _differences(per_rank)
    if diffs:
        more = f"; and {len(diffs) - _SHOWN} more" if len(diffs) > _SHOWN else ""
        raise DistributedError(f"{header} differ across ranks — {'; '.join(diffs[:_SHOWN])}{more}. {fix}")


def check_same(what: str, **values) -> None:
    """Refuse, on every rank, options that are not the same on every rank.

    Call it before the first collective that the options decide (the number of
    products, the block size ...): ranks that disagree would otherwise wait for
    each other until the timeout or crash inside the backend.

    Args:
        what: what the values set up, for the message (``"trace"``, ``"eigenvalues"``).
        **values: plain values (numbers, strings, ``None``, tuples of them) compared by ``repr``.

    Raises:
        InputError: a value is not plain (on the calling rank, before any collective).
        DistributedError: on every rank, naming each key whose values differ and each rank's value.

    >>> check_same("trace", num_matvecs=20)  # a no-op without torch.distributed
    """
    bad = [k for k, v in values.items() if not plain(v)]
    if bad:
        raise InputError(
            f"check_same({what!r}): {', '.join(bad)} must be plain values (numbers, strings, None or tuples of them)"
        )
    if is_active():
        _compare(
            {k: repr(v) for k, v in values.items()},
            f"the settings of {what}",
            "Every rank must make the same call with the same arguments (seed=None on every "
            "rank is fine: one seed is drawn on rank 0)",
        )


def common_value(value, how: str = "rank0"):
    """One value for every rank, from values that each rank decided alone.

    A choice made from local timings or local memory (batch columns or loop; the
    columns per product, which set the size of each all-reduce) must be the same
    on every rank, or the ranks' collectives fall out of step (gloo aborts the
    process). ``how``: ``"rank0"`` (rank 0's value), ``"min"`` or ``"max"``.

    Args:
        value: a JSON value (bool, number, string, ``None``, list).
        how: ``"rank0"``, ``"min"`` or ``"max"``.

    >>> common_value(True), common_value(3, how="max")  # one process: the value itself
    (True, 3)
    """
    if how not in ("rank0", "min", "max"):
        raise InputError(f"how must be 'rank0', 'min' or 'max', got {how!r}")
    if not is_active():
        return value
    values = [json.loads(t) for t in _gather_text(json.dumps(value), "the choice of a common value")]
    return values[0] if how == "rank0" else (min(values) if how == "min" else max(values))


# -- seeds ---------------------------------------------------------------------------------------
def _fresh_seed() -> int:
    """A non-deterministic seed in [0, 2⁶³) (fits an int64 for the broadcast)."""
    return int.from_bytes(os.urandom(8), "little") >> 1


def common_seed(seed, what: str = "the random probes", **same) -> int:
    """One seed for every rank: random probes must be the same numbers everywhere.

    ``seed=None`` draws a fresh seed (on rank 0, broadcast to the others); a
    whole number is returned as is, after checking that every rank passed the
    same one. Without torch.distributed, ``None`` is drawn locally. Options in
    ``same`` (``num_matvecs=...``) are compared in the same exchange, as by
    ``check_same(what, **same)``.

    Raises:
        InputError: ``seed`` is not ``None`` or a whole number.
        DistributedError: ranks passed different seeds (or ``None`` on some ranks
            only), or different ``same`` values.

    >>> common_seed(7)
    7
    >>> 0 <= common_seed(None) < 2 ** 63
    True
    """
    seed = as_seed(seed)
    check_same(what, seed=seed, **same)
    if seed is not None:
        return seed
    if not is_active():
        return _fresh_seed()
    t = torch.tensor([_fresh_seed() if rank() == 0 else 0], dtype=torch.int64, device=_comm_device())
    _collective(lambda: torch.distributed.broadcast(t, src=0), "the broadcast of the random seed")
    return int(t.item())


# -- local failures ------------------------------------------------------------------------------
def agree(error: Optional[BaseException]) -> None:
    """A collective after local validation: if any rank failed, every rank raises.

    Each rank passes the error its own checks raised (or ``None``). The failing
    rank re-raises its own error; every other rank raises ``DistributedError``
    naming the first failing rank and its message, instead of waiting in the next
    collective until the timeout. Without torch.distributed: raises ``error`` if given.

    >>> agree(None)  # nothing failed
    """
    if not is_active():
        if error is not None:
            raise error
        return
    mine = "" if error is None else f"{type(error).__name__}: {error}"
    texts = _gather_text(mine, "the agreement after local checks")
    if error is not None:
        raise error
    failed = [(r, t) for r, t in enumerate(texts) if t]
    if failed:
        r, message = failed[0]
        others = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} failed{others}, so rank {rank()} stops too: {message}")


@contextlib.contextmanager
def agreeing():
    """Share any failure of a block of local work with the other ranks, as ``agree`` does.

    Use it as ``with agreeing(): validate()``.

    Any ``Exception`` in the block is shared with the other ranks (and re-raised
    here); a ``DistributedError`` is re-raised at once — it already reached every rank.
    """
    try:
        yield
    except DistributedError:
        raise
    except Exception as exc:  # noqa: BLE001 — every local failure must reach the other ranks
        agree(exc)
    else:
        agree(None)


# -- start-up comparison of the objective ------------------------------------------------------
_SAME_MODEL = (
    "Every rank must build the same model (same seed or weights, same params= selection, "
    "same dtype), in the same train/eval mode with the same buffers (batch-norm running "
    "statistics), and the same loss"
)


def check_state(objective) -> None:
    """Refuse, on every rank, objectives that differ across ranks; the message names what differs.

    Compared: parameter names, shapes, dtype, device type and values (θ₀); the
    fixed (unselected) parameters; the buffers (batch-norm running statistics);
    the train/eval mode of every module; the loss (type, settings such as
    ``reduction``, ``ignore_index``, ``weight``) and the batch reduction. The
    data are not compared: every rank holds its own shard. One all-gather of a
    few kilobytes of text; tensors are compared by a sha256 of their bytes.

    Raises:
        DistributedError: on every rank, e.g. ``buffer 1.running_mean: rank 0 (5,) float64 cpu
            sha256:..., rank 1 (5,) float64 cpu sha256:...``.
    """
    if is_active():
        _compare(state_facts(objective), "the model, its state or the loss", _SAME_MODEL, objective.device)


def shard(data, rank_: Optional[int] = None, world: Optional[int] = None):
    """This rank's part of ``data``, so that the parts over all ranks are the whole data set.

    * an ``(inputs, targets)`` pair, or one Hugging Face-style dict batch
      (``input_ids``, ``attention_mask``, ``labels``): contiguous slices along the
      first dimension (sizes differ by at most one);
    * a list/tuple of batches: every ``world``-th batch;
    * any other re-iterable (a ``DataLoader``): a view yielding every ``world``-th batch.

    Don't use ``DistributedSampler`` for curvature: it pads shards with repeated
    samples so that they have equal sizes, which changes the cost.
    """
    w = world_size() if world is None else as_int("world", world, minimum=1)
    r = rank() if rank_ is None else as_int("rank", rank_, minimum=0)
    if not 0 <= r < w:
        raise InputError(f"rank {r} is not in [0, {w})")
    return shard_batches(data, r, w)


def init_from_env(timeout_s: float = 300.0, backend: Optional[str] = None) -> bool:
    """Initialise the default process group from torchrun's environment, if launched that way."""
    timeout_s = as_float("timeout_s", timeout_s, positive=True)
    if is_active() or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return is_active()
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    torch.distributed.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return True


def gather_vector(op, x, dst: int = 0, *, max_bytes=None):
    """Full tensors keyed by parameter name of a sharded vector, on rank ``dst`` (``None`` elsewhere).

    ``x`` is this rank's local ``(n_r,)`` or ``(n_r, k)`` part of a vector of a sharded
    operator (``HessianOperator(..., vectors="local")`` on an FSDP model), e.g. an
    eigenvector from ``nh.eigenvalues``. For an operator that is not sharded the vector
    is split by name. See docs/sharded.md.
    """
    from .operators._shard_vectors import gather_vector as _gather

    return _gather(op, x, dst, max_bytes=max_bytes)


_FINISHED = itertools.count(1)  # generations of store barriers in this process


def _store_barrier(timeout_s: float = 60.0) -> None:
    """Wait for every rank in the rendezvous store: proof that all left gloo's last collective.

    (After a gloo barrier returns on one rank, the other may still be reading its last
    message; tearing the connections down then aborts it, seen under load.)
    """
    from torch.distributed.distributed_c10d import _get_default_store

    key, store = f"nethessian/finish/{next(_FINISHED)}", _get_default_store()
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while store.add(key, 0) < world_size():
        if time.monotonic() > deadline:
            raise DistributedError(f"the final barrier: another rank did not finish within {timeout_s:.0f} s")
        time.sleep(0.005)


def finish() -> None:
    """End a distributed run cleanly (no-op alone): a barrier, a store barrier, the teardown.

    Else a rank that finished first can tear gloo down under another's last collective.
    """
    if not is_active():
        return
    _collective(torch.distributed.barrier, "the final barrier")
    _store_barrier()
    torch.distributed.destroy_process_group()
