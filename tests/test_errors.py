"""Bad input gets a clear error that names the problem and the fix."""

import copy

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
    import re

    need = int(re.search(r"max_bytes=(\d+)", msg).group(1))  # the matrix and one chunk of products
    assert need >= P * P * 8
    for _ in range(3):  # the limit named covers what was checked so far (matrix, then a measured chunk)
        try:
            H = nh.hessian(model, loss_fn, data, max_bytes=2 * need)
            break
        except nh.DenseTooLargeError as again:
            need = int(re.search(r"max_bytes=(\d+)", str(again)).group(1))
    assert H.dense.shape == (P, P)


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
    calls = {"n": 0, "from": float("inf")}

    def flaky(out, t):
        calls["n"] += 1
        loss = ((out - t) ** 2).mean()
        return loss * float("nan") if calls["n"] >= calls["from"] and t.shape[0] == 2 else loss

    op = nh.HessianOperator(model, flaky, [(X[:4], y[:4]), (X[4:], y[4:])], cache=False, reduction="mean")
    calls["from"] = calls["n"] + 3  # finite through construction, NaN from the second product on
    with pytest.raises(nh.NonFiniteError, match=r"at matrix-vector product \d+: .*batch 1 has a non-finite loss"):
        nh.eigenvalues(op, k=2, check_symmetry=False)


def test_half_precision_computes_in_float32_and_inference_mode_is_refused():
    model, loss_fn, data = _problem()
    ref = nh.HessianOperator(copy.deepcopy(model).half().float(), loss_fn, data).to_dense()
    op = nh.HessianOperator(copy.deepcopy(model).half(), loss_fn, data)
    assert op.dtype == torch.float32 and op.objective.precision_note is None  # float32 is not half
    torch.testing.assert_close(op.to_dense(), ref, rtol=1e-5, atol=1e-6)
    model.double()
    with torch.inference_mode(), pytest.raises(nh.InputError, match="inference_mode"):
        nh.HessianOperator(model, loss_fn, data)


def test_dtype_reaches_the_objective_from_every_operator():
    model, loss_fn, data = _problem()
    model.float()
    H64 = nh.HessianOperator(copy.deepcopy(model).double(), loss_fn, data).to_dense()
    for make in (nh.HessianOperator, nh.GGNOperator):
        op = make(model, loss_fn, data, dtype=torch.float64)
        assert op.dtype == torch.float64
        if make is nh.HessianOperator:
            torch.testing.assert_close(op.to_dense(), H64, rtol=1e-10, atol=1e-12)
    assert next(model.parameters()).dtype == torch.float32  # the user's model is left as it was


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


# -- issue 9: clear errors instead of raw tracebacks -------------------------------------------------
@pytest.mark.parametrize("targets", [torch.zeros(0, 2, dtype=DT), torch.zeros(6, 0, dtype=DT)])
def test_empty_targets(targets):
    model, loss_fn, (X, _) = _problem()
    with pytest.raises(nh.InputError, match="batch 0 has no targets"):
        nh.HessianOperator(model, loss_fn, (X[: targets.shape[0]], targets))


def test_every_target_ignored():
    model, _, (X, _) = _problem()
    y = torch.full((6,), -100, dtype=torch.long)
    with pytest.raises(nh.InputError, match="every target is ignored"):
        nh.hessian(model, nn.CrossEntropyLoss(), (X, y))


@pytest.mark.parametrize(
    "loss_fn, match",
    [
        (lambda out, t: torch.tensor(float(((out - t) ** 2).mean()), dtype=DT), "detached"),
        (lambda out, t: ((out - t) ** 2).mean().detach(), "detached"),
        (lambda out, t: (((out - t) ** 2).sum() * 100).long(), "returned a torch.int64 tensor"),
    ],
)
def test_detached_or_integer_loss(loss_fn, match):
    model, _, data = _problem()
    with pytest.raises(nh.InputError, match=match):
        nh.HessianOperator(model, loss_fn, data)


def test_products_inside_inference_mode():
    model, loss_fn, data = _problem()
    op = nh.HessianOperator(model, loss_fn, data, cache=False)
    with torch.inference_mode(), pytest.raises(nh.InputError, match="inference_mode"):
        op @ torch.ones(op.shape[0], dtype=DT)
    obj = nh.Objective(model, loss_fn, data)
    with torch.inference_mode(), pytest.raises(nh.InputError, match="inference_mode"):
        obj.gradient()


