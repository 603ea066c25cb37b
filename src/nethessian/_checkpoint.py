"""File-backed checkpoints for long computations (dense columns, Lanczos, probes).

A ``Checkpoint`` stores a dict of tensors and plain values together with the
settings that produced it and a sha256 of the state. Loading is refused, never
mixed in, when the settings differ, when the state is not the expected structure
(a dict of tensors and plain values), when a floating-point tensor holds NaN or
Inf, or when the state's sha256 does not match (a flipped bit, an edited file).

Writes are atomic (temporary file + fsync + ``os.replace``), so a process killed
mid-write leaves the previous checkpoint intact. The temporary file is removed on
any error; one left by a killed process (its name carries host and process id)
is removed when the checkpoint is next opened.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import socket
import tempfile
import time
from typing import Any, Dict, Optional

import torch

from ._checks import all_finite, as_float
from ._fingerprint import Hasher
from .errors import CheckpointError

__all__ = ["Checkpoint"]

_MAGIC = "nethessian-checkpoint-v2"
_OLD_MAGICS = ("nethessian-checkpoint-v1",)
_MAX_DEPTH = 8
#: a temporary file from another machine (its process cannot be checked) is stale after this long
_FOREIGN_TMP_AGE_S = 3600.0


def _fingerprint(settings: Dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 24 else s[:21] + "..."


def _same(a, b) -> bool:
    """Plain equality that never asks a tensor for its truth value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and a.dtype == b.dtype
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:  # e.g. lists holding tensors
        return False


def _bad_value(x, where: str, depth: int = 0) -> Optional[str]:
    """Why ``x`` is not a sound state value (``None`` when it is): tensors and plain values only."""
    if depth > _MAX_DEPTH:
        return f"{where} is nested more than {_MAX_DEPTH} levels deep"
    if isinstance(x, torch.Tensor):
        if x.layout != torch.strided or x.is_meta:
            return f"{where} is a {x.layout} tensor; expected a dense one"
        if (x.is_floating_point() or x.is_complex()) and not all_finite(
            x if not x.is_complex() else torch.view_as_real(x)
        ):
            return f"{where} contains NaN or Inf"
        return None
    if x is None or isinstance(x, (bool, int, str)):
        return None
    if isinstance(x, float):
        return None if math.isfinite(x) or math.isinf(x) else f"{where} is NaN"
    if isinstance(x, (list, tuple)):
        return next((m for i, v in enumerate(x) if (m := _bad_value(v, f"{where}[{i}]", depth + 1))), None)
    if isinstance(x, dict):
        if not all(isinstance(k, (str, int)) for k in x):
            return f"{where} has a key that is not a string"
        return next((m for k, v in x.items() if (m := _bad_value(v, f"{where}[{k!r}]", depth + 1))), None)
    return f"{where} is a {type(x).__name__}; expected a tensor or a plain value"


def _checksum(state: Dict[str, Any]) -> str:
    return Hasher().text(_MAGIC).value(state).hexdigest()


