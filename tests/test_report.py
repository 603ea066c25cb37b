"""build_report: one self-contained HTML page and a JSON file with the same numbers."""

import base64
import io
import json
import os
import re
import shutil
import subprocess

import matplotlib.image as mpimg
import pytest
import torch

import nethessian as nh
from nethessian.errors import InputError
from nethessian._app.report import SECTIONS, ReportPaths, build_report
from nethessian._verdict import classify_point

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SMALL = dict(num_eigs=3, trace_matvecs=12, density_probes=2, lanczos_steps=10)


def _load(paths: ReportPaths):
    return paths.html.read_text(encoding="utf-8"), json.loads(paths.json.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    model, loss_fn, data = nh.examples.two_layer()
    paths = build_report(model, loss_fn, data, tmp_path_factory.mktemp("demo") / "new" / "folder")
    return paths, *_load(paths)


@pytest.fixture(scope="module")
def mlp_problem():
    return nh.examples.mlp((4, 6, 3), n=32, dtype=torch.float64)


@pytest.fixture(scope="module")
def matrix_free(tmp_path_factory, mlp_problem):
    model, loss_fn, data = mlp_problem
    paths = build_report(
        model, loss_fn, data, tmp_path_factory.mktemp("mf"), dense_max_params=10, problem_name="a small MLP", **SMALL
    )
    return paths, *_load(paths)


def _images(page: str):
    return re.findall(r'<img src="([^"]*)"', page)


def _cards(page: str):
    return dict(re.findall(r'data-key="([^"]+)" data-value="([^"]+)"', page))


@pytest.mark.parametrize("which", ["demo", "matrix_free"])
def test_every_section_and_self_contained(which, request):
    paths, page, _ = request.getfixturevalue(which)
    assert paths.html.name == "report.html" and paths.json.name == "report.json"
    from nethessian._app.report_sections import OFF_BY_DEFAULT

    for sid, heading in SECTIONS:
        if sid in OFF_BY_DEFAULT:  # computed only when named
            assert f'id="{sid}"' not in page and f'href="#{sid}"' not in page
            continue
        assert re.search(rf'<section id="{sid}"><h2>{re.escape(heading)}</h2>', page), sid
        assert f'href="#{sid}"' in page
    assert "<link" not in page and "<script" not in page and "url(" not in page
    assert not re.search(r'(src|href)="(https?:|//)', page)
    assert "<style>" in page


@pytest.mark.parametrize("which, figures", [("demo", 5), ("matrix_free", 4)])
def test_every_image_is_an_embedded_png(which, figures, request):
    _, page, _ = request.getfixturevalue(which)
    srcs = _images(page)
    assert len(srcs) == figures
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        png = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert png[:8] == PNG_SIGNATURE
        pixels = mpimg.imread(io.BytesIO(png), format="png")
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert float(pixels[..., :3].std()) > 0.05  # not a blank canvas


def test_demo_numbers_equal_the_library(demo):
    _, page, R = demo
    model, loss_fn, data = nh.examples.two_layer()
    H = nh.hessian(model, loss_fn, data)
    J, g = nh.Objective(model, loss_fn, data).value_and_grad()
    assert R["mode"] == "dense" and R["num_parameters"] == 9
    torch.testing.assert_close(
        torch.tensor(R["eigenvalues"]["all"], dtype=torch.float64), H.eigvalsh(), rtol=1e-12, atol=1e-15
    )
    assert R["trace"]["method"] == "exact" and R["trace"]["stderr"] == 0.0
    assert R["trace"]["value"] == pytest.approx(float(torch.trace(H.dense)), rel=1e-12)
    assert R["trace"]["blocks"]["W2"]["value"] == pytest.approx(float(torch.trace(H["W2"])), rel=1e-12)
    for key, (r, c) in {"a": ("W1", "W1"), "b": ("W1", "W2"), "c": ("W2", "W2")}.items():
        torch.testing.assert_close(
            torch.tensor(R["hessian"]["blocks"][key]["values"], dtype=torch.float64), H[r, c], rtol=1e-12, atol=1e-15
        )
    torch.testing.assert_close(
        torch.tensor(R["hessian"]["dense"], dtype=torch.float64), H.dense, rtol=1e-12, atol=1e-15
    )
    assert R["cost"] == pytest.approx(J, rel=1e-12)
    assert R["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    verdict = classify_point(H.eigvalsh(), float(g.norm()))
    assert R["verdict"]["kind"] == verdict.kind == "not stationary"
    assert R["verdict"]["condition_number"] == pytest.approx(verdict.condition_number, rel=1e-10)
    # the blocks are named a, b, c on the page, in the figure's caption and in the block tables
    for text in ("a</b> = ∂²J/∂W1²", "b</b> = ∂²J/∂W1∂W2", "c</b> = ∂²J/∂W2²"):
        assert text in page
    # the quadratic model: three directions, the model exact at α = 0
    dirs = R["quadratic"]["directions"]
    assert [d["direction"] for d in dirs] == ["top-eigenvector", "gradient", "random"]
    assert dirs[0]["curvature_dHd"] == pytest.approx(max(R["eigenvalues"]["all"]), rel=1e-8)
    for d in dirs:
        mid = len(d["alphas"]) // 2
        assert d["alphas"][mid] == 0.0 and d["true"][mid] == pytest.approx(J) == d["model"][mid]
    # the exact density integrates to 1
    dens = torch.tensor(R["density"]["density"]), torch.tensor(R["density"]["grid"])
    assert float(torch.trapezoid(*dens)) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("which", ["demo", "matrix_free"])
def test_json_numbers_equal_the_page(which, request):
    _, page, R = request.getfixturevalue(which)
    cards = _cards(page)
    lam = (
        R["eigenvalues"]["all"]
        if R["mode"] == "dense"
        else R["eigenvalues"]["largest"]["eigenvalues"] + R["eigenvalues"]["smallest"]["eigenvalues"]
    )
    expected = {
        "num_parameters": R["num_parameters"],
        "cost": R["cost"],
        "gradient_norm": R["gradient_norm"],
        "trace": R["trace"]["value"],
        "lambda_max": max(lam),
        "lambda_min": min(lam),
        "condition_number": R["verdict"]["condition_number"],
    }
    for key, value in expected.items():
        assert key in cards, key
        assert float(cards[key]) == pytest.approx(float("inf") if value is None else value, rel=1e-15), key


def test_settings_and_versions_recorded(demo):
    _, page, R = demo
    s, v = R["settings"], R["versions"]
    assert (s["num_samples"], s["num_batches"], s["dtype"], s["device"], s["seed"]) == (3, 1, "float64", "cpu", 0)
    assert s["dense_max_params"] == 2000 and s["date"]
    assert set(v) >= {"nethessian", "torch", "numpy", "scipy", "python"}
    assert v["nethessian"] == nh.__version__ and v["torch"] == torch.__version__
    for x in (v["torch"], v["numpy"], v["scipy"], v["python"]):
        assert x in page


def test_matrix_free_path_says_so_and_is_right(matrix_free, mlp_problem):
    _, page, R = matrix_free
    model, loss_fn, data = mlp_problem
    P = sum(p.numel() for p in model.parameters())
    assert R["mode"] == "matrix-free" and R["num_parameters"] == P > 10
    assert "Matrix-free mode." in page and "dense_max_params = 10" in page
    assert "Lanczos" in page and "Hutch++" in page and "stochastic lanczos quadrature" in page.lower()
    assert R["hessian"] is None and 'id="fig-heatmap"' not in page
    lam = torch.linalg.eigvalsh(nh.hessian(model, loss_fn, data).dense)
    top, bottom = R["eigenvalues"]["largest"], R["eigenvalues"]["smallest"]
    assert len(top["eigenvalues"]) == len(bottom["eigenvalues"]) == SMALL["num_eigs"]
    assert top["eigenvalues"][0] == pytest.approx(float(lam[-1]), rel=1e-3)
    assert bottom["eigenvalues"][0] == pytest.approx(float(lam[0]), rel=1e-3, abs=1e-3 * float(lam.abs().max()))
    tr = R["trace"]
    assert tr["method"] == "hutch++" and tr["num_matvecs"] == SMALL["trace_matvecs"] and tr["stderr"] > 0
    assert abs(tr["value"] - float(lam.sum())) <= 5 * tr["stderr"]
    assert sum(b["value"] for b in tr["blocks"].values()) == pytest.approx(tr["value"], rel=1e-10)
    assert R["density"]["num_probes"] == SMALL["density_probes"]
    assert R["problem"]["name"] == "a small MLP"
    if R["verdict"]["num_negative"] and R["verdict"]["num_positive"]:
        assert R["verdict"]["condition_number_is_lower_bound"] and "≥" in page


def test_unwritable_folder_is_an_input_error(tmp_path):
    model, loss_fn, data = nh.examples.two_layer()
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "report"):
        with pytest.raises(InputError, match=re.escape(str(out))) as info:
            build_report(model, loss_fn, data, out)
        assert "out_dir" in str(info.value)
    with pytest.raises(InputError, match="num_eigs"):
        build_report(model, loss_fn, data, tmp_path, num_eigs=0)


def _chromium():
    return (
        shutil.which("chromium")
        or shutil.which("chromium-browser")
        or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    )


CHECK_IMAGES = (
    "<script>window.addEventListener('load', () => { const im = [...document.images];"
    " const ok = im.filter(i => i.complete && i.naturalWidth > 0).length;"
    " document.body.setAttribute('data-images-ok', ok + '/' + im.length); });</script>"
)


@pytest.mark.skipif(_chromium() is None, reason="headless Chromium is not installed")
def test_every_image_loads_in_headless_chromium(demo, tmp_path):
    paths, page, _ = demo
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", CHECK_IMAGES + "</body>"), encoding="utf-8")
    cmd = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        probe.as_uri(),
    ]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=90).stdout
    found = re.search(r'data-images-ok="(\d+)/(\d+)"', dom)
    assert found, dom[:500]
    ok, total = map(int, found.groups())
    assert total == len(_images(page)) == 5 and ok == total


