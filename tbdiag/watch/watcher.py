"""The watcher: *when* to measure.  Hooks that observe a model and its optimizer, and count steps.

Cost model
----------
On a non-logging step only the entry hooks run (a forward pre-hook and hook
on the model, and the optimizer's step hooks or one tensor hook per
backward); they count, and take the step's gradient norms for the spike
tracker (`tbdiag.watch.spike_watch`: one fused norm kernel and a few scalar
kernels, no host read).  On a logging step the watcher installs
forward hooks on every layer for the duration of the training forward, plus
a `TorchFunctionMode` (the activation spy) that sees activations applied
functionally (``F.relu``, ``torch.sigmoid``, ``x.tanh()``) or in place.  What
they see goes to a `tbdiag.measure.probe.StepProbe`; the step ends with one host
transfer, a pure assembly (`tbdiag.summary.assembly`) and a `StepRecord` handed to
the writer, which encodes and writes on a background thread.

Observing only
--------------
Hooks never modify tensors they see, never draw random numbers (graph tracing
runs under a forked RNG, in eval mode, without gradients), and keep no
reference to activations or autograd graphs past the step.  Every entry point
runs through one `Shield`: a fault inside tbdiag warns once and detaches.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..measure import graph, layers, logits, run_facts
from ..measure.probe import ProbeOptions, StepProbe
from . import live
from .block_tap import BlockTap
from .forward_tap import Busy, ForwardTap
from .input_watch import InputWatch
from .loop_watch import LoopWatch
from .recorder import StepRecorder
from .sentinel import Sentinel
from .shield import Shield
from .spike_watch import SpikeWatch
from .timing import StepTimer
from .wrappers import unwrap_model, unwrap_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from ..writer import DiagnosticWriter

#: The activation spy runs at the first logging step and then at every SPY_PROBE_EVERY-th: if it never
#: sees an activation applied outside an activation module (F.relu in a forward), module hooks see them all.
SPY_PROBE_EVERY = 10

#: Histograms (and images) come every HISTOGRAMS_EVERY-th logging step by default: they are for people
#: reading the Histograms and Distributions tabs, while the health statistics, which every rule reads, come
#: at every logging step.  Binning and encoding every parameter, gradient and output is most of what a
#: logging step costs on a small model (benchmarks/overhead.py), the same cadence as `wandb.watch`'s default.
HISTOGRAMS_EVERY = 10

#: Every model watched in this process, to refuse a second watch of the same model with a clear message.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()

#: Hooks PyTorch calls while iterating the registry they sit in: a fault inside one of them must leave
#: the removal of that registry's handles for later (see `Shield`).
_ITERATED_WHILE_CALLED = {
    "optimizer step pre-hook": ("optimizer",),
    "optimizer step hook": ("optimizer",),
    "forward hook": ("post",),  # always-called: iterated in place when the user's forward raised
}


def _check_arguments(log_every: Any, images_every: Any, histograms_every: Any, grad_scaler: Any) -> None:
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer (steps between logs), got {log_every!r}")
    for name, every in (("images_every", images_every), ("histograms_every", histograms_every)):
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            what = name.split("_")[0]
            raise ValueError(f"{name} must be None, 0 (no {what}) or a positive integer, got {every!r}")
    if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
        raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")


def _grad_tensor(output: Any) -> torch.Tensor | None:
    """A tensor of a module's output that gradients will flow back through, if any."""
    first = layers.first_tensor(output)
    if first is not None and first.requires_grad:
        return first
    try:
        leaves = pytree.tree_leaves(output)
    except Exception:  # an output type pytree cannot take apart
        return None
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad), None)


