"""Facts about a training set-up that the reading side needs, recorded once in the layer table's ``extra``.

- ``optimizer``: the optimizer's class name (``"AdamW"``): under an adaptive
  optimizer a small gradient still moves the weights, so the rules judge
  learning by the update (`tbdiag.rules.update`).
- ``adam_eps``: the ε of an Adam-family optimizer (the smallest among its
  param groups), quoted by the ``epsilon_dominated`` finding (`tbdiag.rules.optimizer_state`).
- ``output_width``: how many scores the model outputs per sample (its class
  dimension): a classifier's cross-entropy stuck at ln C means guessing
  (`tbdiag.rules.loss`).
"""

from __future__ import annotations

from typing import Any

from .layers import model_output
from .optimizer_state import adam_eps


def output_width(output: Any) -> int | None:
    """The class dimension of a model's output: the last of ``[batch, C]`` / ``[batch, time, C]`` logits, the
    second of ``[batch, C, H, W]`` maps; a Hugging Face output's ``logits``; None for a scalar (a loss)."""
    t = model_output(output)
    if t is None or t.dim() < 2:
        return None
    return int(t.shape[-1] if t.dim() <= 3 else t.shape[1])


def facts(optimizer: Any, width: int | None) -> dict[str, Any]:
    """The entries this module adds to the layer table's ``extra``."""
    out: dict[str, Any] = {}
    if optimizer is not None:
        out["optimizer"] = type(optimizer).__name__
        eps = [e for e in map(adam_eps, getattr(optimizer, "param_groups", ())) if e is not None]
        if eps:
            out["adam_eps"] = min(eps)
    if width is not None:
        out["output_width"] = width
    return out
