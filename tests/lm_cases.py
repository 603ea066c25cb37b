"""Tiny Hugging Face causal LMs (random weights, float64) and padded token batches for tests."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch.nn import functional as F

VOCAB = 97


def tiny_gpt2(seed: int = 0, attn: str = "sdpa", dtype=torch.float64):
    """GPT-2, 2 layers, width 32, 2 heads, 97 tokens, in eval mode (no dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB,
        n_layer=2,
        n_embd=32,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_llama(seed: int = 0, attn: str = "sdpa", dtype=torch.float64):
    """Llama, 2 layers, width 32, MLP 64, 2 heads (2 key-value heads), 97 tokens, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
        attn_implementation=attn,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def padded_batch(lengths: List[int], T: int, seed: int, ignore_prompt: int = 0) -> dict:
    """A right-padded batch: ``input_ids``, ``attention_mask`` (0 on padding), ``labels`` (-100 there).

    ``ignore_prompt`` first tokens of each sequence are also labelled -100 (a prompt).
    """
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), T), generator=g)
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    ids = ids * mask  # pad token 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :ignore_prompt] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def ragged_batches(seed: int = 0) -> List[dict]:
    """Three batches of different sizes and lengths, with padding and ignored prompt tokens."""
    return [
        padded_batch([8, 5], 8, seed, ignore_prompt=2),
        padded_batch([6], 6, seed + 1),
        padded_batch([7, 3, 7], 7, seed + 2, ignore_prompt=1),
    ]


def shifted_ce(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> Tuple[torch.Tensor, int]:
    """Hand-written reference: Σ over predicted tokens of −log p(y_{t+1} | z_t), and their count."""
    total, count = logits.new_zeros(()), 0
    B, T, _ = logits.shape
    for i in range(B):
        for t in range(T - 1):
            y = int(labels[i, t + 1])
            if y != ignore_index:
                total = total - F.log_softmax(logits[i, t], dim=-1)[y]
                count += 1
    return total, count
