"""The one engine policy: which autodiff engine computes an operator's products, chosen once.

An operator offers its candidate engines in order of preference (e.g. a kept
gradient graph, then forward mode, then double backward). ``choose_engine`` runs each
candidate's trial — one column on the first batch, and for a route that can be
silently wrong a cross-check against an independent route — and keeps the first that
passes. The choice is made once, before the first product, and recorded on the
operator (``op.engine``, ``op.engine_reason``, ``op.fallback_reason``); products never
switch engine behind the user's back.

Only an *AD gap* moves on to the next candidate: an error another engine can avoid
(a missing forward-mode, double-backward or batching rule in PyTorch, raised as
``RuntimeError`` / ``NotImplementedError``), or a failed cross-check
(``EngineRejected``). Our own errors (``NetHessianError``, ``DistributedError``
included) and running out of memory always propagate unchanged.

New engines (finite-difference products, structured second-order backprop) plug in
as one more ``Engine`` in an operator's candidate list.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

from .. import distributed as dist
from ..errors import InputError, NetHessianError

__all__ = [
    "Engine",
    "EngineRejected",
    "choose_batched",
    "choose_engine",
    "describe",
    "graph_bytes",
    "is_ad_gap",
    "loop_columns",
]

Run = Callable[[torch.Tensor], torch.Tensor]  # (P, k) block -> (P, k) product over the whole data set

_OOM_WORDS = ("out of memory", "can't allocate memory", "cannot allocate memory")
TRIAL_COLUMNS = 4  # columns of the batched-vs-loop timing trial (bounded cost on any model)
MEASURABLY_FASTER = 0.8  # batching is kept only when its time per column is below 0.8 x the loop's


class EngineRejected(Exception):
    """An engine ran but failed its cross-check (its numbers would be silently wrong)."""


def is_ad_gap(exc: BaseException) -> bool:
    """True for an error that another engine may avoid; never ours, never out-of-memory."""
    if isinstance(exc, EngineRejected):
        return True
    if isinstance(exc, NetHessianError):
        return False
    oom = getattr(torch, "OutOfMemoryError", None)
    if oom is not None and isinstance(exc, oom):
        return False
    if any(w in str(exc).lower() for w in _OOM_WORDS):
        return False
    return isinstance(exc, (RuntimeError, NotImplementedError))


def describe(exc: BaseException) -> str:
    """``Type: first line of the message``."""
    first = str(exc).splitlines()[0] if str(exc) else ""
    return first if isinstance(exc, EngineRejected) else f"{type(exc).__name__}: {first}"


@dataclass
class Engine:
    """One way to compute ``C V``.

    Attributes:
        name: what ``op.engine`` reports.
        run: ``V (P, k) -> C V``; for ``k > 1`` it may vectorise over columns (vmap).
        trial: a cheap run that raises where the engine cannot serve this model (an AD
            gap, or ``EngineRejected`` when a cross-check fails); ``None``: nothing to try.
        why: why this engine is preferred, for ``op.engine_reason``.
        keeps_graph: the engine keeps the model's graph across products (``op.cache``).
        timed_batching: a loop over columns is a real alternative to batching (kept
            graphs); streaming engines re-run the forward pass per loop column and batch.
    """

    name: str
    run: Run
    trial: Optional[Callable[[], None]] = None
    why: str = ""
    keeps_graph: bool = False
    timed_batching: bool = False


def choose_engine(candidates: Sequence[Engine]) -> Tuple[Engine, str, Optional[str]]:
    """The first candidate whose trial passes on every rank: ``(engine, engine_reason, fallback_reason)``.

    Under torch.distributed each rank tries the candidates on its own first batch; a
    failure anywhere stops every rank (``distributed.agreeing``), and all ranks run the
    latest-preferred engine any rank chose, so their collectives stay in step.
    """
    with dist.agreeing():
        i, reason, fallback = _choose_local(candidates)
    j = dist.common_value(i, how="max")
    if j != i:
        fallback = f"another rank could not use {candidates[i].name}"
        reason = f"{candidates[j].why} (fell back: {fallback})"
    return candidates[j], reason, fallback


def _choose_local(candidates: Sequence[Engine]) -> Tuple[int, str, Optional[str]]:
    """The index of the first candidate whose trial passes here, with its reasons.

    A single candidate is what the user asked for: only its cross-check runs (an AD gap
    surfaces at the first product, as PyTorch raises it). When the last candidate fails
    too, a failed cross-check is refused with ``InputError`` naming every engine's
    failure; a plain AD gap re-raises PyTorch's error with those reasons as a note.
    """
    failures: List[str] = []
    rejected = False
    for i, engine in enumerate(candidates):
        last = i == len(candidates) - 1
        try:
            if engine.trial is not None:
                engine.trial()
        except Exception as exc:
            if not is_ad_gap(exc):
                raise
            failures.append(f"{engine.name}: {describe(exc)}")
            rejected |= isinstance(exc, EngineRejected)
            if not last:
                continue
            if rejected:
                raise InputError(
                    "no engine computes this operator correctly: "
                    + "; ".join(failures)
                    + ". Give the custom op a forward-mode rule (jvp) or a twice-"
                    "differentiable backward (no @once_differentiable), or use "
                    "for the Hessian, method='finite-difference' (products from gradients)"
                ) from exc
            if len(failures) > 1 and hasattr(exc, "add_note"):  # Python >= 3.11
                exc.add_note("nethessian tried: " + "; ".join(failures))
            raise
        fallback = "; ".join(failures) or None
        reason = engine.why if fallback is None else f"{engine.why} (fell back: {fallback})"
        return i, reason, fallback
    raise InputError("no engine to choose from")  # pragma: no cover - operators always offer one


def loop_columns(run: Run, V: torch.Tensor) -> torch.Tensor:
    """``run`` one column at a time (no vectorisation)."""
    return torch.cat([run(V[:, j : j + 1]) for j in range(V.shape[1])], dim=1)


def choose_batched(engine: Engine, V: torch.Tensor) -> Tuple[bool, str]:
    """Batch columns (vmap) or loop over them: ``(batched, reason)``, decided once per operator.

    Batching is kept when it runs and, for engines where a loop is a real alternative,
    when it is *measurably faster*: best of two timed runs on at most ``TRIAL_COLUMNS``
    columns, per column below ``MEASURABLY_FASTER`` x the loop's. A batching gap (no
    vmap rule) means loop; out-of-memory and our errors propagate.
    """
    W = V[:, :TRIAL_COLUMNS]
    try:
        engine.run(W)  # also the warm-up of the timing below
    except Exception as exc:
        if not is_ad_gap(exc):
            raise
        return False, f"batching over columns failed ({describe(exc)}): one column at a time"
    if not engine.timed_batching:
        return True, "columns batched (vmap): a loop would re-run the forward pass per column"

    def best(f):
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            f()
            times.append(time.perf_counter() - t0)
        return min(times)

    batched = best(lambda: engine.run(W))
    loop = best(lambda: loop_columns(engine.run, W))
    faster = dist.common_value(bool(batched < MEASURABLY_FASTER * loop))  # rank 0 decides for all
    return faster, (
        f"{W.shape[1]} columns batched took {batched:.3g} s, looped {loop:.3g} s: "
        + ("batched" if faster else "loop (batching not measurably faster)")
    )


def graph_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the tensors autograd saves while ``fn()`` runs (distinct storages).

    The memory a vectorised backward needs per column is about that of the saved
    activations: each column carries its own gradients of every saved tensor.
    """
    seen = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            seen[(st.data_ptr(), t.device)] = st.nbytes()
        except (RuntimeError, NotImplementedError):  # a tensor without storage (functorch wrapper)
            seen[id(t)] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return int(sum(seen.values()))
