"""Progress: a bar on a terminal; off a terminal, lines with done/total, rate and ETA."""

import io
import sys

import pytest
import torch

import nethessian as nh
from nethessian._progress import Progress, format_seconds


def test_log_lines_when_the_stream_is_not_a_terminal():
    out = io.StringIO()
    with Progress(10, "dense columns", unit="col", enabled=True, stream=out, interval=0.0) as p:
        for _ in range(10):
            p.update(1)
    lines = out.getvalue().strip().splitlines()
    assert len(lines) == 10 and lines[-1].startswith("nethessian: dense columns 10/10 col (100%)")
    assert " col/s, ETA " in lines[0] and "1/10 col (10%)" in lines[0]


def test_auto_mode_is_silent_for_short_work_and_lines_are_rate_limited():
    out = io.StringIO()
    with Progress(5, "quick", enabled=None, stream=out) as p:  # auto: nothing within the first 3 s
        p.update(5)
    assert out.getvalue() == ""
    out = io.StringIO()
    with Progress(100, "slow", enabled=True, stream=out, interval=3600.0) as p:
        for _ in range(99):
            p.update(1)
    assert len(out.getvalue().strip().splitlines()) == 1  # the first line, then nothing within the hour
    with Progress(4, "x", enabled=False, stream=out) as p:
        p.update(4)
    assert format_seconds(95.0) == "1m35s"


@pytest.mark.parametrize("what", ["diagonal", "dense"])
def test_estimators_report_progress_in_a_log(what, monkeypatch):
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2)).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    op = nh.HessianOperator(model, torch.nn.MSELoss(), data)
    P = op.shape[0]
    if what == "diagonal":
        nh.diagonal(op, method="exact", engine="autodiff", progress=True, chunk_size=4)
    else:
        op.to_dense(progress=True)
    lines = [ln for ln in err.getvalue().splitlines() if ln.startswith("nethessian:")]
    assert lines and f"{P}/{P}" in lines[-1] and "ETA" in lines[-1]


def test_lanczos_expected_total_keeps_its_estimate_through_a_cycle_that_did_not_improve():
    """The Lanczos bar's total: extrapolated from the bound's fall between restarts; a cycle whose
    bound rose keeps the previous estimate (no jump back to the budget), until the run passes it."""
    from nethessian.linalg._lanczos_options import _expected_total

    falling = [(20, 100.0), (30, 10.0)]  # a factor 10 per 10 products: 1 is 10 products away
    first = _expected_total(falling, k=5, b=1, max_matvecs=400)
    assert first == 30 + 10 + 1 + 5  # + one block and the k verification products
    rose = falling + [(40, 12.0)]
    assert _expected_total(rose, k=5, b=1, max_matvecs=400, previous=first) == first
    assert _expected_total(rose, k=5, b=1, max_matvecs=400) == 400  # no estimate yet: the budget
    passed = falling + [(60, 12.0)]
    assert _expected_total(passed, k=5, b=1, max_matvecs=400, previous=first) == 400
