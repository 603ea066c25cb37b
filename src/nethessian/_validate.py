"""Construction-time checks of an ``Objective``: the model's state, the first batch, the data passes.

Everything here runs once, when an ``Objective`` is built (``Objective.at`` reuses
the results). Each check turns a silent wrong number into an error that says what
is wrong and how to fix it:

* the model: one floating dtype throughout, finite fixed parameters, no NaN in a buffer;
* the first batch: a forward that draws no random numbers, a floating loss that
  depends on the parameters, outputs and targets that don't broadcast into a
  larger array;
* streaming data (a ``DataLoader`` or other iterable): two passes computing
  J(θ₀). Different batch counts mean the data is single-pass; different values
  of J mean the data pipeline is random (shuffled batches with train-mode batch
  norm, random augmentation). Every batch's loss is checked for finiteness on
  the way (``Objective.local_sum``).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Dict, Tuple

import torch
from torch import nn

from ._checks import all_finite
from .errors import InputError, NetHessianError, NonFiniteError, RandomModelError

__all__ = ["check_model_state", "validate"]

_FIX_RANDOM = "Call model.eval() to switch dropout off, or pass allow_random=True to accept a random cost"


def check_model_state(model: nn.Module, chosen: Dict[str, torch.Tensor]) -> None:
    """Refuse a model whose parameters mix dtypes, or with NaN/Inf in any parameter or NaN in a buffer."""
    everything = dict(model.named_parameters())
    for name, p in everything.items():
        if not p.is_floating_point():
            if name in chosen:
                raise InputError(f"parameter {name!r} has dtype {p.dtype}; only floating point is supported")
            continue
        if not all_finite(p.detach()):
            role = "parameter" if name in chosen else "fixed (unselected) parameter"
            raise NonFiniteError(f"{role} {name!r} contains NaN or Inf; re-initialise or load finite weights")
    kinds = {}
    for name, p in everything.items():
        if p.is_floating_point():
            kinds.setdefault(str(p.dtype).replace("torch.", ""), name)
    if len(kinds) > 1:
        example = ", ".join(f"{k} (e.g. {n!r})" for k, n in sorted(kinds.items()))
        raise InputError(
            f"the model mixes parameter dtypes: {example}; convert it to one with "
            "model.float() or model.double() (autocast / mixed precision is not supported)"
        )
    for name, b in model.named_buffers():
        if b.is_floating_point() and bool(torch.isnan(b.detach()).any()):
            raise NonFiniteError(
                f"buffer {name!r} contains NaN (e.g. corrupted batch-norm running "
                "statistics); reset or reload the model's state"
            )


def validate(obj, allow_random: bool) -> None:
    """All data-dependent checks; for streaming data also the single-pass and determinism checks."""
    if obj.data.in_memory:
        _first_batch(obj, obj.data.first(), allow_random)
        _every_loss_finite(obj)
        return
    first = _Pass(obj, allow_random)
    J1 = first.run(hash_data=True)
    J2 = _Pass(obj, allow_random=True).run()
    scale = abs(J1) + abs(J2) + first.output_scale
    tol = 100 * torch.finfo(obj.dtype).eps * scale
    if abs(J1 - J2) > tol:
        raise RandomModelError(
            f"two passes over the data give different costs at the same parameters ({J1!r} and {J2!r}): "
            "the data pipeline is random, so every product would be another matrix. Causes: a shuffling "
            "DataLoader with a model in train mode (batch norm sees other batches: use shuffle=False or "
            "model.eval()), or random augmentation in the Dataset (switch it off for the Hessian). "
            "Shuffling alone is fine with model.eval()"
        )


class _Pass:
    """One pass computing this process's J(θ₀) (no graph); batch 0 gets the first-batch checks."""

    def __init__(self, obj, allow_random: bool):
        self.obj, self.allow_random = obj, allow_random
        self.output_scale = 0.0

    def _fn(self, batch):
        obj = self.obj
        if batch.index == 0:
            loss, out = _first_batch(obj, batch, self.allow_random)
        else:
            with torch.no_grad():
                loss, out = obj.batch_loss(obj.params_dict(obj.theta0), batch)
        self.output_scale = max(self.output_scale, float(out.detach().abs().max()) if out.numel() else 0.0)
        return loss.detach().double(), obj.count(out, batch.targets)

    def run(self, hash_data: bool = False) -> float:
        total, n = self.obj.local_sum(self._fn, what="loss", hash_data=hash_data)
        if self.obj.reduction in (None, "sum"):
            return float(total)
        return float(total) / n if n > 0 else 0.0


