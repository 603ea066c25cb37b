"""CLI: the cost estimate before long runs, half-precision --dtype end to end, `nethessian input-hessian`."""

import json

import pytest
import torch

import nethessian as nh
from nethessian._app import cost
from nethessian._app.cli import main


def _json(capsys, argv):
    assert main(argv + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize(
    "argv, products",
    [
        (["eig", "-k", "2"], None),
        (["trace", "--exact"], (9, 9)),
        (["diag"], (9, 9)),
        (["hessian"], (9, 9)),
        (["density", "--probes", "2", "--steps", "5"], (12, 12)),
    ],
)
def test_estimate_line_before_a_long_run(argv, products, capsys, monkeypatch):
    assert main(argv) == 0
    assert "products ×" not in capsys.readouterr().err  # a quick run says nothing
    monkeypatch.setattr(cost, "ANNOUNCE_ABOVE_S", 0.0)
    assert main(argv) == 0
    line = [x for x in capsys.readouterr().err.splitlines() if "products ×" in x]
    assert len(line) == 1 and line[0].startswith(f"nethessian {argv[0]}: P = 9; ")
    assert " ms each ≈ " in line[0]
    if products is not None:
        assert f"; {products[0]} Hessian-vector products" in line[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["eig", "-k", "2", "--ncv", "5"],
        ["trace", "--num-matvecs", "12"],
        ["trace", "--method", "hutchinson", "--num-matvecs", "6"],
        ["diag", "--method", "estimate", "--num-matvecs", "4"],
        ["density", "--probes", "2", "--steps", "5"],
    ],
)
def test_estimate_line_states_the_memory_bound_the_result_carries(argv, capsys, monkeypatch):
    """Issue 12: before a long run the CLI prints the vectors' memory bound; it is the one the estimator
    then states (and enforces with --max-memory)."""
    monkeypatch.setattr(cost, "ANNOUNCE_ABOVE_S", 0.0)
    assert main(argv + ["--json"]) == 0
    out = capsys.readouterr()
    held = json.loads(out.out)["result"]["memory_bytes"]
    assert held > 0 and f"holds ≤ {cost.memory_words(held)} of vectors per rank" in out.err
    assert main(argv + ["--max-memory", str(held - 1)]) != 0
    assert "max_memory" in capsys.readouterr().err


def test_eig_ncv_sets_the_basis(capsys):
    """`eig --ncv` bounds the Lanczos basis (the memory a large model needs), and a too-small one is refused."""
    small = _json(capsys, ["eig", "-k", "2", "--ncv", "5"])["result"]
    big = _json(capsys, ["eig", "-k", "2", "--ncv", "7"])["result"]
    assert small["memory_bytes"] < big["memory_bytes"]
    torch.testing.assert_close(torch.tensor(small["eigenvalues"]), torch.tensor(big["eigenvalues"]), rtol=1e-6, atol=0)
    assert main(["eig", "-k", "2", "--ncv", "2"]) != 0
    assert "ncv=2 is too small" in capsys.readouterr().err


def test_estimate_counts_match_the_work(capsys, monkeypatch):
    """The planned products of `density` are the products it reports doing."""
    res = _json(capsys, ["density", "--probes", "3", "--steps", "4"])
    args = type("A", (), dict(command="density", probes=3, steps=4))
    assert cost.command_products(args, 9) == (res["result"]["num_matvecs"],) * 2


def _rounded_reference(dtype):
    """The float64 Hessian at the weights the CLI computes with: rounded to ``dtype``, then exact."""
    model, loss_fn, data = nh.examples.two_layer()
    return _full(model.to(dtype).double(), loss_fn, data)


def _full(model, loss_fn, data):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]
    theta = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def J(t):
        parts, i = {}, 0
        for n, s in zip(names, shapes):
            parts[n], i = t[i : i + s.numel()].reshape(s), i + s.numel()
        return loss_fn(torch.func.functional_call(model, parts, (data[0],)), data[1])

    return torch.autograd.functional.hessian(J, theta)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtype_works_end_to_end(dtype, capsys, tmp_path):
    H = _rounded_reference(getattr(torch, dtype))
    lam = torch.linalg.eigvalsh(H)
    res = _json(capsys, ["eig", "-k", "2", "--dtype", dtype])
    torch.testing.assert_close(
        torch.tensor(res["result"]["eigenvalues"], dtype=torch.float64), lam.flip(0)[:2], rtol=1e-5, atol=1e-8
    )
    res = _json(capsys, ["trace", "--exact", "--dtype", dtype])
    assert res["result"]["value"] == pytest.approx(float(H.trace()), rel=1e-5)
    assert main(["report", "--dtype", dtype, "-o", str(tmp_path / "r"), "--sections", "eigenvalues"]) == 0
    R = json.loads((tmp_path / "r" / "report.json").read_text())
    torch.testing.assert_close(torch.tensor(R["eigenvalues"]["all"], dtype=torch.float64), lam, rtol=1e-5, atol=1e-8)
    assert main(["check", "--dtype", dtype]) == 0


def test_input_hessian_command_matches_the_library(capsys):
    model, loss_fn, (X, y) = nh.examples.two_layer()
    R = nh.input_hessian(model, loss_fn, (X, y))
    blocks = torch.autograd.functional.hessian(lambda x: loss_fn(model(x), y), X.clone())
    per = torch.stack([blocks[i, :, i, :] for i in range(X.shape[0])])
    res = _json(capsys, ["input-hessian"])
    assert res["kind"] == "input-hessian" and res["result"]["num_samples"] == 3 and res["result"]["dim"] == 2
    for key, ref, lib in (
        ("top_eigenvalue", torch.linalg.eigvalsh(per)[:, -1], R.top_eigenvalues()),
        ("trace", per.diagonal(dim1=1, dim2=2).sum(-1), R.traces()),
    ):
        got = torch.tensor(res["result"][key], dtype=torch.float64)
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-14)
        torch.testing.assert_close(got, lib.double(), rtol=1e-12, atol=0)
    assert main(["input-hessian", "--limit", "1"]) == 0
    out = capsys.readouterr().out
    assert "top eigenvalue" in out and "2 more" in out and f"{float(R.top_eigenvalues()[0]):+.6e}" in out


TOKENS = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2)).double()
data = (torch.randint(0, 10, (6, 3)), torch.randint(0, 2, (6,)))
loss_fn = nn.CrossEntropyLoss()
"""


def test_input_hessian_token_model_needs_at(tmp_path, capsys):
    f = tmp_path / "tok.py"
    f.write_text(TOKENS)
    assert main(["input-hessian", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("nethessian: error: the inputs are integers") and "at='0'" in err and "embedding" in err
    res = _json(capsys, ["input-hessian", str(f), "--at", "0"])
    assert res["result"]["at"] == "0" and res["result"]["dim"] == 12
    assert main(["input-hessian", "--checkpoint", str(tmp_path / "c")]) == 2


@pytest.mark.parametrize(
    "command",
    [
        ["eig", "-k", "2"],
        ["trace", "--num-matvecs", "6"],
        ["diag", "--method", "estimate", "--num-matvecs", "4"],
        ["density", "--probes", "2", "--steps", "5"],
    ],
)
def test_max_memory_refuses_before_any_product_and_allows_enough(command, capsys):
    assert main([*command, "mlp", "--max-memory", "1000"]) == 2
    err = capsys.readouterr().err
    assert "max_memory = 1,000 bytes" in err and len(err.strip().splitlines()) == 1
    out = _json(capsys, [*command, "two-layer", "--max-memory", str(10**8)])
    assert out["result"]["memory_bytes"] <= 10**8