@pytest.mark.parametrize("reentrant", [True, False])
def test_reentrant_activation_checkpointing(reentrant):
    from torch.utils.checkpoint import checkpoint

    class Checkpointed(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = _problem()[0]

        def forward(self, x):
            return checkpoint(self.inner, x, use_reentrant=reentrant)

    model, loss_fn, data = Checkpointed(), _problem()[1], _problem()[2]
    if reentrant:
        with pytest.raises(nh.InputError, match="use_reentrant=False"):
            nh.HessianOperator(model, loss_fn, data)
    else:
        # non-reentrant checkpointing recomputes the forward during backward with the module's own
        # weights, not nethessian's: gradients at any other point would be silently wrong
        # (Newton steps, finite differences). The cross-check refuses it and names the cause ...
        with pytest.raises(nh.InputError, match="checkpointing"):
            nh.HessianOperator(model, loss_fn, data)
        # ... and finite differences of the model's own gradients (weights really moved) are right
        op = nh.HessianOperator(model, loss_fn, data, method="finite-difference")
        torch.testing.assert_close(op.to_dense(), nh.hessian(model.inner, loss_fn, data).dense, rtol=1e-5, atol=1e-7)


def test_params_selected_but_unused():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.used, self.spare = nn.Linear(3, 2).to(DT), nn.Linear(3, 2).to(DT)

        def forward(self, x):
            return self.used(x)

    _, loss_fn, data = _problem()
    with pytest.raises(nh.InputError, match="do not depend on the selected parameters.*params="):
        nh.HessianOperator(Unused(), loss_fn, data, params=["spare.*"])


@pytest.mark.parametrize("params", [[0], 0, ["0.weight", None], "0.weight"])
def test_params_must_be_names(params):
    model, loss_fn, data = _problem()
    if params == "0.weight":  # one string is one name
        assert nh.HessianOperator(model, loss_fn, data, params=params).shape == (12, 12)
        return
    with pytest.raises(nh.InputError, match="params must be None or a list of parameter names"):
        nh.HessianOperator(model, loss_fn, data, params=params)


@pytest.mark.parametrize("data", ["not data", b"bytes", 3, {"x": 1}, None])
def test_data_that_is_not_data(data):
    model, loss_fn, _ = _problem()
    with pytest.raises(nh.InputError, match="neither an \\(inputs, targets\\) pair"):
        nh.HessianOperator(model, loss_fn, data)


@pytest.mark.parametrize("half", ["0", "2"])
def test_model_mixing_dtypes(half):
    model, loss_fn, data = _problem()
    model.float()
    model[int(half)].half()
    with pytest.raises(nh.InputError, match="mixes parameter dtypes.*float16.*float32.*model.float"):
        nh.HessianOperator(model, loss_fn, data, params=["0.*"])


def test_nan_in_unselected_parameter_or_buffer_is_named():
    model, loss_fn, data = _problem()
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(nh.NonFiniteError, match="fixed \\(unselected\\) parameter '2.weight'"):
        nh.HessianOperator(model, loss_fn, data, params=["0.*"])
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).to(DT).eval()
    model[1].running_var[2] = float("nan")
    with pytest.raises(nh.NonFiniteError, match="buffer '1.running_var' contains NaN"):
        nh.HessianOperator(model, loss_fn, data)


def test_infinite_buffer_is_allowed():
    """Attention masks are often buffers filled with -inf: they are not an error."""

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2).to(DT)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf")], dtype=DT))

        def forward(self, x):
            return self.fc(x) * torch.exp(self.mask.clamp(min=-1.0))

    _, loss_fn, data = _problem()
    assert nh.HessianOperator(Masked(), loss_fn, data).shape == (8, 8)


def test_inputs_the_model_cannot_take_get_a_clear_error():
    model, loss_fn, (X, y) = _problem()
    with pytest.raises(
        nh.InputError, match=r"batch 0: the model's forward failed on these inputs \(tensor \(6, 3\) int64\)"
    ):
        nh.HessianOperator(model, loss_fn, (X.long(), y))


@pytest.mark.parametrize("seed", [2**70, -(2**64)])
def test_seeds_that_do_not_fit_a_generator_are_refused(seed):
    with pytest.raises(nh.InputError, match="64 bits"):
        nh.eigenvalues(torch.eye(30, dtype=DT), k=2, seed=seed)


def test_trace_exact_must_be_a_bool():
    with pytest.raises(nh.InputError, match="exact must be True or False"):
        nh.trace(torch.eye(5, dtype=DT), exact="no")
