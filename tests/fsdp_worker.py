"""One rank of a gloo run of an FSDP2-sharded transformer, launched by test_finite_difference.py."""

import datetime
import os
import sys
import time

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, os.path.dirname(__file__))
import nethessian as nh  # noqa: E402

VOCAB, D, HIDDEN, SEQ = 5, 4, 6, 4


class Block(nn.Module):
    """Pre-norm attention (fused SDPA kernel in its own forward) and a tanh MLP, with residuals."""

    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(D), nn.LayerNorm(D)
        self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.up, self.down = nn.Linear(D, HIDDEN), nn.Linear(HIDDEN, D)

    def forward(self, x):
        q, k, v = self.qkv(self.ln1(x)).chunk(3, dim=-1)
        x = x + self.proj(F.scaled_dot_product_attention(q, k, v, is_causal=True))
        return x + self.down(torch.tanh(self.up(self.ln2(x))))


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, VOCAB)

    def forward(self, tokens):
        x = self.emb(tokens)
        for b in self.blocks:
            x = b(x)
        return self.head(x).reshape(-1, VOCAB)


def problem(world):
    """The model (unsharded, float64), the loss, and 2 batches per rank (unequal sizes)."""
    torch.manual_seed(0)
    model = TinyLM().double()
    g = torch.Generator().manual_seed(1)
    batches = []
    for i in range(2 * world):
        n = 2 + i % 3
        batches.append(
            (torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, VOCAB, (n * SEQ,), generator=g))
        )
    return model, nn.CrossEntropyLoss(), batches


def probe(P):
    return torch.randn(P, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


def reference(model, loss_fn, batches):
    """Single-process exact products and top eigenvalues on every rank's batches."""
    op = nh.HessianOperator(model, loss_fn, batches)
    v = probe(op.shape[0])
    eig = nh.eigenvalues(op, k=3, which="largest", tol=1e-10, seed=0).eigenvalues
    return {"hv": op @ v, "eig": eig, "v_norm": v.norm()}


def shard_model(model):
    """fully_shard per block then the root (the CLI's --fsdp helper)."""
    from nethessian.operators._sharded import fully_shard_blocks

    assert fully_shard_blocks(model) == len(model.blocks)
    return model


def make_op(model, loss_fn, data, vectors=None, **kw):
    """``HessianOperator(..., method="finite-difference", vectors=...)`` on a sharded model."""
    return nh.HessianOperator(model, loss_fn, data, method="finite-difference", vectors=vectors, **kw)


def compare(rank, world, out):
    model, loss_fn, batches = problem(world)
    model = shard_model(model)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    op = make_op(model, loss_fn, nh.shard(batches), vectors="replicated")
    v = probe(op.shape[0])
    t0 = time.perf_counter()
    hv = op @ v
    per_product = time.perf_counter() - t0
    eig = nh.eigenvalues(op, k=3, which="largest", tol=1e-10, seed=0).eigenvalues
    same = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    torch.save(
        {"hv": hv, "eig": eig, "fd_error": op.fd_error, "params_unchanged": same, "seconds_per_product": per_product},
        f"{out}.{rank}",
    )
    print(
        f"rank {rank}: P={op.shape[0]} product {per_product:.3f} s, fd_error {op.fd_error:.2e}, "
        f"products {op.fd_errors.products}"
    )


def local_slice(model, names, full):
    """This rank's local vector of a full name-order vector, by DTensor's own placement logic."""
    from torch.distributed.tensor import distribute_tensor

    named = dict(model.named_parameters())
    parts, at = [], 0
    for n in names:
        p = named[n]
        piece = full[at : at + p.numel()].reshape(p.shape)
        at += p.numel()
        parts.append(distribute_tensor(piece, p.device_mesh, p.placements).to_local().reshape(-1))
    return torch.cat(parts)


def local(rank, world, out):
    """vectors='local': products, the global order, gathering, memory (and estimators when linalg has them)."""
    from fsdp_local import run_local

    model, loss_fn, batches = problem(world)
    model = shard_model(model)
    res = run_local(model, loss_fn, nh.shard(batches), make_op, local_slice, probe)
    torch.save(res, f"{out}.{rank}")
    print(f"rank {rank}: " + ", ".join(f"{k}={v}" for k, v in res.items() if isinstance(v, (int, float, str))))


def killed(rank, world, at):
    """Rank 1 dies after the first product, inside its ``at``-th forward (0: between products).

    Rank 0 must stop with DistributedError (from FSDP's collectives or nethessian's all-reduces).
    """
    model, loss_fn, batches = problem(world)
    model = shard_model(model)
    op = make_op(model, loss_fn, nh.shard(batches))
    v = torch.ones(op.shape[0], dtype=torch.float64)
    op @ v
    if rank == 1 and at == 0:
        os._exit(3)
    if rank == 1:
        calls = []
        model.blocks[1].register_forward_pre_hook(lambda *a: calls.append(1) or (len(calls) == at and os._exit(3)))
    t0 = time.time()
    try:
        for _ in range(1000):
            op @ v
    except nh.NetHessianError as exc:
        print(f"ELAPSED {time.time() - t0:.1f}", file=sys.stderr)
        print(f"ERROR {type(exc).__name__}: {exc}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)  # a dead peer leaves gloo work pending: skip its teardown


def refuse():
    model, loss_fn, batches = problem(2)
    model = shard_model(model)
    for method in ("auto", "double-backward", "forward-over-reverse"):
        try:
            nh.HessianOperator(model, loss_fn, nh.shard(batches), method=method)
        except nh.InputError as exc:
            print("REFUSED", exc)
        else:
            raise SystemExit(f"method={method} was not refused")


def main():
    rank, world, port, mode, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    timeout = float(os.environ.get("NH_TIMEOUT", 60))
    torch.distributed.init_process_group(
        "gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout)
    )
    if mode == "compare":
        compare(rank, world, out)
    elif mode == "local":
        local(rank, world, out)
    elif mode == "killed":
        killed(rank, world, int(out))
    elif mode == "refuse":
        refuse()
    nh.distributed.finish()  # no rank tears gloo down while the other is still in a collective


if __name__ == "__main__":
    main()
