"""Every step's gradient norms for the spike tracker (`tbdiag.measure.gradient_spikes`), taken before any clipping.

``clip_grad_norm_`` rewrites ``.grad`` in place between the backward and
``optimizer.step()``: a spike is cut to the clip value before the optimizer's
hooks see it.  So the norms are taken at the end of each training backward
(an autograd callback queued by a hook on the model's output, as the watcher
does without an optimizer), and handed to the tracker when the step ends;
with gradient accumulation the last backward before the step counts.  They
are taken at the step itself instead (after any clipping) where the end of
the backward is not a safe or meaningful place:

- in a distributed job, where DDP's all-reduce may still be writing the
  gradients when our callback runs;
- under float16 autocast with a GradScaler that ``watch`` was not given: the
  gradients are still scaled there, and the scale's changes would read as
  jumps (at the step they have been unscaled).

Reads nothing on the host: norms, the tracker's comparison and its choice
stay on the device until the logging step.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..measure.gradient_spikes import SpikeTracker
from ..measure.sampled_norms import SampledNorms
from ..measure.probe import StepProbe, grad_scale, local


def _loss_of(output: Any) -> torch.Tensor | None:
    """The loss a model's output carries (Hugging Face ``ModelOutput.loss``, a ``"loss"`` key), if any."""
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    return loss if isinstance(loss, torch.Tensor) and loss.numel() == 1 else None


def _float16_autocast() -> bool:
    return any(torch.is_autocast_enabled(dt) and torch.get_autocast_dtype(dt) == torch.float16
               for dt in ("cuda", "cpu"))


class SpikeWatch:
    """Feeds a `SpikeTracker` one step at a time; see the module docstring."""

    def __init__(self, param_index: Callable[[], list], layers: Callable[[], list], guard: Callable, grad_scaler: Any,
                 at_backward: bool):
        self.tracker = SpikeTracker()
        self._param_index = param_index  # the recorder's (row, parameter, tag) list
        self._layers = layers  # the watcher's rows (`tbdiag.measure.layers.Layer`)
        self.norms = SampledNorms()  # how every step's gradient norms are read
        self._index: list | None = None  # the param_index list the three below were taken from
        self._params: list[torch.Tensor] = []
        self._every: list[int] = []  # all positions
        self._sharded = False  # some parameter is a DTensor: its gradient's local shard is read
        self._rows_whole: frozenset[int] = frozenset()  # embeddings: read whole (`SampledNorms`)
        self._grad_scaler = grad_scaler
        # measure at the end of the backward (before clipping): with an optimizer, outside a distributed job; without
        # one the step itself ends with the backward
        self._at_backward = at_backward
        self._pending: tuple[torch.Tensor, list[int]] | None = None  # the last backward's norms
        self._loss: torch.Tensor | None = None  # the last training forward's loss, when its output carries one
        self._queued = False
        self._guard = guard
        self._hook: Callable | None = None  # guarded at the first training forward (the set-up stays as it was)
        self._callback: Callable | None = None

    def on_output(self, output: Any, grad_tensor: torch.Tensor | None) -> None:
        """A training forward of the model ended: remember its loss; measure at the end of its backward."""
        loss = _loss_of(output)
        self._loss = loss.detach() if loss is not None else None
        if self._at_backward and self._grad_scaler is None and _float16_autocast():
            self._at_backward = False  # gradients scaled by a GradScaler we were not given: wait for the step
        if self._at_backward and grad_tensor is not None:
            if self._hook is None:
                self._hook = self._guard("spike gradient hook", self._on_output_grad)
                self._callback = self._guard("spike backward callback", self._after_backward)
            grad_tensor.register_hook(self._hook)

    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not self._queued and self._writes_grads():
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._callback)
        return None

    def _writes_grads(self) -> bool:
        """Whether the running backward accumulates into ``.grad``: not a ``torch.autograd.grad()``, which
        writes none, so that the ``.grad`` there belong to another backward (another thread's, being written
        or freed meanwhile: reading them crashed a two-thread test)."""
        params = self._params or [p for _, p, _ in self._param_index()]
        param = next((p for p in params if p.requires_grad), None)
        if param is None:
            return True
        try:
            torch._C._will_engine_execute_node(torch.autograd.graph.get_gradient_edge(param).node)
        except RuntimeError:  # "currently running autograd.grad()": the engine says so for a leaf's accumulator
            return False
        return True

    def _after_backward(self) -> None:
        self._queued = False
        self._pending = self._norms()

    def _norms(self) -> tuple[torch.Tensor, list[int]] | None:
        """Every parameter's gradient norm at this step (`tbdiag.measure.sampled_norms`: sampled on a CPU), and the
        positions that had a gradient.  A few Python operations per parameter: this runs at every step."""
        index = self._param_index()
        if index is not self._index:
            self._index, self._params = index, [p for _, p, _ in index]
            self._every = list(range(len(index)))
            self._sharded = any(type(p).__name__ == "DTensor" for p in self._params)
            rows = self._layers()
            self._rows_whole = frozenset(k for k, (row, _, _) in enumerate(index)
                                         if row < len(rows) and isinstance(rows[row].module, nn.Embedding))
        grads = [p.grad for p in self._params]
        positions = self._every
        if any(g is None for g in grads):
            positions = [k for k, g in enumerate(grads) if g is not None]
            if not positions:
                return None
            grads = [grads[k] for k in positions]
        if self._sharded:
            grads = [local(g) for g in grads]
        whole = self._rows_whole if positions is self._every else \
            frozenset(j for j, k in enumerate(positions) if k in self._rows_whole)
        norms, order = self.norms(grads, whole)
        # the norms' parameter positions: the sampler's order itself when every parameter has a gradient (the
        # same list at every step, so the tracker compares nothing)
        positions = order if positions is self._every else [positions[j] for j in order]
        unscale = grad_scale(self._grad_scaler, norms.device)
        return (norms / unscale if unscale is not None else norms), positions

    def on_step(self, step: int) -> None:
        """The step ended (optimizer step, or the backward without an optimizer): one observation."""
        pending, self._pending = self._pending, None
        if pending is None:
            with torch.no_grad():
                pending = self._norms()
        loss, self._loss = self._loss, None
        if pending is not None:
            norms, positions = pending
            with torch.no_grad():
                self.tracker.observe(step, norms, positions, len(self._param_index()), loss)

    def add_to(self, probe: StepProbe) -> None:
        self.tracker.add_to(probe, list(range(len(self._param_index()))))


__all__ = ["SpikeWatch"]
