"""The model as a graph of supported steps (torch.fx), or the reason it is not one.

``torch.fx.symbolic_trace`` records the forward as nodes: placeholders (the input),
``get_attr`` (parameters and buffers used directly, as in ``x @ self.W``),
``call_module`` / ``call_function`` / ``call_method`` (the computation) and the
output. Residual additions and other branching are ordinary nodes with several
inputs; second-order backpropagation over such a graph keeps the joint Hessian of
every tensor that is still *live* (``_backprop``), so branches need no special rule.

A ``Step`` evaluates its node on given input tensors and a name → tensor state
(fixed parameters, buffers and the chosen parameters), so the same function serves
the forward pass and every derivative (``torch.func``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call
from torch.nn.modules import module as _module

from ._rules import classify_function, classify_module

__all__ = ["Plan", "Step", "Unsupported", "build_plan", "run_forward"]

_BILINEAR = (operator.matmul, torch.matmul, F.linear)


@dataclass
class Step:
    """One computation node.

    Attributes:
        name: the fx node's name (key of its output).
        label: what a user recognises: the module path or the function's name.
        kind: ``"linear"``, ``"elementwise"`` or ``"smooth"`` (see ``_rules``).
        inputs: names of the activation nodes it reads, in ``fn``'s order.
        params: the chosen parameters it reads (full names, as in the layout).
        fn: ``fn(xs, state) -> y`` on batched inputs.
    """

    name: str
    label: str
    kind: str
    inputs: Tuple[str, ...]
    params: Tuple[str, ...]
    fn: Callable
    module: Optional[nn.Module] = None
    prefix: str = ""  # the module's path plus "." (its parameters' and buffers' names in the state)


@dataclass
class Plan:
    """The supported graph: its input, steps in forward order, and output node."""

    input: str
    steps: List[Step]
    output: str


class Unsupported(Exception):
    """The model is not a graph of supported steps; ``str`` says which node and why."""


def _substitute(node: fx.Node, order: Dict[str, int]) -> Callable:
    """``(args, kwargs)`` of ``node`` with activation nodes → ``xs[i]`` and get_attr → ``state``."""

    def fill(xs, state):
        def one(a: fx.Node):
            return state[a.target] if a.op == "get_attr" else xs[order[a.name]]

        return fx.node.map_arg(node.args, one), fx.node.map_arg(node.kwargs, one)

    return fill


_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` runs forward or backward hooks, its own or global ones (then it is called)."""
    own = any(getattr(module, h, None) for h in _HOOKS)
    return own or any(getattr(_module, "_global" + h, None) for h in _HOOKS)


def _function_of(node: fx.Node, model: nn.Module, order: Dict[str, int]) -> Callable:
    fill = _substitute(node, order)
    if node.op == "call_module":
        module = model.get_submodule(node.target)
        prefix = f"{node.target}." if node.target else ""
        keys = [n for n, _ in module.named_parameters()] + [n for n, _ in module.named_buffers()]
        # functional_call swaps every tensor in and out (~0.5 ms a call here): a module holding
        # none is called as it is, an nn.Linear is F.linear on the state's tensors
        if not keys:

            def fn(xs, state):
                args, kwargs = fill(xs, state)
                return module(*args, **kwargs)

            return fn
        if type(module) is nn.Linear and len(node.args) == 1 and not node.kwargs and not _hooked(module):
            bias = prefix + "bias" if module.bias is not None else None

            def fn(xs, state):
                (x,) = fill(xs, state)[0]
                return F.linear(x, state[prefix + "weight"], None if bias is None else state[bias])

            return fn

        def fn(xs, state):
            args, kwargs = fill(xs, state)
            local = {k: state[prefix + k] for k in keys}
            return functional_call(module, local, args, kwargs)

        return fn
    if node.op == "call_method":

        def fn(xs, state):
            args, kwargs = fill(xs, state)
            return getattr(args[0], node.target)(*args[1:], **kwargs)

        return fn

    def fn(xs, state):
        args, kwargs = fill(xs, state)
        return node.target(*args, **kwargs)

    return fn


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return repr(node.target)
    return getattr(node.target, "__name__", str(node.target)) + f" (node {node.name})"


