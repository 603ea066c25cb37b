"""The factor path's building blocks (``structured/_factors``, ``_transpose``, ``_unfold``) in float64.

Each fast piece against an independent autograd computation: factors at a max-pool's
maxima (``Scattered``) against the pool's VJP, convolution weight gradients gathered at
the maxima against per-sample autograd, closed-form activation derivatives against
double backward, and matrix-weighted factors against the dense matrix they stand for.
The end-to-end diagonals are tested in test_structured.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vjp, vmap

from nethessian.structured._factors import Factors
from nethessian.structured._graph import Step
from nethessian.structured._transpose import diagonal_derivatives
from nethessian.structured._unfold import Scattered, _gathered_weight_grads, conv_factor_grads, pool_indices

D = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _step(module, label="m", kind="linear", params=()):
    def fn(xs, state):
        return functional_call(module, {k: state[k] for k in params}, (xs[0],))

    return Step(name="y", label=label, kind=kind, inputs=("x",), params=tuple(params), fn=fn, module=module)


@pytest.mark.parametrize("pool", [nn.MaxPool2d(2), nn.MaxPool2d(3, stride=1, padding=1), nn.MaxPool2d(2, dilation=2)])
def test_scattered_is_the_max_pool_vjp_and_scales_like_a_diagonal(pool):
    n, K, C = 3, 4, 2
    x = torch.randn(n, C, 7, 7, generator=_gen(0), dtype=D)
    y, back = vjp(pool, x)
    V = torch.randn(n, K, *y.shape[1:], generator=_gen(1), dtype=D)
    ref = vmap(lambda v: back(v)[0], in_dims=1, out_dims=1)(V).reshape(n, K, -1)
    S = Scattered(V.reshape(n, K, C, -1), pool_indices(_step(pool), x), 49)
    torch.testing.assert_close(S.dense(), ref, **TOL)
    s = torch.randn(n, C * 49, generator=_gen(2), dtype=D)
    torch.testing.assert_close(S.scaled(s).dense(), ref * s[:, None, :], **TOL)


def _per_sample_conv_grads(conv, x, V):
    """``J_θ,nᵀ v_{n,k}`` by autograd, sample by sample and factor by factor: ``(n, K, P)``."""
    params = dict(conv.named_parameters())
    rows = []
    for i in range(x.shape[0]):
        y, back = vjp(lambda p: functional_call(conv, p, (x[i : i + 1],)), params)
        grads = [back(v.reshape(y.shape))[0] for v in V[i]]
        rows.append(torch.stack([torch.cat([g["weight"].reshape(-1), g["bias"]]) for g in grads]))
    return torch.stack(rows)


@pytest.mark.parametrize(
    "conv, pool",
    [
        (nn.Conv2d(1, 3, 3), nn.MaxPool2d(2)),
        (nn.Conv2d(4, 4, 2, groups=2, stride=2, padding=1), nn.MaxPool2d(2, stride=1)),  # overlapping windows
        (nn.Conv2d(2, 2, 2, dilation=2, padding=1), nn.MaxPool2d(3, stride=2)),
    ],
)
def test_conv_weight_gradients_gathered_at_the_maxima(conv, pool):
    torch.manual_seed(0)
    conv = conv.to(D)
    n, K = 2, 5
    x = torch.randn(n, conv.in_channels, 9, 9, generator=_gen(3), dtype=D)
    y = conv(x)
    z = pool(y)
    Vz = torch.randn(n, K, z[0].numel(), generator=_gen(4), dtype=D)
    S = Scattered(Vz.reshape(n, K, y.shape[1], -1), pool_indices(_step(pool), y), y[0, 0].numel())
    step = _step(conv, params=("weight", "bias"))
    ref = _per_sample_conv_grads(conv, x, S.dense())
    args = (conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    gathered = _gathered_weight_grads(conv, x, S, args).reshape(n, K, -1)
    torch.testing.assert_close(gathered, ref[:, :, : conv.weight.numel()], **TOL)
    torch.testing.assert_close(conv_factor_grads(step, x, S), ref, **TOL)  # whichever path it picks
    torch.testing.assert_close(conv_factor_grads(step, x, S.dense()), ref, **TOL)


ACTIVATIONS = [
    (nn.Tanh(), "tanh"),
    (nn.Sigmoid(), "sigmoid"),
    (nn.ReLU(), "relu"),
    (nn.LeakyReLU(0.2), "leaky_relu"),
    (None, "tanh"),  # functional torch.tanh / F.relu / sigmoid, recognised by label
    (None, "relu"),
    (None, "sigmoid"),
    (nn.Softplus(), "softplus"),  # no closed form: the double-backward fallback
]


@pytest.mark.parametrize("module, name", ACTIVATIONS)
def test_activation_derivatives_from_the_forward_output(module, name):
    f = module if module is not None else {"tanh": torch.tanh, "relu": F.relu, "sigmoid": torch.sigmoid}[name]
    step = Step(
        name="y", label=f"{name} (node y)", kind="elementwise", inputs=("x",), params=(), fn=lambda xs, st: f(xs[0])
    )
    step.module = module
    x = torch.randn(4, 3, 5, generator=_gen(5), dtype=D)
    s1, s2 = diagonal_derivatives(step, x, {}, f(x))
    xg = x.clone().requires_grad_(True)
    (d1,) = torch.autograd.grad(f(xg).sum(), xg, create_graph=True)
    torch.testing.assert_close(s1, d1.detach().reshape(4, -1), **TOL)
    if name in ("relu", "leaky_relu"):
        assert s2 is None
    else:
        (d2,) = torch.autograd.grad(d1.sum(), xg)
        torch.testing.assert_close(s2, d2.reshape(4, -1), **TOL)


def test_matrix_weighted_factors_stand_for_their_matrix():
    """``Vᵀ W V + diag(d)``: its diagonal, and the same matrix after ``eigen`` and ``absorb_diagonal``."""
    n, K, Dm = 3, 4, 6
    V = torch.randn(n, K, Dm, generator=_gen(6), dtype=D)
    A = torch.randn(n, K, K, generator=_gen(7), dtype=D)
    W, d = A + A.transpose(1, 2), torch.randn(n, Dm, generator=_gen(8), dtype=D)
    H = V.transpose(1, 2) @ W @ V + torch.diag_embed(d)
    fac = Factors(V, W, d)
    torch.testing.assert_close(fac.diagonal(n, Dm, d), H.diagonal(dim1=1, dim2=2), **TOL)
    for other in (fac.eigen(), fac.absorb_diagonal()):
        Vo, Wo = other.V, torch.diag_embed(other.W) if other.W.ndim == 2 else other.W
        dense = Vo.transpose(1, 2) @ Wo @ Vo + (0 if other.d is None else torch.diag_embed(other.d))
        torch.testing.assert_close(dense, H, **TOL)
    H_out = W
    start = Factors.of_matrices(H_out)
    torch.testing.assert_close(start.V.transpose(1, 2) @ start.W @ start.V, H_out, **TOL)


def test_step_functions_use_the_state_and_honour_hooks():
    """A traced step computes with the state's tensors, bypassing ``functional_call`` only where that
    changes nothing: a module holding no tensors, or a plain ``nn.Linear`` without hooks (a hooked
    one still runs its hook), all matching ``functional_call`` on the same state."""
    from nethessian.structured._graph import _hooked, build_plan

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2, bias=False))
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    names = [n for n, _ in model.named_parameters()]
    plan = build_plan(model, names)
    state = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    x = torch.randn(5, 3)
    h = x
    for step, module in zip(plan.steps, model):
        got = step.fn([h], state)
        local = {k: state[step.prefix + k] for k, _ in module.named_parameters()}
        want = functional_call(module, local, (h,))
        assert torch.allclose(got, want, rtol=1e-6, atol=1e-7)
        h = got
    assert len(seen) == 2  # the hooked Linear ran its hook once in each call
    assert not torch.allclose(h, model(x))  # the state's weights, not the module's
    plain = nn.Linear(3, 2)
    assert not _hooked(plain)
    plain.register_full_backward_hook(lambda m, gi, go: None)  # backward hooks count too
    assert _hooked(plain)
    handle = nn.modules.module.register_module_forward_pre_hook(lambda m, i: None)  # and global ones
    try:
        assert _hooked(nn.Linear(3, 2))
    finally:
        handle.remove()
