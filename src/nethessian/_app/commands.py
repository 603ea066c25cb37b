"""The command line's commands: load the problem once, compute, print or save the result.

Every checkpointed command puts the operator's fingerprint (weights, buffers,
train/eval modes, loss settings, data; ``op.fingerprint()``) into the
checkpoint's settings, so a checkpoint of another model or other data is refused,
never resumed into this one. ``--fsdp`` (eig, trace, density under torchrun): see
``_app/fsdp.py``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

import torch

from .. import distributed as dist
from ..errors import InputError
from . import fsdp
from .problem import Problem, load_problem
from .saving import check_target, save_result, to_json

__all__ = ["demo", "report", "hessian", "eig", "trace", "diag", "density", "check", "input_hessian"]


# -- the problem, settings and output -----------------------------------------------------------
def _emit_json(obj: Any) -> None:
    if dist.is_main():
        print(to_json(obj))


def _say(text: str) -> None:
    if dist.is_main():
        print(text)


def _progress() -> Optional[bool]:
    """Rank 0: auto (a bar on a terminal, log lines elsewhere, only for work past a few seconds)."""
    return None if dist.is_main() else False


def _no_checkpoint(args, command: str) -> None:
    if args.checkpoint:
        raise InputError(
            f"--checkpoint is not supported by `nethessian {command}` (its work is not resumable); drop the option"
        )


def _problem(args) -> Problem:
    """The problem, loaded once; ``--save`` is checked before any work so a long run cannot fail at the end.

    Under torchrun each rank takes its shard of the data (``nh.shard``); with ``--fsdp`` the
    model is sharded too and products are finite differences (``fsdp.shard_problem``).
    """
    sharded = getattr(args, "fsdp", False)
    if sharded:
        fsdp.check_args(args)
    elif getattr(args, "fd_order", None) is not None:
        raise InputError("--fd-order applies with --fsdp only (finite-difference products); drop it or add --fsdp")
    device = fsdp.device(args) if sharded else args.device
    problem = load_problem(args.problem, seed=args.seed, dtype=args.dtype, device=device, batch_size=args.batch_size)
    if dist.world_size() > 1:
        problem.data = dist.shard(problem.data)
    if sharded:
        fsdp.shard_problem(problem, args)
    if args.save:
        check_target(args.save, protected=_protected(args, problem), force=args.force)
    return problem


def _estimator_options(args, settings) -> Dict[str, Any]:
    """What every estimator command passes: seed, checkpoint, progress and ``max_memory=`` when given."""
    options = {"seed": args.seed, "checkpoint": _checkpoint(args, settings), "progress": _progress()}
    if args.max_memory is not None:
        options["max_memory"] = args.max_memory
    return options


def _protected(args, problem: Problem):
    return [problem.source, getattr(args, "checkpoint", None)]


def _settings(args, problem: Problem, **extra) -> Dict[str, Any]:
    """The arguments, and with ``--checkpoint`` or ``--save`` the operator's fingerprint."""
    s = {
        "command": args.command,
        "problem": args.problem or "two-layer",
        "params": args.params,
        "dtype": args.dtype,
        "device": args.device,
        "seed": args.seed,
        "batch_size": args.batch_size,
        "world_size": dist.world_size(),
        **extra,
    }
    if problem.operator_options:
        s["fsdp"], s["operator_options"] = True, dict(problem.operator_options)
    if args.checkpoint or args.save:
        s["operator"] = problem.fingerprint(args.params)
    return s


def _operator(args, problem: Problem):
    """The Hessian operator; before a run that may take minutes, its estimated cost on stderr (rank 0)."""
    from .cost import announce

    op = problem.operator(args.params)
    announce(args, op, problem.operator_options)
    return op


def _fd_facts(op, problem: Problem, result: Dict[str, Any], lines: list, **how) -> None:
    """Finite-difference products: their error estimate into ``result`` and the lines (``fsdp.fd_summary``)."""
    facts, more = fsdp.fd_summary(op, problem.operator_options, **how)
    if facts:
        result["finite_difference"] = facts
        lines += more


def _checkpoint(args, settings):
    if not args.checkpoint:
        return None
    from .._checkpoint import Checkpoint

    return Checkpoint(args.checkpoint, settings)


