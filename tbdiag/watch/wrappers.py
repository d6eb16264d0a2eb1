"""Seeing through the wrappers frameworks put around the user's model and optimizer.

Hooks belong on the real objects: the module whose ``named_modules()`` are the
user's layer names (not ``module.`` from DDP, not ``_orig_mod.`` from
``torch.compile``), and the `torch.optim.Optimizer` whose ``step()`` really
runs (not accelerate's ``AcceleratedOptimizer`` or Lightning's
``LightningOptimizer``, which forward to it but hold no hook registries).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

_MODEL_ATTRS = ("_orig_mod", "module")  # torch.compile's OptimizedModule; DDP, DataParallel, FSDP1
_OPTIMIZER_ATTRS = ("optimizer", "_optimizer")  # accelerate, HF; Lightning


def _is_model_wrapper(model: nn.Module) -> str | None:
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
        return "_orig_mod"
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return "module"
    if type(model).__name__ == "FullyShardedDataParallel" and isinstance(getattr(model, "module", None), nn.Module):
        return "module"
    return None


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's own module inside DDP / DataParallel / FSDP1 / ``torch.compile`` wrappers (any nesting)."""
    for _ in range(16):
        attr = _is_model_wrapper(model)
        if attr is None:
            return model
        model = getattr(model, attr)
    return model


def _has_hook_registry(optimizer: Any) -> bool:
    return isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "_optimizer_step_pre_hooks")


def unwrap_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The `torch.optim.Optimizer` that really steps, inside accelerate / Lightning / HF wrappers.

    Raises TypeError, saying what to pass, when ``optimizer`` is no optimizer at all.
    """
    seen = optimizer
    for _ in range(16):
        if _has_hook_registry(seen):
            return seen
        inner = next((getattr(seen, a) for a in _OPTIMIZER_ATTRS if getattr(seen, a, None) is not None), None)
        if inner is None:
            break
        seen = inner
    raise TypeError(
        f"optimizer must be a torch.optim.Optimizer (or a wrapper holding one as .optimizer), got "
        f"{type(optimizer).__name__}; pass it as watch(model, optimizer=opt), or leave it out to count "
        "backward passes as steps"
    )
