"""Mistakes in the training loop, seen from the watcher's hooks: eval mode, stale gradients, softmaxed outputs.

Three model-level measurements (`tbdiag.contract.statistics.MODEL_STATISTICS`), each
checked by a rule of the same concern in `tbdiag.rules.loop`:

``eval_mode_steps``
    Optimizer steps taken while the model was in ``eval()`` mode with no
    training forward since the previous step: a host-side counter, reported
    at the next logging step.  Such steps open no logging forward (tbdiag
    measures training forwards only), so when nothing else is measured the
    count is written in a record of its own (`StepRecorder.finish_model_only`).
``stale_gradients``
    At the optimizer step before a logging step, the gradient of one small
    parameter is copied and a tensor hook is put on that parameter.  The hook
    runs in the next backward pass *before* the new gradient is accumulated,
    so the parameter's ``.grad`` is still what the loop left there: ``None`` or
    zeros when it was cleared (``zero_grad`` with or without ``set_to_none``,
    on the optimizer or the model), the previous step's gradient, unchanged,
    when it was not.  The comparison is exact (nothing touches a gradient left
    in place), runs on the device, and does not depend on a GradScaler's scale
    (the copy and ``.grad`` are the same tensor's values).  Gradient
    accumulation over micro-batches clears after the step, so its first
    backward finds cleared gradients: silent.  Checked only with an optimizer.
``softmax_output``
    At a logging step's training forward, whether the model's output (its
    ``logits`` for Hugging Face outputs, else its first tensor) is a
    probability distribution over its last dimension (or its channel
    dimension): non-negative, rows summing to 1.  Log-probabilities are
    negative, multi-label sigmoid outputs do not sum to 1: both stay silent.

Every hook only reads: no tensor it sees is modified, no gradient replaced
(the tensor hook returns None), no random number drawn.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..measure.layers import model_output
from ..measure.probe import StepProbe, local, no_autocast

#: How far a row sum may be from 1 for the output to count as probabilities (half-precision softmax rounds).
SOFTMAX_TOLERANCE = 1e-2


def softmax_flag(out: torch.Tensor) -> torch.Tensor | None:
    """1.0 (a device scalar) when ``out`` holds probability rows, else 0.0; None when it cannot be a class output.

    Rows are the last dimension, or dimension 1 of a ``[N, C, ...]`` output
    (segmentation).  Reductions accumulate in float32 without copying the
    output (a language model's logits may be large).
    """
    if not out.is_floating_point() or out.dim() < 2 or out.numel() == 0 or out.is_meta:
        return None
    dims = [d for d in ({out.dim() - 1, 1} if out.dim() >= 3 else {1}) if out.shape[d] > 1]
    if not dims:
        return None
    with torch.no_grad(), no_autocast(out):
        x = local(out.detach())
        non_negative = x.min() >= 0
        sums_to_one = torch.stack([((x.sum(d, dtype=torch.float32) - 1).abs() <= SOFTMAX_TOLERANCE).all()
                                   for d in dims]).any()
        return (non_negative & sums_to_one).to(torch.float32)


class LoopWatch:
    """The watcher's view of the loop itself; the watcher calls it from the hooks it already has.

    ``guard`` wraps the tensor hook like every other tbdiag entry point (`tbdiag.watch.shield.Shield.guard`).
    """

    def __init__(self, model: nn.Module, optimizer: Any, guard: Callable[[str, Callable], Callable]):
        self.model, self.optimizer, self._guard = model, optimizer, guard
        self._trained = False  # a training forward ran since the previous optimizer step
        self._eval_steps = 0  # optimizer steps in eval mode since the previous logging step
        self._softmax: torch.Tensor | None = None
        self._stale: dict[str, Any] | None = None  # the armed check: param, copy, handle, result

    # -------------------------------------------------------------- events from the watcher

    def on_training_forward(self) -> None:
        self._trained = True

    def on_model_output(self, output: Any) -> None:
        """The model's output at a logging step's training forward (the first one of the step counts)."""
        if self._softmax is None:
            out = model_output(output)
            if out is not None:
                self._softmax = softmax_flag(out)

    def on_optimizer_step(self) -> None:
        """After ``optimizer.step()``: count it if the model was in eval mode and never ran a training forward."""
        if not self._trained and not self.model.training:
            self._eval_steps += 1
        self._trained = False

    def report(self, probe: StepProbe | None) -> dict[str, Any]:
        """This logging step's loop statistics, into ``probe``; without one, returned (only what there is to say).

        Device values ride in the probe's host transfer; returned ones are
        device scalars or floats for `StepRecorder.finish_model_only`.
        """
        values: dict[str, Any] = {}
        if self.optimizer is not None:
            values["eval_mode_steps"] = float(self._eval_steps)
        stale = self._stale["result"] if self._stale is not None else None
        if stale is not None:
            values["stale_gradients"] = stale
        if self._softmax is not None:
            values["softmax_output"] = self._softmax
        self._eval_steps, self._softmax = 0, None
        self._disarm()
        if probe is None:
            return values if values.get("eval_mode_steps") or "stale_gradients" in values else {}
        for name, value in values.items():
            probe.add_model(name, value)
        return {}

    # -------------------------------------------------------------- the stale-gradient check

    def arm_stale_check(self) -> None:
        """At the optimizer step before a logging step: copy one small gradient and hook its parameter."""
        self._disarm()
        param = self._smallest_with_grad()
        if param is None:
            return
        with torch.no_grad():
            before = param.grad.detach().clone()
        state: dict[str, Any] = {"param": param, "before": before, "result": None, "handle": None}
        check = self._guard("stale-gradient check", self._check_left_gradient)
        state["handle"] = param.register_hook(lambda grad: check(state, grad))
        self._stale = state

    def _check_left_gradient(self, state: dict[str, Any], grad: torch.Tensor) -> None:
        """The tensor hook: runs before the backward accumulates into ``.grad``, so ``.grad`` is what the loop left."""
        if state["result"] is None and state["before"] is not None:
            left, before = state["param"].grad, state["before"]
            with torch.no_grad():
                if left is None:
                    state["result"] = torch.zeros((), device=grad.device)
                else:
                    kept = (left == before).all().to(torch.float32)
                    # an all-zero previous gradient looks the same cleared or not: not checked (NaN)
                    state["result"] = torch.where((before != 0).any(), kept, torch.nan)
            state["before"] = None
        if state["handle"] is not None:  # safe inside the hook: torch holds the hooks it is iterating
            state["handle"].remove()
        return None

    def _smallest_with_grad(self) -> torch.Tensor | None:
        """The optimizer's smallest trainable parameter holding a dense, unsharded gradient (a few bytes to copy)."""
        best = None
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                g = p.grad
                if (g is None or not p.requires_grad or g.layout != torch.strided
                        or type(p).__name__ == "DTensor" or type(g).__name__ == "DTensor"):
                    continue
                if best is None or p.numel() < best.numel():
                    best = p
        return best

    def _disarm(self) -> None:
        state, self._stale = self._stale, None
        if state is not None and state["handle"] is not None:
            state["handle"].remove()

    def remove(self) -> None:
        """Take the tensor hook off (the watcher detaches)."""
        self._disarm()
