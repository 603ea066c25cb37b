"""ParamLayout: the map between named parameter tensors and one flat vector.

Operators and ``linalg`` work on flat ``(P,)`` vectors; everything a user sees
(blocks, diagonals, eigenvectors) is keyed by parameter name through one layout.
Parameters are flattened row-major, in the order of ``names``.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import Dict, Iterable, Mapping, Optional, Sequence, Tuple

import torch

from .errors import InputError

__all__ = ["ParamLayout", "select_parameters"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of parameters inside a flat vector.

    >>> lay = ParamLayout(("W1", "W2"), ((2, 3), (3, 1)))
    >>> lay.size, lay.offsets, lay.slice("W2")
    (9, (0, 6), slice(6, 9, None))
    >>> {k: tuple(v.shape) for k, v in lay.unflatten(torch.arange(9.)).items()}
    {'W1': (2, 3), 'W2': (3, 1)}
    """

    names: Tuple[str, ...]
    shapes: Tuple[Tuple[int, ...], ...]

    def __post_init__(self):
        object.__setattr__(self, "names", tuple(self.names))
        object.__setattr__(self, "shapes", tuple(tuple(int(d) for d in s) for s in self.shapes))
        if len(self.names) != len(self.shapes):
            raise InputError("ParamLayout needs one shape per name")
        if len(set(self.names)) != len(self.names):
            raise InputError(f"duplicate parameter names in {self.names}")

    @classmethod
    def from_tensors(cls, named: Mapping[str, torch.Tensor]) -> "ParamLayout":
        return cls(tuple(named), tuple(tuple(t.shape) for t in named.values()))

    @property
    def numels(self) -> Tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @property
    def offsets(self) -> Tuple[int, ...]:
        out, acc = [], 0
        for n in self.numels:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def size(self) -> int:
        return sum(self.numels)

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise InputError(f"unknown parameter name {name!r}; known names: {', '.join(self.names)}") from None

    def slice(self, name: str) -> slice:
        i = self.index(name)
        start = self.offsets[i]
        return slice(start, start + self.numels[i])

    def shape(self, name: str) -> Tuple[int, ...]:
        return self.shapes[self.index(name)]

    def unflatten(self, flat: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Split a ``(P,)`` or ``(P, k)`` tensor into named views of natural shape (+ ``(k,)``)."""
        if flat.shape[0] != self.size:
            raise InputError(f"vector has length {flat.shape[0]} but the parameters have {self.size} entries")
        tail = tuple(flat.shape[1:])
        parts = torch.split(flat, list(self.numels), dim=0)
        return {n: p.reshape(s + tail) for n, p, s in zip(self.names, parts, self.shapes)}

    def flatten(self, named: Mapping[str, torch.Tensor], *, strict: bool = True) -> torch.Tensor:
        """Concatenate named tensors (natural shape) into one flat vector in layout order.

        With ``strict=False`` missing names are filled with zeros.
        """
        unknown = set(named) - set(self.names)
        if unknown:
            raise InputError(f"unknown parameter name(s) {sorted(unknown)}; known names: {', '.join(self.names)}")
        ref = next(iter(named.values()), None)
        parts = []
        for n, s in zip(self.names, self.shapes):
            if n in named:
                t = torch.as_tensor(named[n])
                if tuple(t.shape) != s:
                    raise InputError(f"{n!r} has shape {tuple(t.shape)}, expected {s}")
                parts.append(t.reshape(-1))
            elif strict:
                raise InputError(f"missing parameter {n!r}; pass every name or use strict=False")
            else:
                parts.append(torch.zeros(math.prod(s), dtype=ref.dtype, device=ref.device))
        return torch.cat(parts)

    def subset(self, names: Iterable[str]) -> "ParamLayout":
        names = list(names)
        return ParamLayout(tuple(names), tuple(self.shape(n) for n in names))

    def indices(self, names: Iterable[str]) -> torch.Tensor:
        """Flat indices (into this layout) of the given names, in their order."""
        idx = [torch.arange(self.slice(n).start, self.slice(n).stop) for n in names]
        return torch.cat(idx) if idx else torch.zeros(0, dtype=torch.long)


def select_parameters(
    model: torch.nn.Module, params: Optional[Sequence[str] | str] = None
) -> Dict[str, torch.nn.Parameter]:
    """The named parameters a user asked for, in the model's own order.

    ``params=None`` takes every parameter with ``requires_grad``; otherwise each
    entry is an exact name or a glob pattern (``"0.*"``, ``"*.weight"``). Tied
    parameters appear once, under their first name.
    """
    named = dict(model.named_parameters())
    if params is None:
        chosen = {n: p for n, p in named.items() if p.requires_grad}
        if not chosen:
            raise InputError(
                "the model has no parameter with requires_grad=True; pass params=[...] to choose parameters explicitly"
            )
        return chosen
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, (list, tuple, set, frozenset)) or not all(isinstance(p, str) for p in params):
        raise InputError(
            f"params must be None or a list of parameter names / glob patterns (strings), got {params!r}; "
            f"e.g. params=['{next(iter(named), '0.weight')}'] or params=['*.weight']"
        )
    if len(params) == 0:
        raise InputError("params=[] selects no parameter; pass None for all of them, or names/globs")
    chosen_names = set()
    for pat in params:
        hits = [n for n in named if n == pat or fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise InputError(
                f"no parameter matches {pat!r}; the model's parameters are: {', '.join(named) or '(none)'}"
            )
        chosen_names.update(hits)
    return {n: p for n, p in named.items() if n in chosen_names}
