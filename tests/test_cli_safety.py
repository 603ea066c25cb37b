"""The command line never returns a stale or spliced result, never destroys a file, and fails in one line."""

import json
import os

import pytest
import torch
from torch import nn

import nethessian as nh
from nethessian._app.cli import build_parser, main

PROBLEM = """
import os, torch
from torch import nn
here = os.path.dirname(os.path.abspath(__file__))
model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
model.load_state_dict(torch.load(os.path.join(here, "weights.pt")))
X, y = torch.load(os.path.join(here, "data.pt"))
loss_fn = nn.CrossEntropyLoss()
data = (X, y)
if os.path.exists(os.path.join(here, "eval")):
    model.eval()
"""


def _net(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


@pytest.fixture
def problem(tmp_path):
    """A problem file whose weights and data live in files next to it: they change, the file does not."""
    f = tmp_path / "prob.py"
    f.write_text(PROBLEM)
    torch.save(_net(0).state_dict(), tmp_path / "weights.pt")
    g = torch.Generator().manual_seed(1)
    torch.save(
        (torch.randn(10, 3, generator=g, dtype=torch.float64), torch.randint(0, 2, (10,), generator=g)),
        tmp_path / "data.pt",
    )
    return f


def _diag(capsys, argv):
    rc = main(argv)
    out = capsys.readouterr()
    return rc, (json.loads(out.out)["result"]["values"] if rc == 0 else None), out.err


@pytest.mark.parametrize("change", ["weights", "data", "mode"])
def test_checkpoint_of_other_weights_or_data_is_refused(capsys, tmp_path, problem, change):
    ck = str(tmp_path / "ck.pt")
    args = ["diag", str(problem), "--json", "--checkpoint", ck]
    rc, first, _ = _diag(capsys, args)
    assert rc == 0
    if change == "weights":
        torch.save(_net(5).state_dict(), tmp_path / "weights.pt")
    elif change == "data":
        X, y = torch.load(tmp_path / "data.pt")
        torch.save((X * 1.5, y), tmp_path / "data.pt")
    else:  # the modules' train/eval flags (the numbers of this model do not change, its identity does)
        (tmp_path / "eval").write_text("")
    rc, _, err = _diag(capsys, args)
    assert rc == 2 and "differs in: operator" in err and len(err.strip().splitlines()) == 1
    # without the checkpoint the new problem gives other numbers: resuming would have been wrong
    if change != "mode":
        rc, fresh, _ = _diag(capsys, args[:-2])
        assert rc == 0 and fresh != pytest.approx(first, rel=1e-6)


def test_same_problem_resumes_from_its_checkpoint(capsys, tmp_path, problem):
    ck = str(tmp_path / "ck.pt")
    rc, first, _ = _diag(capsys, ["diag", str(problem), "--json", "--checkpoint", ck])
    rc2, again, _ = _diag(capsys, ["diag", str(problem), "--json", "--checkpoint", ck])
    model = _net(0)
    X, y = torch.load(tmp_path / "data.pt")
    H = nh.hessian(model, nn.CrossEntropyLoss(), (X, y)).dense
    assert rc == rc2 == 0
    torch.testing.assert_close(torch.tensor(again, dtype=torch.float64), torch.diagonal(H), rtol=1e-10, atol=1e-14)


def test_save_refuses_to_destroy_files(capsys, tmp_path, problem):
    source = problem.read_text()
    for extra in ([], ["--force"]):  # the problem file: never, even with --force
        assert main(["trace", str(problem), "--exact", "--save", str(problem)] + extra) == 2
        assert "would overwrite" in capsys.readouterr().err and problem.read_text() == source
    ck = tmp_path / "ck.pt"
    assert main(["diag", str(problem), "--checkpoint", str(ck), "--save", str(ck)]) == 2
    assert "would overwrite" in capsys.readouterr().err and not ck.exists()
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    assert main(["trace", str(problem), "--exact", "--save", str(notes)]) == 2
    assert "not a nethessian result" in capsys.readouterr().err and notes.read_text() == "my notes"
    assert main(["trace", str(problem), "--exact", "--save", str(notes), "--force"]) == 0
    assert nh.load(str(notes)).kind == "trace"
    assert main(["trace", str(problem), "--exact", "--save", str(notes)]) == 0  # a result may be replaced
    folder = tmp_path / "d"
    folder.mkdir()
    assert main(["trace", str(problem), "--exact", "--save", str(folder)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert sorted(os.listdir(folder)) == [] and not any(n.endswith(".tmp") for n in os.listdir(tmp_path))


def test_saved_result_carries_the_operator_fingerprint(capsys, tmp_path, problem):
    out = tmp_path / "r.json"
    assert main(["trace", str(problem), "--exact", "--save", str(out)]) == 0
    first = nh.load(str(out)).settings["operator"]
    torch.save(_net(7).state_dict(), tmp_path / "weights.pt")
    assert main(["trace", str(problem), "--exact", "--save", str(out)]) == 0
    assert len(first) == 64 and nh.load(str(out)).settings["operator"] != first


@pytest.mark.parametrize("command", ["check", "report"])
def test_checkpoint_is_refused_where_not_implemented(capsys, tmp_path, command):
    assert main([command, "--checkpoint", str(tmp_path / "ck.pt")]) == 2
    err = capsys.readouterr().err
    assert f"--checkpoint is not supported by `nethessian {command}`" in err
    assert not (tmp_path / "ck.pt").exists()


def test_trace_resumes_from_its_checkpoint_and_refuses_other_weights(capsys, tmp_path, problem):
    ck = str(tmp_path / "ck.pt")
    args = ["trace", str(problem), "--method", "hutchinson", "--num-matvecs", "12", "--json"]
    assert main(args + ["--checkpoint", ck]) == 0
    first = json.loads(capsys.readouterr().out)["result"]
    assert os.path.exists(ck)
    assert main(args + ["--checkpoint", ck]) == 0
    again = json.loads(capsys.readouterr().out)["result"]
    assert main(args) == 0
    plain = json.loads(capsys.readouterr().out)["result"]
    assert again["value"] == pytest.approx(first["value"], rel=1e-12) == plain["value"]
    torch.save(_net(3).state_dict(), tmp_path / "weights.pt")
    assert main(args + ["--checkpoint", ck]) == 2
    assert "operator" in capsys.readouterr().err


BN_BATCH_OF_ONE = """
import torch
from torch import nn
model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
data = (torch.randn(1, 3), torch.randn(1, 1))
loss_fn = nn.MSELoss()
"""


@pytest.mark.parametrize(
    "content, name, code, message",
    [
        # a batch the model cannot take is bad input, caught while building the operator: exit 2
        (BN_BATCH_OF_ONE, "bn.py", 2, "ValueError: Expected more than 1 value per channel"),
        ("import sys\nsys.exit(0)\n", "ex.py", 2, "called sys.exit(0) at"),
        ("import sys\ndef problem():\n    sys.exit(3)\n", "ex2.py", 2, "called sys.exit(3) at"),
        ("def problem():\n    return 1 / 0\n", "z.py", 2, "line 2: return 1 / 0 — ZeroDivisionError"),
        ("# not python\n", "notes.md", 2, "is not a Python file"),
    ],
)
def test_every_error_from_a_problem_file_is_one_line(capsys, tmp_path, content, name, code, message):
    f = tmp_path / name
    f.write_text(content)
    assert main(["eig", str(f)]) == code
    out = capsys.readouterr()
    assert message in out.err and "Traceback" not in out.err and len(out.err.strip().splitlines()) == 1
    assert out.out == ""


def test_distributed_timeout_is_a_flag(monkeypatch, capsys):
    assert build_parser().parse_args(["trace"]).dist_timeout == 300.0
    assert build_parser().parse_args(["trace", "--dist-timeout", "60"]).dist_timeout == 60.0
    assert build_parser().parse_args(["--dist-timeout", "45", "trace"]).dist_timeout == 45.0
    seen = {}
    from nethessian import distributed

    monkeypatch.setattr(distributed, "init_from_env", lambda timeout_s=None, **k: seen.setdefault("t", timeout_s))
    assert main(["diag", "--dist-timeout", "12.5"]) == 0
    assert seen["t"] == 12.5
    assert main(["diag", "--dist-timeout", "0"]) == 2
    assert "--dist-timeout must be a positive" in capsys.readouterr().err


def test_a_run_killed_midway_is_not_resumed_with_other_weights(capsys, tmp_path, problem, monkeypatch):
    from nethessian.operators._hessian import HessianOperator

    ck = tmp_path / "ck.pt"
    args = ["diag", str(problem), "--chunk-size", "1", "--json", "--checkpoint", str(ck)]
    orig, calls = HessianOperator._product, []

    def dies(self, V):
        calls.append(1)
        if len(calls) > 4:
            raise RuntimeError("killed")
        return orig(self, V)

    monkeypatch.setattr(HessianOperator, "_product", dies)
    assert main(args) == 1 and "killed" in capsys.readouterr().err
    monkeypatch.setattr(HessianOperator, "_product", orig)
    done = torch.load(ck, weights_only=True)["state"]["done"]
    assert 0 < done < 26  # some columns of the first model on disk
    torch.save(_net(9).state_dict(), tmp_path / "weights.pt")
    rc, _, err = _diag(capsys, args)
    assert rc == 2 and "operator" in err  # never spliced into the second model's diagonal
    torch.save(_net(0).state_dict(), tmp_path / "weights.pt")
    rc, resumed, _ = _diag(capsys, args)
    rc2, straight, _ = _diag(capsys, args[:-2])
    assert rc == rc2 == 0
    assert resumed == pytest.approx(straight, rel=1e-10, abs=1e-14)


def test_the_fingerprint_is_one_for_all_ranks(monkeypatch):
    """Each rank hashes its own shard; the problem's fingerprint combines them so every rank agrees."""
    from nethessian import distributed
    from nethessian._app.problem import load_problem

    p = load_problem("two-layer")
    local = p.fingerprint()
    shards = {0: local, 1: "f" * 64}
    monkeypatch.setattr(distributed, "is_active", lambda: True)
    got = []
    for r in (0, 1):
        monkeypatch.setattr(distributed, "_gather_text", lambda text, what, device=None: [shards[0], shards[1]])
        got.append(p.fingerprint())
    assert got[0] == got[1] != local and len(got[0]) == 64


def test_only_dtypes_that_work_are_offered(capsys):
    """Half precision works (a float32 copy of the rounded weights; see test_cli_more); others are refused."""
    for dtype in ("float8_e4m3fn", "int8", "complex64"):
        assert main(["trace", "--exact", "--dtype", dtype]) == 2
        assert "invalid choice" in capsys.readouterr().err
    for dtype in ("float32", "bfloat16", "float16"):
        assert main(["trace", "--exact", "--dtype", dtype]) == 0
