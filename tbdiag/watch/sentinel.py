"""The NaN sentinel: the exact step, layer and pass where NaN/Inf first appears, at any ``log_every``.

Per-layer checks on every step would cost a pass over every activation (about
2% of a CPU step of a 26-layer MLP), so the sentinel watches one tensor per
step and finds the layer only once, when it fires:

- Every training forward ends with one finiteness check of the model's output
  (a sum over the output, with the exact mask only when the sum is not finite: about 50 µs
  on a CPU step, most of it the first touch of a kernel after the forward).  NaN
  born anywhere in a forward reaches the output, and NaN born in a backward
  reaches it one step later, through the weights the optimizer wrote with it.
- When the output turns non-finite at step ``s`` the sentinel localises, once:
  if some weights are already NaN/Inf, it was born in the previous step's
  backward (or update): step ``s - 1``, and the layer is the last one in
  forward order with non-finite weights (gradients flow backwards: the first in
  backward order).  Otherwise it was born in this forward: the forward is
  replayed once without gradients, on the same inputs, with the random state
  of this step's forward (restored after; kept at every step only once a
  logging step's forward is seen to draw random numbers, as dropout does: a
  copy of the generator state is the largest per-step cost of the sentinel
  after the check itself), on copies of the module buffers
  (BatchNorm statistics), and the first layer whose output is NaN/Inf is named.  A NaN/Inf
  in the model's input is reported as such.

Reading the check needs the value on the host.  On the CPU that costs nothing,
so the sentinel reads it every step ("read" mode).  On an accelerator a read
is a device-host sync, so by default the check only updates a device-side
first-bad-step tensor (``torch.where``, no sync), sent with the next logging
step's single transfer: the exact step of the first non-finite output, without
the layer (readers then name it from the logging step's per-layer counts).
``watch(..., stop_on=("nonfinite",))`` asks for read mode there too, one sync
per step, to stop at once and name the layer.

Limits: the replay runs the user's forward once more (a forward hook of the
user's runs again; a module that counts its calls in a Python attribute sees
one more); under FSDP2 (sharded parameters) there is no replay.  Gradient
clipping by the global norm spreads one NaN gradient to every layer, so a
backward-born NaN is then placed at the last layer.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..measure.layers import Layer, first_tensor
from ..measure.probe import StepProbe

#: Codes of the model statistic ``nonfinite_where`` (what the report says).
WHERE_CODES: dict[str, float] = {"forward": 0.0, "backward": 1.0, "input": 2.0}


def _floats(value: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a module's output or inputs (nested containers too)."""
    if isinstance(value, torch.Tensor):  # the common case, without walking a tree
        return [value] if value.is_floating_point() and not value.is_meta else []
    try:
        leaves = pytree.tree_leaves(value)
    except Exception:  # a type pytree cannot take apart: its first tensor
        leaves = [first_tensor(value)]
    return [t for t in leaves if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_meta]


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Host read: only called where that costs no device sync (CPU) or the user asked for it.

    A sum is one reduction and no mask: finite unless some element is NaN/Inf, or the sum overflows,
    which the exact check then tells apart (a quarter of the cost of the mask on every step)."""
    for t in tensors:
        t = t.detach()
        if not math.isfinite(float(t.sum())) and not bool(torch.isfinite(t).all()):
            return False
    return True


class Sentinel:
    """Finds the first non-finite step of a watched model; see the module docstring."""

    def __init__(self, layers: Callable[[], list[Layer]], busy: Any, read_always: bool,
                 on_found: Callable[[int, Layer | None, str], None] | None = None):
        self._layers = layers  # the watcher's rows, in model order once fixed
        self._busy = busy
        self.read_always = read_always  # read on accelerators too (stop_on="nonfinite"): one sync per step
        self.found: tuple[int, Layer | None, str] | None = None  # (step, layer, where), read mode only
        self.fresh = False  # found during the current step, not yet written
        self._on_found = on_found
        self._inputs: tuple[tuple, dict] | None = None  # the open forward's inputs, for a replay
        self._rng: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._random: bool | None = None  # a training forward drew random numbers (checked at logging steps)
        self._rng_probe = False  # the open forward compares the generator state before and after
        self._cuda: int | None = None  # the CUDA device of the last output checked in read mode
        self._read: bool | None = None  # decided at the first output checked
        self._first: torch.Tensor | None = None  # device mode: first bad step since the last logging step

    # ---------------------------------------------------------- every step

    def forward_begins(self, args: tuple, kwargs: dict, logging: bool) -> None:
        """A training forward begins: keep references to its inputs and, when needed, its random state (read mode).

        The random state is copied at every step once a forward has drawn
        random numbers; until then only at ``logging`` steps, whose forwards
        are checked for it: a forward that draws none replays the same
        without it.
        """
        if self.found is not None or self._read is False:
            return
        self._inputs = (args, kwargs)
        self._rng_probe = logging and not self._random
        if self._random or self._rng_probe:
            self._rng = self._rng_state()

    def _rng_state(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return torch.get_rng_state(), torch.cuda.get_rng_state(self._cuda) if self._cuda is not None else None

    def forward_ends(self, step: int, module: nn.Module, output: Any) -> None:
        """The training forward of ``step`` ended with ``output``: one finiteness check."""
        inputs, rng = self._inputs, self._rng
        self._inputs = self._rng = None  # no reference kept past the forward
        if self._rng_probe and rng is not None:
            self._rng_probe = False
            self._random = not all(a is b or (a is not None and b is not None and torch.equal(a, b))
                                   for a, b in zip(self._rng_state(), rng))
        if self.found is not None:
            return
        tensors = _floats(output)
        if not tensors:
            return
        device = tensors[0].device
        if self._read is None:
            self._read = self.read_always or device.type == "cpu"
        if self._read:  # (every tensor op here and below is on detached tensors: no autograd graph)
            self._cuda = device.index if device.type == "cuda" else None
            if not _all_finite(tensors):
                self._localise(step, module, inputs, rng)
            return
        finite = torch.stack([torch.isfinite(t.detach()).all() for t in tensors]).all()
        first = self._first
        if first is None or first.device != device:
            first = torch.full((), -1, dtype=torch.int64, device=device)
        self._first = torch.where(finite | (first >= 0), first, step)

    def add_to(self, probe: StepProbe) -> None:
        """Model statistics for a logging step: the sentinel's finding (read mode) or its device state."""
        if self.found is not None:
            step, layer, where = self.found
            probe.add_model("nonfinite_step", float(step))
            probe.add_model("nonfinite_where", WHERE_CODES[where])
            if layer is not None:  # a row, renumbered at the first logging step: read once rows are final
                probe.add_model("nonfinite_layer", lambda: float(layer.row))
            self.fresh = False
        elif self._first is not None:
            first, self._first = self._first, None
            # small numbers through the float32 transfer: the offset from this logging step, the step added back
            offset = torch.where(first >= 0, (first - probe.step).to(torch.float64), math.nan)
            probe.add_model("nonfinite_step", offset, offset=float(probe.step))

    # ---------------------------------------------------------- once

    def _localise(self, step: int, module: nn.Module, inputs: tuple[tuple, dict] | None,
                  rng: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        layers = self._layers()
        bad_weights = [layer for layer in layers
                       if any(not _all_finite([p.detach()]) for _, p in layer.params if not p.is_meta)]
        if bad_weights and step > 0:
            self._found(step - 1, bad_weights[-1], "backward")
            return
        where = "forward"
        if inputs is not None and not _all_finite(_floats(inputs)):
            where = "input"
        layer = self._replay(module, inputs, rng, layers) if inputs is not None else None
        self._found(step, layer, where)

    def _found(self, step: int, layer: Layer | None, where: str) -> None:
        self.found, self.fresh = (step, layer, where), True
        if self._on_found is not None:
            self._on_found(step, layer, where)

    def _replay(self, module: nn.Module, inputs: tuple[tuple, dict], rng: Any, layers: list[Layer]) -> Layer | None:
        """Run this step's forward again, without gradients, to see which layer's output turns non-finite first."""
        if any(type(p).__name__ == "DTensor" for p in module.parameters()):
            return None  # sharded (FSDP2): a forward on one rank alone would wait for the others
        args, kwargs = inputs
        first: list[Layer] = []

        def check(layer: Layer, _module: nn.Module, _args: Any, out: Any) -> None:
            if not first and not _all_finite(_floats(out)):
                first.append(layer)

        # the replay updates copies of the buffers (BatchNorm statistics): the real ones, saved for this step's
        # backward, must not even see an in-place write
        buffers = [(m, name, b) for m in module.modules() for name, b in m.named_buffers(recurse=False)]
        devices = [self._cuda] if rng is not None and rng[1] is not None else []
        handles = [layer.module.register_forward_hook(lambda m, a, o, layer=layer: check(layer, m, a, o))
                   for layer in layers]
        self._busy.value = True
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if rng is not None:
                    torch.set_rng_state(rng[0])
                    if rng[1] is not None:
                        torch.cuda.set_rng_state(rng[1], self._cuda)
                for m, name, b in buffers:
                    setattr(m, name, b.clone())
                try:
                    module(*args, **kwargs)
                except Exception:  # a forward that cannot run twice: the step is still exact
                    pass
        finally:
            self._busy.value = False
            for m, name, b in buffers:
                setattr(m, name, b)
            for h in handles:
                h.remove()
        return first[0] if first else None
