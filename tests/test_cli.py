"""The command line in-process (JSON), bad input, and a run killed with SIGKILL that resumes."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import nethessian as nh
from nethessian._app.cli import main

SLOW_PROBLEM = '''
import time, torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Linear(4, 4)).double()
g = torch.Generator().manual_seed(1)
X, y = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randint(0, 4, (40,), generator=g)
loss_fn = nn.CrossEntropyLoss()

class SlowLoader:
    """A re-iterable that takes its time, like a loader reading from disk."""
    def __iter__(self):
        for i in range(0, 40, 20):
            time.sleep(0.02)
            yield X[i:i + 20], y[i:i + 20]

data = SlowLoader()
'''


def _json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_subcommands_json(capsys, tmp_path):
    H = nh.hessian(*nh.examples.two_layer())
    out = _json(capsys, ["hessian", "--json", "-o", str(tmp_path)])
    assert out["result"]["eigenvalues"] == pytest.approx(H.eigvalsh().tolist(), abs=1e-15)
    saved = torch.load(tmp_path / "hessian.pt")
    torch.testing.assert_close(saved["dense"], H.dense, rtol=1e-12, atol=1e-15)
    assert saved["names"] == ["W1", "W2"]
    import numpy as np

    assert np.allclose(np.load(tmp_path / "hessian.npz")["dense"], H.dense.numpy())
    assert (tmp_path / "hessian.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = _json(capsys, ["trace", "--exact", "--json"])
    assert out["result"]["value"] == pytest.approx(float(torch.trace(H.dense)), rel=1e-12)
    out = _json(capsys, ["eig", "-k", "2", "--which", "smallest", "--tol", "1e-10", "--json"])
    assert out["result"]["eigenvalues"] == pytest.approx(H.eigvalsh()[:2].tolist(), rel=1e-8)
    out = _json(capsys, ["diag", "--json", "--params", "W2"])
    assert out["result"]["values"] == pytest.approx(torch.diagonal(H["W2"]).tolist(), rel=1e-12)
    out = _json(capsys, ["density", "--probes", "2", "--steps", "5", "--json"])
    assert "density" in out["result"]
    assert main(["check", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["result"]["passed"]


def test_save_and_load_with_provenance(capsys, tmp_path):
    path = str(tmp_path / "trace.json")
    assert main(["trace", "--exact", "--save", path]) == 0
    res = nh.load(path)
    assert res.kind == "trace" and res.settings["exact"] is True and res.versions["torch"] == torch.__version__
    with pytest.raises(nh.InputError, match="not a nethessian result"):
        (tmp_path / "junk.pt").write_bytes(b"junk")
        nh.load(str(tmp_path / "junk.pt"))


def test_saved_eigenpairs_round_trip(capsys, tmp_path):
    path = str(tmp_path / "eig.json")
    assert main(["eig", "-k", "2", "--tol", "1e-10", "--save", path]) == 0
    res = nh.load(path)
    vecs = torch.tensor(res.result["eigenvectors"], dtype=torch.float64)
    H = nh.hessian(*nh.examples.two_layer()).dense
    lam = torch.tensor(res.result["eigenvalues"], dtype=torch.float64)
    vecs = vecs if vecs.shape[0] == 9 else vecs.T
    torch.testing.assert_close(H @ vecs, vecs * lam, rtol=1e-8, atol=1e-10)


def test_problem_file_and_builtin(capsys, tmp_path):
    f = tmp_path / "prob.py"
    f.write_text("import nethessian as nh\ndef problem():\n    return nh.examples.two_layer(seed=4)\n")
    out = _json(capsys, ["trace", str(f), "--exact", "--json"])
    H = nh.hessian(*nh.examples.two_layer(seed=4))
    assert out["result"]["value"] == pytest.approx(float(torch.trace(H.dense)), rel=1e-12)


@pytest.mark.parametrize(
    "content,message",
    [
        (None, "does not exist"),
        ("import torch\nx = 1\nraise ValueError('boom')\n", "line 3: raise ValueError('boom')"),
        ("model = 1\n", "lacks loss_fn, data"),
    ],
)
def test_bad_problem_files(capsys, tmp_path, content, message):
    f = tmp_path / "p.py"
    if content is not None:
        f.write_text(content)
    assert main(["eig", str(f)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bad_options(capsys, tmp_path):
    assert main(["eig", "--params", "nope*"]) == 2
    assert "no parameter matches 'nope*'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["eig", "--device", "cuda"]) == 2
        assert "not available" in capsys.readouterr().err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if not os.access(ro, os.W_OK):  # root can write anywhere
        assert main(["hessian", "-o", str(ro / "x" / "y")]) != 0
    assert main(["report", "-o", "/proc/nope"]) == 2
    assert "cannot write" in capsys.readouterr().err
    bad = tmp_path / "ck.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["diag", "--checkpoint", str(bad)]) == 2
    assert "not a readable nethessian checkpoint" in capsys.readouterr().err


def test_checkpoint_with_other_arguments_is_refused(capsys, tmp_path):
    ck = str(tmp_path / "ck.pt")
    assert main(["diag", "--checkpoint", ck, "--json"]) == 0
    capsys.readouterr()
    assert main(["diag", "--checkpoint", ck, "--chunk-size", "3"]) == 2
    assert "other settings (differs in: chunk_size)" in capsys.readouterr().err
    assert main(["diag", "--checkpoint", ck, "--seed", "3"]) == 2  # other weights of the two-layer network
    assert "other settings (differs in: operator, seed)" in capsys.readouterr().err


def _run(args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "nethessian", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_sigkill_midway_then_resume_equals_uninterrupted(tmp_path):
    prob = tmp_path / "slow.py"
    prob.write_text(SLOW_PROBLEM)
    ck = tmp_path / "ck.pt"
    args = ["diag", str(prob), "--method", "exact", "--chunk-size", "1", "--json"]
    p = _run(args + ["--checkpoint", str(ck)])
    t0 = time.time()
    while not ck.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(0.3)
    assert p.poll() is None, "finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert ck.exists()
    done = torch.load(ck, weights_only=True)["state"]
    assert 0 < done["done"] < 48  # killed midway, with finished columns on disk
    resumed = _run(args + ["--checkpoint", str(ck)]).communicate(timeout=300)[0]
    straight = _run(args).communicate(timeout=300)[0]
    r, s = json.loads(resumed)["result"], json.loads(straight)["result"]
    assert r["values"] == pytest.approx(s["values"], rel=1e-12, abs=1e-15)


def test_report_command_writes_html_and_json(capsys, tmp_path):
    out = _json(capsys, ["report", "-o", str(tmp_path / "rep"), "--json"])
    html = (tmp_path / "rep" / "report.html").read_text()
    data = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert out["result"]["html"].endswith("report.html") and 'id="hessian"' in html
    H = nh.hessian(*nh.examples.two_layer())
    assert data["num_parameters"] == 9
    assert float(data["trace"]["value"]) == pytest.approx(float(torch.trace(H.dense)), rel=1e-12)
