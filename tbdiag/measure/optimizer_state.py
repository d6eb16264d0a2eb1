"""Adam-family optimizer state, read on the device at logging steps: where ε outweighs √v̂.

Adam divides each coordinate's first moment by ``√v̂ + ε`` (``v̂`` the
bias-corrected ``exp_avg_sq``).  While ``√v̂`` is far above ε the update
follows the gradient whatever its scale; where ``√v̂`` falls below ε the
denominator is ε, the update shrinks with the gradient and Adam turns into
SGD with a learning rate of ``lr / ε`` (Wortsman et al. 2023, "Small-scale
proxies for large-scale Transformer training instabilities": the update
collapse when the gradient RMS reaches ε).  This module counts, per parameter,
the coordinates in that regime.

What counts and what does not:

- Adam-family groups only: a float ``eps`` and ``betas`` in the param group and
  an ``exp_avg_sq`` of the parameter's shape in its state (Adam, AdamW, NAdam,
  RAdam, their ``foreach``/``fused``/``capturable`` forms, Hugging Face's
  AdamW).  Optimizers whose ε plays another part, or that keep no such state,
  are skipped: SGD, Adagrad, RMSprop, Adamax (``exp_inf``), Adafactor (``eps`` a
  pair; its second moment factored into rows and columns), Lion, 8-bit states.
- ``amsgrad``: the denominator is built from ``max_exp_avg_sq``, so that is read.
- ``step`` may be a number, a CPU tensor or a device tensor (``capturable``,
  ``fused``): the bias correction is computed where the step lives, never read
  on the host.
- Only coordinates whose gradient in this step is non-zero: an embedding row of
  a token not in the batch (``v`` 0, or decaying since the token was last seen)
  is updated by nothing, whatever ε is, and a unit behind a dead ReLU is
  ``dead_relu``'s.  Where the gradient cannot be matched to the state (absent,
  sparse, another shape), the coordinates that ever received one (``v > 0``) count.

Large parameters are read on a fixed strided sample of about
`tbdiag.measure.probe.UPDATE_SAMPLE` elements (the update ratio's sample), and
the counts scaled to the whole tensor: each logging step reads at most that many
elements of ``v`` and of the gradient per parameter, in a few small kernels.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Mapping, Sequence

import torch

from .probe import UPDATE_SAMPLE, local, update_sample
from .stats import gather


def adam_eps(group: Mapping[str, Any]) -> float | None:
    """The ε of an Adam-family param group (a float ``eps`` next to ``betas``), else None."""
    eps, betas = group.get("eps"), group.get("betas")
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not isinstance(betas, (tuple, list)):
        return None
    return float(eps) if len(betas) == 2 else None


def dominated_threshold(group: Mapping[str, Any], state: Mapping[str, Any]) -> "torch.Tensor | float | None":
    """``ε · √(1 - β₂^step)``: ``√v`` below it means ``√v̂ < ε``.  None when the group is not Adam-family or
    the state holds no step yet.  The step of a fused or capturable optimizer lives where the parameters do: it
    gives a 0-d tensor on that device (no host read); a plain optimizer's step is a CPU value, read as a float."""
    eps = adam_eps(group)
    if eps is None:
        return None
    beta2 = group["betas"][1]
    if isinstance(beta2, torch.Tensor):  # (tensor betas: a CPU scalar is a host value; a device one is skipped)
        if beta2.device.type != "cpu" or beta2.numel() != 1:
            return None
        beta2 = float(beta2)
    step = state.get("step", group.get("step"))
    if isinstance(step, torch.Tensor) and step.device.type == "cpu" and step.numel() == 1 and not (
            group.get("fused") or group.get("capturable")):
        step = float(step)  # a host value (torch keeps a plain Adam's step on the CPU whatever the device)
    if isinstance(step, torch.Tensor):  # fused/capturable: where the parameters are, never read on the host
        with torch.no_grad():
            step = step.detach()
            return eps * torch.sqrt(1.0 - torch.pow(float(beta2), step if step.is_floating_point() else step.double()))
    if isinstance(step, numbers.Real) and step > 0:
        return eps * math.sqrt(max(0.0, 1.0 - float(beta2) ** float(step)))
    return None


def second_moment(group: Mapping[str, Any], state: Mapping[str, Any]) -> torch.Tensor | None:
    """The second moment Adam divides by: ``max_exp_avg_sq`` under amsgrad, else ``exp_avg_sq``; None without one."""
    v = state.get("max_exp_avg_sq") if group.get("amsgrad") else None
    if not isinstance(v, torch.Tensor):
        v = state.get("exp_avg_sq")
    if not isinstance(v, torch.Tensor) or v.layout != torch.strided or not v.is_floating_point():
        return None
    return local(v)


