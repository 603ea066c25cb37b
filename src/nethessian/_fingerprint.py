"""Fingerprints: a sha256 of everything an objective's numbers depend on.

A checkpoint made for one objective must not be resumed for another, so the
fingerprint covers θ₀, the fixed (unselected) parameters, the buffers, the
train/eval flag of every module, the loss (its type, reduction and settings
such as ``weight``, ``ignore_index``, ``label_smoothing``), the batch
reduction, and the data (the bytes of every tensor in every batch).

Hashing is over exact bytes (with dtype and shape), so two tensors that differ
in one bit have different fingerprints.
"""
from __future__ import annotations

import functools
import hashlib
import numbers
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["Hasher", "loss_description"]


class Hasher:
    """An incremental sha256 over tensors and plain values (numbers, strings, containers)."""

    def __init__(self):
        self._h = hashlib.sha256()

    def text(self, s: str) -> "Hasher":
        b = s.encode("utf-8")
        self._h.update(len(b).to_bytes(8, "little") + b)
        return self

    def tensor(self, t: torch.Tensor) -> "Hasher":
        """Dtype, shape and the exact bytes of ``t`` (copied to the CPU)."""
        t = t.detach()
        self.text(f"tensor {t.dtype} {tuple(t.shape)}")
        flat = t.to("cpu").contiguous().reshape(-1)
        if flat.is_complex():
            flat = torch.view_as_real(flat).reshape(-1)
        self._h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        return self

    def value(self, obj: Any) -> "Hasher":
        """Any nesting of tensors, numbers, strings, None, tuples, lists and dicts."""
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj)
        if isinstance(obj, bytes):
            self.text(f"bytes[{len(obj)}]")
            self._h.update(obj)
            return self
        if obj is None or isinstance(obj, (bool, str, numbers.Number, torch.dtype, torch.device)):
            return self.text(f"{type(obj).__name__}:{obj!r}")
        if isinstance(obj, (tuple, list)):
            self.text(f"{type(obj).__name__}[{len(obj)}]")
            for x in obj:
                self.value(x)
            return self
        if isinstance(obj, dict):
            self.text(f"dict[{len(obj)}]")
            for k in sorted(obj, key=repr):
                self.text(repr(k)).value(obj[k])
            return self
        return self.text(_name(obj))

    def named(self, items: Iterable) -> "Hasher":
        for name, t in items:
            self.text(name).value(t)
        return self

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _name(obj) -> str:
    """A stable name for a callable or an opaque object (no memory addresses)."""
    kind = obj if isinstance(obj, type) else type(obj)
    qual = getattr(obj, "__qualname__", None) or kind.__qualname__
    return f"{getattr(obj, '__module__', kind.__module__)}.{qual}"


def loss_description(h: Hasher, loss_fn) -> Hasher:
    """Hash what decides the loss's numbers: its type and its plain / tensor settings.

    For an ``nn.Module`` loss: its public attributes (``reduction``, ``ignore_index``,
    ``label_smoothing``, ...), buffers (``weight``, ``pos_weight``) and parameters.
    For ``functools.partial``: the function and the bound arguments. For a plain
    function: its qualified name, code, defaults and the plain values it closes over.
    """
    h.text(_name(loss_fn))
    if isinstance(loss_fn, functools.partial):
        loss_description(h, loss_fn.func)
        return h.value(list(loss_fn.args)).value(dict(loss_fn.keywords))
    if isinstance(loss_fn, nn.Module):
        public = {k: v for k, v in vars(loss_fn).items() if not k.startswith("_")}
        h.value(public)
        h.named(loss_fn.named_buffers()).named(loss_fn.named_parameters())
        return h.named((n, float(m.training)) for n, m in loss_fn.named_modules())
    code = getattr(loss_fn, "__code__", None)
    if code is not None:
        h.value(code.co_code).value([c for c in code.co_consts if _plain(c)])
        h.value([d for d in (getattr(loss_fn, "__defaults__", None) or ()) if _plain(d)])
        cells = getattr(loss_fn, "__closure__", None) or ()
        h.value([_cell(c) for c in cells])
    return h


def _plain(x) -> bool:
    return x is None or isinstance(x, (bool, str, numbers.Number, torch.Tensor, bytes))


def _cell(cell):
    try:
        v = cell.cell_contents
    except ValueError:  # an empty cell
        return None
    return v if _plain(v) else _name(v)
