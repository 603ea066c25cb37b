"""Command line: ``nethessian <command>`` (also ``python -m nethessian``).

Exit codes: 0 done, 2 usage error, 1 computation error (one line on stderr;
the traceback only with ``--debug``). A problem file is executed as Python code:
run only files you trust. Under ``torchrun`` every rank takes its shard of the data;
with ``--fsdp`` (eig, trace, density) the model is sharded with FSDP2 too and the
products are finite differences of its gradients (see ``_app/fsdp.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from typing import List, Optional

from .. import distributed as dist
from ..errors import InputError
from . import commands
from .problem import DTYPES

__all__ = ["main", "build_parser"]


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "problem",
        nargs="?",
        default=None,
        help="a .py file defining model, loss_fn, data (or problem()), or a built-in: "
        "two-layer (default), mlp, cnn. The file is executed as Python code: use "
        "files you trust",
    )
    common.add_argument("--params", nargs="+", default=None, metavar="GLOB", help="parameter names or globs")
    common.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    common.add_argument(
        "--dtype",
        default=None,
        choices=list(DTYPES),
        help="cast the model; a bfloat16/float16 model is computed on a float32 copy of its (rounded) weights",
    )
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--batch-size", type=int, default=None)
    common.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    common.add_argument("--save", default=None, metavar="FILE", help="save the result with its settings")
    common.add_argument(
        "--force", action="store_true", help="let --save overwrite an existing file that is not a nethessian result"
    )
    common.add_argument(
        "--checkpoint",
        default=None,
        metavar="FILE",
        help="resume long work from FILE (hessian, eig, trace, diag, density)",
    )
    _fsdp_flags(common)
    _shared_flags(common)
    return common


def _fsdp_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fsdp",
        action="store_true",
        help="eig, trace, density under torchrun (2+ processes): shard the model with FSDP2 "
        "(fully_shard per block of every nn.ModuleList, then the root) and the data over the ranks; "
        "Hessian products are finite differences of the model's own gradients, with their "
        "estimated error printed. Run: torchrun --nproc-per-node N -m nethessian eig problem.py --fsdp",
    )
    p.add_argument(
        "--fd-order",
        type=int,
        default=None,
        choices=[2, 4],
        help="with --fsdp: the finite-difference stencil, 2 or 4 points (default: 4 for float32 "
        "parameters, 2 for float64); every product costs 4 gradients with the error estimate",
    )


def _shared_flags(p: argparse.ArgumentParser, defaults: bool = False) -> None:
    """Flags accepted before or after the command (``--debug``, ``--dist-timeout``)."""
    keep = {} if defaults else {"default": argparse.SUPPRESS}
    p.add_argument("--debug", action="store_true", help="show tracebacks", **({"default": False} if defaults else keep))
    p.add_argument(
        "--dist-timeout",
        type=float,
        metavar="SECONDS",
        dest="dist_timeout",
        help="torch.distributed timeout under torchrun (default 300)",
        **({"default": 300.0} if defaults else keep),
    )


def _memory_flag(p) -> None:
    p.add_argument(
        "--max-memory",
        type=int,
        default=None,
        metavar="BYTES",
        help="refuse a run whose per-rank vector memory (Krylov basis, probes, work vectors; "
        "not the products' own) would exceed this many bytes",
    )


def _eig_flags(p) -> None:
    p.add_argument("-k", type=int, default=5)
    p.add_argument("--which", default="largest", choices=["largest", "smallest", "both", "magnitude"])
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument(
        "--ncv",
        type=int,
        default=None,
        help="Lanczos basis size, the most vectors of P held (default max(2k+1, 20)); lower it on a large model",
    )
    _memory_flag(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nethessian", description=__doc__.splitlines()[0])
    _shared_flags(parser, defaults=True)
    common = _common_parser()
    sub = parser.add_subparsers(dest="command", metavar="command")

    def add(name, func, help_):
        p = sub.add_parser(name, parents=[common], help=help_)
        p.set_defaults(func=func)
        return p

    d = sub.add_parser("demo", help="the two-layer network: J, gradient, Hessian blocks, eigenvalues, Newton")
    d.add_argument("--seed", type=int, default=0, help="seed of the weights (default 0)")
    d.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    _shared_flags(d)
    d.set_defaults(func=commands.demo)
    p = add("report", commands.report, "self-contained HTML report + JSON")
    p.add_argument("-o", "--output", default="nethessian-report", help="output folder")
    _report_options(p)
    p = add("hessian", commands.hessian, "dense Hessian: .pt, .npz and a heatmap")
    p.add_argument("-o", "--output", default=None, help="output folder")
    p.add_argument("--max-bytes", type=int, default=None)
    _eig_flags(add("eig", commands.eig, "extreme eigenvalues (Lanczos)"))
    p = add("trace", commands.trace, "trace estimate with its standard error")
    p.add_argument("--method", default="hutch++", choices=["hutchinson", "hutch++", "xtrace"])
    p.add_argument("--num-matvecs", type=int, default=None)
    p.add_argument("--exact", action="store_true")
    p.add_argument("--by-block", action="store_true")
    _memory_flag(p)
    p = add("diag", commands.diag, "diagonal of the Hessian")
    p.add_argument("--method", default="exact", choices=["exact", "estimate"])
    p.add_argument("--num-matvecs", type=int, default=None)
    p.add_argument("--chunk-size", type=int, default=None)
    _memory_flag(p)
    p = add("density", commands.density, "spectral density (stochastic Lanczos quadrature)")
    p.add_argument("--probes", type=int, default=8)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("-o", "--output", default=None, help="PNG to write")
    _memory_flag(p)
    add("check", commands.check, "check the Hessian of your model against finite differences")
    p = add(
        "input-hessian",
        commands.input_hessian,
        "Hessian w.r.t. the inputs (or --at a module's output): per-sample top eigenvalue and trace",
    )
    p.add_argument(
        "--at",
        default=None,
        metavar="MODULE",
        help="a name from model.named_modules(): that module's output instead of the inputs "
        "(token models: the embedding module)",
    )
    p.add_argument("--sample-dim", type=int, default=0, help="the activation's sample axis (1: sequence-first)")
    p.add_argument("--limit", type=int, default=20, help="samples listed (default 20)")
    return parser


_BUDGETS = (  # the report's sizes: (flag, build_report keyword, metavar, help)
    (
        "--dense-max-params",
        "dense_max_params",
        "P",
        "form the dense Hessian up to this many parameters, matrix-free above",
    ),
    ("--num-eigs", "num_eigs", "K", "matrix-free: K largest and K smallest eigenvalues"),
    ("--trace-matvecs", "trace_matvecs", "M", "matrix-free: Hutch++ products"),
    ("--density-probes", "density_probes", "N", "matrix-free: SLQ probes"),
    ("--lanczos-steps", "lanczos_steps", "S", "matrix-free: Lanczos steps per SLQ probe"),
)


def _report_options(p: argparse.ArgumentParser) -> None:
    from .report import DEFAULTS, SECTIONS

    for flag, key, metavar, text in _BUDGETS:
        p.add_argument(flag, type=int, default=DEFAULTS[key], metavar=metavar, help=f"{text} (default %(default)s)")
    p.add_argument(
        "--ncv",
        type=int,
        default=None,
        metavar="N",
        help="matrix-free: Lanczos basis vectors (default max(2K + 1, 20)); memory P × N entries",
    )
    p.add_argument(
        "--sections",
        nargs="+",
        default=None,
        metavar="NAME",
        choices=[i for i, _ in SECTIONS],
        help="sections to compute (default all; summary, problem, gradient and reproduce "
        "are always there): " + ", ".join(i for i, _ in SECTIONS),
    )


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line, with where it was raised outside this package."""
    text = " ".join(str(exc).split()) or "(no message)"
    frames = traceback.extract_tb(exc.__traceback__)
    ours = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    outside = [f for f in frames if not os.path.abspath(f.filename).startswith(ours)]
    where = f" (raised at {outside[-1].filename}:{outside[-1].lineno})" if outside else ""
    return f"{type(exc).__name__}: {text}{where}; --debug shows the traceback"