def _on_meta(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this forward runs on meta tensors (shapes only, no values to measure)."""
    p = next(model.parameters(), None)
    if p is not None:
        return p.is_meta
    x = layers.first_tensor(list(args) + list(kwargs.values()))
    return x is not None and x.is_meta


class Watcher:
    """What `DiagnosticWriter.watch` returns; `remove()` detaches every hook (see `DiagnosticWriter.watch`)."""

    def __init__(self, writer: "DiagnosticWriter", model: nn.Module, optimizer: Any = None, log_every: int = 100, *,
                 log_graph: bool = True, example_input: Any = None, histograms: bool = True,
                 activation_histograms: bool = True, histograms_every: int | None = None,
                 images_every: int | None = None, gradient_spikes: bool = True, max_image_layers: int = 8,
                 max_image_channels: int = 16, loss_tags: Sequence[str] | None = None, grad_scaler: Any = None,
                 scalars: bool = True, on_finding: Any = None, stop_on: Any = ()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module as model, got {type(model).__name__}")
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        _check_arguments(log_every, images_every, histograms_every, grad_scaler)
        stop_on = live.check_arguments(on_finding, stop_on)
        self.writer, self.model, self.optimizer = writer, unwrap_model(model), optimizer
        other = _WATCHED.get(self.model)
        if other is not None:
            raise RuntimeError(
                f"this model is already watched by DiagnosticWriter(log_dir={other.writer.log_dir!r}); "
                "watch a model with one writer only, or stop the other first (its handle.remove() or writer.close())")
        self.log_every, self.loss_tags, self.grad_scaler, self.scalars = log_every, loss_tags, grad_scaler, scalars
        self.rank = writer.rank  # None outside torch.distributed
        writes = self.rank is None or self.rank.writes  # what only rank 0 writes, only rank 0 measures
        self.log_graph = log_graph and writes
        self.images_every = (HISTOGRAMS_EVERY * log_every if images_every is None else images_every) if writes else 0
        self.histograms_every = HISTOGRAMS_EVERY * log_every if histograms_every is None else histograms_every
        self.gradient_spikes = bool(gradient_spikes)
        self.options = ProbeOptions(param_histograms=histograms and writes,
                                    activation_histograms=histograms and activation_histograms and writes,
                                    max_image_layers=max_image_layers, max_image_channels=max_image_channels)
        self.step = 0
        self.shield = Shield(self._describe, self._detach)
        self.layers: list[layers.Layer] = []
        self._busy = Busy()
        self.timer = StepTimer()  # the perf/* scalars (tbdiag.watch.timing); the writer reads it from any watcher
        # (registry kind, handle): kind is "pre" / "post" (module forward hooks) or "optimizer"
        self._hooks: list[tuple[str, Any]] = []  # for the watcher's lifetime
        self._entry_hooks: list[tuple[str, Any]] = []  # children as entry points, until the root itself runs
        self._root_pre_handle: Any = None
        self._window: tuple[int, nn.Module] | None = None  # (thread, module) of the open training forward
        self._window_depth = 0
        self._root_seen = self._forward_seen = False
        self._probe: StepProbe | None = None
        self._capture_hook: tuple[str, Any] | None = None  # the optimizer step pre-hook, while a logged step is next
        self._collected_step = -1
        self._logged = 0  # logging steps begun
        self._graph_done = not self.log_graph
        self._backward_queued = False
        self._warned: set[str] = set()
        _WATCHED[self.model] = self
        try:  # a fault anywhere in the set-up leaves the model and optimizer as they were
            self._build(writer, model, optimizer, log_every, grad_scaler, scalars, loss_tags, on_finding, stop_on)
            self._install(example_input)
        except Exception as e:  # half-installed: take everything off again, keep training untouched
            self.shield.trip("watch() set-up", e)
            self.remove()

    def _build(self, writer: "DiagnosticWriter", model: nn.Module, optimizer: Any, log_every: int, grad_scaler: Any,
               scalars: bool, loss_tags: Sequence[str] | None, on_finding: Any, stop_on: Sequence[str]) -> None:
        """The parts that run inside the user's step, each behind the shield's guard."""
        self.tap = ForwardTap(self.shield.guard, self._busy)
        self.block_tap = BlockTap(self.shield.guard)  # repeated blocks and MoE routers (tbdiag.watch.block_tap)
        self.recorder = StepRecorder(writer, optimizer, log_every, grad_scaler=grad_scaler, scalars=scalars,
                                     loss_tags=loss_tags, warn_once=self._warn_once)
        compiled = type(model).__name__ == "OptimizedModule" or any(
            getattr(m, "_compiled_call_impl", None) is not None for m in self.model.modules())  # model.compile()
        self.recorder.attention_note = lambda: self.tap.attention.seen_note(self.layers, compiled)
        self.loop = LoopWatch(self.model, optimizer, self.shield.guard)  # mistakes in the loop (tbdiag.watch.loop_watch)
        self.inputs = InputWatch(self.model)  # the batch's scale and labelled padding (tbdiag.watch.input_watch)
        # the gradient norm of every step, its worst jump kept on the device (tbdiag.watch.spike_watch)
        self.spikes = SpikeWatch(self.recorder.param_index, lambda: self.layers, self.shield.guard, grad_scaler,
                                 at_backward=optimizer is not None and self.rank is None) \
            if self.gradient_spikes else None
        # live alerts (tbdiag.watch.live) and NaN/Inf at the exact step (tbdiag.watch.sentinel)
        self.live = live.LiveMonitor(writer.log_dir, on_finding, stop_on, loss_tags, before_raise=writer.flush) \
            if on_finding is not None or stop_on else None
        writer.live = self.live
        self.sentinel = Sentinel(lambda: self.layers, self._busy, read_always="nonfinite" in stop_on,
                                 on_found=self._on_nonfinite)

    def _install(self, example_input: Any) -> None:
        guard = self.shield.guard
        self.layers = self.tap.layers = self.recorder.layers = layers.discover(self.model)  # one shared list
        self.block_tap.discover(self.model, self.layers)
        self.recorder.blocks = self.block_tap.block_names
        if self.optimizer is not None:
            self._check_optimizer()
        entry_pre, entry_post = guard("forward pre-hook", self._entry_pre), guard("forward hook", self._entry_post)
        for module in [self.model, *self.model.children()]:
            hooks = self._hooks if module is self.model else self._entry_hooks
            pre = module.register_forward_pre_hook(entry_pre, prepend=True, with_kwargs=True)
            hooks += [("pre", pre), ("post", module.register_forward_hook(entry_post, always_call=True))]
            if module is self.model:
                self._root_pre_handle = pre
        if self.optimizer is not None:
            opt = self.optimizer
            self._opt_pre_guarded = guard("optimizer step pre-hook", self._opt_pre)
            self._arm_weight_capture()
            self._hooks.append(("optimizer", opt.register_step_post_hook(guard("optimizer step hook", self._opt_post))))
        else:
            self._output_grad_hook = guard("gradient hook", self._on_output_grad)
            self._after_backward_callback = guard("backward callback", self._after_backward)
        self._graph_guard = guard("graph", self._log_graph)
        if example_input is not None and self.log_graph:
            self._graph_done = True
            self._graph_guard(self.model, example_input if isinstance(example_input, tuple) else (example_input,), {})

    def _check_optimizer(self) -> None:
        in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        trainable_all = [p for layer in self.layers for _, p in layer.params if p.requires_grad]
        for layer in self.layers:
            trainable = [p for _, p in layer.params if p.requires_grad]
            if trainable:
                layer.info.in_optimizer = all(id(p) in in_opt for p in trainable)
        if trainable_all and not any(id(p) in in_opt for p in trainable_all):
            warnings.warn("the optimizer passed to watch() holds none of the model's trainable parameters; steps are "
                          "still counted from it, but check that you passed the right optimizer", stacklevel=5)

    def _describe(self) -> str:
        return f"{type(self.model).__name__} (DiagnosticWriter log_dir={self.writer.log_dir!r}, step {self.step})"

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"tbdiag: {message}", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------ detaching

    def remove(self) -> None:
        """Detach every hook; safe to call twice.  Pending data of a half-done step is dropped."""
        self.shield.stop("remove")

    def _detach(self, entry: str, args: tuple = ()) -> bool:
        """Take our hooks off, as far as is safe from inside ``entry``; True once nothing of ours is left.

        The activation spy is a mode on the thread that opened the training
        forward; it is popped only on that thread, where nesting is restored:
        by the forward hook that closes the window, or by ``remove()``.
        """
        if not hasattr(self, "sentinel"):  # the set-up failed before its parts were all built: no hook is on yet
            self._hooks, self._entry_hooks = [], []
            if _WATCHED.get(self.model) is self:
                del _WATCHED[self.model]
            return True
        window = self._window
        if self.tap.spy is not None and window is not None and window[0] == threading.get_ident() and (
                entry == "remove" or (entry == "forward hook" and args and args[0] is window[1])):
            self.tap.pop_spy()
        if self.tap.spy is None:
            self._window = None
        unsafe = set(_ITERATED_WHILE_CALLED.get(entry, ()))
        if self.tap.spy is not None:
            unsafe.add("post")  # the forward hook that pops the spy must still run
        hooks = [*self._hooks, *self._entry_hooks, *self.tap.hooks, *self.block_tap.hooks]
        keep = [(kind, h) for kind, h in hooks if kind in unsafe]
        if keep:  # the root's pre-hook sweeps again at the next forward, where every registry is safe
            keep += [(kind, h) for kind, h in hooks if h is self._root_pre_handle]
        for _, h in hooks:
            if all(h is not k for _, k in keep):
                h.remove()
        self._hooks, self._entry_hooks, self.tap.hooks, self.block_tap.hooks = keep, [], [], []
        self._probe = self.tap.probe = None
        self.loop.remove()
        if _WATCHED.get(self.model) is self:
            del _WATCHED[self.model]
        return not keep

    # ------------------------------------------------------------ step logic

    def _is_training_forward(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and not self._busy.value

    def _entry_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of the model (or of a direct child, when the model's own forward is never called) begins."""
        if self._busy.value:
            return None
        window = self._window
        if window is not None:  # nested in an open training forward, on this thread or another
            if window[1] is module and window[0] == threading.get_ident():
                self._window_depth += 1  # the module calls itself: its inner forward's hook must not close
            return None
        if not self._is_training_forward():
            self.timer.other_forward()
            return None
        self._window, self._window_depth, self._forward_seen = (threading.get_ident(), module), 0, True
        self.loop.on_training_forward()
        self.timer.forward_begins(args, kwargs)
        self.sentinel.forward_begins(args, kwargs, logging=self.step % self.log_every == 0)
        if module is self.model and not self._root_seen:
            self._root_seen = True  # the model's own forward runs: its children need no entry hooks
            for _, h in self._entry_hooks:
                h.remove()
            self._entry_hooks.clear()
        if not self._graph_done and not layers.has_lazy(self.layers):
            self._graph_done = True  # (lazy modules are traced once their shapes are known)
            self._graph_guard(module, args, kwargs)
            if self.shield.tripped:
                return None
        if self.step % self.log_every == 0:
            self._begin_logging_forward(args, kwargs)
        return None

    def _begin_logging_forward(self, args: tuple, kwargs: dict) -> None:
        step = self.step
        self._check_precision()
        if self._probe is None:
            if step == self._collected_step:
                return
            self._collected_step = step
            if _on_meta(self.model, args, kwargs):
                self._warn_once("meta", "meta tensors carry no values: no statistics are logged for this model")
                return
            images = self.images_every > 0 and step % self.images_every == 0
            histograms = self.histograms_every > 0 and step % self.histograms_every == 0
            options = self.options
            self._probe = StepProbe(step, ProbeOptions(
                **{**vars(options), "images": images, "param_histograms": options.param_histograms and histograms,
                   "activation_histograms": options.activation_histograms and histograms}))
            self._logged += 1
        if self._probe.step == step:
            self._busy.value = True  # (before the spy opens: its reductions are not the user's)
            try:
                self.inputs.on_logging_forward(self._probe, args, kwargs)
            finally:
                self._busy.value = False
            spy_due = (self._logged - 1) % SPY_PROBE_EVERY == 0
            self.tap.open(self._probe, spy_due, describe=not self.recorder.table_written)
            self.block_tap.open(self._probe)

    def _entry_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        window = self._window
        if window is None or window[1] is not module or window[0] != threading.get_ident() or self._busy.value:
            return None
        if self._window_depth:
            self._window_depth -= 1
            return None
        self.tap.close()
        self.block_tap.close()
        self._window = None
        self.sentinel.forward_ends(self.step, module, output)
        if module is self.model and self._probe is not None and self._probe.step == self.step:
            self.loop.on_model_output(output)
            logits.record_log_z(self._probe, output)
        if self._probe is not None and not self.recorder.table_written:
            self.recorder.output_width = run_facts.output_width(output)
        training = self._is_training_forward()
        if training and self.spikes is not None:
            self.spikes.on_output(output, _grad_tensor(output))
        if self.optimizer is None and training:
            out = _grad_tensor(output)
            if out is not None:
                out.register_hook(self._output_grad_hook)
            else:  # no gradient will flow back through the model (frozen): the forward is the step
                self._after_backward()
        return None

    def _check_precision(self) -> None:
        """Warn once where logged gradients could be scaled by a GradScaler tbdiag cannot see."""
        if self.optimizer is not None or self.grad_scaler is not None or "scaled" in self._warned:
            return
        for device_type in ("cuda", "cpu"):
            if torch.is_autocast_enabled(device_type) and torch.get_autocast_dtype(device_type) == torch.float16:
                self._warn_once(
                    "scaled", "float16 autocast without an optimizer: if a GradScaler scales the loss, the logged "
                    "gradients are scaled too; pass watch(model, optimizer) (it steps on unscaled gradients) or "
                    "watch(..., grad_scaler=scaler)")
                return

    # without an optimizer: a step is one backward pass through the model
    def _on_output_grad(self, grad: torch.Tensor) -> None:
        if not self._backward_queued:
            self._backward_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward_callback)
        return None

    def _after_backward(self) -> None:
        self._backward_queued = False
        self._end_step(update=False)

    # with an optimizer: a step is one optimizer.step()
    def _arm_weight_capture(self) -> None:
        """The optimizer's step pre-hook (it copies the weights) is there only for the steps that are logged.

        Called between steps, from the step post-hook at the latest: the pre-hook registry is not being
        iterated then.  A hook call costs a few microseconds per step even when it returns at once.
        """
        due = self.step % self.log_every == 0
        if due and self._capture_hook is None:
            self._capture_hook = ("optimizer", self.optimizer.register_step_pre_hook(self._opt_pre_guarded))
            self._hooks.append(self._capture_hook)
        elif not due and self._capture_hook is not None:
            hook, self._capture_hook = self._capture_hook, None
            self._hooks = [h for h in self._hooks if h is not hook]
            hook[1].remove()

    def _opt_pre(self, optimizer, args, kwargs) -> None:
        # Due to be logged, whether or not its forward has run yet: with a closure (LBFGS, Lightning) the
        # forward and backward run inside optimizer.step(), after this hook.
        if self.step % self.log_every == 0 and (self._probe is None or self._probe.step == self.step):
            self._busy.value = True
            try:
                self.recorder.capture_weights()
            finally:
                self._busy.value = False
        return None

    def _opt_post(self, optimizer, args, kwargs) -> None:
        if not self._forward_seen:
            self._warn_once(
                "no-forward", "the optimizer stepped but no training forward of the watched model (or of one of its "
                "direct children) was seen; watch the module your training step calls, in train() mode")
        self._end_step(update=True)
        return None

    def _end_step(self, update: bool) -> None:
        self.timer.step_ends()
        if self.spikes is not None:
            self.spikes.on_step(self.step)
        probe = self._sentinel_probe(self._probe)
        if update:
            self.loop.on_optimizer_step()
        if probe is not None and probe.step == self.step:
            self._probe = None
            self._busy.value = True
            try:
                self.loop.report(probe)
                self.recorder.collect(probe, update)
                if self.spikes is not None:
                    self.spikes.add_to(probe)
                self.recorder.finish(probe, after_sync=self.timer.flush)
            finally:
                self._busy.value = False
        elif update and self.step % self.log_every == 0:  # a logging step without a training forward (eval mode)
            said = self.loop.report(None)
            if said:
                self.recorder.finish_model_only(self.step, said)
        if update and (self.step + 1) % self.log_every == 0:
            self.loop.arm_stale_check()  # checked in the next step's backward
        self.step += 1
        if update:
            self._arm_weight_capture()
        self.timer.ready()
        if self.live is not None:
            self.live.check()  # may raise TrainingHealthError (stop_on), the one exception the Shield lets through

    def _sentinel_probe(self, probe: StepProbe | None) -> StepProbe | None:
        """The step's probe with the sentinel's statistics; the step where it found NaN/Inf is logged, whatever
        ``log_every`` (not in a distributed job: the other ranks would not join its collective)."""
        if probe is None or probe.step != self.step:
            if not self.sentinel.fresh or self.rank is not None:
                return probe
            probe = self._probe = StepProbe(self.step, ProbeOptions(**{**vars(self.options), "images": False}))
        self.sentinel.add_to(probe)
        return probe

    def _on_nonfinite(self, step: int, layer: layers.Layer | None, where: str) -> None:
        if self.live is None:  # with live alerts the nonfinite finding itself warns
            name = layer.name if layer is not None else "the model"
            self._warn_once("nonfinite", f"NaN/Inf first appeared at step {step} in {name} ({where}); "
                            "`tbdiag report` has the details")

    def _log_graph(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The graph, traced from this call of ``module`` (the module tree for sharded models)."""
        self._busy.value = True
        try:
            sharded = any(type(m).__name__.startswith("FSDP") for m in module.modules())
            self.writer.write_graph(graph.graph_events(module, args, kwargs, traceable=not sharded))
        finally:
            self._busy.value = False
