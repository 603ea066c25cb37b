"""The exact diagonal of a chain of layers from weighted outer-product factors.

For a model that is a chain ``z_0 → f_1 → z_1 → … → f_L → z_L`` (``nn.Sequential``
and its fx equivalent), the per-sample Hessian of ℓ with respect to a node is kept as

    H_z = Vᵀ W V + diag(d) = Σ_{k,l} W_kl v_k v_lᵀ + diag(d)
          (per sample; V: (n, K, D), W: (n, K, K) or diagonal (n, K), d: (n, D)),

starting from the loss's Hessian itself, ``V = I``, ``W = H_out`` (K = number of
outputs, exact for every loss setting). BackPACK starts from square-root factors
``± s sᵀ``; an eigendecomposition would give diagonal weights, but a batched ``eigh`` of
N small matrices costs about a gradient of the MLP, more than the K×K weight products
it saves. Undoing a step ``z = f(x)`` with ``J = ∂z/∂x`` and ``g = ∂ℓ/∂z``:

* factors: ``v ↦ Jᵀ v`` (``_transpose.Transpose``: closed forms for element-wise
  maps, Linear, convolutions and max-pools, else one vector-Jacobian product per
  factor); W is unchanged. Below a max-pool the factors stay as their values at the
  maxima (``_unfold.Scattered``) through element-wise maps and into a convolution's
  weight gradient, so the zeros are never formed where nothing else needs them;
* diagonal part: for a diagonal J (element-wise maps, BatchNorm in eval)
  ``Jᵀ diag(d) J = diag(J² d)``, plus the residual ``diag(g ⊙ σ'')`` of a curved
  element-wise map; for a selection J (Flatten, Identity, Dropout in eval, MaxPool:
  every output copies one input) ``Jᵀ diag(d) J = diag(Jᵀ d)``; for any other J the
  diagonal becomes D new factors ``e_j`` with weights ``d_j`` after W is made diagonal
  (``W = Q Λ Qᵀ``, ``V ↦ Qᵀ V``; exact, and the only place the factor count grows —
  with ReLU it never does).

Only as much is kept as the layers below need (the *level* of each node): a
``Linear`` on 2-D inputs needs only ``diag(H_z)`` for its weights, so below the last
layer whose input needs more, only the diagonal travels:

    diag(Jᵀ H J) = Σ_{k,l} W_kl (Jᵀ v_k) ⊙ (Jᵀ v_l) + (J ⊙ J)ᵀ d,

with ``(J ⊙ J)ᵀ d`` the VJP of the layer with squared weights (Linear, Conv,
ConvTranspose: every Jacobian entry is one weight). Parameter diagonals:
``Linear`` (2-D input) ``diag(H_W) = diag(H_z)ᵀ (x ⊙ x)``; any other layer
``Σ_{k,l} W_kl (J_θᵀ v_k) ⊙ (J_θᵀ v_l) + (J_θ ⊙ J_θ)ᵀ d`` with per-sample, per-factor
VJPs in θ and the last term as the θ-VJP at squared inputs (Linear, Conv: entries of
J_θ are inputs).
"""

from __future__ import annotations

from typing import Dict, List, Optional

import torch
from torch import nn
from torch.func import vjp, vmap

from ._transpose import Transpose, curved, squared_input_pull
from ._unfold import conv_factor_grads, dense

__all__ = ["Factors", "chain_reason", "factor_diagonal", "factor_bytes"]

WEIGHTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
SELECTION = (
    nn.Flatten,
    nn.Unflatten,
    nn.Identity,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
)
DIAGONAL_J = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RANK = {None: 0, "diag": 1, "full": 2}


def jacobian_class(step) -> str:
    """``"diagonal"``, ``"selection"``, ``"weighted"`` or ``"other"`` (how diag(d) pulls back)."""
    if step.kind == "elementwise" or isinstance(step.module, DIAGONAL_J):
        return "diagonal"
    if isinstance(step.module, SELECTION) or (step.module is None and step.label.split(" ")[0] == "flatten"):
        return "selection"
    if isinstance(step.module, WEIGHTED):
        return "weighted"
    return "other"


def chain_reason(plan) -> Optional[str]:
    """None when the plan is a chain of linear/element-wise steps (factor path), else why not."""
    previous = plan.input
    for step in plan.steps:
        if step.kind == "smooth":
            return f"{step.label} has a dense residual"
        if step.inputs != (previous,):
            return f"{step.label} branches (not a chain)"
        previous = step.name
    return None if previous == plan.output else "the output is not the last step"


def _param_level(step, x: torch.Tensor) -> Optional[str]:
    if not step.params:
        return None
    return "diag" if isinstance(step.module, nn.Linear) and x.ndim == 2 else "full"