WORKER = """
import datetime, os, sys
import torch
import nethessian as nh
from nethessian._app.report import build_report
rank, port, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
torch.distributed.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=30))
torch.set_num_threads(1)
model, loss_fn, (X, y) = nh.examples.mlp((4, 6, 3), n=33, dtype=torch.float64)
build_report(model, loss_fn, nh.shard((X, y)), f"{out}/rank{rank}", dense_max_params=10, num_eigs=3,
             trace_matvecs=12, density_probes=2, lanczos_steps=10)
"""


def test_two_processes_compute_together_and_rank_0_writes(tmp_path):
    import socket
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), port, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in (0, 1)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
    assert not (tmp_path / "rank1").exists()
    _, R = _load(ReportPaths(tmp_path / "rank0" / "report.html", tmp_path / "rank0" / "report.json"))
    model, loss_fn, data = nh.examples.mlp((4, 6, 3), n=33, dtype=torch.float64)
    J, g = nh.Objective(model, loss_fn, data).value_and_grad()
    assert R["cost"] == pytest.approx(J, rel=1e-12)
    assert R["gradient_norm"] == pytest.approx(float(g.norm()), rel=1e-10)
    assert (R["settings"]["world_size"], R["settings"]["num_samples"]) == (2, 33)


@pytest.mark.parametrize("radius", [1.0, 0.1, 0.37, 3.3e-3, 7.77])
def test_alpha_grid_is_symmetric_with_an_exact_zero(radius):
    from nethessian._app.report_sections import alpha_grid

    a = alpha_grid(radius)
    assert a.numel() == 41 and a[20].item() == 0.0  # 0 · (r / 20): exactly zero on any CPU
    torch.testing.assert_close(a, -a.flip(0), rtol=0, atol=0)
    assert a[-1].item() == pytest.approx(radius, rel=1e-15) and bool((a.diff() > 0).all())


