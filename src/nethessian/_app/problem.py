"""Load a problem for the command line: a built-in name or a Python file.

A problem file defines ``model``, ``loss_fn`` and ``data`` at module level, or
a function ``problem()`` returning them.
"""

from __future__ import annotations

import importlib.util
import os
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch

from .. import examples
from .._checks import as_int
from ..errors import InputError

__all__ = ["Problem", "load_problem", "parse_device", "parse_dtype"]

BUILTIN_NAMES = {"two-layer": "the two-layer 2-3-1 sigmoid network (sleep, study → test score)"}
BUILTIN_DESCRIPTIONS = {
    "two-layer": "ŷ = f(f(X W1) W2) with f the sigmoid and no biases; J = ½ Σₙ (yₙ − ŷₙ)². X = hours of "
    "(sleep, study) of 3 students, each column divided by its maximum; y = test scores / 100. "
    "W1 is 2×3 and W2 is 3×1: θ has 9 entries.",
}


@dataclass(eq=False)
class Problem:
    """One problem, identified once: the user's objects, where they came from, one operator per ``params``.

    Attributes:
        model, loss_fn, data: the problem (see :class:`~nethessian.Objective`).
        name: a one-line name (the file, the built-in's description; default: model and loss types).
        source: absolute path of the problem file (``None`` for a built-in or objects given in Python).
        builtin: the built-in's name (``"two-layer"``, ``"mlp"``, ``"cnn"``), else ``None``.
        description: a paragraph about the problem, when known.
        seed: the seed the built-in's weights were drawn with.
        operator_options: keywords of every ``HessianOperator`` built by :meth:`operator`
            (``--fsdp``: ``method="finite-difference"``, ``fd_order``, ``fd_error``).
    """

    model: Any
    loss_fn: Any
    data: Any
    name: Optional[str] = None
    source: Optional[str] = None
    builtin: Optional[str] = None
    description: Optional[str] = None
    seed: int = 0
    operator_options: Dict[str, Any] = field(default_factory=dict)
    _operators: Dict[Optional[Tuple[str, ...]], Any] = field(default_factory=dict, repr=False)

    def operator(self, params: Optional[Sequence[str]] = None):
        """The Hessian operator for ``params`` (with :attr:`operator_options`), built (and validated) once."""
        from ..operators._hessian import HessianOperator

        key = None if params is None else tuple(params)
        if key not in self._operators:
            self._operators[key] = HessianOperator(self.model, self.loss_fn, self.data, params, **self.operator_options)
        return self._operators[key]

    def quadratic(self, params: Optional[Sequence[str]] = None):
        """The :class:`~nethessian.QuadraticModel` on :meth:`operator` (no second objective)."""
        from .._quadratic import QuadraticModel

        q = object.__new__(QuadraticModel)  # QuadraticModel has no public constructor from an operator
        q._set_operator(self.operator(params))
        return q

    def objective(self, params: Optional[Sequence[str]] = None):
        """The one :class:`~nethessian.Objective` behind :meth:`operator`."""
        return self.operator(params).objective

    def fingerprint(self, params: Optional[Sequence[str]] = None) -> str:
        """sha256 of everything the numbers depend on (weights, buffers, modes, loss, data, operator).

        Under torch.distributed each rank holds its own shard, so the ranks' fingerprints are
        combined (in rank order) into one that every rank shares: one checkpoint file, one identity.
        """
        from .. import distributed as dist
        from .._fingerprint import Hasher

        op = self.operator(params)
        local = op.fingerprint()
        if not dist.is_active():
            return local
        ranks = dist._gather_text(local, "the problem's fingerprint", op.device)
        return Hasher().text("ranks").value(ranks).hexdigest()

    def describe(self) -> Dict[str, Any]:
        """Name, description and the model's and loss's types, for the report and saved results."""
        loss = self.loss_fn
        loss_name = (
            type(loss).__name__
            if hasattr(loss, "forward") or not callable(loss)
            else getattr(loss, "__name__", type(loss).__name__)
        )
        name = self.name or f"{type(self.model).__name__} with {loss_name}"
        return {
            "name": name,
            "description": self.description,
            "source": self.source,
            "builtin": self.builtin,
            "seed": self.seed,
            "model": type(self.model).__name__,
            "loss": loss_name,
            "model_repr": repr(self.model),
        }