def _describe_inputs(x) -> str:
    """``tensor (4, 3) int64``-style summary of a batch's inputs, for error messages."""
    if isinstance(x, torch.Tensor):
        return f"tensor {tuple(x.shape)} {str(x.dtype)[6:]}" + (" sparse" if x.is_sparse else "")
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {_describe_inputs(v)}" for k, v in x.items()) + "}"
    if isinstance(x, (tuple, list)):
        return "(" + ", ".join(_describe_inputs(v) for v in x) + ")"
    return type(x).__name__


def _every_loss_finite(obj) -> None:
    """Each in-memory batch's loss, without graph: a NaN/Inf anywhere is refused, naming the batch.

    (Streaming data gets the same check in its two validation passes.) Local only: no
    collective runs inside the construction's agreement block.
    """
    named = obj.params_dict(obj.theta0)

    def fn(batch):
        with _forward_errors(batch):
            loss, out = obj.batch_loss(named, batch)
        return loss.double(), obj.count(out, batch.targets)

    with torch.no_grad():
        obj.local_sum(fn, what="loss")


@contextlib.contextmanager
def _forward_errors(batch):
    """The model's forward failing on a batch (wrong dtype, a batch-norm batch of 1) as a clear error."""
    try:
        yield
    except (RuntimeError, TypeError, ValueError, NotImplementedError) as exc:
        if isinstance(exc, NetHessianError):
            raise
        raise InputError(
            f"batch {batch.index}: the model's forward failed on these inputs "
            f"({_describe_inputs(batch.inputs)}): {type(exc).__name__}: {exc}"
        ) from exc


_RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


