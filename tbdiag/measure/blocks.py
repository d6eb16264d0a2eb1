"""Transformer structure worth its own statistics: the repeated blocks and the mixture-of-experts routers.

- Repeated blocks: the entries of a ``ModuleList`` whose entries are all of
  one class with submodules of their own (Hugging Face ``model.layers.N``,
  ``transformer.h.N``, ``encoder.layer.N``; nested stages keep their inner
  lists), outside any expert list.  Their outputs are the residual stream,
  where Sun et al. (2024) find massive activations: `massive_stats` takes
  max|h| exactly and median|h| from a fixed strided sample, never a
  full-size temporary.
- Routers: a module named ``gate`` or ``router`` beside an ``experts``
  module (Mixtral, Qwen-MoE, OLMoE, ...), whose output is either its top-k
  choices (an integer ``[tokens, k]`` tensor in its output tuple, the
  routers of transformers 5) or router logits ``[tokens, num_experts]``,
  chosen from with the block's ``top_k``.  `expert_load` counts the tokens
  per expert with a scatter-add (``bincount`` on an accelerator reads its
  maximum on the host).

Pure tensor functions and module walks; the hooks that call them live in
`tbdiag.watch.block_tap`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

#: Elements of a block output sampled for its median |h| (a fixed stride: bounded memory, same positions each step).
MEDIAN_SAMPLE = 65_536
#: Idle experts are counted only where a balanced router gives each expert at least this many choices on average
#: (a balanced expert then gets none with a chance of about e^-4, 2%).
IDLE_MIN_CHOICES = 4
#: Names a router goes by, beside its ``experts``.
ROUTER_NAMES = ("gate", "router")


@dataclass
class Router:
    """A mixture-of-experts router: its module, how many experts and how many each token picks."""

    name: str
    module: nn.Module
    num_experts: int
    top_k: int


def repeated_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the model's repeated blocks, in ``named_modules()`` order (see the module docstring)."""
    out: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2 or "experts" in name.split("."):
            continue
        kinds = {type(m) for m in module}
        if len(kinds) != 1 or next(iter(module.children()), None) is None:
            continue
        if next(iter(module[0].children()), None) is None:
            continue  # a list of leaf layers (heads, experts' linears): not blocks
        out += [(f"{name}.{i}" if name else str(i), m) for i, m in enumerate(module)]
    return out


def _int_attr(*modules: nn.Module, names: tuple[str, ...]) -> int | None:
    for m in modules:
        for n in names:
            v = getattr(m, n, None)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
    return None


def routers(model: nn.Module) -> list[Router]:
    """The mixture-of-experts routers of ``model`` whose number of experts and top-k are known."""
    out = []
    for parent_name, parent in model.named_modules():
        experts = getattr(parent, "experts", None)
        if not isinstance(experts, nn.Module):
            continue
        for child_name in ROUTER_NAMES:
            gate = getattr(parent, child_name, None)
            if not isinstance(gate, nn.Module):
                continue
            top_k = _int_attr(gate, parent, names=("top_k", "num_experts_per_tok"))
            n = _int_attr(gate, parent, experts, names=("num_experts", "num_local_experts", "n_routed_experts"))
            if n is None and isinstance(gate, nn.Linear):
                n = gate.out_features
            if n is None and isinstance(experts, nn.ModuleList):
                n = len(experts)
            if top_k is not None and n is not None and top_k <= n:
                out.append(Router(f"{parent_name}.{child_name}" if parent_name else child_name, gate, n, top_k))
            break
    return out


def massive_stats(h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(max|h|, median|h|)`` of a block output as float32 0-dim tensors on its device; no host read.

    The maximum is exact (a min and a max, no ``abs()`` copy); the median comes from a fixed strided sample
    of at most about `MEDIAN_SAMPLE` elements.
    """
    h = h.detach()
    flat = h.reshape(-1) if h.is_contiguous() else None
    if flat is not None:
        lo, hi = torch.aminmax(flat)
    else:
        lo, hi = h.amin(), h.amax()
        flat = h.flatten()  # (a strided view's sample needs a copy; only non-contiguous outputs pay it)
    peak = torch.maximum(lo.abs(), hi.abs()).float()
    stride = max(1, -(-flat.numel() // MEDIAN_SAMPLE))
    median = flat[::stride].abs().float().median()
    return peak, median


def choices(output: object, num_experts: int, top_k: int) -> torch.Tensor | None:
    """A router output's top-k expert indices (any shape ending in k), or None when it is not recognised."""
    items = list(output) if isinstance(output, (tuple, list)) else [output]
    for t in items:
        if isinstance(t, torch.Tensor) and not t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == top_k:
            return t.detach()
    for t in items:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() >= 1 and t.shape[-1] == num_experts:
            return t.detach().topk(top_k, dim=-1).indices
    return None


def expert_load(indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """``[busiest expert's share of tokens, share of experts with no token]`` (float32, on the device).

    ``indices``: each token's top-k expert choices, ``[..., k]``.  The share is of tokens, not of choices: a
    token picks an expert at most once, so it is 1 when every token picks the busiest expert.
    """
    flat = indices.reshape(-1).long()
    tokens = max(1, indices.numel() // max(1, indices.shape[-1]))
    counts = torch.zeros(num_experts, dtype=torch.float32, device=flat.device)
    counts.scatter_add_(0, flat.clamp(0, num_experts - 1), torch.ones_like(flat, dtype=torch.float32))
    idle = (counts == 0).float().mean()
    if flat.numel() < IDLE_MIN_CHOICES * num_experts:  # too few tokens: a balanced router leaves experts idle by chance
        idle = torch.full_like(idle, math.nan)
    return torch.stack([counts.max() / tokens, idle])


__all__ = ["Router", "repeated_blocks", "routers", "massive_stats", "choices", "expert_load", "MEDIAN_SAMPLE"]
