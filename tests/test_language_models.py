"""Causal language models: nh.losses.causal_lm, Hugging Face batches and models, half precision.

References are independent float64 computations: a hand-written shifted cross-entropy
(loops over positions) and ``torch.autograd.functional.hessian`` of that loss computed
from the logits of ``functional_call``.
"""

import copy
import logging
from types import SimpleNamespace

import pytest
import torch
from torch.func import functional_call
from torch.utils.data import DataLoader

import nethessian as nh
from contract import assert_operator_matches
from lm_cases import VOCAB, padded_batch, ragged_batches, shifted_ce, tiny_gpt2, tiny_llama
from nethessian._objective import Objective, math_attention
from nethessian.losses import causal_lm

transformers = pytest.importorskip("transformers")

# a few blocks of every kind (attention, layer norm, MLP), small enough for a dense reference
GPT2_PARAMS = ["transformer.h.0.attn.c_attn.bias", "transformer.h.1.ln_2.weight", "transformer.h.1.mlp.c_proj.bias"]
LLAMA_PARAMS = ["model.layers.0.input_layernorm.weight", "model.layers.1.self_attn.o_proj.weight"]


# -- the loss -----------------------------------------------------------------------------------
def test_causal_lm_matches_a_hand_written_shifted_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 6, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (3, 6), generator=g)
    labels[0, 4:] = -100
    labels[2, :3] = -100
    total, count = shifted_ce(logits, labels)
    loss = causal_lm()
    torch.testing.assert_close(loss(logits, labels), total / count, rtol=1e-14, atol=0)
    torch.testing.assert_close(loss(SimpleNamespace(logits=logits), labels), total / count, rtol=1e-14, atol=0)
    assert loss.term_count(logits, labels) == count == 3 * 5 - 2 - 2  # labels[0, 4:], labels[2, 1:3]
    other = labels.masked_fill(labels == -100, 7)
    other[1, 2] = 7
    total7, count7 = shifted_ce(logits, other, ignore_index=7)
    torch.testing.assert_close(causal_lm(ignore_index=7)(logits, other), total7 / count7, rtol=1e-14, atol=0)


def test_causal_lm_weights_ragged_batches_into_one_big_batch():
    g = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(b, t, 7, generator=g, dtype=torch.float64), torch.randint(0, 7, (b, t), generator=g))
        for b, t in [(2, 5), (1, 3), (3, 4)]
    ]
    batches[0][1][1, 2:] = -100
    loss = causal_lm()
    combined = sum(loss.term_count(z, y) * loss(z, y) for z, y in batches) / sum(
        loss.term_count(z, y) for z, y in batches
    )
    big_z = torch.zeros(6, 5, 7, dtype=torch.float64)
    big_y = torch.full((6, 5), -100)
    row = 0
    for z, y in batches:  # right-pad each batch to length 5 with ignored labels
        big_z[row : row + z.shape[0], : z.shape[1]] = z
        big_y[row : row + z.shape[0], : y.shape[1]] = y
        row += z.shape[0]
    torch.testing.assert_close(combined, loss(big_z, big_y), rtol=1e-14, atol=0)


@pytest.mark.parametrize(
    "bad, match",
    [
        ((torch.zeros(2, 4, 5), torch.zeros(2, 4)), "integer tensor"),
        ((torch.zeros(2, 4, 5), torch.zeros(2, 3, dtype=torch.long)), "logits of shape"),
        ((torch.zeros(2, 4), torch.zeros(2, 4, dtype=torch.long)), "logits of shape"),
        (({"logits": 1}, torch.zeros(2, 4, dtype=torch.long)), "no .logits"),
    ],
)
def test_causal_lm_refuses_what_it_cannot_read(bad, match):
    with pytest.raises(nh.InputError, match=match):
        causal_lm()(*bad)


@pytest.mark.parametrize("index", [1.5, "x", True])
def test_causal_lm_ignore_index_is_an_int(index):
    with pytest.raises(nh.InputError, match="ignore_index must be an int"):
        causal_lm(index)


