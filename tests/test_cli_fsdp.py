"""``nethessian eig|trace|density --fsdp`` under torchrun (2 gloo ranks on 127.0.0.1) against exact references.

The problem file is a small float64 transformer-like network (an ``nn.ModuleList`` of
residual blocks); the references are its dense exact Hessian in one process.
"""

import json
import math
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import nethessian as nh
from nethessian._app.cli import main
from nethessian._app.problem import load_problem

TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
WORLD = 2

PROBLEM = """
import torch
from torch import nn

class Block(nn.Module):
    def __init__(self, d=6, h=8):
        super().__init__()
        self.ln, self.up, self.down = nn.LayerNorm(d), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        return x + self.down(torch.tanh(self.up(self.ln(x))))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        return self.head(x)

torch.manual_seed(0)
model = Net().double()
g = torch.Generator().manual_seed(1)
data = [
    (torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g))
    for n in (5, 7, 6, 4)
]
loss_fn = nn.CrossEntropyLoss()
"""


@pytest.fixture(scope="module")
def problem_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fsdp") / "net.py"
    path.write_text(PROBLEM)
    return str(path)


@pytest.fixture(scope="module")
def exact(problem_file):
    """The dense exact Hessian (name order) of the whole data set in one process."""
    prob = load_problem(problem_file)
    op = nh.HessianOperator(prob.model, prob.loss_fn, prob.data)
    H = op.to_dense()
    return {"H": H, "eig": torch.linalg.eigvalsh(H), "shapes": op.layout.shapes}


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _torchrun(*args, timeout=120):
    """``torchrun --nproc-per-node 2 -m nethessian ARGS`` with 1 thread per rank; its JSON (printed by rank 0)."""
    if not os.path.exists(TORCHRUN):
        pytest.skip("torchrun not installed beside this python")
    cmd = [TORCHRUN, "--nproc-per-node", str(WORLD), "--master-addr", "127.0.0.1", "--master-port", _port()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [*cmd, "-m", "nethessian", *args, "--dist-timeout", "60"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,  # torchrun and its ranks in one process group: killed together on a hang
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun {' '.join(args)} hung past {timeout} s: {err[-3000:]}")
    assert proc.returncode == 0, err[-4000:]
    return json.loads(out)  # one JSON document: only rank 0 printed


def _global_order(shapes, world):
    """The sharded operator's global order: rank-major, each rank's dim-0 chunks (ceil(d₀/world) rows) by name.

    FSDP2's ``Shard(0)`` placement, as docs/sharded.md describes it; returns the permutation of the
    name-order vector.
    """
    starts = [0]
    for s in shapes:
        starts.append(starts[-1] + math.prod(s))
    order = []
    for r in range(world):
        for start, s in zip(starts, shapes):
            rows, rest = s[0], math.prod(s[1:])
            c = -(-rows // world)
            lo, hi = min(r * c, rows), min((r + 1) * c, rows)
            order.extend(range(start + lo * rest, start + hi * rest))
    return torch.tensor(order)


def test_eig_fsdp_matches_exact_and_saves_gathered_eigenvectors(problem_file, exact, tmp_path):
    out = str(tmp_path / "eig.json")
    r = _torchrun("eig", problem_file, "--fsdp", "-k", "2", "--tol", "1e-10", "--json", "--save", out)
    res, fd = r["result"], r["result"]["finite_difference"]
    assert r["settings"]["fsdp"] and r["settings"]["world_size"] == WORLD
    assert r["settings"]["operator_options"]["method"] == "finite-difference"
    assert fd["fd_order"] == 2 and fd["gradients_per_product"] == 4  # float64: order 2 (+ error estimate)
    assert fd["global_size"] == exact["H"].shape[0]
    err = fd["fd_error"]
    want = exact["eig"].flip(0)[:2]
    assert 0 < err < 1e-4 * float(want.abs().max())  # the float64 bound
    assert res["converged"]
    torch.testing.assert_close(torch.tensor(res["eigenvalues"], dtype=torch.float64), want, rtol=0, atol=err)
    saved = nh.load(out)  # rank 0 gathered the sharded eigenvectors, in parameter-name order
    assert saved.settings["fsdp"] and saved.result["finite_difference"]["fd_error"] == pytest.approx(err, rel=1e-12)
    V = torch.tensor(saved.result["eigenvectors"], dtype=torch.float64).T
    assert V.shape == (exact["H"].shape[0], 2)
    torch.testing.assert_close(V.norm(dim=0), torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-10)
    for i, lam in enumerate(res["eigenvalues"]):  # an eigenvector of the exact H to the FD error
        resid = float((exact["H"] @ V[:, i] - lam * V[:, i]).norm())
        assert resid <= err + res["residuals"][i] + 1e-12, (i, resid, err)


def test_trace_fsdp_equals_single_process_hutchpp_within_fd_error(problem_file, exact):
    r = _torchrun("trace", problem_file, "--fsdp", "--num-matvecs", "30", "--seed", "5", "--json")
    res, fd = r["result"], r["result"]["finite_difference"]
    H = exact["H"]
    perm = _global_order(exact["shapes"], WORLD)
    assert sorted(perm.tolist()) == list(range(H.shape[0]))
    # the probes are slices of one global vector in the rank-major order: the same run as one
    # process on Π H Πᵀ with the same seed
    ref = nh.trace(H[perm][:, perm], method="hutch++", num_matvecs=30, seed=5)
    assert res["num_matvecs"] == 30 and fd["probe_fd_error"] == pytest.approx(fd["fd_error"] * H.shape[0])
    assert abs(res["value"] - float(ref.value)) <= fd["probe_fd_error"], (res["value"], float(ref.value))
    assert abs(res["value"] - float(ref.value)) < 1e-6 * abs(float(torch.trace(H)))


def test_density_fsdp_runs_and_its_support_brackets_the_spectrum(problem_file, exact):
    r = _torchrun("density", problem_file, "--fsdp", "--probes", "1", "--steps", "25", "--json")
    fd = r["result"]["finite_difference"]
    nodes = torch.tensor(r["result"]["nodes"], dtype=torch.float64)
    lo, hi = float(exact["eig"][0]), float(exact["eig"][-1])
    # Ritz values lie inside the spectrum of the FD operator, within its error of the exact one
    assert float(nodes.min()) >= lo - fd["fd_error"] and float(nodes.max()) <= hi + fd["fd_error"]
    assert float(nodes.max()) == pytest.approx(hi, abs=1e-3 * hi)  # 25 steps find λ_max


# -- refusals, in one process ---------------------------------------------------------------------
def _refused(capsys, argv, *needles):
    assert main(argv) == 2
    err = capsys.readouterr().err
    for n in needles:
        assert n in err, err
    return err


def test_fsdp_without_torchrun_says_how_to_run(problem_file, capsys):
    _refused(capsys, ["eig", problem_file, "--fsdp"], "needs at least 2", "torchrun --nproc-per-node 2")


@pytest.mark.parametrize("command", ["hessian", "diag", "check", "report", "input-hessian"])
def test_commands_without_sharded_products_refuse_fsdp(problem_file, capsys, command):
    _refused(capsys, [command, problem_file, "--fsdp"], f"`nethessian {command}` cannot run with --fsdp")


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["trace", "--exact"], "trace --exact is not available with --fsdp"),
        (["trace", "--by-block"], "trace --by-block is not available with --fsdp"),
        (["eig", "--checkpoint", "ck"], "--checkpoint is not supported with --fsdp"),
    ],
)
def test_options_sharded_runs_cannot_honour_are_refused(problem_file, capsys, tmp_path, extra, needle):
    argv = [extra[0], problem_file, "--fsdp", *[str(tmp_path / a) if a == "ck" else a for a in extra[1:]]]
    _refused(capsys, argv, needle)


