"""What every rank must share, as readable ``{what: value}`` facts (compared by ``distributed``).

Tensors are described by shape, dtype, device type and a sha256 of their exact
bytes, so two ranks whose batch-norm statistics differ in one bit disagree, and
the message still says which buffer it is.
"""

from __future__ import annotations

import math
from typing import Dict

import torch

from ._fingerprint import Hasher, loss_description

__all__ = ["layout_facts", "plain", "state_facts", "tensor_fact"]


def plain(value) -> bool:
    """A number, string, bool, ``None``, dtype, or a tuple/list of them (compared by ``repr``)."""
    if isinstance(value, (tuple, list)):
        return all(plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def tensor_fact(t: torch.Tensor) -> str:
    """``"(5,) float64 cpu sha256:…"``: shape, dtype, device type and a hash of the bytes."""
    digest = Hasher().tensor(t).hexdigest()[:16]
    return f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')} {t.device.type} sha256:{digest}"


def layout_facts(names, shapes, dtype, device) -> Dict[str, str]:
    """Dtype, device type, the parameter count and each selected parameter's shape."""
    facts = {
        "dtype": str(dtype).replace("torch.", ""),
        "device type": torch.device(device).type,
        "number of parameters": f"{sum(math.prod(s) for s in shapes)} in {len(names)} tensors",
    }
    facts.update({f"parameter {n}": f"shape {tuple(s)}" for n, s in zip(names, shapes)})
    return facts


def mode_facts(modes) -> Dict[str, str]:
    """Train/eval mode from ``(name, training)`` pairs: "all train", "all eval" or the modules in eval mode."""
    named = list(modes)
    evals = [n or "(the model)" for n, training in named if not training]
    mode = "all train" if not evals else "all eval" if len(evals) == len(named) else "eval: " + ", ".join(evals)
    return {"train/eval mode": mode}


def loss_facts(loss_fn) -> Dict[str, str]:
    """The loss: its type, its plain settings and tensors one by one, and a hash of all that decides it."""
    module = isinstance(loss_fn, torch.nn.Module)
    facts = {
        "loss": type(loss_fn).__qualname__ if module else getattr(loss_fn, "__qualname__", type(loss_fn).__qualname__)
    }
    if module:
        facts.update(
            {
                f"loss.{k}": repr(v)
                for k, v in sorted(vars(loss_fn).items())
                if not k.startswith("_") and k != "training" and plain(v)
            }
        )
        facts.update({f"loss.{n}": tensor_fact(t) for n, t in loss_fn.named_buffers()})
    facts["loss settings"] = "sha256:" + loss_description(Hasher(), loss_fn).hexdigest()[:16]
    return facts


def state_facts(objective) -> Dict[str, str]:
    """Everything an objective's numbers depend on except the data (each rank holds its own shard).

    Parameter names, shapes, dtype, device type and values (θ₀); the fixed
    (unselected) parameters; the buffers; the train/eval mode of every module;
    the loss and the batch reduction.
    """
    facts = layout_facts(objective.layout.names, objective.layout.shapes, objective.dtype, objective.device)
    facts["values of the selected parameters"] = tensor_fact(objective.theta0)
    facts.update({f"fixed parameter {n}": tensor_fact(t) for n, t in objective._fixed.items()})
    facts.update({f"buffer {n}": tensor_fact(t) for n, t in objective._buffers.items()})
    facts.update(mode_facts(objective._modes))
    facts.update(loss_facts(objective.loss_fn))
    facts["reduction"] = repr(getattr(objective, "reduction", None))  # None: not resolved yet
    return facts