def levels(steps, env: Dict[str, torch.Tensor]) -> List[Optional[str]]:
    """Per step, what of its output's Hessian the steps below need: None, "diag" or "full"."""
    out, below = [], None
    for step in steps:
        pull = None if below is None else (below if jacobian_class(step) in ("diagonal", "selection") else "full")
        own = _param_level(step, env[step.inputs[0]])
        below = max(pull, own, key=_RANK.__getitem__)
        out.append(below)
    return out


def weighted_squares(W: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """``Σ_{k,l} W_kl a_k ⊙ a_l`` per sample (``W`` (n, K, K)) or ``Σ_k w_k a_k²`` (``W`` (n, K)).

    ``A`` is ``(n, K, m)``; the result ``(n, m)``.
    """
    if W.ndim == 2:
        return torch.einsum("nk,nkm->nm", W, A * A)
    return ((W @ A) * A).sum(1)


class Factors:
    """``H = Vᵀ W V + diag(d)`` per sample (V None: K = 0; d None: zero).

    ``V`` is (n, K, D); the weights ``W`` are (n, K) (diagonal) or (n, K, K) (symmetric).

    The loss's Hessian enters as ``V = I`` with ``W = H_out`` (no eigendecomposition: a
    batched ``eigh`` of N small matrices costs more than a gradient of the MLP). Only
    where the diagonal must become factors (``absorb_diagonal``) are the weights
    diagonalised, ``W = Q Λ Qᵀ`` → ``V ↦ Qᵀ V``, ``W ↦ Λ`` (exact).
    """

    def __init__(self, V: Optional[torch.Tensor], W: Optional[torch.Tensor], d: Optional[torch.Tensor]):
        self.V, self.W, self.d = V, W, d

    @classmethod
    def of_matrices(cls, H: torch.Tensor) -> "Factors":
        """From dense per-sample Hessians ``(n, D, D)``: ``V = I``, ``W = H``."""
        n, D = H.shape[0], H.shape[1]
        return cls(torch.eye(D, dtype=H.dtype, device=H.device).expand(n, D, D), H, None)

    def diagonal(self, n: int, D: int, like: torch.Tensor) -> torch.Tensor:
        out = like.new_zeros(n, D) if self.d is None else self.d.clone()
        if self.V is not None:
            out += weighted_squares(self.W, dense(self.V))
        return out

    def eigen(self) -> "Factors":
        """The same H with diagonal weights (``eigh`` of ``W`` when it is a matrix)."""
        if self.V is None or self.W.ndim == 2:
            return self
        lam, Q = torch.linalg.eigh(self.W)
        return Factors(Q.transpose(1, 2) @ dense(self.V), lam, self.d)

    def absorb_diagonal(self) -> "Factors":
        """The diagonal as D unit-vector factors with weights d (exact; n·D² memory)."""
        if self.d is None:
            return self
        fac = self.eigen()
        n, D = self.d.shape
        eye = torch.eye(D, dtype=self.d.dtype, device=self.d.device).expand(n, D, D)
        V = eye if fac.V is None else torch.cat([dense(fac.V), eye], dim=1)
        W = self.d if fac.W is None else torch.cat([fac.W, self.d], dim=1)
        return Factors(V, W, None)


def _squared_theta(step, x: torch.Tensor, state, d: torch.Tensor) -> Optional[torch.Tensor]:
    """``Σ_n (J_θ,n ⊙ J_θ,n)ᵀ d_n`` where every entry of J_θ is one input (or 0/1); else None."""
    if isinstance(step.module, WEIGHTED):
        return _theta_vjp(step, x * x, state, d)
    if isinstance(step.module, nn.Embedding):
        return _theta_vjp(step, x, state, d)
    return None


def _theta_vjp(step, x: torch.Tensor, state, cot: torch.Tensor) -> torch.Tensor:
    """``Σ_n J_θ,nᵀ cot_n`` of the step at inputs ``x``, the chosen parameters side by side."""
    names = step.params

    def f(*ths):
        st = dict(state)
        st.update(zip(names, ths))
        return step.fn([x], st)

    y, pull = vjp(f, *[state[p] for p in names])
    return torch.cat([t.reshape(-1) for t in pull(cot.reshape(y.shape))])


def _per_factor_theta(step, x: torch.Tensor, state, V: torch.Tensor) -> torch.Tensor:
    """``J_θ,nᵀ v_{n,k}`` for every sample and factor: ``(n, K, P_step)``."""
    names = step.params

    def one(x_n, V_n):
        def f(*ths):
            st = dict(state)
            st.update(zip(names, ths))
            return step.fn([x_n.unsqueeze(0)], st)[0]

        y, pull = vjp(f, *[state[p] for p in names])
        grads = vmap(pull)(V_n.reshape(V_n.shape[0], *y.shape))
        return torch.cat([t.reshape(V_n.shape[0], -1) for t in grads], dim=1)

    return vmap(one)(x, V)


def param_diagonal(step, x: torch.Tensor, state, fac: Factors, D_y: int) -> torch.Tensor:
    """The diagonal of the step's chosen parameters (layout order within the step)."""
    n = x.shape[0]
    if isinstance(step.module, nn.Linear) and x.ndim == 2:
        dg = fac.diagonal(n, D_y, x)
        parts = {"weight": (dg.T @ x.square()).reshape(-1), "bias": dg.sum(0)}
        return torch.cat([parts[p.rsplit(".", 1)[-1]] for p in step.params])
    extra = None
    if fac.d is not None:
        extra = _squared_theta(step, x, state, fac.d)
        if extra is None:
            fac = fac.absorb_diagonal()
    out = 0 if extra is None else extra
    if fac.V is not None:
        G = conv_factor_grads(step, x, fac.V)
        if G is None:
            G = _per_factor_theta(step, x, state, dense(fac.V))
        out = out + weighted_squares(fac.W, G).sum(0)
    return out


def pull_factors(fac: Factors, step, x: torch.Tensor, state, g_y: torch.Tensor, target: str, y=None):
    """``(factors of the input Hessian, g_x)`` (``target="diag"``: the diagonal only).

    ``y`` is the step's output from the forward pass (closed-form activation derivatives).
    """
    cls, n = jacobian_class(step), x.shape[0]
    squared = target == "diag" and cls == "weighted"
    if fac.d is not None and cls in ("weighted", "other") and not squared:
        fac = fac.absorb_diagonal()
    T = Transpose(step, x, state, cls, y)
    V = None if fac.V is None else T.factors(fac.V)
    g_x = T(g_y[:, None, :])[:, 0]
    d = fac.d
    if d is not None:
        if cls == "diagonal":
            d = d * T.s1.square()
        elif cls == "selection":
            d = T(d[:, None, :])[:, 0]
        else:
            d = squared_input_pull(step, x, state, d)
    if T.s2 is not None:
        r = g_y * T.s2  # the residual diag(g ⊙ σ''); exactly zero for ReLU adds nothing
        if bool(r.any()):
            d = r if d is None else d + r
    out = Factors(V, fac.W if V is not None else None, d)
    if target == "diag" and V is not None:
        out = Factors(None, None, out.diagonal(n, T.width, x))
    return out, g_x


def _add_by_name(diag: torch.Tensor, layout, names, values: torch.Tensor) -> None:
    """``diag[layout.slice(name)] += values[part of name]`` for the names side by side in ``values``."""
    start = 0
    for name in names:
        sl = layout.slice(name)
        diag[sl] += values[start : start + sl.stop - sl.start]
        start += sl.stop - sl.start


def factor_diagonal(
    plan, env: Dict[str, torch.Tensor], g: torch.Tensor, H: torch.Tensor, state, layout, diag: torch.Tensor
) -> None:
    """Add the chunk's exact parameter diagonal (a chain plan) into ``diag`` (layout order)."""
    steps = plan.steps
    lv = levels(steps, env)
    fac = Factors.of_matrices(H)
    for i in reversed(range(len(steps))):
        step = steps[i]
        if lv[i] is None:
            break
        x = env[step.inputs[0]]
        if step.params:
            _add_by_name(diag, layout, step.params, param_diagonal(step, x, state, fac, g.shape[1]))
        below = lv[i - 1] if i > 0 else None
        if below is None:
            break
        fac, g = pull_factors(fac, step, x, state, g, below, env.get(step.name))


def factor_bytes(plan, env: Dict[str, torch.Tensor], layout, item: int) -> float:
    """Bytes per sample of the factor path (upper bound: every curved map adds a diagonal)."""
    size = {k: v[0].numel() for k, v in env.items()}
    steps, lv = plan.steps, levels(plan.steps, env)
    K, has_d, worst = size[plan.output], False, 0
    for i in reversed(range(len(steps))):
        step = steps[i]
        if lv[i] is None:
            break
        D_y, D_x = size[step.name], size[step.inputs[0]]
        P = sum(layout.numels[layout.index(p)] for p in step.params)
        if step.params and _param_level(step, env[step.inputs[0]]) == "full":
            k_p = K + (D_y if has_d and not isinstance(step.module, WEIGHTED + (nn.Embedding,)) else 0)
            worst = max(worst, 2 * k_p * (P + D_y))
        below = lv[i - 1] if i > 0 else None
        if below is None:
            break
        cls = jacobian_class(step)
        if has_d and cls in ("weighted", "other") and not (below == "diag" and cls == "weighted"):
            K, has_d = K + D_y, False
        worst = max(worst, 3 * K * (D_y + D_x) + 4 * (D_y + D_x) + 2 * K * K)
        has_d = has_d or curved(step)
        if below == "diag":
            K = 0
    return float(item * worst)
