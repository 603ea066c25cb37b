"""Command line: ``nethessian <command>`` (also ``python -m nethessian``).

Exit codes: 0 done, 2 usage error, 1 computation error (one line on stderr;
the traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

import torch

from .errors import InputError, NetHessianError

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


def _fmt_matrix(M: torch.Tensor, indent: str = "    ") -> str:
    rows = M.detach().cpu().double().reshape(M.shape[0], -1).tolist()
    return "\n".join(indent + "  ".join(f"{x:+.6f}" for x in r) for r in rows)


def demo_result(seed: int = 0) -> dict:
    """The numbers ``nethessian demo`` shows for the two-layer network."""
    from . import examples
    from .check import fd_hessian
    from .dense import BlockHessian, hessian
    from .objective import Objective
    from .verdict import classify_point

    model, loss_fn, data = examples.two_layer(seed=seed)
    obj = Objective(model, loss_fn, data)
    J, g = obj.value_and_grad()
    H = hessian(model, loss_fn, data)
    fd = BlockHessian(fd_hessian(obj), H.layout)
    eig = H.eigvalsh()
    verdict = classify_point(eig, float(g.norm()))
    blocks = {"a": ("W1", "W1"), "b": ("W1", "W2"), "c": ("W2", "W2")}
    fd_err = {}
    for key, (r, c) in blocks.items():
        diff = (H[r, c] - fd[r, c]).abs().max()
        fd_err[key] = float(diff / H[r, c].abs().max().clamp_min(1e-300))
    return {
        "seed": seed, "J": J, "gradient": {n: t.tolist() for n, t in H.layout.unflatten(g).items()},
        "gradient_norm": float(g.norm()),
        "blocks": {k: {"of": f"d2J/d{r} d{c}", "shape": list(H[r, c].shape), "values": H[r, c].tolist()}
                   for k, (r, c) in blocks.items()},
        "eigenvalues": eig.tolist(), "verdict": verdict.to_dict(), "fd_relative_difference": fd_err,
        "_H": H, "_g": g,
    }


def _print_demo(res: dict) -> None:
    H, g = res["_H"], res["_g"]
    p = print
    p("nethessian demo: the 2-3-1 sigmoid network (no biases), J = ½ Σ (y − ŷ)²")
    p("  z2 = X W1, a2 = f(z2), z3 = a2 W2, ŷ = f(z3); X = sleep/study hours scaled by column max,")
    p(f"  y = test scores / 100; weights drawn with seed {res['seed']}\n")
    p(f"J = {res['J']:.10f}\n")
    p(f"gradient (‖g‖ = {res['gradient_norm']:.3e})")
    for name, t in H.layout.unflatten(g).items():
        p(f"  dJ/d{name}  shape {tuple(t.shape)}\n{_fmt_matrix(t)}")
    p("\nHessian blocks (parameters flattened row-major)")
    for key, b in res["blocks"].items():
        r, c = b["of"].replace("d2J/d", "").split(" d")
        p(f"  {key} = ∂²J/∂{r}∂{c}" if r != c else f"  {key} = ∂²J/∂{r}²", f" shape {tuple(b['shape'])}")
        p(_fmt_matrix(H[r, c]))
    p("\neigenvalues of H (ascending)")
    p("  " + "  ".join(f"{x:+.4e}" for x in res["eigenvalues"]))
    p(f"  → {res['verdict']['message']}")
    p("\nlargest relative difference from central finite differences (max |H − FD| / max |H|)")
    for key, err in res["fd_relative_difference"].items():
        p(f"  {key}: {err:.1e}")


def _cmd_demo(args) -> int:
    res = demo_result(seed=args.seed)
    if args.json:
        print(json.dumps({k: v for k, v in res.items() if not k.startswith("_")}, indent=2))
    else:
        _print_demo(res)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nethessian", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="command")
    d = sub.add_parser("demo", help="the two-layer network: J, gradient, Hessian blocks, eigenvalues")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    d.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    d.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse prints its own message
        return int(exc.code or 0)
    if args.command is None:
        args = parser.parse_args(["demo"] + (["--debug"] if args.debug else []))
    try:
        return args.func(args)
    except (UsageError, InputError) as exc:
        if args.debug:
            raise
        print(f"nethessian: error: {exc}", file=sys.stderr)
        return 2
    except (NetHessianError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"nethessian: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
