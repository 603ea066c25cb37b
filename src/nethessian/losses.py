"""Built-in losses whose batches combine exactly into one whole-data-set cost.

``causal_lm`` is the next-token cross-entropy of a causal language model, as
Hugging Face computes it: position ``t`` predicts token ``t + 1``,

    L_b = (1 / c_b) Σ_{i, t : y_{i,t+1} ≠ ignore} −log softmax(z_{i,t})[y_{i,t+1}],
    c_b = #{(i, t) : t < T − 1, y_{i,t+1} ≠ ignore}

for logits ``z`` of shape ``(B, T, V)`` and labels ``y`` of shape ``(B, T)``.
The loss carries ``c_b`` (``term_count``), so the Objective weighs batch ``b`` by
``c_b`` and the cost over ragged, padded batches equals the cost of one big batch:
``J = Σ_b c_b L_b / Σ_b c_b``.

Example:
    >>> import torch, nethessian as nh
    >>> loss = nh.losses.causal_lm()
    >>> logits = torch.zeros(1, 3, 5, dtype=torch.float64)     # uniform predictions
    >>> labels = torch.tensor([[1, 2, -100]])
    >>> round(float(loss(logits, labels)), 6) == round(float(torch.log(torch.tensor(5.0))), 6)
    True
    >>> loss.term_count(logits, labels)                           # only 2 → predicted; -100 ignored
    1
"""

from __future__ import annotations

import numbers
from typing import Any, Tuple

import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError

__all__ = ["CausalLMLoss", "ModelLoss", "causal_lm", "logits_of", "shifted_labels"]


def logits_of(outputs: Any) -> torch.Tensor:
    """The logits tensor of a model output: the tensor itself, or ``outputs.logits``."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    raise InputError(
        f"the model output is a {type(outputs).__name__} with no .logits tensor; causal_lm takes "
        "a (batch, time, vocabulary) logits tensor or an object with .logits (a Hugging Face "
        "CausalLMOutput)"
    )


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """``labels[:, 1:]``: the token each position ``0 … T−2`` predicts."""
    return labels[..., 1:]


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if not isinstance(labels, torch.Tensor) or labels.is_floating_point() or labels.is_complex():
        kind = labels.dtype if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise InputError(f"causal_lm labels must be an integer tensor of token ids, got {kind}")
    if logits.ndim != labels.ndim + 1 or tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise InputError(
            f"causal_lm needs logits of shape (batch, time, vocabulary) and labels of shape "
            f"(batch, time); got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )


class CausalLMLoss(nn.Module):
    """Mean next-token cross-entropy over the predicted (non-ignored) tokens.

    Args:
        ignore_index: label value that marks a token not to predict (padding,
            prompt tokens); Hugging Face's convention is ``-100``.

    ``reduction`` is ``"mean"`` and ``term_count(outputs, labels)`` is the number of
    predicted tokens the mean divides by: the Objective uses both to weigh batches.
    """

    reduction = "mean"

    def __init__(self, ignore_index: int = -100):
        super().__init__()
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise InputError(f"ignore_index must be an int, got {ignore_index!r}")
        self.ignore_index = int(ignore_index)

    def pairs(self, outputs: Any, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(logits[:, :-1] as (N, V), labels[:, 1:] as (N,))``: each position and the token it predicts."""
        logits = logits_of(outputs)
        _check(logits, labels)
        z = logits[..., :-1, :]
        return z.reshape(-1, z.shape[-1]), shifted_labels(labels).reshape(-1).to(logits.device)

    def forward(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The mean cross-entropy; ``0`` (not NaN) when no token is predicted, with weight 0."""
        z, y = self.pairs(outputs, labels)
        total = F.cross_entropy(z, y, ignore_index=self.ignore_index, reduction="sum")
        count = (y != self.ignore_index).sum()
        return total / count.clamp(min=1).to(total.dtype)

    def term_count(self, outputs: Any, labels: torch.Tensor) -> int:
        """``c_b``: the number of predicted tokens (shifted labels that are not ``ignore_index``)."""
        _check(logits_of(outputs), labels)
        return int((shifted_labels(labels) != self.ignore_index).sum())

    def extra_repr(self) -> str:
        """``ignore_index=…`` in the module's repr."""
        return f"ignore_index={self.ignore_index}"


def causal_lm(ignore_index: int = -100) -> CausalLMLoss:
    """The causal language-modelling loss: shifted, mean over predicted tokens, exactly batchable.

    Takes ``(outputs, labels)``: ``outputs`` the logits ``(B, T, V)`` or an object with
    ``.logits`` (a Hugging Face model output), ``labels`` the token ids ``(B, T)`` with
    ``ignore_index`` where a token is not predicted. See the module docstring.
    """
    return CausalLMLoss(ignore_index)


class ModelLoss(CausalLMLoss):
    """``loss_fn=None``: the model computes its own loss from ``labels`` (``output.loss``).

    The Objective passes the batch's labels to the model as ``labels=`` and takes
    ``output.loss`` as the batch loss, weighted by the number of non-ignored shifted
    labels (Hugging Face's causal-LM convention, ignore index ``-100``). Called as a
    function of ``(logits, labels)`` (the GGN's loss on the outputs) it is the causal
    LM cross-entropy, which is what a Hugging Face causal LM computes.
    """

    uses_model_loss = True

    def __init__(self):
        super().__init__(ignore_index=-100)

    @staticmethod
    def of(output: Any) -> torch.Tensor:
        """The ``.loss`` of a model output; a clear error when the model returned none."""
        loss = getattr(output, "loss", None)
        if not isinstance(loss, torch.Tensor):
            raise InputError(
                f"loss_fn is None but the model's output ({type(output).__name__}) has no .loss tensor: "
                "pass a loss_fn (e.g. nethessian.losses.causal_lm()), or a model that computes its "
                "loss from labels= (a Hugging Face *ForCausalLM) with the labels in the batch"
            )
        return loss