def _finish(args, problem: Problem, kind: str, result: Dict[str, Any], settings: Dict[str, Any], text: str) -> int:
    if args.save and dist.is_main():
        save_result(args.save, kind, result, settings, protected=_protected(args, problem), force=args.force)
    if args.json:
        _emit_json({"kind": kind, "settings": settings, "result": result})
    else:
        _say(text)
    return 0


# -- commands -----------------------------------------------------------------------------------
def demo(args) -> int:
    from .demo import demo_result, newton_text, print_demo

    res = demo_result(seed=args.seed)
    if args.json:
        _emit_json({k: v for k, v in res.items() if not k.startswith("_")})
    else:
        print_demo(res)
        print("\n" + newton_text(res["_problem"]))
    return 0


def _write_hessian(folder: str, H, settings: Dict[str, Any]) -> Dict[str, str]:
    import numpy as np

    from .._plots import hessian_heatmap, save as save_figure

    os.makedirs(folder, exist_ok=True)
    files = {
        "pt": os.path.join(folder, "hessian.pt"),
        "npz": os.path.join(folder, "hessian.npz"),
        "png": os.path.join(folder, "hessian.png"),
    }
    torch.save(
        {
            "dense": H.dense.cpu(),
            "names": list(H.names),
            "shapes": [list(s) for s in H.layout.shapes],
            "settings": settings,
        },
        files["pt"],
    )
    np.savez(
        files["npz"],
        dense=H.dense.detach().cpu().double().numpy(),
        names=np.array(H.names),
        shapes=np.array([json.dumps(list(s)) for s in H.layout.shapes]),
    )
    save_figure(hessian_heatmap(H), files["png"])
    return files


def hessian(args) -> int:
    from .._dense import BlockHessian

    problem = _problem(args)
    op = _operator(args, problem)
    settings = _settings(args, problem, max_bytes=args.max_bytes)
    H = BlockHessian(
        op.to_dense(max_bytes=args.max_bytes, progress=_progress(), checkpoint=_checkpoint(args, settings)), op.layout
    )
    files = _write_hessian(args.output, H, settings) if args.output and dist.is_main() else {}
    eig = H.eigvalsh()
    result = {
        "names": list(H.names),
        "shapes": [list(s) for s in H.layout.shapes],
        "P": H.shape[0],
        "eigenvalues": eig.tolist(),
        "trace": float(torch.trace(H.dense)),
        "asymmetry": H.asymmetry,
        "files": files,
    }
    blocks = ", ".join(f"{n}{list(s)}" for n, s in zip(H.names, H.layout.shapes))
    text = [
        f"Hessian: P = {H.shape[0]}, blocks {blocks}",
        f"  trace = {result['trace']:.6e}, eigenvalues in [{float(eig[0]):.4e}, {float(eig[-1]):.4e}]",
    ]
    text += [f"  wrote {p}" for p in files.values()]
    return _finish(args, problem, "hessian", result, settings, "\n".join(text))


def eig(args) -> int:
    from ..linalg._lanczos import eigenvalues

    problem = _problem(args)
    op = _operator(args, problem)
    settings = _settings(args, problem, k=args.k, which=args.which, tol=args.tol, ncv=args.ncv)
    gather = op.sharded and bool(args.save)
    if gather:
        fsdp.check_gather(op, args.k)
    res = eigenvalues(
        op,
        k=args.k,
        which=args.which,
        tol=args.tol,
        ncv=args.ncv,
        **_estimator_options(args, settings),
    )
    result = res.to_dict(eigenvectors=bool(args.save) and not gather)  # --save keeps whole eigenpairs
    if gather:  # each rank holds its slice: the whole vectors on rank 0, in parameter-name order
        result["eigenvectors"] = fsdp.gathered_eigenvectors(op, res)
    lines = [
        f"{args.k} {args.which} eigenvalues of the Hessian (P = {op.global_size}, {res.num_matvecs} products, "
        f"{'converged' if res.converged else 'NOT converged'})"
    ]
    lines += [
        f"  λ{i + 1} = {float(v):+.8e}   residual {float(r):.1e}"
        for i, (v, r) in enumerate(zip(res.eigenvalues, res.residuals))
    ]
    _fd_facts(op, problem, result, lines, scale=float(res.eigenvalues.abs().max()) if len(res.eigenvalues) else None)
    return _finish(args, problem, "eigenvalues", result, settings, "\n".join(lines))


