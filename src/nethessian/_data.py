"""Batches and their weights: how several batches combine into one cost.

The cost is over the whole data set. With a mean-reduced loss every loss term
weighs the same whatever the batch sizes, so a batch's loss (as the loss
function returns it) is weighted by its *term count* — the number of terms the
mean divides by — and the sum is divided by the total count:

    J = Σ_b c_b L_b / Σ_b c_b          (reduction "mean")
    J = Σ_b L_b                         (reduction "sum")

``c_b`` is the number of elements of the unreduced loss; for cross-entropy and
NLL with class indices it is the number of non-ignored targets, or with class
``weight=`` the sum of the targets' weights (exactly what torch divides by). A
loss object with ``reduction = "mean"`` and a ``term_count(outputs, targets)``
method (``nethessian.losses.causal_lm``: the predicted tokens) gives ``c_b`` itself.

A batch is an ``(inputs, targets)`` pair, or a Hugging Face-style mapping of model
inputs holding its targets under ``"labels"`` (``input_ids``, ``attention_mask``,
``labels``): the model gets the other entries as keyword arguments.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable, Iterator, List, Optional, Union

import torch
from torch import nn

from .errors import InputError, NonFiniteError

__all__ = ["Batch", "Batches", "resolve_reduction", "term_count"]

Reduction = Union[str, Callable[[torch.Tensor, torch.Tensor], Any], None]


@dataclass(frozen=True)
class Batch:
    index: int
    inputs: Any  # tensor, tuple of tensors (model(*inputs)) or dict (model(**inputs))
    targets: torch.Tensor


def _is_pair(obj) -> bool:
    return isinstance(obj, (tuple, list)) and len(obj) == 2 and isinstance(obj[1], torch.Tensor)


def _is_single_batch(obj) -> bool:
    """An ``(inputs, targets)`` pair, or one mapping batch (``{"input_ids": …, "labels": …}``)."""
    return _is_pair(obj) or isinstance(obj, Mapping)


def split_mapping(index: int, raw: Mapping):
    """``(inputs without "labels", labels)`` of a Hugging Face-style mapping batch."""
    if "labels" not in raw:
        raise InputError(
            f"batch {index} is a mapping with keys {sorted(map(str, raw))} but no 'labels', so it is "
            "neither an (inputs, targets) pair nor a Hugging Face-style batch: put the targets under "
            "'labels' (-100 where a token is not predicted), or pass (inputs, labels) pairs"
        )
    inputs = {k: v for k, v in raw.items() if k != "labels"}
    return inputs, raw["labels"]


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (tuple, list)):
        for t in x:
            yield from _tensors(t)
    elif isinstance(x, Mapping):
        for t in x.values():
            yield from _tensors(t)


def _move(x, device, dtype):
    if isinstance(x, torch.Tensor):
        if x.is_floating_point():
            return x.to(device=device, dtype=dtype)
        return x.to(device=device)
    if isinstance(x, (tuple, list)):
        return type(x)(_move(t, device, dtype) for t in x)
    if isinstance(x, Mapping):  # a dict, or a Hugging Face BatchEncoding: a plain dict from here on
        return {k: _move(v, device, dtype) for k, v in x.items()}
    return x


class Batches:
    """Re-iterable view of the user's data as ``Batch`` objects on the model's device.

    ``data`` is one batch or a re-iterable of batches (a list, a ``DataLoader``); a
    batch is an ``(inputs, targets)`` pair or a mapping with ``"labels"`` (Hugging
    Face style). Floating-point tensors are cast to the compute dtype; in-memory
    data (one batch or a list/tuple of them) is moved once and kept.
    """

    def __init__(self, data, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        if _is_single_batch(data):
            self.in_memory = True
            self._cached: Optional[List[Batch]] = [self._make(0, data)]
            self._source = None
        elif isinstance(data, (list, tuple)):
            if len(data) == 0:
                raise InputError("data is empty: pass an (inputs, targets) pair or a non-empty list of them")
            self.in_memory = True
            self._cached = [self._make(i, b) for i, b in enumerate(data)]
            self._source = None
        elif isinstance(data, torch.Tensor):
            raise InputError("data is a single tensor; pass an (inputs, targets) pair, e.g. data=(X, y)")
        elif isinstance(data, (str, bytes)) or not hasattr(data, "__iter__"):
            raise InputError(
                f"data of type {type(data).__name__} is neither an (inputs, targets) pair nor an "
                "iterable of such batches; pass data=(X, y), a list of (X, y) batches or a DataLoader"
            )
        else:
            try:
                it = iter(data)
            except TypeError:
                raise InputError(
                    f"data of type {type(data).__name__} is neither an (inputs, targets) pair nor "
                    "an iterable of such batches"
                ) from None
            if it is data:
                raise InputError(
                    "data is a one-shot iterator (e.g. a generator); nethessian passes over the data "
                    "many times. Pass a list of batches or a DataLoader instead"
                )
            self.in_memory = False
            self._cached = None
            self._source = data
            self._first_count: Optional[int] = None  # batches in the first complete pass
        if self._cached is not None:
            self.num_batches = len(self._cached)
        else:
            try:
                self.num_batches = len(data)
            except TypeError:
                self.num_batches = None

    def _make(self, index: int, raw) -> Batch:
        if isinstance(raw, Mapping):
            raw = split_mapping(index, raw)
        if not (isinstance(raw, (tuple, list)) and len(raw) == 2):
            raise InputError(
                f"batch {index} is a {type(raw).__name__}, not an (inputs, targets) pair; "
                "each batch must be a pair such as (X, y), or a mapping with 'labels'"
            )
        inputs, targets = raw
        if not isinstance(targets, torch.Tensor):
            raise InputError(f"batch {index}: targets must be a tensor, got {type(targets).__name__}")
        if targets.numel() == 0:
            raise InputError(
                f"batch {index} has no targets (shape {tuple(targets.shape)}): every batch "
                "needs at least one sample; drop empty batches"
            )
        for role, obj in (("inputs", inputs), ("targets", targets)):
            for t in _tensors(obj):
                if t.is_floating_point() or t.is_complex():
                    if not torch.isfinite(t).all():
                        bad = int((~torch.isfinite(t)).sum())
                        raise NonFiniteError(
                            f"batch {index}: {role} contain {bad} NaN or Inf value(s); clean or impute the data first"
                        )
        return Batch(index, _move(inputs, self.device, self.dtype), _move(targets, self.device, self.dtype))

    def __iter__(self) -> Iterator[Batch]:
        return self.iterate()

    def iterate(self, hasher=None) -> Iterator[Batch]:
        """One pass over the batches; ``hasher`` (a ``_fingerprint.Hasher``) takes in every batch's tensors."""
        if self._cached is not None:
            for b in self._cached:
                if hasher is not None:
                    hasher.value([b.inputs, b.targets])
                yield b
            return
        n = 0
        for i, raw in enumerate(self._source):
            n += 1
            if hasher is not None:
                hasher.value(
                    list(raw) if isinstance(raw, (tuple, list)) else dict(raw) if isinstance(raw, Mapping) else raw
                )
            yield self._make(i, raw)
        self._check_count(n)

    def _check_count(self, n: int) -> None:
        """Refuse an empty pass, and a pass with another number of batches than the first one.

        A one-shot iterable (``__iter__`` returning a stored iterator, a ``DataLoader``
        over a one-shot ``IterableDataset``) yields its batches once: the next pass is
        empty or short, and a result computed from it would miss batches.
        """
        first = self._first_count
        if first is None:
            if n == 0:
                raise InputError("data is empty: the iterable yielded no batch")
            self._first_count = n
        elif n != first:
            raise InputError(
                f"the data yielded {first} batches on its first pass and {n} on a later one: it can be "
                f"iterated only once ({type(self._source).__name__}.__iter__ returns the same, used-up "
                "iterator, or a DataLoader wraps a one-shot IterableDataset). nethessian passes over the "
                "data many times: pass a list of batches, or a DataLoader over a map-style Dataset (or an "
                "IterableDataset whose __iter__ starts a fresh pass each time)"
            )

    def first(self) -> Batch:
        for b in self:
            return b
        raise InputError("data is empty: the iterable yielded no batch")