def buffer_writes(obj, batch) -> list:
    """Buffers the forward writes in place with a value that depends on θ.

    Batch norm's running statistics in train mode are not counted (the forward does not
    read them back). A write that does not depend on θ (a counter, a constant rescale)
    leaves a well-defined cost, since every forward starts from the snapshot; the check
    runs the forward at θ₀ and at a nudged θ and compares what was written. A write that
    does depend on θ (an exponential average updated, then read, inside ``forward``) makes
    the output depend on θ through a path backward does not see (``no_grad``; forward-mode
    tangents do flow through it): the model's gradient is then not the gradient of any
    function, and every engine would return a non-symmetric matrix, silently.
    """
    if not obj._buffers:
        return []
    norm_train = {
        f"{n}.{s}" if n else s
        for n, m in obj.model.named_modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training
        for s in _RUNNING_STATS
    }
    theta = obj.theta0
    noise = torch.randn(theta.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    after = []
    for at in (theta, theta + 1e-2 * (1.0 + theta.abs()) * noise.to(theta)):
        copies = {k: b.clone() for k, b in obj._buffers.items()}
        with torch.no_grad():
            obj.call_model(obj.params_dict(at), batch.inputs, buffers=copies)
        after.append(copies)
    return sorted(
        k
        for k, b in after[0].items()
        if k not in norm_train and not torch.equal(b, obj._buffers[k]) and not torch.equal(b, after[1][k])
    )


def _first_batch(obj, batch, allow_random: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward one batch with graph: refuse randomness, a detached or integer loss, broadcasting."""
    leaf, named = obj.leaf()
    cpu_state = torch.random.get_rng_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    cuda_states = torch.cuda.get_rng_state_all() if cuda else None
    with torch.enable_grad(), warnings.catch_warnings():
        # torch warns, then broadcasts, when a loss's input and target sizes differ
        warnings.filterwarnings("error", message=".*target size.*", category=UserWarning)
        try:
            with _forward_errors(batch):
                loss, out = obj.batch_loss(named, batch)
        except UserWarning as w:
            raise InputError(
                f"batch {batch.index}: {w} — the loss would broadcast them into a wrong "
                "cost; reshape the targets to the outputs' shape"
            ) from None
    random = not torch.equal(cpu_state, torch.random.get_rng_state())
    if cuda_states is not None:
        random |= any(not torch.equal(a, b) for a, b in zip(cuda_states, torch.cuda.get_rng_state_all()))
    if random and not allow_random:
        culprits = [
            f"{n or type(m).__name__} ({type(m).__name__}, p={m.p})"
            for n, m in obj.model.named_modules()
            if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training
        ]
        where = f" — {', '.join(culprits)}" if culprits else ""
        raise RandomModelError(
            "the model's forward pass draws random numbers" + where + ", so the cost "
            "and its Hessian would be random. " + _FIX_RANDOM
        )
    _check_broadcast(obj.loss_fn, out, batch)
    _check_loss_graph(loss, out, batch)
    writes = buffer_writes(obj, batch)
    if writes:
        raise InputError(
            f"the model's forward writes buffer(s) {', '.join(writes[:4])} in place (e.g. an average "
            "updated under no_grad, then read): its output then depends on the parameters through a "
            "path that backward does not see, so the model's own gradient is not the gradient of any "
            "cost and no Hessian exists to compute. Move the update out of forward, or freeze it "
            "(eval mode, or a flag) while computing curvature"
        )
    if not all_finite(loss.detach()) and obj.count(out, batch.targets) != 0:
        raise NonFiniteError(
            f"the loss of batch {batch.index} is {float(loss.detach())} at the current parameters; "
            "check the data scale and the initialisation"
        )
    return loss.detach(), out.detach()


def _check_broadcast(loss_fn, out: torch.Tensor, batch) -> None:
    """Warn when the loss broadcasts outputs against floating targets into a larger array.

    ``(N, 1)`` outputs minus ``(N,)`` targets is an ``(N, N)`` array: the loss then
    averages N² wrong differences without an error (torch's MSELoss only warns).
    The loss is run once more on batch 0 under a ``TorchFunctionMode`` that follows
    which tensors come from the outputs and which from the targets, so a loss that
    reshapes correctly itself (``out[:, 0] - t``) is not flagged.
    """
    t = batch.targets
    if not t.is_floating_point():
        return
    tracker = _Provenance(out.detach(), t)
    with torch.no_grad(), tracker:
        loss_fn(tracker.keep[0], t)
    if tracker.found is not None:
        (a_shape, b_shape), r_shape, name = tracker.found
        warnings.warn(
            f"batch {batch.index}: the loss combines a tensor of shape {a_shape} from the outputs "
            f"(shape {tuple(out.shape)}) with one of shape {b_shape} from the targets (shape {tuple(t.shape)}) "
            f"in {name}, which broadcasts them to {r_shape}: a larger array than either, so every output is "
            f"compared with every target. If that is not intended, reshape the targets to {tuple(out.shape)} "
            f"(e.g. y.view({', '.join(map(str, out.shape))})) or the outputs to {tuple(t.shape)}",
            UserWarning,
            stacklevel=6,
        )


class _Provenance(torch.overrides.TorchFunctionMode):
    """Tags tensors derived from the outputs ("o") and the targets ("t").

    Records the first operation that takes both and returns more elements than any of its inputs.
    """

    def __init__(self, out: torch.Tensor, targets: torch.Tensor):
        super().__init__()
        self.keep = [out, targets]  # alive, so ids are not reused
        self.tags = {id(out): {"o"}, id(targets): {"t"}}
        self.found = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        by_tag = {}
        for a in inputs:
            for tag in self.tags.get(id(a), ()):
                by_tag.setdefault(tag, a)
        if not by_tag:
            return result
        for r in torch.utils._pytree.tree_leaves(result):
            if isinstance(r, torch.Tensor):
                self.keep.append(r)
                self.tags[id(r)] = set(by_tag)
        if (
            self.found is None
            and len(by_tag) == 2
            and isinstance(result, torch.Tensor)
            and result.numel() > max(a.numel() for a in inputs)
        ):
            a, b = by_tag["o"], by_tag["t"]
            self.found = ((tuple(a.shape), tuple(b.shape)), tuple(result.shape), getattr(func, "__name__", str(func)))
        return result


def _check_loss_graph(loss: torch.Tensor, out: torch.Tensor, batch) -> None:
    """Refuse an integer loss, a loss cut from the graph, and outputs that don't depend on θ."""
    if not loss.is_floating_point():
        raise InputError(
            f"batch {batch.index}: loss_fn returned a {loss.dtype} tensor; the cost must be "
            "floating point (don't round it or convert it to an integer)"
        )
    if not out.requires_grad:
        raise InputError(
            "the model's outputs do not depend on the selected parameters, so there is nothing to "
            "differentiate (PyTorch: 'element 0 of tensors does not require grad'). Causes: params= selects "
            "parameters the forward never uses; the forward runs under torch.no_grad() or calls .detach(); "
            "or reentrant activation checkpointing — torch.utils.checkpoint.checkpoint(..., "
            "use_reentrant=True) builds no graph to parameters when the inputs need no gradient: pass "
            "use_reentrant=False (or model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
            "{'use_reentrant': False}) for Hugging Face models)"
        )
    if not loss.requires_grad:
        raise InputError(
            f"batch {batch.index}: the loss is detached from the model's outputs (it needs no gradient): "
            "loss_fn must compute with torch operations on the outputs — no .item(), .detach(), "
            "float(...) or NumPy"
        )
