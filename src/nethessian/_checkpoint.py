"""File-backed checkpoints for long computations (dense columns, Lanczos, probes).

A ``Checkpoint`` stores a dict of tensors and plain values together with the
settings that produced it. Loading with other settings is refused, never mixed
in. Writes are atomic (temporary file + ``os.replace``), so a process killed
mid-write leaves the previous checkpoint intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from typing import Any, Dict, Optional

import torch

from .errors import CheckpointError

__all__ = ["Checkpoint"]

_MAGIC = "nethessian-checkpoint-v1"


def _fingerprint(settings: Dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def _short(x) -> str:
    s = repr(x)
    return s if len(s) <= 24 else s[:21] + "..."


class Checkpoint:
    """Save and resume the state of one long computation.

    Args:
        path: file to write. Its folder must exist and be writable.
        settings: everything that determines the result (algorithm, sizes,
            seeds, problem identity). A checkpoint written with different
            settings is refused on ``load``.
        every: minimum seconds between two writes (``save(force=True)`` ignores it).

    Algorithms call ``load()`` once at the start (``None`` when there is nothing
    to resume) and ``save(state)`` as they go; ``state`` holds tensors and
    JSON-able values.
    """

    def __init__(self, path: str | os.PathLike, settings: Dict[str, Any], every: float = 2.0):
        self.path = os.fspath(path)
        self.settings = dict(settings)
        self.fingerprint = _fingerprint(self.settings)
        self.every = float(every)
        self._last = -float("inf")
        folder = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(folder):
            raise CheckpointError(f"checkpoint folder {folder!r} does not exist; create it first")
        if not os.access(folder, os.W_OK):
            raise CheckpointError(f"checkpoint folder {folder!r} is not writable; choose another path")

    def load(self) -> Optional[Dict[str, Any]]:
        if not os.path.exists(self.path):
            return None
        try:
            blob = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # corrupt or not ours
            raise CheckpointError(
                f"{self.path!r} is not a readable nethessian checkpoint ({type(exc).__name__}: {exc}); "
                "delete it or choose another --checkpoint path"
            ) from None
        if not isinstance(blob, dict) or blob.get("magic") != _MAGIC:
            raise CheckpointError(
                f"{self.path!r} is not a nethessian checkpoint; delete it or choose another path"
            )
        if blob.get("fingerprint") != self.fingerprint:
            theirs = json.loads(blob.get("settings", "{}"))
            diff = sorted(k for k in set(theirs) | set(self.settings)
                          if str(theirs.get(k)) != str(self.settings.get(k)))
            raise CheckpointError(
                f"{self.path!r} was made with other settings (differs in: {', '.join(diff) or '?'}); "
                "rerun with the original arguments, or delete the file to start over"
            )
        return blob["state"]

    def resume(self, expect: Dict[str, Any]) -> Optional[Dict[str, Any]]:
        """The saved state, after checking it belongs to the computation described by ``expect``.

        ``expect`` names what the numbers depend on (algorithm, size, seed, the
        operator's fingerprint); any difference is refused, never mixed in.
        """
        state = self.load()
        if state is None:
            return None
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path!r} holds malformed state; delete it to start over")
        diff = sorted(k for k in expect if state.get(k) != expect[k])
        if diff:
            got = ", ".join(f"{k}={_short(state.get(k))} (now {_short(expect[k])})" for k in diff)
            raise CheckpointError(
                f"checkpoint {self.path!r} holds another computation: {got}; "
                "rerun with the original arguments, or delete the file to start over"
            )
        return state

    def due(self) -> bool:
        """Whether a throttled ``save`` would write now (check before building a costly state)."""
        return time.monotonic() - self._last >= self.every

    def save(self, state: Dict[str, Any], *, force: bool = False) -> bool:
        """Write ``state`` atomically; returns whether it was written."""
        now = time.monotonic()
        if not force and now - self._last < self.every:
            return False
        blob = {
            "magic": _MAGIC,
            "fingerprint": self.fingerprint,
            "settings": json.dumps(self.settings, sort_keys=True, default=str),
            "state": state,
        }
        folder = os.path.dirname(os.path.abspath(self.path))
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ckpt-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(blob, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self._last = now
        return True

    def clear(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)
