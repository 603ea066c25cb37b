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
        batches.append((torch.randint(0, VOCAB, (n, SEQ), generator=g),
                        torch.randint(0, VOCAB, (n * SEQ,), generator=g)))
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
    from torch.distributed.fsdp import fully_shard
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def compare(rank, world, out):
    model, loss_fn, batches = problem(world)
    model = shard_model(model)
    before = {n: p.to_local().clone() for n, p in model.named_parameters()}
    op = nh.HessianOperator(model, loss_fn, nh.shard(batches), method="finite-difference")
    v = probe(op.shape[0])
    t0 = time.perf_counter()
    hv = op @ v
    per_product = time.perf_counter() - t0
    eig = nh.eigenvalues(op, k=3, which="largest", tol=1e-10, seed=0).eigenvalues
    same = all(torch.equal(p.to_local(), before[n]) for n, p in model.named_parameters())
    torch.save({"hv": hv, "eig": eig, "fd_error": op.fd_error, "params_unchanged": same,
                "seconds_per_product": per_product}, f"{out}.{rank}")
    print(f"rank {rank}: P={op.shape[0]} product {per_product:.3f} s, fd_error {op.fd_error:.2e}, "
          f"products {op.fd_errors.products}")


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
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=60))
    if mode == "compare":
        compare(rank, world, out)
    elif mode == "refuse":
        refuse()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