def _kind(node: fx.Node, model: nn.Module) -> str:
    if node.op == "call_module":
        kind, why = classify_module(model.get_submodule(node.target))
        if kind is None:
            raise Unsupported(f"module {node.target!r}: {why}")
        return kind
    kind = classify_function(node.target, node.op == "call_method")
    if kind is None:
        raise Unsupported(f"{_label(node)}: no second-order backpropagation rule for it")
    return kind


def _step(node: fx.Node, model: nn.Module, chosen: Sequence[str]) -> Step:
    kind = _kind(node, model)
    acts = [a for a in node.all_input_nodes if a.op != "get_attr"]
    attrs = [a.target for a in node.all_input_nodes if a.op == "get_attr"]
    order = {a.name: i for i, a in enumerate(acts)}
    if node.op == "call_module":
        prefix = f"{node.target}." if node.target else ""
        owned = [prefix + n for n, _ in model.get_submodule(node.target).named_parameters()]
    else:
        owned = [t for t in attrs if t in chosen]
    if not acts:
        raise Unsupported(f"{_label(node)}: computes on parameters alone (no rule for that)")
    if kind == "elementwise" and owned:
        raise Unsupported(f"{_label(node)}: an element-wise map of a parameter is not linear in it")
    if node.op == "call_function" and node.target in _BILINEAR and len(acts) != 1:
        raise Unsupported(f"{_label(node)}: a product of two activations (or of parameters) has no rule")
    if kind != "linear" and len(acts) != 1:
        raise Unsupported(f"{_label(node)}: a non-linear map of several inputs has no rule")
    module = model.get_submodule(node.target) if node.op == "call_module" else None
    prefix = f"{node.target}." if node.op == "call_module" and node.target else ""
    return Step(
        node.name,
        _label(node),
        kind,
        tuple(a.name for a in acts),
        tuple(p for p in owned if p in chosen),
        _function_of(node, model, order),
        module,
        prefix,
    )


def build_plan(model: nn.Module, chosen: Sequence[str]) -> Plan:
    """Trace ``model`` and check every node; raises ``Unsupported`` naming the first bad one."""
    try:
        graph = fx.Tracer().trace(model)  # the graph alone: no GraphModule (its code generation)
    except Exception as exc:  # fx raises many types for untraceable Python
        raise Unsupported(
            f"torch.fx cannot trace the model's forward ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''})"
        ) from None
    unique = {id(p): n for n, p in model.named_parameters()}
    for name, p in model.named_parameters(remove_duplicate=False):
        if unique[id(p)] != name:
            raise Unsupported(f"parameter {unique[id(p)]!r} is shared as {name!r} (weight tying)")
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise Unsupported(f"the forward takes {len(inputs)} inputs; the structured engine needs one tensor")
    steps, used = [], {}
    output: Optional[str] = None
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr"):
            continue
        if node.op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node) or out.op in ("get_attr", "placeholder"):
                raise Unsupported("the forward must return one computed tensor")
            output = out.name
            continue
        step = _step(node, model, chosen)
        for p in step.params:
            if p in used:
                raise Unsupported(f"parameter {p!r} is used by {used[p]} and {step.label} (weight tying)")
            used[p] = step.label
        steps.append(step)
    return Plan(inputs[0].name, steps, output)


def run_forward(plan: Plan, state: Dict[str, torch.Tensor], inputs: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Every node's output for a batch (no graph recorded)."""
    env = {plan.input: inputs}
    with torch.no_grad():
        for step in plan.steps:
            env[step.name] = step.fn([env[i] for i in step.inputs], state)
    return env
