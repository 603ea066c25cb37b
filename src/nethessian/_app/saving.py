"""Results saved with provenance (a JSON file), and ``nh.load`` to read them back."""
from __future__ import annotations

import datetime
import json
import os
import platform
from dataclasses import dataclass
from typing import Any, Dict

import torch

from ..errors import InputError

__all__ = ["SavedResult", "save_result", "load", "versions"]

_MAGIC = "nethessian-result-v1"


def versions() -> Dict[str, str]:
    import numpy
    import scipy

    from .._version import __version__
    return {"nethessian": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "scipy": scipy.__version__, "python": platform.python_version()}


@dataclass(frozen=True)
class SavedResult:
    """What ``--save`` wrote: the kind of result, its numbers, and the settings that made it."""

    kind: str
    result: Dict[str, Any]
    settings: Dict[str, Any]
    versions: Dict[str, str]
    created: str


def save_result(path: str, kind: str, result: Dict[str, Any], settings: Dict[str, Any]) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path!r}: folder {folder!r} is missing or not writable")
    blob = {"magic": _MAGIC, "kind": kind, "result": result, "settings": settings,
            "versions": versions(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(blob, fh, default=_plain)
    os.replace(tmp, path)


def _plain(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if hasattr(x, "tolist"):  # numpy
        return x.tolist()
    return str(x)


def load(path: str) -> SavedResult:
    """Load a result written by ``nethessian ... --save FILE``."""
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    try:
        with open(path) as fh:
            blob = json.load(fh)
    except Exception as exc:
        raise InputError(f"{path!r} is not a nethessian result file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("magic") != _MAGIC:
        raise InputError(f"{path!r} is not a nethessian result file")
    return SavedResult(blob["kind"], blob["result"], blob["settings"], blob["versions"], blob["created"])