def resolve_reduction(loss_fn, reduction: Reduction, multi_batch: bool) -> Reduction:
    """The reduction that decides batch weights: the user's ``reduction=``, else ``loss_fn.reduction``.

    Returns ``"sum"``, ``"mean"``, ``"batchmean"``, a callable ``(outputs, targets) -> count``,
    or ``None`` when there is one batch and the reduction cannot be known (weight 1).
    """
    if reduction is None:
        reduction = getattr(loss_fn, "reduction", None)
    if reduction is None:
        if multi_batch:
            raise InputError(
                "the loss function's reduction cannot be known (it has no .reduction attribute) and "
                "the data has several batches, so they cannot be weighted correctly. Pass "
                "reduction='sum'; reduction='mean', which weighs each batch by its number of samples "
                "(outputs.shape[0]: for padded sequences that is the number of sequences, not of "
                "tokens); or a callable (outputs, targets) -> number of loss terms the loss averages "
                "over, e.g. lambda out, t: (t != -100).sum() to count the predicted tokens"
            )
        return None
    if callable(reduction):
        return reduction
    if reduction == "none":
        raise InputError(
            "loss_fn has reduction='none', so it returns one loss per term, but the cost must be a "
            "scalar: use reduction='mean' or reduction='sum'"
        )
    if reduction not in ("sum", "mean", "batchmean"):
        raise InputError(f"reduction {reduction!r} is not supported; use 'mean', 'sum', 'batchmean' or a callable")
    return reduction


