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
import types
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


def loss_description(h: Hasher, loss_fn, _depth: int = 0, _seen=None) -> Hasher:
    """Hash what decides the loss's numbers: its type and its plain / tensor settings.

    For an ``nn.Module`` loss: its public attributes (``reduction``, ``ignore_index``,
    ``label_smoothing``, ...), buffers (``weight``, ``pos_weight``) and parameters.
    For ``functools.partial``: the function and the bound arguments. For a plain
    function: its qualified name, code, defaults, the values it closes over **and the
    globals its code reads** (a temperature ``T`` set at module level, a loss object
    whose ``reduction`` was changed) — followed into the objects and functions they
    name, three levels deep. Modules (``torch``, ``F``) count by name only.
    """
    seen = set() if _seen is None else _seen
    if id(loss_fn) in seen or _depth > 3:
        return h.text(_name(loss_fn))
    seen.add(id(loss_fn))
    h.text(_name(loss_fn))
    if isinstance(loss_fn, functools.partial):
        loss_description(h, loss_fn.func, _depth + 1, seen)
        return _values(h, list(loss_fn.args) + sorted(loss_fn.keywords.items()), _depth, seen)
    if isinstance(loss_fn, nn.Module):
        public = {k: v for k, v in vars(loss_fn).items() if not k.startswith("_")}
        _values(h, sorted(public.items()), _depth, seen)
        h.named(loss_fn.named_buffers()).named(loss_fn.named_parameters())
        return h.named((n, float(m.training)) for n, m in loss_fn.named_modules())
    code = getattr(loss_fn, "__code__", None)
    if code is None:  # a callable object: its public state
        state = (
            {k: v for k, v in vars(loss_fn).items() if not k.startswith("_")} if hasattr(loss_fn, "__dict__") else {}
        )
        return _values(h, sorted(state.items()), _depth, seen)
    h.value(code.co_code).value([c for c in code.co_consts if _plain(c)])
    _values(h, list(getattr(loss_fn, "__defaults__", None) or ()), _depth, seen)
    _values(h, [_cell(c) for c in (getattr(loss_fn, "__closure__", None) or ())], _depth, seen)
    glob = getattr(loss_fn, "__globals__", {})
    return _values(h, [(n, glob[n]) for n in sorted(_global_names(code)) if n in glob], _depth, seen)


def _global_names(code) -> set:
    """The global names a code object (and the functions defined inside it) reads."""
    names = set(code.co_names)
    for c in code.co_consts:
        if hasattr(c, "co_names"):
            names |= _global_names(c)
    return names


def _values(h: Hasher, items, depth: int, seen) -> Hasher:
    """Hash plain values as they are, and follow callables and objects (``loss_description``)."""
    for item in items:
        key, v = item if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) else (None, item)
        if key is not None:
            h.text(key)
        if _plain(v) or (isinstance(v, (list, tuple)) and all(_plain(x) for x in v)):
            h.value(v)
        elif isinstance(v, dict):
            _values(h, sorted(((str(k), x) for k, x in v.items()), key=lambda kv: kv[0]), depth + 1, seen)
        elif isinstance(v, (list, tuple)):
            _values(h, list(v), depth + 1, seen)
        elif isinstance(v, types.ModuleType) or isinstance(v, type):
            h.text(_name(v) if isinstance(v, type) else v.__name__)
        else:
            loss_description(h, v, depth + 1, seen)
    return h


def _plain(x) -> bool:
    return x is None or isinstance(x, (bool, str, numbers.Number, torch.Tensor, bytes))


def _cell(cell):
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell
        return None
