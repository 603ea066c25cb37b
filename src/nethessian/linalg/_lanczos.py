"""Extreme eigenvalues of a symmetric operator: thick-restart (block) Lanczos.

Lanczos builds an orthonormal basis ``V`` (P x j) of a Krylov space and the
projected matrix ``H = Vᵀ A V`` (float64, j x j). With full
reorthogonalisation the Krylov relation

    A V = V H + F S,        F (P x b) orthonormal, F ⟂ V,  S (b x j)

holds to rounding, so a Ritz pair ``(θ, x = V y)`` of ``H y = θ y`` has the
residual ``‖A x − θ x‖ = ‖S y‖`` without another product. When ``V`` is full
(``ncv`` columns) it is compressed to the wanted Ritz vectors and a few of
their neighbours, ``V ← V Y``, ``H ← diag(θ)``, ``S ← S Y``; the relation still
holds and the Krylov space grows again from ``F`` (thick restart). Blocks of
``b`` vectors go through the operator in one ``A @ F`` call.

Own work per step (``_restart._Krylov.expand``): the couplings the relation already
knows (``A F − V Sᵀ``: the three-term recurrence, the whole kept block after a restart),
the new block's own coefficients, then one classical Gram-Schmidt pass against the basis
(stored by columns: only ``j`` columns are read): ``Vᵀ w`` is measured, and subtracted only
above 16 units of rounding (``_restart._ROUNDING``: what the products' own rounding leaves
there); the DGKS test (a second pass when a column loses more than 1/√2 of its norm) rarely
fires once the known couplings are gone. The basis stays orthogonal to 16 eps, measured every
step (a laxer test lets the loss of orthogonality grow geometrically).
The same pass measures ``uᵀ(A − Aᵀ)v`` on the first two blocks: the symmetry check
costs no product.

Stopping rule. A Ritz value ``θ`` with residual ``r`` is within ``r`` of an
eigenvalue, and within ``r²/δ`` when the rest of the spectrum is at least ``δ``
away (Parlett, ch. 11). ``δ`` is estimated as the distance to the nearest other
Ritz interval ``θ_j ± r_j``; next to an unwanted Ritz value the spectrum is not
resolved yet (eigenvalues may hide there), so there ``δ = 0``. Every wanted pair
must reach ``min(r, r²/δ) ≤ tol · max(|θ|, √eps · max|θ|)``: inside a cluster the
quadratic bound stops early, the pair at the edge of the wanted set needs
``r ≤ tol·|θ|``. Like any Krylov method from a random start, an eigenvalue whose
eigenvector is nearly orthogonal to the start, or a further copy of a repeated
eigenvalue (beyond ``block_size``), can be missed; the pairs returned are still
true eigenpairs with honest residuals. A block of ``b`` vectors or a smaller
``tol`` makes a miss rarer.

Verification. The Krylov residual ``‖S y‖`` is exact only while the relation
holds; in float32 on an ill-conditioned operator rounding can break it (a
residual of 0.0 next to a true 1e-2). So before claiming convergence the ``k``
returned pairs are multiplied once more, ``R = A X − X diag(θ)`` (``k`` products,
counted and reserved in ``max_matvecs``), and the stopping rule is applied to
the *true* residuals ``‖R e_i‖``, which are also what ``residuals`` returns.

Non-convergence: the result carries ``converged=False`` and a
``NotConvergedWarning`` is issued (the linalg convention: results with a
``converged`` flag warn, functions returning a bare tensor raise).

References:
    K. Wu and H. Simon, "Thick-restart Lanczos method for large symmetric
    eigenvalue problems", SIAM J. Matrix Anal. Appl. 22(2), 602-616 (2000).
    G. W. Stewart, "A Krylov-Schur algorithm for large eigenproblems",
    SIAM J. Matrix Anal. Appl. 23(3), 601-614 (2001).
    B. N. Parlett, *The Symmetric Eigenvalue Problem*, SIAM (1998), ch. 11
    (the r²/gap bound); G. H. Golub and R. Underwood (1977) for block Lanczos.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Dict, Literal, Optional

import torch

from .. import distributed
from .._checks import as_int
from .._columns import column_chunk, identity_columns
from .._progress import Progress
from ..errors import InputError, NotSymmetricError
from ..operators._base import check_dense_size
from ._eigen_result import EigenResult
from ._lanczos_options import _basis_home, _basis_size, _budget, _checkpoint_settings, _expected_total, _kept
from ._lanczos_options import _tests_to_skip, _validate
from ._lanczos_state import load_state, save_state
from ._memory import check_memory, lanczos_bytes, verify_chunk
from ._operator import Operator, _distributed_hint, as_operator, check_symmetric, make_generator
from ._ortho import norms
from ._restart import _final_order, _Krylov, _like, _rank, _Ritz, _shares
from ._util import warn_not_converged

__all__ = ["EigenResult", "eigenvalues"]

Which = Literal["largest", "smallest", "both", "magnitude"]


def eigenvalues(
    op: Any,
    k: int = 5,
    *,
    which: Which = "largest",
    tol: float = 1e-3,
    seed: Optional[int] = 0,
    max_matvecs: Optional[int] = None,
    block_size: int = 1,
    ncv: Optional[int] = None,
    check_symmetry: bool = True,
    checkpoint: Any = None,
    progress: Optional[bool] = None,
    max_bytes: Optional[int] = None,
    basis_dtype: Optional[torch.dtype] = None,
    basis_device: Any = None,
    max_memory: Optional[int] = None,
) -> EigenResult:
    """``k`` extreme eigenpairs of a symmetric operator by thick-restart Lanczos.

    Stops when every wanted Ritz value ``θ`` has the error bound
    ``min(r, r²/δ) ≤ tol · max(|θ|, √eps · max|θ|)`` (residual ``r``, gap ``δ``;
    see the module docstring); the floor lets eigenvalues near 0 stop. The
    residuals of the returned pairs are then recomputed with ``k`` real products
    and the rule is applied again to them: ``converged=True`` means the *true*
    residuals meet it. When ``P < ncv + block_size`` (e.g. ``k ≥ P/2``) the
    matrix is formed with ``P`` products (after checking its size against
    ``max_bytes``) and solved densely (exact; ``max_matvecs`` unused).

    Args:
        op: a square operator with ``@`` on (P,) and (P, m) tensors, or a symmetric tensor.
        k: number of eigenpairs, ``1 <= k < P``.
        which: ``"largest"`` / ``"smallest"`` (algebraic; ``"smallest"`` finds negative
            curvature), ``"magnitude"`` (largest ``|λ|``), or ``"both"``: the
            ``k // 2`` smallest and the ``k - k // 2`` largest (odd k: one more at the top).
        tol: relative accuracy of the eigenvalues, ``0 < tol < 1``.
        seed: seed of the CPU generator for the starting block; ``None`` draws one
            (on rank 0, broadcast to every rank under torch.distributed).
        max_matvecs: budget of products, the symmetry check and the ``k`` verifying
            products included (default ``20 * ncv``). When it runs out the result
            has ``converged=False`` and a ``NotConvergedWarning`` is issued.
        block_size: vectors per product; ``b > 1`` suits operators that do many
            vectors in one pass and finds eigenvalues of multiplicity up to ``b``.
        ncv: basis size, the most Krylov vectors ever held (default ``max(2k + 1, 20, k + 6b)``):
            thick restart compresses the basis to the wanted Ritz vectors when it is full,
            so the memory is ``P x ncv`` whatever the number of iterations.
        basis_dtype: dtype the basis is stored in (default the operator's), e.g.
            ``torch.float32`` for a float64 operator or ``torch.bfloat16`` to halve it;
            products, the next block and all Krylov scalars keep the operator's dtype /
            float64. A lower precision limits the attainable accuracy to about its
            epsilon (the true residuals returned say so).
        basis_device: device the basis is stored on (e.g. ``"cpu"`` for an operator on a
            GPU); it is brought to the operator 16 columns at a time.
        max_memory: refuse, before any product, a run whose memory bound (``memory_bytes``
            of the result, see ``_memory``) exceeds this many bytes.
        check_symmetry: check ``uᵀ(Av) = vᵀ(Au)`` on the first two Lanczos blocks, from
            coefficients the iteration computes anyway (no product; 2 products on random
            vectors on the dense path, for a finite-difference operator, with a ``basis_dtype``
            other than the operator's, or when the run ends after one block; not when resuming).
        checkpoint: a ``nethessian.Checkpoint``; resumed from at the start (after
            checking it was made for this operator, ``"operator": fingerprint``),
            written after every restart and at the end.
        progress: ``None`` auto, ``True``/``False`` (see ``nethessian._progress``).
        max_bytes: memory limit of the dense path (default 4 GiB).

    Returns:
        EigenResult.

    Raises:
        InputError: bad ``k``, ``which``, ``tol``, ``ncv``, ``block_size`` or a non-square operator.
        DenseTooLargeError: the dense path would exceed ``max_bytes``.
        NotSymmetricError: the symmetry check failed.
        NonFiniteError: a product returned NaN or Inf.
        CheckpointError: the checkpoint was made for another operator or other settings, or is damaged.

    >>> A = torch.diag(torch.arange(1.0, 41.0, dtype=torch.float64))
    >>> res = eigenvalues(A, k=3, tol=1e-10)
    >>> [round(x, 8) for x in res.eigenvalues.tolist()], res.converged
    ([40.0, 39.0, 38.0], True)
    """
    op = as_operator(op)
    P = op.global_size
    k, tol, b = _validate(P, k, which, tol, block_size)
    ncv = _basis_size(P, k, b, ncv)
    max_matvecs = _budget(max_matvecs, ncv, k, b, check_symmetry)
    max_bytes = None if max_bytes is None else as_int("max_bytes", max_bytes, minimum=0)
    bdtype, bdevice = _basis_home(op, basis_dtype, basis_device)
    distributed.check_same(
        "eigenvalues",
        k=k,
        which=which,
        tol=float(tol),
        block_size=b,
        ncv=ncv,
        max_matvecs=max_matvecs,
        check_symmetry=bool(check_symmetry),
        dense=P < ncv + b,
    )
    gen = make_generator(seed)
    if P < ncv + b:
        return _dense(op, k, which, gen, check_symmetry, checkpoint, progress, max_bytes)
    memory = check_memory(
        "eigenvalues",
        lanczos_bytes(op.size, ncv, b, k, op.dtype, bdtype, (bdtype, bdevice) != (op.dtype, op.device)),
        max_memory,
        "lower ncv (at least k + block_size), store the basis in a lower precision (basis_dtype=) "
        "or on the CPU (basis_device='cpu')",
        bdevice,
    )
    expect = _checkpoint_settings(op, k, which, b, ncv, seed, bdtype, checkpoint)
    kry, done = load_state(checkpoint, expect, op, gen, k, tol, max_matvecs, (bdtype, bdevice))
    if done is not None:
        return replace(done, memory_bytes=memory)
    symmetry = bool(check_symmetry) and kry is None  # not when resuming
    approximate = getattr(op.base, "engine", None) == "finite-difference"  # see _check_symmetry
    if symmetry and (bdtype != op.dtype or approximate):
        check_symmetric(op, gen)
        symmetry = False
    if kry is None:
        kry = _Krylov.start(op, ncv, b, gen, bdtype, bdevice)
    with Progress(max_matvecs, f"eigenvalues ({which})", enabled=progress, initial=op.num_matvecs) as bar:
        ritz = _iterate(kry, op, k, which, tol, ncv, max_matvecs, checkpoint, expect, bar, symmetry)
        result, bound = _verified(ritz, op, k, tol, which)
        result = replace(result, memory_bytes=memory)
        bar.update(k)
        bar.set_total(op.num_matvecs)
    save_state(checkpoint, kry, expect, op, result=(result, tol, max_matvecs))
    if not result.converged:
        warn_not_converged(
            f"eigenvalues(which={which!r}, k={k}) did not reach tol={tol:g} in {op.num_matvecs} "
            f"products (max_matvecs={max_matvecs}); the worst error bound from the recomputed residuals "
            f"is {bound:.3g}x the target. Raise max_matvecs or ncv, loosen tol, or use float64; "
            "the residuals returned are the true ones."
        )
    return result


def _iterate(
    kry: _Krylov,
    op: Operator,
    k: int,
    which: str,
    tol: float,
    ncv: int,
    max_matvecs: int,
    checkpoint: Any,
    expect: Dict[str, Any],
    bar: Progress,
    symmetry: bool = False,
) -> _Ritz:
    """Expand, test, restart until the Krylov bound meets ``tol`` or the budget (less ``k``) is spent.

    ``symmetry``: test the operator's symmetry on the first two blocks (``_check_symmetry``), or
    with 2 products of its own when the run ends before a second block.
    """
    b = kry.b
    keep = _kept(k, b, ncv)
    history, skip = [], 0
    while True:
        due = kry.j + b > ncv  # a restart, which needs the Ritz pairs
        full = kry.filled or due  # a basis never filled may have missed the wanted end
        spent = op.num_matvecs + b + k + (2 if symmetry else 0) > max_matvecs  # 2: check_symmetric below
        if (full and skip == 0) or spent or due:  # before the basis first fills nothing can stop the run
            ritz = _Ritz(kry, which)
            bound = ritz.worst_bound(k, tol)
            if (bound <= 1.0 and full) or spent:
                if symmetry:
                    check_symmetric(op, kry.gen)
                return ritz
            skip = _tests_to_skip(bound)
            if due:
                kry.restart(ritz, keep)
                save_state(checkpoint, kry, expect, op)
                history.append((op.num_matvecs, bound))
                bar.set_total(_expected_total(history, k, b, max_matvecs, previous=bar.total))
        elif full:
            skip -= 1
        kry.expand(op)
        bar.update(b)
        if symmetry and kry.j > b:
            _check_symmetry(kry, op)
            symmetry = False


def _check_symmetry(kry: _Krylov, op: Operator) -> None:
    """Refuse a non-symmetric operator from the second block's Gram-Schmidt coefficients (no product).

    By the Krylov relation the first block's Lanczos vectors ``u`` and the second's ``v``
    have ``vᵀ(A u)`` in ``S`` already, and the Gram-Schmidt pass measures ``uᵀ(A v)``: the
    pass's coefficients on the old block are ``uᵀ(A − Aᵀ)v`` (zero up to rounding when ``A``
    is symmetric; for ``A = S + K``, ``K`` skew, they contain ``−‖K u‖²``, so the test
    cannot miss a skew part that moves ``u``). Same tolerance as ``check_symmetric``. Only for
    a basis kept in the operator's dtype (rounding it to a lower precision perturbs the
    relation by that precision's epsilon) and exact products: a finite-difference operator
    (``engine == "finite-difference"``) is tested on random vectors by ``check_symmetric`` as before, so
    that its own step check, not this test, reports a truncation error along the Lanczos
    vectors (the top eigendirections, where it is largest).
    """
    rtol = 1e-8 if op.dtype == torch.float64 else 1e-3
    scale = max(float(kry.H.abs().sum(0).max()), torch.finfo(torch.float64).tiny)
    rel = kry.asymmetry / scale
    if rel > rtol:
        raise NotSymmetricError(
            f"the operator is not symmetric: for two Lanczos vectors u, v, u·(A v) − v·(A u) = "
            f"{kry.asymmetry:.3g}, relative to ‖A‖ ≈ {scale:.3g} that is {rel:.2e} > {rtol:.0e}; "
            "Lanczos needs a symmetric operator" + _distributed_hint()
        )


def _verified(ritz: _Ritz, op: Operator, k: int, tol: float, which: str):
    """The ``k`` wanted pairs with residuals recomputed from ``k`` real products, and their bound.

    The products are taken ``verify_chunk`` columns at a time and each residual ``A x − θ x`` is formed
    in place in its product and measured with float64 accumulation (``_ortho.norms``), so
    the verification holds ``X`` and one block beyond the basis (``linalg._memory``); a
    half-precision operator's residual is formed in float32, one column at a time.

    An operator that never saw a block (``batched`` None: a ``CurvatureOperator`` after a
    b=1 run) is given ``b`` columns at a time, as the expansion's products were: a larger
    block would first time batched against looped columns (W3: ~21 products' time to verify
    5 pairs, and it chose the loop). Same products either way.
    """
    idx, X = ritz.wanted(k)
    theta = ritz.theta[idx]
    b = ritz.kry.b
    c = b if getattr(op.base, "batched", False) is None else verify_chunk(op.size, k, b)
    true = torch.cat([_residual_norms(op, X[:, a : a + c], theta[a : a + c]) for a in range(0, k, c)])
    res = ritz.res.clone()
    res[idx] = true
    bound = ritz.worst_bound(k, tol, res)
    return EigenResult(
        theta.clone(), X, true, op.num_matvecs, bound <= 1.0, op.layout, which, precision_note=op.precision_note
    ), bound


def _residual_norms(op: Operator, X: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """``‖A x_i − θ_i x_i‖`` (float64, on the CPU) of a few columns, from one block product."""
    AX = op @ X
    if _shares(AX, X):
        AX = AX.clone()  # an operator that hands back its input
    out = torch.empty(X.shape[1], dtype=torch.float64)
    for i in range(X.shape[1]):
        if AX.dtype in (torch.float32, torch.float64) and AX.device.type != "mps":
            r = AX[:, i].sub_(X[:, i].to(AX.dtype), alpha=float(theta[i]))
        else:  # half precision (or MPS, no float64): the difference in float32
            r = AX[:, i].float().sub_(X[:, i].float(), alpha=float(theta[i]))
        out[i] = norms(op, r)[0]
    return out


def _dense(op: Operator, k: int, which: str, gen, check_symmetry: bool, checkpoint, progress, max_bytes) -> EigenResult:
    """Small P (or k ≥ P/2): form the matrix with P products and solve it exactly."""
    P = op.size
    if op.sharded:
        raise InputError(
            f"P = {op.global_size} is too small for Lanczos with ncv + block_size basis vectors "
            "and a sharded operator has no dense path: lower ncv or k, or run unsharded"
        )
    check_dense_size(P, torch.float64, max_bytes)  # the float64 copy eigh works on
    if check_symmetry:
        check_symmetric(op, gen)
    spent = op.num_matvecs + P
    A = (
        identity_columns(
            op.matmul,
            P,
            dtype=op.dtype,
            device=op.device,
            chunk=column_chunk(P),
            checkpoint=checkpoint,
            identity={"operator": op.key(checkpoint)},
            progress=progress,
            desc="eigenvalues (dense)",
        )
        .cpu()
        .double()
    )
    A = (A + A.T) / 2
    theta, Y = torch.linalg.eigh(A)
    idx = _rank(theta, which)[:k]
    idx = idx[_final_order(theta[idx], which)]
    vals, vecs = theta[idx], Y[:, idx]
    res = (A @ vecs - vecs * vals).norm(dim=0)
    return EigenResult(
        vals,
        _like(vecs, op),
        res,
        spent,
        True,
        op.layout,
        which,
        memory_bytes=P * P * 8,
        precision_note=op.precision_note,
    )
