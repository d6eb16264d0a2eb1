"""The NaN sentinel: the exact step, layer and pass where NaN/Inf first appears, at any ``log_every``.

Per-layer checks on every step would cost a pass over every activation (about
2% of a CPU step of a 26-layer MLP), so the sentinel watches one tensor per
step and finds the layer only once, when it fires:

- Every training forward ends with one finiteness check of the model's output:
  one reduction per floating-point output tensor (`_reduce`), never a full-size
  temporary, then three kernels on a few scalars (`_flag`).  On an accelerator
  the reduction is a minimum and a maximum (``torch.aminmax``, one pass over a
  dense tensor): in the tensor's own dtype (no float32 copy of a bfloat16
  tensor), NaN-propagating, and with no sum that a finite tensor could
  overflow, so it is exact.  On a CPU it is a sum (a third
  of ``aminmax``'s time there: about 50 µs on a CPU step, most of it the first
  touch of a kernel after the forward), which a sum of huge but finite values
  also makes Inf: then, and only then, the exact ``aminmax`` tells the two apart
  (a float16 sum overflows at 65,504: float16 goes to ``aminmax`` at once).
  NaN born anywhere in a forward reaches the output, and NaN born in a backward
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
so the sentinel reads it every step ("read" mode: one read, whatever the number
of output tensors).  On an accelerator a read is a device-host sync, so by
default the check only folds into a device-side first-bad-step tensor (a
comparison, a clamp and a ``torch.where``, no sync), sent with the next logging
step's single transfer: the exact step of the first non-finite output, without
the layer (readers then name it from the logging step's per-layer counts).
``watch(..., stop_on=("nonfinite",))`` asks for read mode there too, one sync
per step (not one per output tensor), to stop at once and name the layer.

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
from ..measure.probe import StepProbe, local

#: Codes of the model statistic ``nonfinite_where`` (what the report says).
WHERE_CODES: dict[str, float] = {"forward": 0.0, "backward": 1.0, "input": 2.0}

#: Output dtypes the check reduces (torch has no reductions for the float8 types: such outputs go unchecked).
CHECKED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

#: Device types whose values the host reads without waiting for a device: the check is read there at every step.
READ_FREE = frozenset({"cpu"})

#: ``Sentinel._first`` before any non-finite output: no step.
_NO_STEP = torch.iinfo(torch.int64).max


def _floats(value: Any) -> list[torch.Tensor]:
    """The tensors of a module's output or inputs (nested containers too) that the check reads: floating point,
    not empty, with values (not meta); a sharded DTensor's local shard."""
    if isinstance(value, torch.Tensor):  # the common case, without walking a tree
        leaves = [value]
    else:
        try:
            leaves = pytree.tree_leaves(value)
        except Exception:  # a type pytree cannot take apart: its first tensor
            leaves = [first_tensor(value)]
    shards = [local(t) for t in leaves if isinstance(t, torch.Tensor)]
    return [t for t in shards if t.dtype in CHECKED_DTYPES and not t.is_meta and t.numel() > 0]


def _flat(t: torch.Tensor) -> torch.Tensor | None:
    """``t``'s elements as a contiguous 1-D view (any order), or None where they are not one dense block.

    Permuted layouts (channels-last, a transpose) are dense: ordered by stride they are contiguous.
    """
    if t.is_contiguous():
        return t.view(-1)
    p = t.permute(sorted(range(t.dim()), key=t.stride, reverse=True))
    return p.view(-1) if p.is_contiguous() else None