# -- dense references -----------------------------------------------------------------------------
def reference_hessian(model, names, batches):
    """∇²J over ``names`` by torch.autograd.functional.hessian of the shifted CE summed by hand."""
    base = {n: p.detach() for n, p in model.named_parameters()}
    shapes = [base[n].shape for n in names]
    theta0 = torch.cat([base[n].reshape(-1) for n in names])

    def J(theta):
        chunks = torch.split(theta, [s.numel() for s in shapes])
        params = {**base, **{n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}}
        total, count = theta.new_zeros(()), 0
        for b in batches:
            inputs = {k: v for k, v in b.items() if k != "labels"}
            with math_attention():
                logits = functional_call(model, params, (), inputs).logits
            t, c = shifted_ce(logits, b["labels"])
            total, count = total + t, count + c
        return total / count

    return torch.autograd.functional.hessian(J, theta0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_gpt2_hessian_products_match_autograd_hessian(attn):
    model = tiny_gpt2(attn=attn)
    data = ragged_batches()
    H = reference_hessian(model, GPT2_PARAMS, data)
    op = nh.HessianOperator(model, causal_lm(), data, params=GPT2_PARAMS)
    assert_operator_matches(op, H, rtol=1e-10)


def test_llama_hessian_products_match_autograd_hessian():
    model = tiny_llama()
    data = ragged_batches()
    H = reference_hessian(model, LLAMA_PARAMS, data)
    op = nh.HessianOperator(model, causal_lm(), data, params=LLAMA_PARAMS)
    # Llama's RMSNorm and rotary embeddings compute in float32 inside a float64 model: products agree
    # to ~1e-7 and the matrix is symmetric only to that level (the contract's 1e3·eps symmetry is float64's)
    V = torch.randn(op.shape[0], 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    scale = float(H.abs().max()) * op.shape[0] ** 0.5
    torch.testing.assert_close(op @ V, H @ V, rtol=1e-7, atol=1e-7 * scale)
    torch.testing.assert_close(op @ V[:, 0], H @ V[:, 0], rtol=1e-7, atol=1e-7 * scale)


def test_gpt2_ggn_matches_jacobian_sandwich():
    """G = Σ_b c_b Jᵀ ∇²_z L_b J / Σ_b c_b with J = ∂logits/∂θ, both by autograd.functional."""
    model, data, names = tiny_gpt2(), ragged_batches()[:2], GPT2_PARAMS[1:]
    base = {n: p.detach() for n, p in model.named_parameters()}
    theta0 = torch.cat([base[n].reshape(-1) for n in names])
    sizes = [base[n].numel() for n in names]
    G, total = torch.zeros(theta0.numel(), theta0.numel(), dtype=torch.float64), 0
    for b in data:
        inputs = {k: v for k, v in b.items() if k != "labels"}

        def logits(theta):
            chunks = torch.split(theta, sizes)
            params = {**base, **{n: c.reshape(base[n].shape) for n, c in zip(names, chunks)}}
            return functional_call(model, params, (), inputs).logits.reshape(-1)

        Jac = torch.autograd.functional.jacobian(logits, theta0)
        z = logits(theta0).detach()
        Hz = torch.autograd.functional.hessian(
            lambda f: shifted_ce(f.reshape(b["input_ids"].shape + (VOCAB,)), b["labels"])[0], z
        )
        G += Jac.T @ Hz @ Jac
        total += shifted_ce(z.reshape(b["input_ids"].shape + (VOCAB,)), b["labels"])[1]
    op = nh.GGNOperator(model, causal_lm(), data, params=names)
    assert_operator_matches(op, G / total, rtol=1e-10)


# -- batches: lists, pairs, DataLoaders, the model's own loss ------------------------------------
def one_big_batch(batches, T=8):
    """The ragged batches right-padded to length T and stacked (ignored labels, masked inputs)."""
    out = {k: [] for k in batches[0]}
    for b in batches:
        pad = T - b["input_ids"].shape[1]
        for k, fill in (("input_ids", 0), ("attention_mask", 0), ("labels", -100)):
            out[k].append(torch.nn.functional.pad(b[k], (0, pad), value=fill))
    return {k: torch.cat(v) for k, v in out.items()}


def test_batching_is_invariant_across_ragged_batches_pairs_and_a_dataloader():
    model = tiny_gpt2()
    ragged = ragged_batches()
    v = torch.randn(
        sum(dict(model.named_parameters())[n].numel() for n in GPT2_PARAMS),
        generator=torch.Generator().manual_seed(3),
        dtype=torch.float64,
    )
    layouts = {
        "one big batch": one_big_batch(ragged),
        "list of dicts": ragged,
        "(inputs, labels) pairs": [({k: x for k, x in b.items() if k != "labels"}, b["labels"]) for b in ragged],
        "DataLoader": DataLoader(ragged, batch_size=None),
        "tokenizer BatchEncodings": [transformers.BatchEncoding(b) for b in ragged],
    }
    results = {
        name: nh.HessianOperator(model, causal_lm(), data, params=GPT2_PARAMS) @ v for name, data in layouts.items()
    }
    values = {name: Objective(model, causal_lm(), data).value() for name, data in layouts.items()}
    for name in layouts:
        torch.testing.assert_close(results[name], results["one big batch"], rtol=1e-10, atol=1e-12)
        assert values[name] == pytest.approx(values["one big batch"], rel=1e-12)


def test_model_own_loss_with_loss_fn_none():
    """loss_fn=None uses output.loss (Hugging Face computes it in float32) weighted by predicted tokens."""
    model, data = tiny_gpt2(), ragged_batches()
    own = Objective(model, None, data)
    ours = Objective(model, causal_lm(), data)
    assert own.value() == pytest.approx(ours.value(), rel=1e-6)
    v = torch.randn(own.size, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    Hv_own = nh.HessianOperator(model, None, data) @ v
    Hv = nh.HessianOperator(model, causal_lm(), data) @ v
    assert float((Hv_own - Hv).norm() / Hv.norm()) < 1e-5


def test_hf_batch_errors_are_clear():
    model = tiny_gpt2()
    b = ragged_batches()[0]
    with pytest.raises(nh.InputError, match="no 'labels'"):
        Objective(model, causal_lm(), [{k: v for k, v in b.items() if k != "labels"}])
    with pytest.raises(nh.InputError, match="loss_fn is None.*keyword arguments"):
        Objective(model, None, (b["input_ids"], b["labels"]))


def test_model_is_left_as_it_was():
    model = tiny_gpt2(attn="sdpa")
    model.train()  # train mode with dropout off: the forward is deterministic
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    op = nh.HessianOperator(model, causal_lm(), ragged_batches(), params=GPT2_PARAMS)
    op @ torch.ones(op.shape[0], dtype=torch.float64)
    assert model.training and all(m.training for m in model.modules())
    assert model.config._attn_implementation == "sdpa"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert next(model.parameters()).dtype == torch.float64


def test_float32_sdpa_runs_on_a_twice_differentiable_kernel():
    """On the CPU, float32 sdpa is the flash kernel (no double backward) unless the Objective routes it."""
    model = tiny_gpt2(dtype=torch.float32)
    data = ragged_batches()[:1]
    op = nh.HessianOperator(model, causal_lm(), data, params=GPT2_PARAMS)
    ref = nh.HessianOperator(tiny_gpt2(dtype=torch.float64), causal_lm(), data, params=GPT2_PARAMS)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    Hv, Hv64 = op @ v.float(), ref @ v
    assert float((Hv.double() - Hv64).norm() / Hv64.norm()) < 1e-4


# -- estimators on the tiny GPT-2 -----------------------------------------------------------------
def test_eigenvalues_and_trace_on_tiny_gpt2():
    model, data = tiny_gpt2(), ragged_batches()
    op = nh.HessianOperator(model, causal_lm(), data, params=GPT2_PARAMS)
    dense = op.to_dense()
    exact = torch.linalg.eigvalsh(dense)
    res = nh.eigenvalues(op, k=2, tol=1e-8)
    torch.testing.assert_close(
        torch.as_tensor(res.eigenvalues, dtype=torch.float64).sort().values, exact[-2:], rtol=1e-6, atol=1e-8
    )
    tr = nh.trace(op, exact=True, by_block=True)
    assert tr.value == pytest.approx(float(dense.trace()), rel=1e-10)
    offsets = [0]
    for n in GPT2_PARAMS:
        offsets.append(offsets[-1] + dict(model.named_parameters())[n].numel())
    for i, n in enumerate(GPT2_PARAMS):
        block = dense[offsets[i] : offsets[i + 1], offsets[i] : offsets[i + 1]]
        assert tr.blocks[n].value == pytest.approx(float(block.trace()), rel=1e-10, abs=1e-12)


# -- half precision --------------------------------------------------------------------------------
def relative_error(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def objective_hvp(obj, v):
    """H v of an Objective by double backward over its batches, in the Objective's compute dtype."""
    theta, named = obj.leaf()

    def fn(b):
        loss, out = obj.batch_loss(named, b)
        (g,) = torch.autograd.grad(loss, theta, create_graph=True)
        (hv,) = torch.autograd.grad(g @ v.to(obj.dtype), theta)
        return hv, obj.count(out, b.targets)

    return obj.sum_over_batches(fn)


def test_bf16_model_computes_in_float32_on_a_copy_and_says_so(caplog):
    model = tiny_gpt2(dtype=torch.bfloat16)
    data = ragged_batches()
    with caplog.at_level(logging.WARNING, logger="nethessian"):
        op = nh.HessianOperator(model, causal_lm(), data, params=GPT2_PARAMS)
    assert op.dtype == torch.float32 and op.objective.precision_note is None
    assert any("float32 copy" in r.getMessage() for r in caplog.records)
    assert next(model.parameters()).dtype == torch.bfloat16  # the model is unchanged
    # the same numbers as the bf16 weights exactly converted to float64, to float32 precision
    ref = nh.HessianOperator(tiny_gpt2(dtype=torch.bfloat16).double(), causal_lm(), data, params=GPT2_PARAMS)
    v = torch.randn(op.shape[0], generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    assert relative_error(op @ v.float(), ref @ v) < 1e-4


def half_problem(kind, dtype):
    """(model in ``dtype``, loss, data, params): the tiny GPT-2, or a small MLP (fp16 GPT-2 overflows)."""
    if kind == "gpt2":
        return tiny_gpt2(dtype=dtype), causal_lm(), ragged_batches(), GPT2_PARAMS
    model, loss, data = nh.examples.mlp((20, 16, 10), n=64, seed=0)
    return model.to(dtype), loss, data, None


# documented (docs/language-models.md): bf16 ~1e-2, fp16 ~1e-3 relative; measured 9e-3 and 9e-4
@pytest.mark.parametrize(
    "kind, dtype, bound", [("gpt2", torch.bfloat16, 2e-2), ("mlp", torch.bfloat16, 2e-2), ("mlp", torch.float16, 2e-3)]
)
def test_explicit_half_precision_products_are_within_the_documented_error(kind, dtype, bound):
    model, loss, data, params = half_problem(kind, dtype)
    obj = Objective(model, loss, data, params, dtype=dtype)
    assert obj.dtype == dtype and "relative error" in obj.precision_note
    ref = Objective(copy.deepcopy(model).double(), loss, data, params)
    v = torch.randn(obj.size, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    Hv = objective_hvp(obj, v)
    assert Hv.dtype == dtype
    assert relative_error(Hv, objective_hvp(ref, v)) < bound


def test_dtype_must_be_a_floating_dtype():
    with pytest.raises(nh.InputError, match="dtype must be one of"):
        Objective(tiny_gpt2(), causal_lm(), padded_batch([4], 4, 0), dtype=torch.int32)