class Checkpoint:
    """Save and resume the state of one long computation.

    Args:
        path: file to write. Its folder must exist and be writable.
        settings: everything that determines the result (algorithm, sizes,
            seeds, the operator's fingerprint). A checkpoint written with
            different settings is refused on ``load``.
        every: minimum seconds between two writes (``save(force=True)`` ignores it).

    Algorithms call ``resume(expect)`` (or ``load()``) once at the start (``None``
    when there is nothing to resume) and ``save(state)`` as they go; ``state`` is a
    dict with string keys of tensors and plain values (numbers, strings, ``None``,
    lists and dicts of them).

    Raises:
        CheckpointError: the folder is missing or not writable, or ``path`` is a folder.
    """

    def __init__(self, path: str | os.PathLike, settings: Dict[str, Any], every: float = 2.0):
        self.path = os.fspath(path)
        if not isinstance(settings, dict):
            raise CheckpointError(f"checkpoint settings must be a dict, got {type(settings).__name__}")
        self.settings = dict(settings)
        self.fingerprint = _fingerprint(self.settings)
        self.every = as_float("every", every)
        if self.every < 0:
            raise CheckpointError(f"every must be ≥ 0 seconds, got {every!r}")
        self._last = -float("inf")
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder {folder!r} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise CheckpointError(f"checkpoint folder {folder!r} is not writable; choose another path")
        if os.path.isdir(self.path):
            raise CheckpointError(f"checkpoint path {self.path!r} is a folder; give a file name inside it")
        self._remove_stale_temporaries()

    # ------------------------------------------------------------------ reading
    def load(self) -> Optional[Dict[str, Any]]:
        """The saved state (``None`` when there is no file), after validating the whole file.

        Raises:
            CheckpointError: unreadable, not a checkpoint, other settings, malformed or damaged state.
        """
        if not os.path.exists(self.path):
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or not ours; weights_only never runs code from the file
            raise CheckpointError(
                f"{self.path!r} is not a readable nethessian checkpoint ({type(exc).__name__}: {exc}); "
                "delete it or choose another --checkpoint path"
            ) from None
        self._check_header(blob)
        self._check_settings(blob)
        return self._check_state(blob)

    def _damaged(self, what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {self.path!r} is damaged: {what}; delete it to start over")

    def _check_header(self, blob) -> None:
        if isinstance(blob, dict) and blob.get("magic") in _OLD_MAGICS:
            raise CheckpointError(
                f"{self.path!r} was written by an older nethessian without a checksum; delete it to start over"
            )
        if not isinstance(blob, dict) or blob.get("magic") != _MAGIC:
            raise CheckpointError(f"{self.path!r} is not a nethessian checkpoint; delete it or choose another path")
        for key in ("fingerprint", "settings", "checksum"):
            if not isinstance(blob.get(key), str):
                raise self._damaged(f"its {key!r} entry is missing or not a string")

    def _check_settings(self, blob: Dict[str, Any]) -> None:
        if blob["fingerprint"] == self.fingerprint:
            return
        try:
            theirs = json.loads(blob["settings"])
        except ValueError:
            theirs = None
        if not isinstance(theirs, dict):
            raise self._damaged("its settings are not a JSON object")
        diff = sorted(k for k in set(theirs) | set(self.settings) if str(theirs.get(k)) != str(self.settings.get(k)))
        raise CheckpointError(
            f"{self.path!r} was made with other settings (differs in: {', '.join(diff) or '?'}); "
            "rerun with the original arguments, or delete the file to start over"
        )

    def _check_state(self, blob: Dict[str, Any]) -> Dict[str, Any]:
        state = blob.get("state")
        if not isinstance(state, dict):
            raise self._damaged(f"its state is a {type(state).__name__}, not a dict")
        if not all(isinstance(k, str) for k in state):
            raise self._damaged("its state has a key that is not a string")
        why = _bad_value(state, "state")
        if why:
            raise self._damaged(why)
        if _checksum(state) != blob["checksum"]:
            raise self._damaged(
                "the state's sha256 does not match the one written with it (a changed bit or an edited file)"
            )
        return state

    def resume(self, expect: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The saved state, after checking it belongs to the computation described by ``expect``.

        ``expect`` names what the numbers depend on (algorithm, size, seed, the
        operator's fingerprint); any difference is refused, never mixed in.
        """
        state = self.load()
        if state is None:
            return None
        diff = sorted(k for k in expect if not _same(state.get(k), expect[k]))
        if diff:
            got = ", ".join(f"{k}={_short(state.get(k))} (now {_short(expect[k])})" for k in diff)
            raise CheckpointError(
                f"checkpoint {self.path!r} holds another computation: {got}; "
                "rerun with the original arguments, or delete the file to start over"
            )
        return state

    # ------------------------------------------------------------------ writing
    def due(self) -> bool:
        """Whether a throttled ``save`` would write now (check before building a costly state)."""
        return time.monotonic() - self._last >= self.every

    def save(self, state: Dict[str, Any], *, force: bool = False) -> bool:
        """Write ``state`` atomically; returns whether it was written.

        Raises:
            CheckpointError: ``state`` is not a dict of tensors and plain values, or has NaN/Inf.
        """
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return False
        if not isinstance(state, dict) or not all(isinstance(k, str) for k in state):
            raise CheckpointError("checkpoint state must be a dict with string keys")
        why = _bad_value(state, "state")
        if why:
            raise CheckpointError(f"refusing to write checkpoint {self.path!r}: {why}")
        blob = {
            "magic": _MAGIC,
            "fingerprint": self.fingerprint,
            "settings": json.dumps(self.settings, sort_keys=True, default=str),
            "checksum": _checksum(state),
            "state": state,
        }
        self._write(blob)
        self._last = now
        return True

    def _tmp_prefix(self) -> str:
        return f".{os.path.basename(self.path)}.ckpt-"

    def _write(self, blob: Dict[str, Any]) -> None:
        folder = os.path.dirname(os.path.abspath(self.path))
        host = socket.gethostname().replace("-", "_")
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f"{self._tmp_prefix()}{os.getpid()}@{host}-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
            _fsync_folder(folder)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _remove_stale_temporaries(self) -> None:
        """Remove this checkpoint's temporary files whose writer is gone (killed between write and rename)."""
        folder = os.path.dirname(os.path.abspath(self.path))
        prefix, here = self._tmp_prefix(), socket.gethostname().replace("-", "_")
        for name in os.listdir(folder):
            if not (name.startswith(prefix) and name.endswith(".tmp")):
                continue
            full = os.path.join(folder, name)
            pid, _, rest = name[len(prefix) :].partition("@")
            host = rest.rpartition("-")[0]
            try:
                stale = (
                    (not _alive(int(pid)))
                    if host == here
                    else time.time() - os.path.getmtime(full) > _FOREIGN_TMP_AGE_S
                )
                if stale:
                    os.unlink(full)
            except (ValueError, OSError):  # not one of ours, or already gone
                continue


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_folder(folder: str) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