def term_count(loss_fn, reduction: Reduction, outputs: torch.Tensor, targets: torch.Tensor) -> float:
    """The number of loss terms a mean-reduced loss divides by for this batch.

    A callable ``reduction(outputs, targets)`` gives it directly; ``"mean"`` with a loss
    torch does not know is ``outputs.shape[0]`` (samples — for padded sequences the
    number of sequences, not of tokens: pass a callable that counts the tokens).
    """
    if reduction is None or reduction == "sum":
        return 1.0
    if callable(reduction):
        return _count(reduction(outputs, targets))
    counter = getattr(loss_fn, "term_count", None)
    if reduction == "mean" and callable(counter):  # the loss knows what its mean divides by
        return _count(counter(outputs, targets))
    if reduction == "batchmean":
        return float(outputs.shape[0])
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and not targets.is_floating_point():
        mask = targets != loss_fn.ignore_index
        if loss_fn.weight is not None:
            w = loss_fn.weight.to(device=targets.device)
            return float(w[targets[mask]].double().sum())
        return float(mask.sum())
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)):  # probability targets
        return float(math.prod(outputs.shape) // outputs.shape[1]) if outputs.ndim > 1 else 1.0
    if isinstance(loss_fn, nn.Module) and hasattr(loss_fn, "reduction"):
        unreduced = copy.copy(loss_fn)
        unreduced.reduction = "none"
        with torch.no_grad():
            return float(unreduced(outputs.detach(), targets).numel())
    return float(outputs.shape[0])  # a callable told to be "mean": weight by samples


def _count(value) -> float:
    """A count returned by a ``reduction`` callable: a finite number ≥ 0."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InputError(
            f"the reduction callable returned {value!r}; it must return the batch's number of loss "
            "terms (a finite number >= 0), e.g. lambda out, t: (t != -100).sum()"
        )
    return float(value)
