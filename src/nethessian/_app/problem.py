"""Load a problem for the command line: a built-in name or a Python file.

A problem file defines ``model``, ``loss_fn`` and ``data`` at module level, or
a function ``problem()`` returning them.
"""
from __future__ import annotations

import importlib.util
import os
import traceback
from typing import Optional

import torch

from .. import examples
from ..errors import InputError

__all__ = ["load_problem", "parse_device", "parse_dtype"]

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
          "bfloat16": torch.bfloat16}


def parse_dtype(name: Optional[str]) -> Optional[torch.dtype]:
    if name is None:
        return None
    if name not in DTYPES:
        raise InputError(f"unknown dtype {name!r}; valid: {', '.join(DTYPES)}")
    return DTYPES[name]


def parse_device(name: Optional[str]) -> Optional[torch.device]:
    if name is None:
        return None
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use cpu, cuda, cuda:1, mps ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} is not available: this machine has no CUDA GPU; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise InputError(f"device {name!r} is not there: {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise InputError("device 'mps' is not available on this machine; use --device cpu")
    return dev


def _from_file(path: str):
    if not os.path.exists(path):
        raise InputError(f"problem file {path!r} does not exist")
    name = "nethessian_problem_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        target = os.path.realpath(path)
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == target]
        where = f"{path}, line {frames[-1].lineno}" if frames else path
        line = f": {frames[-1].line}" if frames and frames[-1].line else ""
        raise InputError(f"problem file failed to import at {where}{line} — {type(exc).__name__}: {exc}") from None
    if hasattr(module, "problem"):
        out = module.problem()
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise InputError(f"{path}: problem() must return (model, loss_fn, data)")
        return tuple(out)
    missing = [n for n in ("model", "loss_fn", "data") if not hasattr(module, n)]
    if missing:
        raise InputError(f"{path} lacks {', '.join(missing)}: define model, loss_fn and data, "
                         "or a function problem() returning them")
    return module.model, module.loss_fn, module.data


def load_problem(spec: Optional[str], *, seed: int = 0, dtype: Optional[str] = None,
                 device: Optional[str] = None, batch_size: Optional[int] = None):
    """``(model, loss_fn, data)`` from a built-in name (two-layer, mlp, cnn) or a ``.py`` file."""
    spec = spec or "two-layer"
    if spec in examples.BUILTINS:
        model, loss_fn, data = examples.BUILTINS[spec](seed=seed)
    elif spec.endswith(".py") or os.path.sep in spec:
        model, loss_fn, data = _from_file(spec)
    else:
        raise InputError(f"unknown problem {spec!r}: give a .py file or one of {', '.join(examples.BUILTINS)}")
    dt, dev = parse_dtype(dtype), parse_device(device)
    if dt is not None or dev is not None:
        model = model.to(device=dev, dtype=dt)
    if batch_size is not None:
        if batch_size < 1:
            raise InputError(f"--batch-size must be positive, got {batch_size}")
        if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)):
            raise InputError("--batch-size needs data given as one (inputs, targets) pair")
        X, y = data
        data = [(X[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(y), batch_size)]
    return model, loss_fn, data
