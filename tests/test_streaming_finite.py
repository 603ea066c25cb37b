import torch
import pytest
import nethessian as nh
from nethessian.errors import NonFiniteError


class LogLoss(torch.nn.Module):
    reduction = "mean"

    def forward(self, out, t):
        return torch.log(out.abs() * t).mean()


@pytest.mark.parametrize("bad", [0, 1])
def test_streaming_double_backward_names_the_batch_with_an_infinite_loss(bad):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1).double()
    batches = [(torch.randn(4, 3, dtype=torch.float64), torch.ones(4, 1, dtype=torch.float64)) for _ in range(2)]
    batches[bad][1][0] = 0.0  # log(0) = -inf in that batch only
    with pytest.raises(NonFiniteError, match=f"batch {bad}"):
        op = nh.HessianOperator(model, LogLoss(), batches, method="double-backward", cache=False)
        op @ torch.ones(op.shape[0], dtype=torch.float64)
