"""The benchmark workloads (models, losses, data) and the core benchmark's Problem.

W2/W3/W4 are bench_core's (FACTS.md), MLP/CNN bench_spectrum's (MLP = W3 with
``nh.examples.mlp``'s defaults, CNN = W4).
"""

from __future__ import annotations

import copy

import torch
from torch.func import functional_call, grad as func_grad, jvp, vmap

import nethessian as nh

K_BATCH = 32  # columns of the "many HVPs at once" block

# name -> (description, builder returning (model, loss_fn, (X, y)), number of parameters)
WORKLOADS = {
    "W2": (
        "MLP 64-48-32-10 tanh, CE, N=512 (P=5,018)",
        lambda: nh.examples.mlp((64, 48, 32, 10), n=512, activation="tanh", seed=0),
        5018,
    ),
    "W3": (
        "MLP 784-128-64-10 tanh, CE, N=1024 (P=109,386)",
        lambda: nh.examples.mlp((784, 128, 64, 10), n=1024, activation="tanh", seed=0),
        109386,
    ),
    "W4": ("CNN conv 1->8->16, N=256 (P=5,258)", lambda: nh.examples.cnn(seed=0), 5258),
    "MLP": ("MLP 784-128-64-10 tanh, CE, N=1024 (P=109,386) = nh.examples.mlp()", nh.examples.mlp, 109386),
    "CNN": ("CNN conv 1->8->16, max-pool, linear, N=256 (P=5,258) = nh.examples.cnn()", nh.examples.cnn, 5258),
}
CORE_WORKLOADS = ("W2", "W3", "W4")
SPECTRUM_WORKLOADS = ("MLP", "CNN")


def describe(names):
    """``{name: description}`` of the workloads ``names``."""
    return {n: WORKLOADS[n][0] for n in names}


def make_workload(name):
    """``(model, loss_fn, X, y)`` of workload ``name``; checks its parameter count."""
    if name not in WORKLOADS:
        raise ValueError(name)
    _, build, P = WORKLOADS[name]
    model, loss_fn, (X, y) = build()
    got = sum(p.numel() for p in model.parameters())
    assert got == P, (name, got, P)
    return model, loss_fn, X, y


def rel_err(a, ref):
    """``‖a − ref‖ / ‖ref‖`` in float64."""
    a, ref = a.double(), ref.double()
    return float((a - ref).norm() / ref.norm())


class Problem:
    """One workload with every method's callable, all on the same model/data/vector."""

    def __init__(self, name, seed=0):
        self.name = name
        model, loss_fn, X, y = make_workload(name)
        self.model, self.loss_fn, self.X, self.y = model, loss_fn, X, y
        self.names = [n for n, _ in model.named_parameters()]
        self.shapes = [tuple(p.shape) for _, p in model.named_parameters()]
        self.numels = [p.numel() for _, p in model.named_parameters()]
        self.P = sum(self.numels)
        self.params = {n: p.detach() for n, p in model.named_parameters()}
        g = torch.Generator().manual_seed(1234 + seed)
        self.v = torch.randn(self.P, generator=g, dtype=X.dtype)
        self.V = torch.randn(self.P, K_BATCH, generator=g, dtype=X.dtype)
        self.v_dict = self.split(self.v)
        self.V_dict = {n: t.movedim(-1, 0).contiguous() for n, t in self.split(self.V).items()}  # (k, *shape)
        self.v_list = list(self.v_dict.values())

    def split(self, flat):
        """Per-parameter views of a flat (P, ...) tensor, as ``{name: tensor}``."""
        tail = tuple(flat.shape[1:])
        return {n: p.reshape(s + tail) for n, p, s in zip(self.names, torch.split(flat, self.numels), self.shapes)}

    def flat(self, tensors):
        return torch.cat([t.reshape(-1) for t in tensors])

    # --- the unit: one forward + backward, plain torch.autograd --------------------------
    def gradient(self):
        params = list(self.model.parameters())
        loss = self.loss_fn(self.model(self.X), self.y)
        return torch.autograd.grad(loss, params)

    # --- nethessian ----------------------------------------------------------------------
    def nh_operator(self, **kw):
        op = nh.HessianOperator(self.model, self.loss_fn, (self.X, self.y), **kw)
        assert tuple(op.layout.names) == tuple(self.names), (op.layout.names, self.names)
        return op

    # --- peers ---------------------------------------------------------------------------
    def f_dict(self, p):
        return self.loss_fn(functional_call(self.model, p, (self.X,)), self.y)

    def func_hvp(self, v_dict):
        """torch.func forward-over-reverse: jvp(grad(f))."""
        return jvp(func_grad(self.f_dict), (self.params,), (v_dict,))[1]

    def func_hvp_vmap(self, V_dict):
        return vmap(self.func_hvp)(V_dict)

    def leaves(self):
        return {n: p.detach().clone().requires_grad_(True) for n, p in self.params.items()}

    def db_rebuilt(self, v_list):
        """Plain double backward, gradient graph rebuilt at every call."""
        leaves = self.leaves()
        ps = list(leaves.values())
        loss = self.f_dict(leaves)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        return torch.autograd.grad(g, ps, v_list)

    def raw_kept_graph(self):
        """Plain-torch kept gradient graph (the floor nethessian's kept-graph engine builds on)."""
        leaves = self.leaves()
        ps = list(leaves.values())
        with torch.enable_grad():
            loss = self.f_dict(leaves)
            g = torch.autograd.grad(loss, ps, create_graph=True)
        return ps, g

    # --- references (float64) ------------------------------------------------------------
    def reference_hvp(self, V):
        """float64 double backward of a float64 copy of the model; V (P,) or (P, k)."""
        m64 = copy.deepcopy(self.model).double()
        X64 = self.X.double()
        ps = list(m64.parameters())
        loss = self.loss_fn(m64(X64), self.y)
        g = torch.autograd.grad(loss, ps, create_graph=True)
        cols = V[:, None] if V.ndim == 1 else V
        out = []
        for c in cols.double().T:
            vs = [t.reshape(s) for t, s in zip(torch.split(c, self.numels), self.shapes)]
            out.append(self.flat(torch.autograd.grad(g, ps, vs, retain_graph=True)))
        out = torch.stack(out, dim=1)
        return out[:, 0] if V.ndim == 1 else out
