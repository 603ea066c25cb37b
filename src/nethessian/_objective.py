"""Objective: J(θ) over the whole data set as a pure function of named parameters.

The objective holds the user's model, loss and data, the chosen parameters
(``params`` globs) and their layout, and a snapshot ``theta0`` of their values.
It never changes the user's model: parameters and buffers are passed through
``torch.func.functional_call``; every forward gets its own clone of the
buffers, so a forward that writes them (batch-norm running statistics in train
mode, a counter in eval mode) cannot change the next one.

``Objective.at(θ)`` is the same objective at other parameters (nothing
re-validated); ``fingerprint()`` is a sha256 of everything the numbers depend on
(checkpoints refuse another one). Construction-time checks live in
``_validate.py``; small helpers on batches and model outputs in
``_objective_helpers.py``.

``sum_over_batches`` is the single place where per-batch quantities combine
into whole-data-set ones (batch weights, and the data-parallel all-reduce);
its ``local_sum`` checks every batch's loss for NaN/Inf.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from . import distributed as dist
from ._checks import all_finite, check_vector
from ._data import Batch, Batches, resolve_reduction, term_count
from ._fingerprint import Hasher, _name, loss_description
from ._objective_helpers import _output_tensor, _widen, _with_labels
from ._validate import check_model_state, validate
from .errors import InputError, NonFiniteError
from ._params import ParamLayout, select_parameters
from ._precision import choose_dtype, precision_note
from .losses import ModelLoss

__all__ = ["Objective", "math_attention"]


def math_attention():
    """Context that routes scaled_dot_product_attention to its twice-differentiable math kernel."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel(SDPBackend.MATH)
    except ImportError:  # torch < 2.3
        return torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False, enable_math=True)


_INFERENCE_MODE = (
    "nethessian cannot differentiate inside torch.inference_mode(); call it outside "
    "that context (torch.no_grad() is fine)"
)

_ALL_IGNORED = (
    "every target is ignored (zero loss terms): the mean cost is undefined; check "
    "ignore_index and the targets (or use reduction='sum')"
)


_ELEMENTWISE = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.KLDivLoss,
    nn.PoissonNLLLoss,
)