def _sample(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(view, numel / its numel)``: the elements of ``t`` that are read (a view, whatever the layout)."""
    if t.numel() <= UPDATE_SAMPLE or t.is_contiguous():
        view, root = update_sample(t)
        return view, root * root
    view = t  # not contiguous: a strided slice along the leading dimensions, same logical elements for every tensor
    for d in range(t.dim()):
        if view.numel() <= UPDATE_SAMPLE:
            break
        step = min(view.shape[d], -(-view.numel() // UPDATE_SAMPLE))
        view = view[(slice(None),) * d + (slice(None, None, step),)]
    return view, t.numel() / max(1, view.numel())


def _matches(v: torch.Tensor, grad: torch.Tensor | None) -> bool:
    """Whether ``grad`` can be read element for element beside ``v`` (else ``v > 0`` says what counts)."""
    return (grad is not None and grad.layout == torch.strided and grad.shape == v.shape
            and grad.device == v.device and v.is_contiguous() == grad.is_contiguous())


def dominated_counts(v: torch.Tensor, grad: torch.Tensor | None,
                     threshold: "torch.Tensor | float") -> torch.Tensor:
    """``[dominated, counted]`` (float32, on ``v``'s device): of the coordinates that received a gradient this
    step (``grad != 0``; without a matching ``grad``, those with ``v > 0``), how many have ``√v < threshold``.

    Read on `_sample`'s elements and scaled to the whole tensor.  Pure: reads ``v`` and ``grad``, writes nothing.
    """
    with torch.no_grad():
        vs, scale = _sample(v.detach())
        root = vs.to(torch.float32, copy=True).sqrt_()
        live = _sample(grad.detach())[0] != 0 if _matches(v, grad) else vs > 0
        dominated = (live & (root < threshold)).sum()
        counted = live.sum()
        return torch.stack([dominated, counted]).to(torch.float32) * scale


def _counts_together(vs: list[torch.Tensor], lives: list[torch.Tensor], thresholds: list[float],
                     scales: list[float]) -> list[torch.Tensor]:
    """`dominated_counts` of many samples with thresholds known on the host, in a dozen fused ``_foreach`` ops
    instead of a handful of kernels per parameter (the per-call overhead is most of the cost of small tensors).

    ``min(floor(sqrt(v) / threshold), 1)`` is 0 where dominated and 1 elsewhere; ``|sign(live)|`` is 1 where
    counted; their L1 norms count the coordinates kept and counted.
    """
    with torch.no_grad():
        kept = torch._foreach_sqrt([v.to(torch.float32, copy=True) for v in vs])
        torch._foreach_div_(kept, thresholds)
        torch._foreach_floor_(kept)
        torch._foreach_clamp_max_(kept, 1.0)
        counted = [t.to(torch.float32, copy=True) for t in lives]
        torch._foreach_abs_(counted)
        torch._foreach_sign_(counted)
        torch._foreach_mul_(kept, counted)
        n_counted = torch._foreach_norm(counted, 1)
        n_kept = torch._foreach_norm(kept, 1)
        return [torch.stack([c - k, c]) * scale for c, k, scale in zip(n_counted, n_kept, scales)]


def epsilon_counts(optimizer: Any, params: Sequence[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor] | None:
    """``(positions, [k, 2] counts)``: `dominated_counts` of each parameter of ``params`` (``(position,
    parameter)``) that an Adam-family group of ``optimizer`` holds, with state; None when there is none.

    Parameters whose step is a number or a host value are counted together (`_counts_together`); those with
    a step on the device (capturable, fused) one by one.  The counts are gathered on the first one's device
    (a model spread over several devices).
    """
    groups = getattr(optimizer, "param_groups", None)
    state = getattr(optimizer, "state", None)
    if not groups or state is None:
        return None
    group_of = {id(p): g for g in groups if adam_eps(g) is not None for p in g["params"]}
    results: dict[int, torch.Tensor] = {}
    together: list[tuple[int, torch.Tensor, torch.Tensor, float, float]] = []  # position, v, live, threshold, scale
    for k, p in params:
        group = group_of.get(id(p))
        st = state.get(p) if group is not None else None
        if not st:
            continue
        v = second_moment(group, st)
        threshold = dominated_threshold(group, st) if v is not None else None
        if v is None or threshold is None or v.numel() == 0:
            continue
        grad = local(p.grad) if p.grad is not None else None
        if isinstance(threshold, torch.Tensor):
            results[k] = dominated_counts(v, grad, threshold)
            continue
        vs, scale = _sample(v.detach())
        live = _sample(grad.detach())[0] if _matches(v, grad) else vs
        together.append((k, vs, live, threshold, scale))
    if together:
        counts = _counts_together([t[1] for t in together], [t[2] for t in together], [t[3] for t in together],
                                  [t[4] for t in together])
        results.update(zip((t[0] for t in together), counts))
    if not results:
        return None
    positions = sorted(results)
    counts = [results[k] for k in positions]
    return positions, torch.stack(gather(counts, counts[0].device))


__all__ = ["adam_eps", "dominated_threshold", "second_moment", "dominated_counts", "epsilon_counts"]
