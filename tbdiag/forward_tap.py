"""The taps of one logging-step training forward: a hook on every layer and the activation spy.

Installed when a logging step's training forward begins and removed when it
ends, on the thread that runs it: a non-logging step never pays for them.
What they see goes to the step's `tbdiag.probe.StepProbe`.
"""

from __future__ import annotations

import functools
import threading
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from .layers import ACTIVATION_KINDS, Layer, first_tensor
from .probe import StepProbe, no_autocast, storage_key


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
        out = func(*args, **kwargs)
        kind = ACTIVATION_KINDS.get(func)
        if kind is not None and not self.tap.busy.value:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                self.tap.spy_activation(kind, x, out)
        return out


class ForwardTap:
    """Hooks on every layer plus the activation spy, for one training forward at a time.

    ``guard(entry, fn)`` makes each callback safe to run inside the user's
    forward (`tbdiag.shield.Shield.guard`).  Activations applied outside
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
        self._act_stack: list[int] = []
        self._layer_hook = guard("layer hook", lambda layer, module, args, out: self._on_output(layer, args, out))
        self._act_pre = guard("layer hook", lambda layer, module, args: self._act_stack.append(layer.row))
        self.spy_activation = guard("activation spy", self.on_activation)

    def open(self, probe: StepProbe, spy_due: bool, describe: bool) -> None:
        """Tap this thread's forward: ``describe`` records shapes and MACs (before the layer table is written)."""
        self.probe, self.thread, self._describe = probe, threading.get_ident(), describe
        self._act_stack.clear()
        for layer in self.layers:
            # the same hook objects at every logging step: torch.compile guards on them, so fresh ones would
            # recompile the model at every logging step
            if layer.hooks is None:
                layer.hooks = (functools.partial(self._layer_hook, layer), functools.partial(self._act_pre, layer))
            self.hooks.append(("post", layer.module.register_forward_hook(layer.hooks[0])))
            if layer.is_activation:
                self.hooks.append(("pre", layer.module.register_forward_pre_hook(layer.hooks[1])))
        if self.functional_activations or spy_due:
            self.spy = _ActivationSpy(self)
            self.spy.__enter__()

    def close(self) -> None:
        """Pop the spy (on the thread that pushed it) and remove the layer hooks."""
        self.pop_spy()
        for _, h in self.hooks:
            h.remove()
        self.hooks.clear()
        self._act_stack.clear()
        if self.probe is not None:
            self.probe.producers.clear()
        self.probe = self.thread = None

    def pop_spy(self) -> None:
        if self.spy is not None:
            spy, self.spy = self.spy, None
            spy.__exit__(None, None, None)

    def _on_output(self, layer: Layer, args: tuple, output: Any) -> None:
        probe = self.probe
        if probe is None or threading.get_ident() != self.thread:
            return None  # a forward on another thread, or outside the training forward being measured
        out = first_tensor(output)
        if layer.is_activation:
            if self.spy is None and out is not None and args and isinstance(args[0], torch.Tensor):
                self.on_activation(layer.activation_kind, args[0], out)  # before `out` is registered below
            if self._act_stack and self._act_stack[-1] == layer.row:
                self._act_stack.pop()
        if out is None:
            return None
        self.busy.value = True
        try:
            # our own reductions need not pass through the spy (a Python call per op), and are float32
            # whatever autocast would pick
            with torch._C.DisableTorchFunction(), no_autocast(out):
                probe.record_output(layer, args, out, describe=self._describe)
        finally:
            self.busy.value = False
        return None

    def on_activation(self, kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """An activation function ran on ``x``: attribute it to the layer that produced ``x``."""
        probe = self.probe
        if self.spy is not None and not self._act_stack:
            self.functional_activations = True  # applied outside any activation module: keep the spy on
        if probe is None or out.numel() == 0:
            return
        target = probe.producers.get(storage_key(x))
        if target is None and self._act_stack:
            target = self._act_stack[-1]
        if target is None:
            return
        self.busy.value = True
        try:
            with torch._C.DisableTorchFunction(), no_autocast(out):
                probe.on_activation(self.layers[target], kind, out)
        finally:
            self.busy.value = False
