"""Helpers of ``Objective`` on one batch: the tensor a loss takes, ``labels=`` inputs, float32 widening.

Module-level functions without state, used by ``_objective.py``'s ``forward``,
``batch_loss`` and ``local_sum``.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from ._data import Batch
from .errors import InputError
from .losses import logits_of


def _output_tensor(raw: Any) -> Any:
    """The tensor a loss takes: the output itself, or its ``.logits`` (a Hugging Face model output)."""
    if isinstance(raw, torch.Tensor):
        return raw
    try:
        return logits_of(raw)
    except InputError:
        return raw


def _widen(value):
    """A half-precision batch value in float32, so that batches are weighed and summed in float32."""
    if isinstance(value, torch.Tensor) and value.dtype in (torch.float16, torch.bfloat16):
        return value.float()
    return value


def _with_labels(batch: Batch) -> Dict[str, Any]:
    """The keyword inputs plus ``labels=`` targets, for a model that computes its own loss."""
    if not isinstance(batch.inputs, dict):
        raise InputError(
            f"loss_fn is None, so the model must compute its loss from labels=, but batch {batch.index}'s "
            f"inputs are a {type(batch.inputs).__name__}, not keyword arguments: pass Hugging Face-style "
            "batches ({'input_ids': ..., 'labels': ...}) or a loss_fn"
        )
    return {**batch.inputs, "labels": batch.targets}