def test_report_command_builds_one_objective(tmp_path, monkeypatch, capsys):
    from nethessian._app.cli import main
    from nethessian._objective import Objective

    built = []
    init = Objective.__init__
    monkeypatch.setattr(Objective, "__init__", lambda self, *a, **k: (built.append(1), init(self, *a, **k))[1])
    assert main(["report", "-o", str(tmp_path), "--save", str(tmp_path / "r.json")]) == 0
    assert len(built) == 1  # one Objective per problem: the GGN section shares it (from_objective)
    built.clear()
    hessian_only = [sid for sid, _ in SECTIONS if sid not in ("ggn", "input-hessian")]
    assert main(["report", "-o", str(tmp_path), "--save", str(tmp_path / "r.json"), "--sections", *hessian_only]) == 0
    assert len(built) == 1  # the report, its quadratic model and the saved fingerprint share one objective
    R = json.loads((tmp_path / "report.json").read_text())
    assert (
        R["problem"]["builtin"] == "two-layer"
        and "BUILTINS[&#x27;two-layer&#x27;](seed=0)" in (tmp_path / "report.html").read_text()
    )


def _count_products(monkeypatch):
    from nethessian.operators._hessian import HessianOperator

    seen = []
    orig = HessianOperator._product
    monkeypatch.setattr(HessianOperator, "_product", lambda self, V: (seen.append(V.shape[1]), orig(self, V))[1])
    return seen