def _reduce(t: torch.Tensor, exact: bool) -> tuple[torch.Tensor, ...]:
    """One reduction of ``t`` into scalars on its device that are all finite if every element of ``t`` is.

    Never a full-size temporary, never a host read.  ``exact``: its minimum and maximum, NaN-propagating and
    in ``t``'s own dtype, so that no finite tensor can overflow into Inf: finite exactly when every element
    is.  One pass (`torch.aminmax`) over a dense tensor; ``aminmax`` copies any other to a contiguous one
    first, so a strided view is read twice instead (``amin`` and ``amax``).  Otherwise (only where reading
    the result costs nothing, `READ_FREE`) its sum, a CPU's fastest reduction (a third of ``aminmax``'s time
    on float32), which is also Inf/NaN when a sum of finite values overflows the float32 range: the caller
    then asks for the exact one.  A float16 sum would overflow at 65,504, and a float32 sum of a float16
    tensor is a full-size copy on a CPU: float16 is always reduced exactly.
    """
    t = t.detach()
    if exact or t.dtype == torch.float16:
        flat = _flat(t)
        return torch.aminmax(flat) if flat is not None else (t.amin(), t.amax())
    return (t.sum(),)  # float32/float64, or bfloat16: summed in float32 by the CPU, the float32 range


def _flag(tensors: list[torch.Tensor], exact: bool) -> torch.Tensor:
    """0 if every element of ``tensors`` is finite, else NaN: a 0-dim tensor on their device, no host read.

    One reduction per tensor (`_reduce`), then three kernels on a few scalars (0 * Inf and 0 * NaN are NaN).
    Tensors on several devices are reduced on each; the flags meet on the first accelerator's device (a copy
    between accelerators is no host sync), and a CPU's joins as a number (read on the host, free there: a
    copy up from pageable host memory would wait for the stream).
    """
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).extend(_reduce(t, exact))
    flags = [torch.stack(values).mul(0).sum() for values in by_device.values()]
    if len(flags) == 1:
        return flags[0]
    on_host = sum(float(f) for f in flags if f.device.type == "cpu")
    accelerators = [f for f in flags if f.device.type != "cpu"]
    target = accelerators[0].device
    return torch.stack([f.to(device=target, dtype=torch.float32, non_blocking=True) for f in accelerators]).sum() \
        + on_host


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of ``tensors`` is finite, with one host read (a device sync off the CPU).

    Where reading costs nothing (`READ_FREE`), the cheapest reduction first and the exact one only when it says
    non-finite: a sum that overflowed while every element is finite is told apart, not called NaN.
    """
    if not tensors:
        return True
    if all(t.device.type in READ_FREE for t in tensors):
        values = _reduce(tensors[0], exact=False) if len(tensors) == 1 else ()
        if len(values) == 1:  # one sum: read as it is (the three kernels of `_flag` would triple a small check)
            if math.isfinite(float(values[0])):
                return True
        elif float(_flag(tensors, exact=False)) == 0.0:
            return True
    return float(_flag(tensors, exact=True)) == 0.0


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
        if self._read is None:
            self._read = self.read_always or all(t.device.type in READ_FREE for t in tensors)
        if self._read:  # (every tensor op here and below is on detached tensors: no autograd graph)
            self._cuda = next((t.device.index for t in tensors if t.device.type == "cuda"), None)
            if not _all_finite(tensors):
                self._localise(step, module, inputs, rng)
            return
        # device mode: the exact check's flag folds into the first bad step, on the device, with no host read
        flag = _flag(tensors, exact=True)
        first = self._first
        if first is None or first.device != flag.device:
            first = torch.full((), _NO_STEP, dtype=torch.int64, device=flag.device)
        self._first = torch.where(flag == 0, first, first.clamp(max=step))

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
            offset = torch.where(first != _NO_STEP, (first - probe.step).to(torch.float64), math.nan)
            probe.add_model("nonfinite_step", offset, offset=float(probe.step))

    # ---------------------------------------------------------- once

    def _localise(self, step: int, module: nn.Module, inputs: tuple[tuple, dict] | None,
                  rng: tuple[torch.Tensor, torch.Tensor | None] | None) -> None:
        layers = self._layers()
        bad_weights = [layer for layer in layers if not _all_finite(_floats([p for _, p in layer.params]))]
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
