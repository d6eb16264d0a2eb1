"""The taps of one logging-step training forward: a hook on every layer and the activation spy.

Installed when a logging step's training forward begins and removed when it
ends, on the thread that runs it: a non-logging step never pays for them.
What they see goes to the step's `tbdiag.measure.probe.StepProbe`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from ..measure.layers import ACTIVATION_KINDS, DEAD_BELOW, Layer, call_kind, first_tensor
from ..measure.probe import StackBuffer, StepProbe, autocast_device, no_autocast
from .attention_tap import KERNELS, AttentionTap

#: Rectifier-like kinds judged on their pre-activation (smooth ones: GELU, SiLU, ...): measured before the op
#: runs, as an in-place one (``nn.SiLU(inplace=True)``) overwrites it.
_BEFORE = frozenset(kind for kind, below in DEAD_BELOW.items() if below < 0)


class Busy(threading.local):
    """Per thread: True while tbdiag itself runs (its own ops are not the user's forward)."""

    value = False


class _ActivationSpy(TorchFunctionMode):
    """Sees every activation function call during a logging-step forward (on the thread that pushed it)."""

    def __init__(self, tap: "ForwardTap"):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in KERNELS and not self.tap.busy.value:  # an attention call: outside any attention module?
            self.tap.attention.stray_call(func)
        kind = ACTIVATION_KINDS.get(func)
        # (inside an activation module its own hooks measure it, whatever ops it is made of)
        if kind is None or self.tap.busy.value or self.tap.in_activation_module:
            return func(*args, **kwargs)
        kind = call_kind(kind, func, args, kwargs)
        x = args[0] if args else kwargs.get("input")
        if kind is None or not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return func(*args, **kwargs)
        if kind in _BEFORE:  # judged on its input, which an in-place call overwrites
            self.tap.spy_activation(kind, x, None)
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.tap.spy_activation(kind, x, out)
        return out


class ForwardTap:
    """Hooks on every layer plus the activation spy, for one training forward at a time.

    ``guard(entry, fn)`` makes each callback safe to run inside the user's
    forward (`tbdiag.watch.shield.Shield.guard`).  Activations applied outside
    activation modules (``F.relu`` in a forward) are seen only by the spy,
    which runs at the logging steps it is asked to probe and, once it has
    seen one, at every logging step.
    """

    def __init__(self, guard: Callable[[str, Callable], Callable], busy: Busy):
        self.busy = busy
        self.layers: list[Layer] = []
        self.probe: StepProbe | None = None
        self.thread: int | None = None  # the thread whose forward is tapped
        self.spy: _ActivationSpy | None = None
        self.hooks: list[tuple[str, Any]] = []  # ("pre" | "post", handle)
        self.functional_activations = False  # the spy saw F.relu & co. outside activation modules
        self._describe = False
        self._learn = False  # this forward taps every layer and learns which ReLU modules need no tap
        self._relu_inputs: dict[int, list[int | None]] = {}  # ReLU module row -> per call, the layer it follows
        self._act_stack: list[int] = []
        self.stack_buffer = StackBuffer()  # kept across logging steps
        self._layer_hook = guard("layer hook", lambda layer, module, args, out: self._on_output(layer, args, out))
        self._act_pre = guard("layer hook", lambda layer, module, args: self._on_input(layer, args))
        self.spy_activation = guard("activation spy", self.on_activation)
        self.attention = AttentionTap(guard, busy)  # the attention rows' kernels (tbdiag.watch.attention_tap)

    def open(self, probe: StepProbe, spy_due: bool, describe: bool) -> None:
        """Tap this thread's forward: ``describe`` records shapes and MACs (before the layer table is written).

        The forwards that describe the model, run the activation spy or draw
        feature maps tap every layer and learn which ReLU modules need no tap
        (`Layer.untapped`); the others leave those out, a hook call and a
        reduction fewer per ReLU.
        """
        self.probe, self.thread, self._describe = probe, threading.get_ident(), describe
        self._act_stack.clear()
        self._learn = describe or spy_due or probe.options.images
        probe.calls.clear()
        probe.batch = not self._learn  # (the forwards that learn measure every output in its hook)
        probe.stack_buffer = self.stack_buffer
        if self._learn:
            self._relu_inputs.clear()
            for layer in self.layers:
                layer.relu_after, layer.untapped = None, False
        attributing = False  # some activation is attributed to the layer it follows in this forward
        for layer in self.layers:
            if layer.untapped:
                continue
            # the same hook objects at every logging step: torch.compile guards on them, so fresh ones would
            # recompile the model at every logging step
            if layer.hooks is None:
                layer.hooks = (functools.partial(self._layer_hook, layer), functools.partial(self._act_pre, layer))
            self.hooks.append(("post", layer.module.register_forward_hook(layer.hooks[0])))
            if layer.is_activation:
                attributing = True
                self.hooks.append(("pre", layer.module.register_forward_pre_hook(layer.hooks[1])))
        self.attention.open(probe, self.layers, self.hooks)
        if self.functional_activations or spy_due:
            attributing = True
            self.spy = _ActivationSpy(self)
            self.spy.__enter__()
        probe.track_producers = attributing

    def close(self) -> None:
        """Pop the spy (on the thread that pushed it) and remove the layer hooks."""
        if self.probe is None and self.spy is None and not self.hooks:
            return  # not open (every non-logging step)
        self.pop_spy()
        self.attention.close()
        for _, h in self.hooks:
            h.remove()
        self.hooks.clear()
        self._act_stack.clear()
        if self.probe is not None:
            self._measure(self.probe.flush_outputs, None)  # (a fault: the forward hook's, which calls this)
            if self._learn:
                self._learn_untapped(self.probe)
            self.probe.producers.clear()
        self.probe = self.thread = None

    @property
    def in_activation_module(self) -> bool:
        """Whether an activation module's forward is running (its own hooks measure it)."""
        return bool(self._act_stack)

    def _learn_untapped(self, probe: StepProbe) -> None:
        """After a forward that tapped every layer: which rectifier-like modules the next forwards can leave
        untapped (their dead units come from the output of the layer they follow, their pre-activation).

        Those whose every call took, as it was, the output of a layer that ran
        once in this forward (not a sum, a slice, or a reused layer's output).
        """
        for row, inputs in self._relu_inputs.items():
            if inputs and all(t is not None and probe.calls.get(t) == 1 for t in inputs):
                self.layers[row].untapped = True
                for t in inputs:
                    self.layers[t].relu_after = self.layers[row].activation_kind
        self._relu_inputs.clear()

    def pop_spy(self) -> None:
        self.attention.pop()  # (pushed above the activation spy: modes leave in reverse order)
        if self.spy is not None:
            spy, self.spy = self.spy, None
            spy.__exit__(None, None, None)

    def _on_output(self, layer: Layer, args: tuple, output: Any) -> None:
        probe = self.probe
        if probe is None or threading.get_ident() != self.thread:
            return None  # a forward on another thread, or outside the training forward being measured
        out = first_tensor(output)
        if layer.is_activation:
            if (layer.activation_kind not in _BEFORE and out is not None and args
                    and isinstance(args[0], torch.Tensor)):
                self.on_activation(layer.activation_kind, args[0], out)  # before `out` is registered below
            if self._act_stack and self._act_stack[-1] == layer.row:
                self._act_stack.pop()
        if out is None:
            return None
        self._measure(probe.record_output, out, layer, args, out, describe=self._describe)
        return None

    def _on_input(self, layer: Layer, args: tuple) -> None:
        """An activation module's forward begins: its calls are its own; a smooth rectifier-like one is measured
        now, on its input (an in-place one overwrites it)."""
        if self.probe is None or threading.get_ident() != self.thread:
            return
        self._act_stack.append(layer.row)
        if layer.activation_kind in _BEFORE and args and isinstance(args[0], torch.Tensor):
            self.on_activation(layer.activation_kind, args[0], None)

    def _measure(self, fn: Callable, out: torch.Tensor | None, *args: Any, **kwargs: Any) -> None:
        """Run one of the probe's measurements: marked busy, past the spy, in float32 whatever autocast picks.

        The contexts are entered only where they change something: at a few
        microseconds each they would be a large part of a small layer's cost.
        """
        self.busy.value = True
        try:
            if self.spy is None and autocast_device(out) is None:
                fn(*args, **kwargs)
            else:  # our reductions need not pass through the spy (a Python call per op)
                with torch._C.DisableTorchFunction(), no_autocast(out):
                    fn(*args, **kwargs)
        finally:
            self.busy.value = False

    def on_activation(self, kind: str, x: torch.Tensor, out: torch.Tensor | None) -> None:
        """An activation function ran (``out``), or is about to run (None), on ``x``: attribute it to the layer
        that produced ``x``."""
        probe = self.probe
        if self.spy is not None and not self._act_stack:
            self.functional_activations = True  # applied outside any activation module: keep the spy on
        if probe is None or x.numel() == 0 or not x.is_floating_point():
            return
        produced = probe.producer(x)
        target = produced[0] if produced is not None else None
        if self._learn and self._act_stack:  # inside an activation module: does it take a layer's output as is?
            module_row = self._act_stack[-1]
            as_is = produced is not None and produced[1]
            same = kind in DEAD_BELOW and self.layers[module_row].activation_kind == kind
            follows = target if as_is and same else None
            self._relu_inputs.setdefault(module_row, []).append(follows)
        if target is None and self._act_stack:
            target = self._act_stack[-1]
        if target is None:
            return
        self._measure(probe.on_activation, x, self.layers[target], kind, x, out)
