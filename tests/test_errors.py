"""Bad input gets a clear error that names the problem and the fix."""
import pytest
import torch
from torch import nn

import nethessian as nh

DT = torch.float64


def _problem(n=6):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(DT)
    return model, nn.MSELoss(), (torch.randn(n, 3, dtype=DT), torch.randn(n, 2, dtype=DT))


@pytest.mark.parametrize("where", ["inputs", "targets"])
def test_nan_in_data_names_the_batch(where):
    model, loss_fn, (X, y) = _problem()
    batches = [(X[:3], y[:3]), (X[3:].clone(), y[3:].clone())]
    (batches[1][0] if where == "inputs" else batches[1][1])[1, 0] = float("inf")
    with pytest.raises(nh.NonFiniteError, match=f"batch 1: {where} contain 1 NaN or Inf"):
        nh.HessianOperator(model, loss_fn, batches)


def test_nan_in_parameters_names_the_parameter():
    model, loss_fn, data = _problem()
    with torch.no_grad():
        model[2].bias[0] = float("nan")
    with pytest.raises(nh.NonFiniteError, match="'2.bias'"):
        nh.hessian(model, loss_fn, data)


def test_loss_not_scalar():
    model, _, data = _problem()
    with pytest.raises(nh.InputError, match="reduction='none'.*must be a scalar.*reduction='mean'"):
        nh.hessian(model, nn.MSELoss(reduction="none"), data)
    with pytest.raises(nh.InputError, match="must return a scalar, got \\(6, 2\\)"):
        nh.hessian(model, lambda out, y: (out - y) ** 2, data)


def test_outputs_and_targets_that_do_not_fit():
    model, loss_fn, (X, y) = _problem()
    with pytest.raises(nh.InputError, match=r"outputs have shape \(6, 2\) but targets \(6,\).*Reshape"):
        nh.hessian(model, loss_fn, (X, y[:, 0]))
    with pytest.raises(nh.InputError, match="loss_fn failed"):
        nh.hessian(model, nn.CrossEntropyLoss(), (X, torch.zeros(5, dtype=torch.long)))


def test_no_parameter_matches():
    model, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match=r"no parameter matches 'conv\.\*'.*0\.weight"):
        nh.hessian(model, loss_fn, data, params=["conv.*"])


def test_dense_too_large_says_bytes_and_alternative():
    model, loss_fn, data = _problem()
    P = sum(p.numel() for p in model.parameters())
    with pytest.raises(nh.DenseTooLargeError) as exc:
        nh.hessian(model, loss_fn, data, max_bytes=100)
    msg = str(exc.value)
    assert f"{P * P * 8:,} bytes" in msg and "max_bytes=" in msg and "HessianOperator" in msg
    assert nh.hessian(model, loss_fn, data, max_bytes=P * P * 8).dense.shape == (P, P)


def test_model_that_returns_non_tensor():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            return {"out": self.fc(x)}

    _, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match="returned a dict"):
        nh.hessian(Bad().to(DT), loss_fn, data)


def test_bad_vector_shape_for_operator():
    model, loss_fn, data = _problem()
    op = nh.HessianOperator(model, loss_fn, data)
    with pytest.raises(nh.InputError, match=r"shape \(\d+,\) or \(\d+, k\)"):
        op @ torch.ones(3, dtype=DT)
    with pytest.raises(nh.NonFiniteError):
        op @ torch.full((op.shape[0],), float("nan"), dtype=DT)


def test_unknown_method():
    model, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match="valid: auto, forward-over-reverse, double-backward"):
        nh.HessianOperator(model, loss_fn, data, method="magic")


def test_data_that_is_a_tensor():
    model, loss_fn, (X, y) = _problem()
    with pytest.raises(nh.InputError, match=r"\(inputs, targets\) pair"):
        nh.HessianOperator(model, loss_fn, X)


def test_nan_mid_run_names_the_product_and_the_batch():
    """A loss that is finite at θ0's first evaluation but NaN later (here: from the 3rd pass on)."""
    model, _, (X, y) = _problem()
    calls = {"n": 0}

    def flaky(out, t):
        calls["n"] += 1
        loss = ((out - t) ** 2).mean()
        return loss * float("nan") if calls["n"] >= 4 and t.shape[0] == 2 else loss

    op = nh.HessianOperator(model, flaky, [(X[:4], y[:4]), (X[4:], y[4:])], cache=False, reduction="mean")
    with pytest.raises(nh.NonFiniteError, match=r"at matrix-vector product \d+: .*batch 1 has a non-finite loss"):
        nh.eigenvalues(op, k=2, check_symmetry=False)


def test_half_precision_and_inference_mode_are_refused_clearly():
    model, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match="float16.*model.float\\(\\)"):
        nh.HessianOperator(model.half(), loss_fn, data)
    model.double()
    with torch.inference_mode(), pytest.raises(nh.InputError, match="inference_mode"):
        nh.HessianOperator(model, loss_fn, data)


def test_empty_params_selection():
    model, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match="params=\\[\\] selects no parameter"):
        nh.HessianOperator(model, loss_fn, data, params=[])


def test_other_warnings_in_forward_are_not_errors():
    class Warns(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x):
            import warnings
            warnings.warn("some deprecation the user does not control", UserWarning)
            return self.fc(x)

    _, loss_fn, data = _problem()
    with pytest.warns(UserWarning, match="deprecation"):
        nh.HessianOperator(Warns().double(), loss_fn, data)
