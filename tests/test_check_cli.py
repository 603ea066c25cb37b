"""nh.check and the command line's demo."""

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import nethessian as nh
from nethessian._check import check
from nethessian._app.cli import main


def test_check_passes_on_user_model_and_reports_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))  # float32: check runs a float64 copy
    X, y = torch.randn(9, 3), torch.randint(0, 2, (9,))
    rep = check(model, nn.CrossEntropyLoss(), (X, y))
    assert rep.passed and rep.hvp_vs_fd < 1e-7 and rep.symmetry < 1e-12 and rep.dense_vs_columns < 1e-12
    assert set(rep.blocks_vs_fd) >= {"0.weight / 0.weight", "0.weight / 2.bias"}
    assert next(model.parameters()).dtype == torch.float32  # the user's model untouched
    assert "PASSED" in str(rep)


def test_check_detects_a_wrong_hessian(monkeypatch):
    model, loss_fn, data = nh.examples.two_layer(seed=1)
    from nethessian.operators._hessian import HessianOperator

    orig = HessianOperator._product  # every product (op @ v, op @ V, to_dense) goes through it
    monkeypatch.setattr(HessianOperator, "_product", lambda self, V: 1.01 * orig(self, V))
    rep = check(model, loss_fn, data)
    assert not rep.passed and rep.hvp_vs_fd > 1e-3


def test_demo_json_in_process(capsys):
    assert main(["demo", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [b["shape"] for b in res["blocks"].values()] == [[6, 6], [6, 3], [3, 3]]
    assert max(res["fd_relative_difference"].values()) < 1e-7
    model, loss_fn, data = nh.examples.two_layer(seed=0)
    H = nh.hessian(model, loss_fn, data)
    torch.testing.assert_close(
        torch.tensor(res["blocks"]["b"]["values"], dtype=torch.float64), H["W1", "W2"], rtol=1e-12, atol=1e-15
    )
    assert res["eigenvalues"] == pytest.approx(H.eigvalsh().tolist(), rel=1e-12, abs=1e-15)
    assert res["verdict"]["kind"] == "not stationary"


def test_demo_text_via_module():
    out = subprocess.run([sys.executable, "-m", "nethessian", "demo"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for s in ("J =", "a = ∂²J/∂W1²", "b = ∂²J/∂W1∂W2", "c = ∂²J/∂W2²", "eigenvalues", "finite differences"):
        assert s in out.stdout


def test_usage_error_exit_code():
    assert main(["no-such-command"]) == 2


def test_check_with_class_weighted_loss_runs_in_float64():
    torch.manual_seed(1)
    model = nn.Linear(3, 3)
    loss_fn = nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 3.0]))
    rep = check(model, loss_fn, (torch.randn(8, 3), torch.randint(0, 3, (8,))))
    assert rep.passed
    assert loss_fn.weight.dtype == torch.float32  # the user's loss untouched


def test_debug_flag_before_or_after_the_command():
    from nethessian._app.cli import build_parser

    args = build_parser().parse_args(["--debug", "trace"])
    assert args.debug is True
    args = build_parser().parse_args(["trace", "--debug"])
    assert args.debug is True
    assert build_parser().parse_args(["trace"]).debug is False


def test_demo_numbers_come_from_one_objective(monkeypatch):
    from nethessian._app.demo import demo_result
    from nethessian._objective import Objective

    built = []
    init = Objective.__init__
    monkeypatch.setattr(Objective, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    res = demo_result(seed=2)
    assert len(built) == 1  # J, g, the dense Hessian and the finite differences share one objective
    H = nh.hessian(*nh.examples.two_layer(seed=2))
    torch.testing.assert_close(
        torch.tensor(res["eigenvalues"], dtype=torch.float64), H.eigvalsh(), rtol=1e-10, atol=1e-14
    )


def test_whole_demo_with_newton_builds_one_objective(monkeypatch, capsys):
    from nethessian._app.cli import main
    from nethessian._objective import Objective

    built = []
    init = Objective.__init__
    monkeypatch.setattr(Objective, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    assert main(["demo"]) == 0
    assert "damped Newton" in capsys.readouterr().out
    assert len(built) == 1  # the demo's numbers and its Newton run share the problem's one Objective
