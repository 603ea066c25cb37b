"""Command line: ``nethessian <command>`` (also ``python -m nethessian``).

Exit codes: 0 done, 2 usage error, 1 computation error (one line on stderr;
the traceback only with ``--debug``).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from typing import Any, Dict, List, Optional

import torch

from .. import distributed as dist
from ..errors import InputError, NetHessianError

__all__ = ["main"]


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


def _fmt_matrix(M: torch.Tensor, indent: str = "    ") -> str:
    rows = M.detach().cpu().double().reshape(M.shape[0], -1).tolist()
    return "\n".join(indent + "  ".join(f"{x:+.6f}" for x in r) for r in rows)


def demo_result(seed: int = 0) -> dict:
    """The numbers ``nethessian demo`` shows for the two-layer network."""
    from .. import examples
    from .._check import fd_hessian
    from .._dense import BlockHessian, hessian
    from .._objective import Objective
    from .._verdict import classify_point

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
        _emit_json({k: v for k, v in res.items() if not k.startswith("_")})
    else:
        _print_demo(res)
        newton = _demo_newton(args.seed)
        if newton is not None:
            print("\n" + newton)
    return 0


def _demo_newton(seed: int) -> str:
    from .. import examples
    from .._newton import newton
    model, loss_fn, data = examples.two_layer(seed=seed)
    from .._dense import hessian
    from .._verdict import classify_point
    res = newton(model, loss_fn, data)
    res.apply(model)  # our own copy of the demo network
    eig = hessian(model, loss_fn, data).eigvalsh()
    verdict = classify_point(eig, res.gradient_norms[-1], rtol=1e-6, gtol=1e-8)
    return ("damped Newton on the two-layer network (Levenberg–Marquardt damping λ = μ‖g‖; "
            "see docs/quadratic-and-newton.md)\n" + res.table() +
            "\n\neigenvalues of H at the end point\n  " + "  ".join(f"{x:+.4e}" for x in eig.tolist()) +
            f"\n  → {verdict.message}" +
            (f"\n  J = {res.value:.1e} and J = ½Σ(y − ŷ)² ≥ 0, so this is a global minimum, not isolated: the "
             f"network fits all 3 points exactly, and the {verdict.num_zero} flat directions are tangent to a whole set of exact fits"
             if verdict.kind == "degenerate" and res.value < 1e-20 else ""))


# -- the problem, settings and output ---------------------------------------------------------
def _emit_json(obj: Any) -> None:
    if dist.is_main():
        print(json.dumps(obj, indent=2, default=_jsonable))


def _jsonable(x):
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, torch.dtype):
        return str(x)
    return str(x)


def _say(text: str) -> None:
    if dist.is_main():
        print(text)


def _problem(args):
    from .problem import load_problem
    model, loss_fn, data = load_problem(args.problem, seed=args.seed, dtype=args.dtype,
                                        device=args.device, batch_size=args.batch_size)
    if dist.world_size() > 1:
        data = dist.shard(data)
    return model, loss_fn, data


def _settings(args, **extra) -> Dict[str, Any]:
    s = {"command": args.command, "problem": args.problem or "two-layer", "params": args.params,
         "dtype": args.dtype, "device": args.device, "seed": args.seed, "batch_size": args.batch_size,
         "world_size": dist.world_size(), **extra}
    if args.problem and os.path.exists(args.problem):
        with open(args.problem, "rb") as fh:
            s["problem_sha256"] = hashlib.sha256(fh.read()).hexdigest()
    return s


def _checkpoint(args, settings):
    if not args.checkpoint:
        return None
    from .._checkpoint import Checkpoint
    return Checkpoint(args.checkpoint, settings)


def _finish(args, kind: str, result: Dict[str, Any], settings: Dict[str, Any], text: str) -> int:
    if args.save and dist.is_main():
        from .saving import save_result
        save_result(args.save, kind, result, settings)
    if args.json:
        _emit_json({"kind": kind, "settings": settings, "result": result})
    else:
        _say(text)
    return 0


def _progress() -> bool:
    return sys.stderr.isatty() and dist.is_main()


def _operator(args, model, loss_fn, data):
    from ..operators._hessian import HessianOperator
    return HessianOperator(model, loss_fn, data, args.params)


# -- commands ---------------------------------------------------------------------------------
def _cmd_hessian(args) -> int:
    from .._dense import hessian
    model, loss_fn, data = _problem(args)
    settings = _settings(args, max_bytes=args.max_bytes)
    H = hessian(model, loss_fn, data, args.params, max_bytes=args.max_bytes, progress=_progress(),
                checkpoint=_checkpoint(args, settings))
    files = {}
    if args.output and dist.is_main():
        import numpy as np
        from .._plots import hessian_heatmap, save as save_figure
        os.makedirs(args.output, exist_ok=True)
        files["pt"] = os.path.join(args.output, "hessian.pt")
        torch.save({"dense": H.dense.cpu(), "names": list(H.names),
                    "shapes": [list(s) for s in H.layout.shapes], "settings": settings}, files["pt"])
        files["npz"] = os.path.join(args.output, "hessian.npz")
        np.savez(files["npz"], dense=H.dense.detach().cpu().double().numpy(), names=np.array(H.names),
                 shapes=np.array([json.dumps(list(s)) for s in H.layout.shapes]))
        files["png"] = os.path.join(args.output, "hessian.png")
        save_figure(hessian_heatmap(H), files["png"])
    eig = H.eigvalsh()
    result = {"names": list(H.names), "shapes": [list(s) for s in H.layout.shapes], "P": H.shape[0],
              "eigenvalues": eig.tolist(), "trace": float(torch.trace(H.dense)),
              "asymmetry": H.asymmetry, "files": files}
    text = [f"Hessian: P = {H.shape[0]}, blocks " + ", ".join(f"{n}{list(s)}" for n, s in zip(H.names, H.layout.shapes)),
            f"  trace = {result['trace']:.6e}, eigenvalues in [{float(eig[0]):.4e}, {float(eig[-1]):.4e}]"]
    text += [f"  wrote {p}" for p in files.values()]
    return _finish(args, "hessian", result, settings, "\n".join(text))


def _cmd_eig(args) -> int:
    from ..linalg._lanczos import eigenvalues
    model, loss_fn, data = _problem(args)
    op = _operator(args, model, loss_fn, data)
    settings = _settings(args, k=args.k, which=args.which, tol=args.tol)
    res = eigenvalues(op, k=args.k, which=args.which, tol=args.tol, seed=args.seed,
                      checkpoint=_checkpoint(args, settings), progress=_progress())
    result = res.to_dict(eigenvectors=bool(args.save))  # --save keeps whole eigenpairs
    lines = [f"{args.k} {args.which} eigenvalues of the Hessian (P = {op.shape[0]}, {res.num_matvecs} products, "
             f"{'converged' if res.converged else 'NOT converged'})"]
    lines += [f"  λ{i + 1} = {float(v):+.8e}   residual {float(r):.1e}"
              for i, (v, r) in enumerate(zip(res.eigenvalues, res.residuals))]
    return _finish(args, "eigenvalues", result, settings, "\n".join(lines))


def _cmd_trace(args) -> int:
    from ..linalg._trace import trace
    model, loss_fn, data = _problem(args)
    op = _operator(args, model, loss_fn, data)
    settings = _settings(args, method=args.method, num_matvecs=args.num_matvecs, exact=args.exact,
                         by_block=args.by_block)
    res = trace(op, method=args.method, num_matvecs=args.num_matvecs, seed=args.seed, exact=args.exact,
                by_block=args.by_block, progress=_progress())
    lines = [f"trace of the Hessian ({res.method}, {res.num_matvecs} products): {res.value:.6e} ± {res.stderr:.2e}"]
    for name, b in (res.blocks or {}).items():
        lines.append(f"  {name:<30} {b.value:+.6e} ± {b.stderr:.2e}")
    return _finish(args, "trace", res.to_dict(), settings, "\n".join(lines))


def _cmd_diag(args) -> int:
    from ..linalg._diagonal import diagonal
    model, loss_fn, data = _problem(args)
    op = _operator(args, model, loss_fn, data)
    settings = _settings(args, method=args.method, num_matvecs=args.num_matvecs, chunk_size=args.chunk_size)
    res = diagonal(op, method=args.method, num_matvecs=args.num_matvecs, seed=args.seed,
                   chunk_size=args.chunk_size, progress=_progress(), checkpoint=_checkpoint(args, settings))
    lines = [f"diagonal of the Hessian ({res.method}, {res.num_matvecs} products)"]
    for name, t in res.by_name.items():
        lines.append(f"  {name:<30} sum {float(t.sum()):+.6e}  min {float(t.min()):+.3e}  max {float(t.max()):+.3e}")
    return _finish(args, "diagonal", res.to_dict(), settings, "\n".join(lines))


def _cmd_density(args) -> int:
    from ..linalg._density import spectral_density
    model, loss_fn, data = _problem(args)
    op = _operator(args, model, loss_fn, data)
    settings = _settings(args, num_probes=args.probes, lanczos_steps=args.steps)
    res = spectral_density(op, num_probes=args.probes, lanczos_steps=args.steps, seed=args.seed,
                           checkpoint=_checkpoint(args, settings), progress=_progress())
    text = (f"spectral density (SLQ: {args.probes} probes × {args.steps} Lanczos steps, {res.num_matvecs} products)"
            f"\n  support ≈ [{float(res.nodes.min()):.4e}, {float(res.nodes.max()):.4e}]")
    if args.output and dist.is_main():
        res.plot(args.output)
        text += f"\n  wrote {args.output}"
    return _finish(args, "density", res.to_dict(), settings, text)


def _cmd_check(args) -> int:
    from .._check import check
    model, loss_fn, data = _problem(args)
    rep = check(model, loss_fn, data, args.params)
    _finish(args, "check", rep.to_dict(), _settings(args), str(rep))
    return 0 if rep.passed else 1


def _cmd_report(args) -> int:
    from .report import build_report
    model, loss_fn, data = _problem(args)
    paths = build_report(model, loss_fn, data, args.output, params=args.params, seed=args.seed,
                         problem_name=args.problem or "two-layer", progress=_progress())
    return _finish(args, "report", {"html": paths.html, "json": paths.json}, _settings(args),
                   f"wrote {paths.html}\nwrote {paths.json}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nethessian", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("problem", nargs="?", default=None,
                        help="a .py file defining model, loss_fn, data (or problem()), or a built-in: "
                             "two-layer (default), mlp, cnn")
    common.add_argument("--params", nargs="+", default=None, metavar="GLOB", help="parameter names or globs")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    common.add_argument("--dtype", default=None, choices=["float32", "float64", "float16", "bfloat16"])
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--batch-size", type=int, default=None)
    common.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    common.add_argument("--save", default=None, metavar="FILE", help="save the result with its settings")
    common.add_argument("--checkpoint", default=None, metavar="FILE", help="resume long work from FILE")
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", metavar="command")

    def add(name, func, help_):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=func)
        return p

    d = sub.add_parser("demo", help="the two-layer network: J, gradient, Hessian blocks, eigenvalues, Newton")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    d.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    d.set_defaults(func=_cmd_demo)
    p = add("report", _cmd_report, "self-contained HTML report + JSON")
    p.add_argument("-o", "--output", default="nethessian-report", help="output folder")
    p = add("hessian", _cmd_hessian, "dense Hessian: .pt, .npz and a heatmap")
    p.add_argument("-o", "--output", default=None, help="output folder")
    p.add_argument("--max-bytes", type=int, default=None)
    p = add("eig", _cmd_eig, "extreme eigenvalues (Lanczos)")
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--which", default="largest", choices=["largest", "smallest", "both", "magnitude"])
    p.add_argument("--tol", type=float, default=1e-3)
    p = add("trace", _cmd_trace, "trace estimate with its standard error")
    p.add_argument("--method", default="hutch++", choices=["hutchinson", "hutch++", "xtrace"])
    p.add_argument("--num-matvecs", type=int, default=None)
    p.add_argument("--exact", action="store_true")
    p.add_argument("--by-block", action="store_true")
    p = add("diag", _cmd_diag, "diagonal of the Hessian")
    p.add_argument("--method", default="exact", choices=["exact", "estimate"])
    p.add_argument("--num-matvecs", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=None)
    p = add("density", _cmd_density, "spectral density (stochastic Lanczos quadrature)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("-o", "--output", default=None, help="PNG to write")
    add("check", _cmd_check, "check the Hessian of your model against finite differences")
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its own message
        return int(exc.code or 0)
    if args.command is None:
        args = parser.parse_args(["demo"] + (["--debug"] if args.debug else []))
    try:
        dist.init_from_env()
        return args.func(args)
    except BrokenPipeError:  # the reader went away (e.g. `nethessian demo | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (UsageError, InputError) as exc:
        if args.debug:
            raise
        print(f"nethessian: error: {exc}", file=sys.stderr)
        return 2
    except (NetHessianError, RuntimeError, OSError) as exc:
        if args.debug:
            raise
        print(f"nethessian: {type(exc).__name__}: {exc}", file=sys.stderr)
        if isinstance(exc, dist.DistributedError):
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(1)  # a dead or hung peer leaves collectives pending; gloo's teardown would abort
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