def _fail(args, exc: BaseException, code: int, usage: bool) -> int:
    if getattr(args, "debug", False):
        raise exc
    if usage:
        print(f"nethessian: error: {' '.join(str(exc).split())}", file=sys.stderr)
    else:
        print(f"nethessian: {_one_line(exc)}", file=sys.stderr)
    if isinstance(exc, dist.DistributedError):
        sys.stdout.flush(), sys.stderr.flush()
        os._exit(1)  # a dead or hung peer leaves collectives pending; gloo's teardown would abort
    return code


def _exit_after_torchrun(code: int) -> None:
    """End a rank the CLI's own torchrun run started, once ``finish()`` tore gloo down.

    Interpreter finalisation would then destroy the FSDP model's DTensors, which still hold
    the torn-down process group, and gloo's threads abort the rank ("terminate called
    without an active exception", seen in 2 of ~60 ``--fsdp`` runs after a complete
    result). Nothing is left to clean up: output is flushed and the rank exits with
    ``code``, as ``_fail`` does for a distributed error.
    """
    import logging

    logging.shutdown()
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(code)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed its own message
        return int(exc.code or 0)
    if args.command is None:
        args = parser.parse_args(["demo"] + (["--debug"] if args.debug else []))
    try:
        if not args.dist_timeout > 0:
            raise InputError(f"--dist-timeout must be a positive number of seconds, got {args.dist_timeout}")
        was_active = dist.is_active()
        started = dist.init_from_env(timeout_s=args.dist_timeout) and not was_active
        code = args.func(args)
        if started and dist.is_active():  # a process group this run created
            dist.finish()  # every rank done before gloo is torn down
            _exit_after_torchrun(code)
        return code
    except BrokenPipeError:  # the reader went away (e.g. `nethessian demo | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except InputError as exc:
        return _fail(args, exc, 2, usage=True)
    except SystemExit as exc:  # the user's model or loss called sys.exit while we computed
        err = InputError(
            f"the problem's code called sys.exit({exc.code!r}) during the computation; a model or loss must not exit"
        )
        return _fail(args, err, 2, usage=True)
    except Exception as exc:  # our errors and the user's model's: one line, never a traceback
        return _fail(args, exc, 1, usage=False)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
