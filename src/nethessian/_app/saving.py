"""Results saved with provenance (a JSON file), ``nh.load`` to read them back, and the one JSON converter.

``--save FILE`` never destroys what it should not: it refuses the problem file and
the checkpoint (even with ``--force``), a folder, and any existing file that is not
a nethessian result unless ``--force``. The write is atomic (a uniquely named
temporary file, then ``os.replace``) and the temporary file is removed on error.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import pathlib
import platform
import tempfile
from dataclasses import dataclass
from typing import Any, Dict, Iterable, Optional

import torch

from ..errors import InputError

__all__ = ["SavedResult", "save_result", "check_target", "load", "versions", "jsonable", "to_json"]

_MAGIC = "nethessian-result-v1"
_HEAD = '{"magic": "' + _MAGIC + '"'


def versions() -> Dict[str, str]:
    """Versions of nethessian, its dependencies, Python and the platform (for provenance)."""
    import matplotlib
    import numpy
    import scipy

    from .._version import __version__

    return {
        "nethessian": __version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "matplotlib": matplotlib.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def jsonable(x: Any) -> Any:
    """``x`` as plain JSON values.

    Tensors and arrays become lists, NaN/Inf ``None`` (JSON has neither), dtypes, devices and
    paths strings.
    """
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, torch.Tensor) or hasattr(x, "tolist"):  # numpy arrays and scalars too
        return jsonable(x.tolist())
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if x is None or isinstance(x, (bool, int, str)):
        return x
    return str(x)  # torch.dtype, torch.device, pathlib.Path, ...


def to_json(obj: Any, indent: Optional[int] = 2) -> str:
    """Strict JSON text of ``obj`` (see :func:`jsonable`)."""
    return json.dumps(jsonable(obj), indent=indent, allow_nan=False)


@dataclass(frozen=True)
class SavedResult:
    """What ``--save`` wrote: the kind of result, its numbers, and the settings that made it."""

    kind: str
    result: Dict[str, Any]
    settings: Dict[str, Any]
    versions: Dict[str, str]
    created: str


def _is_result(path: str) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return fh.read(len(_HEAD)) == _HEAD
    except OSError:
        return False


def _same_file(a: str, b: str) -> bool:
    """The same path (existing or not, after links), or two names of one existing file (hard links)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


def check_target(path: str, *, protected: Iterable[Optional[str]] = (), force: bool = False) -> None:
    """Refuse a ``--save`` path that would destroy something; call it before the computation.

    Args:
        path: where the result is to go.
        protected: files never to overwrite, even with ``force`` (the problem file, the checkpoint).
        force: allow overwriting an existing file that is not a nethessian result.

    Raises:
        InputError: ``path`` is a protected file, a folder, in a missing or read-only folder, or an
            existing non-result file without ``force``.
    """
    path = os.fspath(path)
    for p in protected:
        if p and _same_file(path, os.fspath(p)):
            raise InputError(
                f"--save {path!r} would overwrite {os.fspath(p)!r}, which this command reads "
                "(the problem file or the checkpoint); choose another file name"
            )
    if os.path.isdir(path):
        raise InputError(f"--save {path!r} is a folder; give a file name, e.g. {os.path.join(path, 'result.json')!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        raise InputError(f"cannot write {path!r}: folder {folder!r} is missing or not writable")
    if os.path.exists(path) and not force and not _is_result(path):
        raise InputError(
            f"--save {path!r} exists and is not a nethessian result; choose another file name, "
            "or pass --force to overwrite it"
        )


def save_result(
    path: str,
    kind: str,
    result: Dict[str, Any],
    settings: Dict[str, Any],
    *,
    protected: Iterable[Optional[str]] = (),
    force: bool = False,
) -> None:
    """Write ``result`` with its settings, versions and date to ``path`` (JSON), atomically."""
    check_target(path, protected=protected, force=force)
    blob = {
        "magic": _MAGIC,
        "kind": kind,
        "result": result,
        "settings": settings,
        "versions": versions(),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    }
    write_atomic(path, to_json(blob, indent=None))


def write_atomic(path: str | pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` through a unique temporary file in the same folder (removed on error)."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load(path: str) -> SavedResult:
    """Load a result written by ``nethessian ... --save FILE``.

    Raises:
        InputError: the file is missing, not JSON, not a nethessian result, or lacks an entry.
    """
    if not os.path.exists(path):
        raise InputError(f"{path!r} does not exist")
    try:
        with open(path, encoding="utf-8") as fh:
            blob = json.load(fh)
    except Exception as exc:
        raise InputError(f"{path!r} is not a nethessian result file ({type(exc).__name__})") from None
    if not isinstance(blob, dict) or blob.get("magic") != _MAGIC:
        raise InputError(f"{path!r} is not a nethessian result file")
    missing = [k for k in ("kind", "result", "settings", "versions", "created") if k not in blob]
    if missing:
        raise InputError(f"{path!r} is a damaged nethessian result: it lacks {', '.join(missing)}")
    return SavedResult(blob["kind"], blob["result"], blob["settings"], blob["versions"], blob["created"])