#: the dtypes the command line offers (``--dtype`` casts the model). A half-precision model is
#: stored in bfloat16/float16 but the library computes on a float32 copy of its parameters
#: (its rounding would swamp second derivatives): the numbers are those of the rounded weights.
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def _where(exc: BaseException, path: str) -> str:
    """``"FILE, line N: code"`` of the deepest frame of ``exc`` in the problem file, else ``FILE``."""
    target = os.path.realpath(path)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if os.path.realpath(f.filename) == target]
    if not frames:
        return path
    return f"{path}, line {frames[-1].lineno}" + (f": {frames[-1].line}" if frames[-1].line else "")


def _run_user_code(path: str, what: str, fn: Callable[[], Any]) -> Any:
    """Run the problem file's code; any failure (``sys.exit`` included) becomes one clear InputError."""
    try:
        return fn()
    except SystemExit as exc:
        raise InputError(
            f"problem file called sys.exit({exc.code!r}) at {_where(exc, path)}; "
            "a problem file must define model, loss_fn and data, not exit"
        ) from None
    except Exception as exc:
        raise InputError(f"problem file {what} at {_where(exc, path)} — {type(exc).__name__}: {exc}") from None


def _from_file(path: str):
    if not os.path.exists(path):
        raise InputError(f"problem file {path!r} does not exist")
    if os.path.isdir(path) or not path.endswith(".py"):
        raise InputError(
            f"problem {path!r} is not a Python file: give a .py file that defines model, "
            "loss_fn and data (or problem()), or a built-in: " + ", ".join(examples.BUILTINS)
        )
    name = "nethessian_problem_" + os.path.splitext(os.path.basename(path))[0].replace("-", "_")
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise InputError(f"problem file {path!r} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    _run_user_code(path, "failed to import", lambda: spec.loader.exec_module(module))
    if hasattr(module, "problem"):
        out = _run_user_code(path, "problem() failed", module.problem)
        if not (isinstance(out, (tuple, list)) and len(out) == 3):
            raise InputError(f"{path}: problem() must return (model, loss_fn, data)")
        return tuple(out)
    missing = [n for n in ("model", "loss_fn", "data") if not hasattr(module, n)]
    if missing:
        raise InputError(
            f"{path} lacks {', '.join(missing)}: define model, loss_fn and data, or a function problem() returning them"
        )
    return module.model, module.loss_fn, module.data


def _rebatch(data, batch_size: int):
    batch_size = as_int("--batch-size", batch_size, minimum=1)
    if not (isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[1], torch.Tensor)):
        raise InputError("--batch-size needs data given as one (inputs, targets) pair")
    X, y = data
    return [(X[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def load_problem(
    spec: Optional[str],
    *,
    seed: int = 0,
    dtype: Optional[str] = None,
    device: Optional[str] = None,
    batch_size: Optional[int] = None,
) -> Problem:
    """The :class:`Problem` named by ``spec``: a built-in (two-layer, mlp, cnn) or a ``.py`` file.

    A problem file is executed as Python code: load only files you trust.

    Raises:
        InputError: unknown name, missing or non-Python file, or the file failed (one line, with
            the file's line number; ``sys.exit`` in the file included).
    """
    spec = spec or "two-layer"
    if spec in examples.BUILTINS:
        model, loss_fn, data = examples.BUILTINS[spec](seed=seed)
        source, name = None, BUILTIN_NAMES.get(spec, spec)
    elif spec.endswith(".py") or os.path.sep in spec or os.path.exists(spec):
        model, loss_fn, data = _from_file(spec)
        source, name = os.path.abspath(spec), spec
    else:
        raise InputError(f"unknown problem {spec!r}: give a .py file or one of {', '.join(examples.BUILTINS)}")
    dt, dev = parse_dtype(dtype), parse_device(device)
    if dt is not None or dev is not None:
        model = model.to(device=dev, dtype=dt)
    if batch_size is not None:
        data = _rebatch(data, batch_size)
    return Problem(
        model,
        loss_fn,
        data,
        name=name,
        source=source,
        builtin=None if source else spec,
        description=None if source else BUILTIN_DESCRIPTIONS.get(spec),
        seed=seed,
    )
