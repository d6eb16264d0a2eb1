"""Attention health on the device: the softmax input of a few query rows, against all the keys they attend.

Which modules are attention (`attention_modules`), and pure tensor functions
that rebuild the attention logits ``q·kᵀ x scale (+ additive mask)`` of a
fixed subsample of query rows from what the model handed its attention
kernel: the arguments of ``F.scaled_dot_product_attention`` (`sdpa_rows`),
the input of an eager attention's softmax (`softmax_rows`), or those of
``F.multi_head_attention_forward`` (`mha_rows`, ``nn.MultiheadAttention`` and
``nn.TransformerEncoderLayer``: the sampled items' keys are projected again,
the size of those items' keys).  The user's kernel still runs on its own
inputs; nothing here modifies them, draws random numbers or reads a value
on the host, and dropout never enters (it comes after the softmax).

Memory is bounded: at most a few batch items and `MAX_ROWS` query rows, every
key, so about `LOGIT_ELEMENTS` logits whatever the sequence length.
`head_stats` reduces them per head, on the device; the host turns a layer's
heads into its ``attn_*`` statistics (`tbdiag.summary.assembly.attention_columns`).
"""

from __future__ import annotations

import inspect
import math
import re

import torch
import torch.nn.functional as F
from torch import nn

#: Logits computed per attention call, at most (more only when a single row of one item over every head and
#: key is larger): 4 MiB of float32, with its temporaries a few times that.
LOGIT_ELEMENTS = 1 << 20
#: Query rows sampled per attention call, evenly spaced and always including the last (under a causal mask
#: the row that sees every key).
MAX_ROWS = 32
#: Batch items sampled per attention call, evenly spaced.
MAX_ITEMS = 4

#: A module is an attention module when its class name says so (``GPT2Attention``, ``LlamaAttention``,
#: ``BertSelfAttention``, ``CausalSelfAttention``, timm's ``Attention``) and no module inside it does: the
#: innermost one computes the softmax (``BertAttention`` wraps ``BertSelfAttention``).
_ATTENTION_NAME = re.compile(r"attention|attn", re.IGNORECASE)


def attention_modules(model: nn.Module) -> dict[int, nn.Module]:
    """``id -> module`` of the model's attention modules: ``nn.MultiheadAttention``, and the innermost modules
    whose class name contains "attention" or "attn"."""
    named = [m for m in model.modules()
             if isinstance(m, nn.MultiheadAttention) or _ATTENTION_NAME.search(type(m).__name__)]
    ids = {id(m) for m in named}
    return {id(m): m for m in named
            if isinstance(m, nn.MultiheadAttention) or not any(id(c) in ids for c in m.modules() if c is not m)}


