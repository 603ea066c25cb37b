"""A checkpoint is never silently ignored by the structured engine."""

import pytest
import torch
from torch import nn

import nethessian as nh


def _op():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    return nh.HessianOperator(model, nn.MSELoss(), data)


@pytest.mark.parametrize("what", ["diagonal", "trace"])
def test_auto_with_a_checkpoint_takes_the_resumable_column_loop(tmp_path, what):
    op = _op()
    H = op.to_dense()
    ck = nh.Checkpoint(tmp_path / "ck.pt", {"what": what})
    if what == "diagonal":
        r = nh.diagonal(op, method="exact", checkpoint=ck)
        torch.testing.assert_close(r.values, torch.diagonal(H), rtol=1e-12, atol=1e-14)
    else:
        r = nh.trace(op, exact=True, checkpoint=ck)
        assert r.value == pytest.approx(float(torch.trace(H)), rel=1e-12)
    assert r.engine == "autodiff" and "checkpoint" in r.engine_reason
    assert (tmp_path / "ck.pt").exists()
    # without a checkpoint the structured engine runs (supported model) and agrees
    free = nh.diagonal(op, method="exact") if what == "diagonal" else nh.trace(op, exact=True)
    assert free.engine == "structured"


def test_structured_with_a_checkpoint_is_refused(tmp_path):
    op = _op()
    ck = nh.Checkpoint(tmp_path / "ck.pt", {})
    with pytest.raises(nh.InputError, match="takes no checkpoint"):
        nh.diagonal(op, method="exact", engine="structured", checkpoint=ck)
    with pytest.raises(nh.InputError, match="takes no checkpoint"):
        nh.trace(op, exact=True, engine="structured", checkpoint=ck)


def test_dense_hessian_with_a_checkpoint_takes_the_column_loop(tmp_path):
    """nh.hessian on a Linear chain: "auto" goes structured without a checkpoint, the resumable
    column loop with one (it used to run structured and ignore the checkpoint)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    data = (torch.randn(8, 3, dtype=torch.float64), torch.randn(8, 2, dtype=torch.float64))
    free = nh.hessian(model, nn.MSELoss(), data)
    assert free.engine == "structured"
    ck = nh.Checkpoint(tmp_path / "ck.pt", {"what": "dense"})
    H = nh.hessian(model, nn.MSELoss(), data, checkpoint=ck)
    assert H.engine == "autodiff" and "checkpoint" in H.engine_reason
    assert (tmp_path / "ck.pt").exists()
    torch.testing.assert_close(H.dense, free.dense, rtol=1e-10, atol=1e-12)
    with pytest.raises(nh.InputError, match="takes no checkpoint"):
        nh.hessian(model, nn.MSELoss(), data, checkpoint=ck, engine="structured")