class Objective:
    """J(θ) = weighted sum over batches of ``loss_fn(model(inputs), targets)``.

    Args:
        model: any ``nn.Module``; its mode decides batch norm (train: batch
            statistics, eval: running ones). A model output with ``.logits`` (Hugging
            Face) stands for its logits tensor.
        loss_fn: callable ``(outputs, targets) -> scalar``; ``None``: the model's own
            ``output.loss``, computed from ``labels=`` (see ``losses.ModelLoss``).
        data: a batch or a re-iterable of batches: ``(inputs, targets)`` pairs or
            Hugging Face-style mappings with ``"labels"``.
        params: ``None`` (every parameter with ``requires_grad``) or names / glob patterns.
        reduction: how batches combine when ``loss_fn`` has no ``.reduction``.
        allow_random: accept a model whose forward pass draws random numbers.
        dtype: the precision to compute in, on a copy of the parameters (None: the
            model's, but float32 for a bf16/fp16 model when the copy fits; see ``_precision``).
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Optional[Callable],
        data,
        params: Optional[Sequence[str]] = None,
        *,
        reduction=None,
        allow_random: bool = False,
        dtype: Optional[torch.dtype] = None,
    ):
        if not isinstance(model, nn.Module):
            raise InputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is None:
            loss_fn = ModelLoss()
        if not callable(loss_fn):
            raise InputError(
                "loss_fn must be callable as loss_fn(outputs, targets) -> scalar, or None "
                "for a model that returns its own .loss"
            )
        self.model, self.loss_fn = model, loss_fn
        with dist.agreeing():  # a local failure on one rank stops every rank, with its message
            self._build(model, params, data, reduction, allow_random, dtype)
        dist.check_state(self)

    def _build(self, model: nn.Module, params, data, reduction, allow_random: bool, dtype) -> None:
        """Local set-up and validation (everything but the comparison across ranks)."""
        if torch.is_inference_mode_enabled():
            raise InputError(_INFERENCE_MODE)
        chosen = select_parameters(model, params)
        check_model_state(model, chosen)
        devices = {p.device for p in chosen.values()}
        if len(devices) > 1:
            raise InputError(
                f"parameters are on several devices {sorted(map(str, devices))}; "
                "move the model to one device with model.to(device) first"
            )
        self.model_dtype, self.device = next(iter(chosen.values())).dtype, devices.pop()
        numel = sum(t.numel() for t in [*model.parameters(), *model.buffers()] if t.is_floating_point())
        self.dtype = choose_dtype(self.model_dtype, dtype, numel, self.device)
        self.precision_note = precision_note(self.dtype)
        self.layout = ParamLayout.from_tensors(chosen)
        self.theta0 = torch.cat([p.detach().reshape(-1) for p in chosen.values()]).to(self.dtype).clone()
        # snapshots: later in-place changes to the user's model don't reach this objective
        self._fixed = {n: self._copy(p) for n, p in model.named_parameters() if n not in chosen}
        self._buffers = {n: self._copy(b) for n, b in model.named_buffers()}
        self._modes = tuple((n, m.training) for n, m in model.named_modules())
        self._fingerprint: Optional[str] = None
        self._shared: Dict[str, Any] = {"data_hash": None}  # shared with every .at(θ) copy
        self.data = Batches(data, self.device, self.dtype)
        multi = self.data.num_batches != 1 or dist.world_size() > 1
        self.reduction = resolve_reduction(loss_fn=self.loss_fn, reduction=reduction, multi_batch=multi)
        validate(self, allow_random)

    def _copy(self, t: torch.Tensor) -> torch.Tensor:
        """A detached copy of a parameter or buffer, floating ones in the compute dtype."""
        t = t.detach()
        return t.to(self.dtype, copy=True) if t.is_floating_point() else t.clone()

    # -- the same objective at other parameters; its identity ------------------------------
    def at(self, theta: torch.Tensor) -> "Objective":
        """The same objective with ``theta0 = theta``: model, loss, data, layout and validation shared.

        Cheap: nothing is re-validated and no data pass is made. ``theta`` is a ``(P,)`` tensor.
        """
        check_vector(theta, self.size, "theta")
        if theta.ndim != 1:
            raise InputError(f"theta must be a vector of shape ({self.size},), got {tuple(theta.shape)}")
        new = copy.copy(self)
        new.theta0 = theta.detach().to(device=self.device, dtype=self.dtype).clone()
        new._fingerprint = None
        return new

    def fingerprint(self) -> str:
        """sha256 hex of everything the numbers depend on (computed once, then cached).

        Covers θ₀, the fixed parameters, the buffers, the train/eval flag of every
        module, the loss's type and settings, the reduction, and the data: the bytes
        of every tensor of every batch (streaming data: hashed during one pass, so a
        shuffling DataLoader gives another fingerprint on every pass).
        """
        if self._fingerprint is None:
            h = Hasher().text("nethessian.Objective").tensor(self.theta0)
            h.value(list(self.layout.names)).value([list(s) for s in self.layout.shapes])
            h.text("fixed").named(sorted(self._fixed.items()))
            h.text("buffers").named(sorted(self._buffers.items()))
            h.text("modes").named(self._modes)
            loss_description(h.text("loss"), self.loss_fn)
            red = self.reduction
            h.text("reduction").value(red if red is None or isinstance(red, str) else _name(red))
            self._fingerprint = h.text("data").text(self._data_hash()).hexdigest()
        return self._fingerprint

    def _data_hash(self) -> str:
        if self._shared["data_hash"] is None:
            h = Hasher()
            for _ in self.data.iterate(h):
                pass
            self._shared["data_hash"] = h.hexdigest()
        return self._shared["data_hash"]

    # -- evaluation --------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.layout.size

    def params_dict(self, theta: torch.Tensor) -> Dict[str, torch.Tensor]:
        return self.layout.unflatten(theta)

    def leaf(self, theta: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """A fresh leaf copy of θ that requires grad, and its named views.

        The views are made with grad mode on, so derivatives flow to the leaf even when
        the caller runs under ``torch.no_grad()``.
        """
        if torch.is_inference_mode_enabled():
            raise InputError(_INFERENCE_MODE)
        with torch.enable_grad():
            leaf = (self.theta0 if theta is None else theta).detach().clone().requires_grad_(True)
            return leaf, self.params_dict(leaf)

    def call_model(
        self, named: Dict[str, torch.Tensor], inputs, buffers: Optional[Dict[str, torch.Tensor]] = None
    ) -> Any:
        """The model's raw output with ``named`` parameters; buffers cloned (running stats untouched).

        Attention runs on the "math" kernel: the fused flash / memory-efficient
        kernels have no second derivative (nor forward-mode rule) in PyTorch.
        ``buffers``: the copies to run with (default: fresh clones of the snapshot).
        """
        # every forward gets its own buffers: a forward that writes them (train-mode batch norm's
        # running statistics, a counter updated in eval mode) must not change the next one
        if buffers is None:
            buffers = {k: b.clone() for k, b in self._buffers.items()}
        state = {**self._fixed, **buffers, **named}
        if isinstance(inputs, dict):
            args, kwargs = (), inputs
        else:
            args, kwargs = (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), None
        with math_attention():
            return functional_call(self.model, state, args, kwargs)

    def forward(self, named: Dict[str, torch.Tensor], inputs) -> torch.Tensor:
        """The model's output tensor: what it returns, or its ``.logits`` (Hugging Face outputs)."""
        return _output_tensor(self.call_model(named, inputs))

    def batch_loss(self, named: Dict[str, torch.Tensor], batch: Batch) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(loss as loss_fn returns it, outputs)`` for one batch; checks what can go wrong.

        With ``loss_fn=None`` (``ModelLoss``) the model gets the targets as ``labels=`` and
        its ``output.loss`` is the batch loss.
        """
        own = getattr(self.loss_fn, "uses_model_loss", False)
        raw = self.call_model(named, _with_labels(batch) if own else batch.inputs)
        out = _output_tensor(raw)
        if not isinstance(out, torch.Tensor):
            raise InputError(
                f"the model returned a {type(out).__name__}, not a tensor nor an object with .logits; "
                "wrap it so forward returns the tensor the loss takes"
            )
        loss = ModelLoss.of(raw) if own else self._loss(out, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise InputError(
                f"loss_fn must return a scalar, got {shape}; use reduction='mean' or 'sum' "
                "(or .mean()/.sum() in your function)"
            )
        return loss.reshape(()), out

    def _loss(self, out: torch.Tensor, batch: Batch):
        """``loss_fn(out, targets)``, with the shape checks and a clear error when it fails."""
        t = batch.targets
        if isinstance(self.loss_fn, _ELEMENTWISE) and tuple(out.shape) != tuple(t.shape):
            raise InputError(
                f"batch {batch.index}: outputs have shape {tuple(out.shape)} but targets {tuple(t.shape)}; "
                f"{type(self.loss_fn).__name__} would broadcast them into a wrong cost. Reshape the "
                f"targets to {tuple(out.shape)} (e.g. y.view({', '.join(map(str, out.shape))}))"
            )
        try:
            return self.loss_fn(out, t)
        except (RuntimeError, ValueError, IndexError) as exc:
            if isinstance(exc, RuntimeError) and torch._C._functorch.is_functorch_wrapped_tensor(out):
                raise  # inside a torch.func transform: an AD gap another engine may avoid, not bad input
            raise InputError(
                f"batch {batch.index}: loss_fn failed on outputs of shape {tuple(out.shape)} "
                f"({out.dtype}) and targets of shape {tuple(t.shape)} ({t.dtype}): {exc}"
            ) from None

    def count(self, outputs: torch.Tensor, targets: torch.Tensor) -> float:
        return term_count(self.loss_fn, self.reduction, outputs, targets)

    def sum_over_batches(self, fn: Callable[[Batch], Tuple[Any, float]]):
        """Combine ``fn(batch) -> (value, count)`` over the data set with the batch weights.

        ``value`` is the batch's quantity (loss, gradient, product ...) for the loss as
        ``loss_fn`` returns it; the result is the same quantity for the whole-data-set
        cost J. Across processes, local sums and counts are all-reduced (``finish``).
        """
        return self.finish(*self.local_sum(fn))

    def local_sum(
        self, fn: Callable[[Batch], Tuple[Any, float]], *, what: Optional[str] = None, hash_data: bool = False
    ) -> Tuple[Any, float]:
        """This process's weighted sum ``Σ_b w_b value_b`` and term count ``Σ_b c_b``.

        With ``what`` ("loss", "loss or gradient"), or when the value is a scalar (a batch's
        loss), every batch's value is checked: a NaN or Inf raises ``NonFiniteError``
        naming the batch (products are checked by the operator, which then looks for
        the culprit batch). With
        ``hash_data`` the pass also takes the data's fingerprint (streaming data).
        """
        total, n = None, 0.0
        mean = self.reduction not in (None, "sum")
        hasher = Hasher() if hash_data else None
        for batch in self.data.iterate(hasher):
            value, c = fn(batch)
            if mean and c == 0:  # every target ignored: no terms (and its mean loss is 0/0)
                term = torch.zeros_like(value)
            else:
                if what is not None or getattr(value, "ndim", None) == 0:  # a scalar is a batch's loss
                    self.check_finite(value, batch.index, what or "loss")
                term = _widen(value) * (c if mean else 1.0)
            total = term if total is None else total + term
            n += c
        if hasher is not None:
            self._shared["data_hash"] = hasher.hexdigest()
        if total is not None and total.dtype != value.dtype:  # half values: summed in float32
            total = total.to(value.dtype)
        if mean and n <= 0 and dist.world_size() == 1:
            raise InputError(_ALL_IGNORED)
        return total, n

    @staticmethod
    def check_finite(value: torch.Tensor, index: int, what: str = "loss") -> None:
        """Refuse a batch's loss (or other value) that holds NaN or Inf, naming the batch.

        Skipped inside torch.func transforms (no data-dependent checks there).
        """
        if not isinstance(value, torch.Tensor) or torch._C._functorch.is_functorch_wrapped_tensor(value):
            return
        if not all_finite(value.detach()):
            raise NonFiniteError(
                f"batch {index}: the {what} is NaN or Inf at the current parameters; check that batch's "
                "data and the loss (log of 0, overflow), and the parameters' scale"
            )

    def finish(self, total: torch.Tensor, n: float, inplace: bool = False) -> torch.Tensor:
        """All-reduce a local weighted sum and divide by the global term count for a mean.

        ``inplace``: ``total`` is the caller's own fresh tensor and may be divided in place
        (a product's output: no second vector per product).
        """
        total, n = dist.reduce_sum(total, n)
        if self.reduction not in (None, "sum"):
            if n <= 0:
                raise InputError(_ALL_IGNORED)
            total = total.div_(n) if inplace else total / n
        return total

    def value(self, theta: Optional[torch.Tensor] = None) -> float:
        theta = self.theta0 if theta is None else theta
        named = self.params_dict(theta)
        with torch.no_grad():

            def fn(b):
                loss, out = self.batch_loss(named, b)
                return loss.double(), self.count(out, b.targets)

            return float(self.finish(*self.local_sum(fn, what="loss")))

    def value_and_grad(self, theta: Optional[torch.Tensor] = None) -> Tuple[float, torch.Tensor]:
        theta, named = self.leaf(theta)

        def fn(b):
            with torch.enable_grad():
                loss, out = self.batch_loss(named, b)
                (g,) = torch.autograd.grad(loss, theta, allow_unused=True)
            g = torch.zeros_like(theta) if g is None else g
            return torch.cat([loss.detach().double().reshape(1), g.double()]), self.count(out, b.targets)

        vg = self.finish(*self.local_sum(fn, what="loss or gradient"))
        return float(vg[0]), vg[1:].to(self.dtype)

    def gradient(self, theta: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.value_and_grad(theta)[1]