def _sample(n: int, count: int) -> slice:
    """Evenly spaced indices of ``range(n)``, at most ``count`` of them, always including ``n - 1``."""
    step = max(1, -(-n // max(count, 1)))
    return slice((n - 1) % step, n, step)


def _shape(items: int, heads: int, rows: int, keys: int) -> tuple[int, int]:
    """(items, rows) to sample so that items x heads x rows x keys stays within `LOGIT_ELEMENTS`."""
    per_row = max(1, heads * keys)
    rows_fit = max(1, LOGIT_ELEMENTS // per_row)
    b = min(items, MAX_ITEMS, max(1, rows_fit))
    r = min(rows, MAX_ROWS, max(1, rows_fit // b))
    return b, r


def _valid_from_mask(mask: torch.Tensor, allowed_is_true: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(which keys a row may attend, the additive bias or None) from a boolean or float mask."""
    if mask.dtype == torch.bool:
        return (mask if allowed_is_true else ~mask), None
    bias = mask.float()
    return bias > torch.finfo(torch.float32).min / 2, bias


def _causal(rows: slice, n_rows: int, keys: int, device: torch.device) -> torch.Tensor:
    """``[r, keys]``: key j is visible from query i when j <= i (top-left aligned, as SDPA's ``is_causal``)."""
    i = torch.arange(n_rows, device=device)[rows]
    return torch.arange(keys, device=device) <= i[:, None]


def _pick(mask: torch.Tensor, items: slice, b: int, rows: slice, shape: tuple[int, int, int]) -> torch.Tensor:
    """A mask broadcastable to ``[B, H, Lq, Lk]`` cut to the sampled items and rows: ``[b, 1|H, r, Lk]``."""
    B, Lq, Lk = shape
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    mask = mask.expand(B if mask.shape[0] == 1 else mask.shape[0], mask.shape[1], Lq, Lk)
    return mask[items][:b, :, rows]


def sdpa_rows(query: torch.Tensor, key: torch.Tensor, attn_mask: torch.Tensor | None = None,
              is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits [b, H, r, Lk] float32, valid [b, 1|H, r, Lk] bool)`` of ``F.scaled_dot_product_attention``'s
    arguments; None for layouts it does not read (nested tensors, more than one batch dimension)."""
    if query.is_nested or key.is_nested or query.dim() not in (3, 4) or key.dim() != query.dim():
        return None
    if query.dim() == 3:  # [B, L, E]: one head
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        attn_mask = attn_mask.unsqueeze(-3) if attn_mask is not None and attn_mask.dim() == 3 else attn_mask
    B, H, Lq, D = query.shape
    Hk, Lk = key.shape[1], key.shape[2]
    if H % Hk:
        return None
    b, r = _shape(B, H, Lq, Lk)
    items, rows = _sample(B, b), _sample(Lq, r)
    q = query[items][:b, :, rows]
    k = key[items][:b]
    b, r = q.shape[0], q.shape[2]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    # grouped-query attention: query heads [Hk, H // Hk] against their shared key head, without copying keys;
    # the scale goes on the few query rows first, so a half-precision product holds the logits themselves
    logits = torch.matmul(q.reshape(b, Hk, H // Hk, r, D) * scale, k.unsqueeze(2).transpose(-1, -2))
    logits = logits.reshape(b, H, r, Lk).float()
    valid = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=query.device)
    if attn_mask is not None:
        allowed, bias = _valid_from_mask(_pick(attn_mask, items, b, rows, (B, Lq, Lk)))
        valid = valid & allowed
        if bias is not None:
            logits = logits + bias
    if is_causal:
        valid = valid & _causal(rows, Lq, Lk, query.device)
    return logits, valid


def softmax_rows(x: torch.Tensor, heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, valid)`` of the input of an eager attention's softmax over its last dimension,
    ``[B, H, Lq, Lk]`` (or ``[B * heads, Lq, Lk]`` with ``heads``, as ``nn.MultiheadAttention`` computes it).

    The input is the logits with the mask already added: keys masked with -inf or the dtype's lowest value
    (Hugging Face's) are not attended."""
    if x.dim() == 3:
        x = x.unflatten(0, (-1, heads)) if heads and x.shape[0] % heads == 0 else x.unsqueeze(1)
    if x.dim() != 4 or x.is_nested:
        return None
    B, H, Lq, Lk = x.shape
    b, r = _shape(B, H, Lq, Lk)
    rows = x[_sample(B, b)][:b, :, _sample(Lq, r)].float()
    return rows, rows > torch.finfo(x.dtype).min / 2


def mha_rows(args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(logits, valid)`` of a ``F.multi_head_attention_forward`` call, rebuilt from its inputs and projection
    weights for the sampled rows (the queries and keys are projected again: a few rows, and the sampled items'
    keys).  None for what it does not rebuild: ``bias_k``/``bias_v``, ``add_zero_attn``, ``static_k``."""
    try:
        a = _MHA_SIGNATURE.bind(*args, **kwargs).arguments
    except TypeError:
        return None
    query, key, heads = a["query"], a["key"], int(a["num_heads"])
    if a.get("bias_k") is not None or a.get("add_zero_attn") or a.get("static_k") is not None:
        return None
    if query.dim() == 2:  # unbatched [L, E]
        query, key = query.unsqueeze(1), key.unsqueeze(1)
        for name in ("key_padding_mask",):
            if a.get(name) is not None:
                a[name] = a[name].unsqueeze(0)
    Lq, B, E = query.shape
    Lk, D = key.shape[0], E // heads
    b, r = _shape(B, heads, Lq, Lk)
    items, rows = _sample(B, b), _sample(Lq, r)
    if a.get("use_separate_proj_weight"):
        w_q, w_k = a["q_proj_weight"], a["k_proj_weight"]
    else:
        w_q, w_k = a["in_proj_weight"][:E], a["in_proj_weight"][E:2 * E]
    bias = a.get("in_proj_bias")
    b_q, b_k = (bias[:E], bias[E:2 * E]) if bias is not None else (None, None)
    q = F.linear(query[rows][:, items][:, :b], w_q, b_q)  # [r, b, E]
    k = F.linear(key[:, items][:, :b], w_k, b_k)  # [Lk, b, E]
    b, r = q.shape[1], q.shape[0]
    q = q.reshape(r, b, heads, D).permute(1, 2, 0, 3)
    k = k.reshape(Lk, b, heads, D).permute(1, 2, 0, 3)
    logits = torch.matmul(q / math.sqrt(D), k.transpose(-1, -2)).float()
    valid = torch.ones(1, 1, 1, 1, dtype=torch.bool, device=query.device)
    attn_mask, padding = a.get("attn_mask"), a.get("key_padding_mask")
    if attn_mask is not None:  # [Lq, Lk] or [B * heads, Lq, Lk]; a True entry is NOT allowed
        mask = attn_mask.unflatten(0, (-1, heads)) if attn_mask.dim() == 3 else attn_mask
        allowed, add = _valid_from_mask(_pick(mask, items, b, rows, (B, Lq, Lk)), allowed_is_true=False)
        valid = valid & allowed
        if add is not None:
            logits = logits + add
    elif a.get("is_causal"):
        valid = valid & _causal(rows, Lq, Lk, query.device)
    if padding is not None:  # [B, Lk]; a True entry is padding
        allowed, add = _valid_from_mask(padding[items][:b, None, None, :], allowed_is_true=False)
        valid = valid & allowed
        if add is not None:
            logits = logits + add
    return logits, valid


_MHA_SIGNATURE = inspect.signature(F.multi_head_attention_forward)


def head_stats(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[H, 3]`` per head: the largest logit a query row gives a key it attends; the mean normalised entropy
    of the rows (entropy / ln(keys attended), 1 = uniform, 0 = one-hot); the mean share on the first key.

    Rows that attend fewer than two keys carry no entropy (a causal mask's first row) and are left out;
    a head without any such row reads NaN.
    """
    valid = valid.expand_as(logits)
    masked = logits.masked_fill(~valid, -math.inf)
    top = masked.amax(dim=(0, 2, 3))
    n = valid.sum(-1)  # [b, H, r] keys attended
    use = n >= 2
    p = torch.softmax(masked, dim=-1).nan_to_num(0.0)  # (a row with no key: NaN -> 0, left out by `use`)
    entropy = -torch.special.xlogy(p, p).sum(-1) / n.clamp(min=2).float().log()
    weight = use.float()
    count = weight.sum(dim=(0, 2))
    mean = (entropy * weight).sum(dim=(0, 2)) / count
    sink = (p[..., 0] * weight).sum(dim=(0, 2)) / count
    top = torch.where(count > 0, top, torch.full_like(top, math.nan))
    return torch.stack([top, mean, sink], dim=1)


__all__ = ["LOGIT_ELEMENTS", "MAX_ROWS", "MAX_ITEMS", "attention_modules", "sdpa_rows", "softmax_rows",
           "mha_rows", "head_stats"]