def test_sections_and_budgets_change_the_work_done(tmp_path, monkeypatch, mlp_problem):
    from nethessian._app.report import planned_products

    model, loss_fn, data = mlp_problem
    seen = _count_products(monkeypatch)

    def products(**options):
        seen.clear()
        paths = build_report(
            model, loss_fn, data, tmp_path / str(len(os.listdir(tmp_path))), dense_max_params=10, **{**SMALL, **options}
        )
        return sum(seen), *_load(paths)

    base, page, R = products(sections=["summary"])
    assert R["sections"] == ["summary", "problem", "gradient", "reproduce"]
    assert R["eigenvalues"] is None and R["trace"] is None and 'id="eigenvalues"' not in page
    for m in (12, 24):
        n, page, R = products(sections=["trace"], trace_matvecs=m)
        assert n - base == m == R["trace"]["num_matvecs"] and 'id="trace"' in page and 'id="density"' not in page
        P = R["num_parameters"]
        assert planned_products(
            P, {**SMALL, "dense_max_params": 10, "trace_matvecs": m, "sections": R["sections"]}
        ) == (m, m)
    n, _, R = products(sections=["density"], density_probes=3, lanczos_steps=7)
    assert n - base == R["density"]["num_matvecs"] >= 3 * 7  # (+ a 2-product symmetry check)
    with pytest.raises(InputError, match="unknown report section"):
        build_report(model, loss_fn, data, tmp_path / "x", sections=["nope"])


SMALL_PROBLEM = """
import torch
from torch import nn
torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
g = torch.Generator().manual_seed(1)
data = (torch.randn(32, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (32,), generator=g))
loss_fn = nn.CrossEntropyLoss()
"""


def test_report_command_takes_the_options_and_states_its_cost(tmp_path, capsys):
    from nethessian._app.cli import main

    f = tmp_path / "p.py"
    f.write_text(SMALL_PROBLEM)
    argv = [
        "report",
        str(f),
        "-o",
        str(tmp_path / "r"),
        "--dense-max-params",
        "10",
        "--num-eigs",
        "2",
        "--trace-matvecs",
        "8",
        "--density-probes",
        "2",
        "--lanczos-steps",
        "6",
        "--sections",
        "eigenvalues",
        "trace",
    ]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert re.search(r"matrix-free; \d+–\d+ .*Hessian-vector products × [\d.e+-]+ ms each ≈", err)
    assert "trace (Hutch++) done in" in err and "spectral density" not in err
    R = json.loads((tmp_path / "r" / "report.json").read_text())
    s = R["settings"]
    assert (s["dense_max_params"], s["num_eigs"], s["trace_matvecs"], s["density_probes"], s["lanczos_steps"]) == (
        10,
        2,
        8,
        2,
        6,
    )
    assert R["density"] is None and R["trace"]["num_matvecs"] == 8
    assert len(R["eigenvalues"]["largest"]["eigenvalues"]) == 2
    assert main(["report", str(f), "--sections", "nope"]) == 2


def test_report_ncv_sizes_every_eigenvalue_run_and_a_too_small_one_is_refused_first(tmp_path, capsys):
    """``--ncv`` (a large model's way to fit the report in memory) reaches every Lanczos run: the
    stated memory bound of each is that of an ``ncv``-vector basis; fewer than ``num_eigs + 1``
    vectors is refused before any product."""
    from nethessian._app.cli import main
    from nethessian.linalg._memory import lanczos_bytes

    f = tmp_path / "p.py"
    f.write_text(SMALL_PROBLEM)
    common = ["report", str(f), "--dense-max-params", "10", "--num-eigs", "2", "--sections", "eigenvalues", "ggn"]
    assert main(common + ["-o", str(tmp_path / "r"), "--ncv", "7"]) == 0
    R = json.loads((tmp_path / "r" / "report.json").read_text())
    assert R["settings"]["ncv"] == 7
    P = 51  # 4·6 + 6 + 6·3 + 3
    want = lanczos_bytes(P, 7, 1, 2, torch.float64, torch.float64, False)
    assert R["eigenvalues"]["largest"]["memory_bytes"] == R["eigenvalues"]["smallest"]["memory_bytes"] == want
    assert R["eigenvalues"]["largest"]["converged"]
    assert "ncv=7" in (tmp_path / "r" / "report.html").read_text()
    capsys.readouterr()
    assert main(common + ["-o", str(tmp_path / "bad"), "--ncv", "2"]) != 0
    assert "ncv" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "report.json").exists()