def trace(args) -> int:
    from ..linalg._trace import trace as trace_fn

    problem = _problem(args)
    op = _operator(args, problem)
    settings = _settings(
        args, problem, method=args.method, num_matvecs=args.num_matvecs, exact=args.exact, by_block=args.by_block
    )
    res = trace_fn(
        op,
        method=args.method,
        num_matvecs=args.num_matvecs,
        exact=args.exact,
        by_block=args.by_block,
        **_estimator_options(args, settings),
    )
    lines = [f"trace of the Hessian ({res.method}, {res.num_matvecs} products): {res.value:.6e} ± {res.stderr:.2e}"]
    for name, b in (res.blocks or {}).items():
        lines.append(f"  {name:<30} {b.value:+.6e} ± {b.stderr:.2e}")
    result = res.to_dict()
    _fd_facts(op, problem, result, lines, per_probe=True)
    return _finish(args, problem, "trace", result, settings, "\n".join(lines))


def diag(args) -> int:
    from ..linalg._diagonal import diagonal

    problem = _problem(args)
    op = _operator(args, problem)
    settings = _settings(args, problem, method=args.method, num_matvecs=args.num_matvecs, chunk_size=args.chunk_size)
    res = diagonal(
        op,
        method=args.method,
        num_matvecs=args.num_matvecs,
        chunk_size=args.chunk_size,
        **_estimator_options(args, settings),
    )
    lines = [f"diagonal of the Hessian ({res.method}, {res.num_matvecs} products)"]
    for name, t in res.by_name.items():
        lines.append(f"  {name:<30} sum {float(t.sum()):+.6e}  min {float(t.min()):+.3e}  max {float(t.max()):+.3e}")
    return _finish(args, problem, "diagonal", res.to_dict(), settings, "\n".join(lines))


def density(args) -> int:
    from ..linalg._density import spectral_density

    problem = _problem(args)
    op = _operator(args, problem)
    settings = _settings(args, problem, num_probes=args.probes, lanczos_steps=args.steps)
    res = spectral_density(
        op,
        num_probes=args.probes,
        lanczos_steps=args.steps,
        **_estimator_options(args, settings),
    )
    lines = [
        f"spectral density (SLQ: {args.probes} probes × {args.steps} Lanczos steps, {res.num_matvecs} products)",
        f"  support ≈ [{float(res.nodes.min()):.4e}, {float(res.nodes.max()):.4e}]",
    ]
    result = res.to_dict()
    _fd_facts(op, problem, result, lines, scale=float(res.nodes.abs().max()))
    text = "\n".join(lines)
    if args.output and dist.is_main():
        from .._plots import density_plot, save as save_figure

        save_figure(density_plot(res), args.output)
        text += f"\n  wrote {args.output}"
    return _finish(args, problem, "density", result, settings, text)


def check(args) -> int:
    from .._check import check as check_fn

    _no_checkpoint(args, "check")
    problem = _problem(args)
    rep = check_fn(problem.model, problem.loss_fn, problem.data, args.params)
    _finish(args, problem, "check", rep.to_dict(), _settings(args, problem), str(rep))
    return 0 if rep.passed else 1


def input_hessian(args) -> int:
    from .._input_hessian import input_hessian as input_hessian_fn

    _no_checkpoint(args, "input-hessian")
    problem = _problem(args)
    settings = _settings(args, problem, at=args.at, sample_dim=args.sample_dim)
    R = input_hessian_fn(
        problem.model, problem.loss_fn, problem.data, at=args.at, params=args.params, sample_dim=args.sample_dim
    )
    return _finish(
        args, problem, "input-hessian", R.to_dict(blocks=bool(args.save)), settings, R.summary(limit=args.limit)
    )


def report(args) -> int:
    from .report import report_problem

    _no_checkpoint(args, "report")
    problem = _problem(args)
    options = {
        k: getattr(args, k)
        for k in ("dense_max_params", "num_eigs", "trace_matvecs", "density_probes", "lanczos_steps", "ncv", "sections")
    }
    paths = report_problem(problem, args.output, params=args.params, seed=args.seed, progress=_progress(), **options)
    return _finish(
        args,
        problem,
        "report",
        {"html": paths.html, "json": paths.json},
        _settings(args, problem),
        f"wrote {paths.html}\nwrote {paths.json}",
    )