def test_fd_order_without_fsdp_is_refused(problem_file, capsys):
    _refused(capsys, ["eig", problem_file, "--fd-order", "4"], "--fd-order applies with --fsdp only")


def test_eig_fsdp_float32_uses_the_4_point_stencil_within_its_error(problem_file, exact):
    r = _torchrun("eig", problem_file, "--fsdp", "--dtype", "float32", "-k", "1", "--tol", "1e-3", "--json")
    fd = r["result"]["finite_difference"]
    assert fd["fd_order"] == 4 and fd["gradients_per_product"] == 4
    lam = float(exact["eig"][-1])  # the float64 exact λ_max (the float32 weights are the same numbers rounded)
    assert fd["fd_error"] < 1e-2 * lam  # the float32 bound
    assert abs(r["result"]["eigenvalues"][0] - lam) <= fd["fd_error"], (r["result"]["eigenvalues"], lam, fd)


def test_cost_line_names_finite_difference_products_and_their_gradients():
    from nethessian._app.cost import estimate_line, product_kind

    assert product_kind({}) is None and product_kind({"method": "auto"}) is None
    kind = product_kind({"method": "finite-difference", "fd_order": 4, "fd_error": True})
    assert kind == "finite-difference, order 4: 4 gradients per product"
    assert product_kind({"method": "finite-difference", "fd_order": 2, "fd_error": False}).endswith(
        "2 gradients per product"
    )
    line = estimate_line(1000, kind, (20, 400), 0.5)
    assert line.startswith("P = 1,000, finite-difference, order 4: 4 gradients per product; 20–400")


def test_an_error_estimate_large_against_the_spectrum_is_flagged():
    from types import SimpleNamespace

    from nethessian._app.fsdp import fd_summary

    options = {"method": "finite-difference", "fd_order": 4, "fd_error": True}
    op = SimpleNamespace(fd_error=0.5, global_size=10)
    facts, lines = fd_summary(op, options, scale=2.0, per_probe=True)
    assert facts["fd_error_relative"] == pytest.approx(0.25) and facts["probe_fd_error"] == pytest.approx(5.0)
    assert any("WARNING: that is 25.0% of the largest |eigenvalue|" in line for line in lines), lines
    facts, lines = fd_summary(SimpleNamespace(fd_error=1e-3, global_size=10), options, scale=2.0)
    assert facts["fd_error_relative"] == pytest.approx(5e-4) and not any("WARNING" in line for line in lines)
    assert fd_summary(op, {}) == ({}, [])  # exact products: nothing to say
