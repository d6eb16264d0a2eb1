"""Attention that grows sick, and its fixed twins: small pre-LN transformers trained in the regime of Wortsman et
al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities"): a high learning rate
without qk-layernorm grows the attention logits until the attention is one-hot and the loss breaks; the same run
with qk-layernorm (or at a sane learning rate) stays healthy.

The block is written by hand with ``F.scaled_dot_product_attention`` (the way nanoGPT and most research code
write it), so every attention path a user can take is reachable: ``attention="sdpa"`` (the fused call),
``"eager"`` (q·kᵀ, a mask, softmax), ``"mha"`` (``nn.MultiheadAttention``).  Nothing here imports pytest.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from recipes import LAST_WINDOW, VOCAB, batch_rows, stride_sequences, train_loop
from torch import nn

SEQ = 32


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally with qk-layernorm (a LayerNorm on queries and keys per head)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = False, attention: str = "sdpa"):
        super().__init__()
        self.heads, self.attention = heads, attention
        if attention == "mha":
            self.mha = nn.MultiheadAttention(dim, heads, batch_first=True, bias=False)
            return
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(dim // heads) if qk_norm else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        if self.attention == "mha":
            mask = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
            return self.mha(x, x, x, attn_mask=mask, need_weights=False)[0]
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.attention == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
            scores = scores.masked_fill(torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1), float("-inf"))
            y = F.softmax(scores, dim=-1) @ v
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, **kwargs):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, **kwargs)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyLM(nn.Module):
    """A pre-LN decoder-only language model."""

    def __init__(self, dim: int = 64, heads: int = 4, layers: int = 2, **kwargs):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.pos = nn.Parameter(torch.randn(SEQ, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, **kwargs) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids) + self.pos[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def tiny_lm(logdir: str, steps: int = 200, log_every: int = 5, seed: int = 0, *, lr: float = 3e-2,
            qk_norm: bool = False, attention: str = "sdpa", warmup: int = 0, batch: int = 16,
            dim: int = 64, layers: int = 2) -> tuple[float, float]:
    """`TinyLM` on stride sequences: AdamW (no weight decay), linear warm-up then constant, no clipping."""
    torch.manual_seed(seed)
    model = TinyLM(dim=dim, layers=layers, qk_norm=qk_norm, attention=attention)
    data = stride_sequences(4096, seed, length=SEQ)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    def loss_of(m, step):
        x = data[batch_rows(len(data), batch, step)]
        logits = m(x[:, :-1])
        return F.cross_entropy(logits.reshape(-1, VOCAB), x[:, 1:].reshape(-1))

    return train_loop(logdir, model, opt, sched, loss_of, steps, log_every, clip=None)


__all__ = ["TinyLM", "tiny_lm", "LAST_WINDOW"]
