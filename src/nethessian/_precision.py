"""The dtype an Objective computes in, for half-precision (bf16 / fp16) models.

Second derivatives in half precision carry the rounding of 8 (bf16) or 11 (fp16)
mantissa bits through two backward passes: a bf16 Hessian-vector product is off
by about a percent of its norm (measured in ``docs/language-models.md``). So by
default a half-precision model is evaluated in float32 on a float32 *copy* of its
parameters and buffers (the user's model is not touched) when that copy fits in
memory; otherwise in the model's own precision, and every result says so
(``precision_note``). An explicit ``dtype=`` decides instead.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

import torch

from .errors import InputError

__all__ = ["HALF", "choose_dtype", "precision_note"]

HALF = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# copies of θ that a product keeps alive in the compute dtype: the parameters, the
# gradient, the tangent and the product (activations come on top, as in any precision)
_COPIES = 4

# relative error ‖Hv_half − Hv_64‖ / ‖Hv_64‖ measured on nethessian's test models (see
# docs/language-models.md, "Half precision"): the typical size, not a bound
MEASURED = {torch.bfloat16: "~1e-2", torch.float16: "~1e-3 (and overflow to NaN through attention masks)"}

log = logging.getLogger("nethessian")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def free_bytes(device: torch.device) -> Optional[int]:
    """Free memory on ``device`` (None when unknown)."""
    try:
        if device.type == "cuda":
            return int(torch.cuda.mem_get_info(device)[0])
        if device.type == "cpu":
            return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, RuntimeError, AttributeError):
        return None
    return None


def choose_dtype(
    model_dtype: torch.dtype, requested: Optional[torch.dtype], numel: int, device: torch.device
) -> torch.dtype:
    """The compute dtype: ``requested`` if given, else float32 for a half model whose copy fits.

    Args:
        model_dtype: the dtype of the model's parameters.
        requested: the user's ``dtype=`` (None: choose).
        numel: floating elements of the parameters and buffers (the copy's size).
        device: where the copy would live.

    Logs one line when a half-precision model is computed in another precision, or in its own.
    """
    if requested is not None:
        if requested not in _FLOATS:
            raise InputError(f"dtype must be one of {[_name(d) for d in _FLOATS]} or None, got {requested!r}")
        return requested
    if model_dtype not in HALF:
        return model_dtype
    need, free = _COPIES * 4 * numel, free_bytes(device)
    if free is None or need <= free:
        log.warning(
            "nethessian: the model is %s; computing in float32 on a float32 copy of its parameters "
            "(%.3g GB; the model is unchanged). Pass dtype=torch.%s to compute in %s instead",
            _name(model_dtype),
            4 * numel / 1e9,
            _name(model_dtype),
            _name(model_dtype),
        )
        return torch.float32
    log.warning(
        "nethessian: a float32 copy of the %s model needs about %.3g GB and %.3g GB are free; "
        "computing in %s (products off by %s relative; results carry a precision_note)",
        _name(model_dtype),
        need / 1e9,
        free / 1e9,
        _name(model_dtype),
        MEASURED[model_dtype],
    )
    return model_dtype


def precision_note(dtype: torch.dtype) -> Optional[str]:
    """A one-line statement of the error products carry in ``dtype``; None for float32/float64."""
    if dtype not in HALF:
        return None
    return (
        f"computed in {_name(dtype)}: Hessian-vector products carry a relative error of "
        f"{MEASURED[dtype]} (measured against float64; see docs/language-models.md)"
    )
