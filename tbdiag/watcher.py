"""The watcher: *when* to measure.  Hooks that observe a model and its optimizer, and count steps.

Cost model
----------
On a non-logging step only the entry hooks run (a forward pre-hook and hook
on the model, and the optimizer's step hooks or one tensor hook per
backward); they count and return.  On a logging step the watcher installs
forward hooks on every layer for the duration of the training forward, plus
a `TorchFunctionMode` (the activation spy) that sees activations applied
functionally (``F.relu``, ``torch.sigmoid``, ``x.tanh()``) or in place.  What
they see goes to a `tbdiag.probe.StepProbe`; the step ends with one host
transfer, a pure assembly (`tbdiag.assembly`) and a `StepRecord` handed to
the writer, which encodes and writes on a background thread.

Observing only
--------------
Hooks never modify tensors they see, never draw random numbers (graph tracing
runs under a forked RNG, in eval mode, without gradients), and keep no
reference to activations or autograd graphs past the step.  Every entry point
runs through one `Shield`: a fault inside tbdiag warns once and detaches.
"""

from __future__ import annotations

import functools
import threading
import warnings
import weakref
from typing import TYPE_CHECKING, Any, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import distributed, graph, layers, schema
from .assembly import Assembler, ParamLayout, remap_rows
from .probe import ProbeOptions, StepProbe, WeightCopies, count_nonfinite, grad_scale, local, no_autocast, storage_key
from .shield import Shield
from .wrappers import is_compiled, unwrap_model, unwrap_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .writer import DiagnosticWriter

#: The activation spy runs at the first logging step and then at every SPY_PROBE_EVERY-th: if it never
#: sees an activation applied outside an activation module (F.relu in a forward), module hooks see them all.
SPY_PROBE_EVERY = 10

#: Every model watched in this process, to refuse a second watch of the same model with a clear message.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()

#: Hooks PyTorch calls while iterating the registry they sit in: a fault inside one of them must leave
#: the removal of that registry's handles for later (see `Shield`).
_ITERATED_WHILE_CALLED = {
    "optimizer step pre-hook": ("optimizer",),
    "optimizer step hook": ("optimizer",),
    "forward hook": ("post",),  # always-called: iterated in place when the user's forward raised
}


class _ActivationSpy(TorchFunctionMode):
    """Sees every activation function call during a logging-step forward (on the thread that pushed it)."""

    def __init__(self, watcher: "Watcher"):
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = layers.ACTIVATION_KINDS.get(func)
        if kind is not None and not self.watcher._busy:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                self.watcher._spy_activation(kind, x, out)
        return out


def _check_arguments(log_every: Any, images_every: Any, grad_scaler: Any) -> None:
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer (steps between logs), got {log_every!r}")
    if images_every is not None and (not isinstance(images_every, int) or images_every < 0):
        raise ValueError(f"images_every must be None, 0 (no images) or a positive integer, got {images_every!r}")
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
                 activation_histograms: bool = True, images_every: int | None = None, max_image_layers: int = 8,
                 max_image_channels: int = 16, loss_tags: Sequence[str] | None = None, grad_scaler: Any = None,
                 scalars: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module as model, got {type(model).__name__}")
        optimizer = unwrap_optimizer(optimizer) if optimizer is not None else None
        _check_arguments(log_every, images_every, grad_scaler)
        self.writer, self.model, self.optimizer = writer, unwrap_model(model), optimizer
        self.compiled = is_compiled(model)
        other = _WATCHED.get(self.model)
        if other is not None:
            raise RuntimeError(
                f"this model is already watched by DiagnosticWriter(log_dir={other.writer.log_dir!r}); "
                "watch a model with one writer only, or stop the other first (its handle.remove() or writer.close())")
        self.log_every, self.loss_tags, self.grad_scaler, self.scalars = log_every, loss_tags, grad_scaler, scalars
        self.rank = writer.rank  # None outside torch.distributed
        writes = self.rank is None or self.rank.writes  # what only rank 0 writes, only rank 0 measures
        self.log_graph = log_graph and writes
        self.images_every = (10 * log_every if images_every is None else images_every) if writes else 0
        self.options = ProbeOptions(param_histograms=histograms and writes,
                                    activation_histograms=histograms and activation_histograms and writes,
                                    max_image_layers=max_image_layers, max_image_channels=max_image_channels)
        self.step = 0
        self.shield = Shield(self._describe, self._detach)
        self.layers: list[layers.Layer] = []
        # (registry kind, handle): kind is "pre" / "post" (module forward hooks) or "optimizer"
        self._hooks: list[tuple[str, Any]] = []  # for the watcher's lifetime
        self._entry_hooks: list[tuple[str, Any]] = []  # children as entry points, until the root itself runs
        self._temp_hooks: list[tuple[str, Any]] = []  # layer hooks of one logging forward
        self._root_pre_handle: Any = None
        self._tls = threading.local()  # per thread: inside our own work (the spy and entry hooks ignore it)
        self._window: tuple[int, nn.Module] | None = None  # (thread, module) of the open training forward
        self._window_depth = 0
        self._root_seen = self._forward_seen = False
        self._probe: StepProbe | None = None
        self._collected_step = -1
        self._spy: _ActivationSpy | None = None
        self._act_stack: list[int] = []
        self._functional_activations = False  # the spy saw F.relu & co. outside activation modules
        self._logged = 0  # logging steps begun
        self._spy_due = False
        self._params: list[tuple[int, nn.Parameter, str]] | None = None  # (row, parameter, tag), once not lazy
        self._sharded: list[bool] = []  # per parameter: a DTensor shard (FSDP2)
        self._weights = WeightCopies()
        self._assembler = Assembler()
        self._graph_done = not self.log_graph
        self._table_written = False
        self._backward_queued = False
        self._warned: set[str] = set()
        self._announcement = distributed.Announcement(self.rank) if self.rank and self.rank.reduces else None
        self._reduce: bool | None = None  # pool across ranks: decided at the end of the first logging step
        _WATCHED[self.model] = self
        try:
            self._install(example_input)
        except Exception as e:  # half-installed: take everything off again, keep training untouched
            self.shield.trip("watch() set-up", e)
            self.remove()

    def _install(self, example_input: Any) -> None:
        guard = self.shield.guard
        self.layers = layers.discover(self.model)
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
            self._hooks.append(("optimizer", opt.register_step_pre_hook(guard("optimizer step pre-hook", self._opt_pre))))
            self._hooks.append(("optimizer", opt.register_step_post_hook(guard("optimizer step hook", self._opt_post))))
        else:
            self._output_grad_hook = guard("gradient hook", self._on_output_grad)
            self._after_backward_callback = guard("backward callback", self._after_backward)
        self._layer_hook_guard = guard("layer hook", lambda layer, m, args, out: self._layer_hook(layer, args, out))
        self._act_pre_guard = guard("layer hook", lambda layer, m, args: self._act_stack.append(layer.row))
        self._spy_activation = guard("activation spy", self._on_activation)
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

    def _param_index(self) -> list[tuple[int, nn.Parameter, str]]:
        if self._params is not None:
            return self._params
        index = layers.param_index(self.layers)
        if not layers.has_lazy(self.layers):
            self._params = index  # fixed once no lazy module is left to materialise
        return index

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
        me, window = threading.get_ident(), self._window
        if self._spy is not None and window is not None and window[0] == me and (
                entry == "remove" or (entry == "forward hook" and args and args[0] is window[1])):
            spy, self._spy = self._spy, None
            spy.__exit__(None, None, None)
        if self._spy is None:
            self._window = None
        unsafe = set(_ITERATED_WHILE_CALLED.get(entry, ()))
        if self._spy is not None:
            unsafe.add("post")  # the forward hook that pops the spy must still run
        hooks = [*self._hooks, *self._entry_hooks, *self._temp_hooks]
        keep = [(kind, h) for kind, h in hooks if kind in unsafe]
        if keep:  # the root's pre-hook sweeps again at the next forward, where every registry is safe
            keep += [(kind, h) for kind, h in hooks if h is self._root_pre_handle]
        for _, h in hooks:
            if all(h is not k for _, k in keep):
                h.remove()
        self._hooks, self._entry_hooks, self._temp_hooks = keep, [], []
        self._probe = None
        if _WATCHED.get(self.model) is self:
            del _WATCHED[self.model]
        return not keep

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"tbdiag: {message}", RuntimeWarning, stacklevel=4)

    # ------------------------------------------------------------ step logic

    @property
    def _busy(self) -> bool:
        return getattr(self._tls, "busy", False)

    @_busy.setter
    def _busy(self, value: bool) -> None:
        self._tls.busy = value

    def _is_training_forward(self) -> bool:
        return self.model.training and torch.is_grad_enabled() and not self._busy

    def _entry_pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """A forward of the model (or of a direct child, when the model's own forward is never called) begins."""
        if self._busy:
            return None
        window = self._window
        if window is not None:  # nested in an open training forward, on this thread or another
            if window[1] is module and window[0] == threading.get_ident():
                self._window_depth += 1  # the module calls itself: its inner forward's hook must not close
            return None
        if not self._is_training_forward():
            return None
        self._window, self._window_depth, self._forward_seen = (threading.get_ident(), module), 0, True
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
            self._probe = StepProbe(step, ProbeOptions(**{**vars(self.options), "images": images}))
            self._spy_due = self._logged % SPY_PROBE_EVERY == 0
            self._logged += 1
        if self._probe.step == step:
            self._begin_forward()

    def _entry_post(self, module: nn.Module, args: tuple, output: Any) -> None:
        window = self._window
        if window is None or window[1] is not module or window[0] != threading.get_ident() or self._busy:
            return None
        if self._window_depth:
            self._window_depth -= 1
            return None
        self._end_forward()
        self._window = None
        if self.optimizer is None and self._is_training_forward():
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
        if self._probe is not None and self._probe.step == self.step:
            self._collect_params(update=False)
            self._finish()
        self.step += 1

    # with an optimizer: a step is one optimizer.step()
    def _opt_pre(self, optimizer, args, kwargs) -> None:
        # Due to be logged, whether or not its forward has run yet: with a closure (LBFGS, Lightning) the
        # forward and backward run inside optimizer.step(), after this hook.
        if self.step % self.log_every == 0 and (self._probe is None or self._probe.step == self.step):
            with torch.no_grad():
                trainable = [(k, local(p.detach())) for k, (_, p, _) in enumerate(self._param_index())
                             if p.requires_grad]
                self._weights.capture([k for k, _ in trainable], [t for _, t in trainable])
        return None

    def _opt_post(self, optimizer, args, kwargs) -> None:
        if self._probe is not None and self._probe.step == self.step:
            self._collect_params(update=True)
            self._finish()
        elif not self._forward_seen:
            self._warn_once(
                "no-forward", "the optimizer stepped but no training forward of the watched model (or of one of its "
                "direct children) was seen; watch the module your training step calls, in train() mode")
        self.step += 1
        return None

    # ---------------------------------------------------- forward collection

    def _begin_forward(self) -> None:
        self._act_stack.clear()
        for layer in self.layers:
            # the same hook objects at every logging step: torch.compile guards on them, so fresh ones would
            # recompile the model at every logging step
            if layer.hooks is None:
                layer.hooks = (functools.partial(self._layer_hook_guard, layer),
                               functools.partial(self._act_pre_guard, layer))
            self._temp_hooks.append(("post", layer.module.register_forward_hook(layer.hooks[0])))
            if layer.is_activation:
                self._temp_hooks.append(("pre", layer.module.register_forward_pre_hook(layer.hooks[1])))
        if self._functional_activations or self._spy_due:
            self._spy = _ActivationSpy(self)
            self._spy.__enter__()

    def _end_forward(self) -> None:
        if self._spy is not None:
            spy, self._spy = self._spy, None
            spy.__exit__(None, None, None)
        for _, h in self._temp_hooks:
            h.remove()
        self._temp_hooks.clear()
        self._act_stack.clear()
        if self._probe is not None:
            self._probe.producers.clear()

    def _layer_hook(self, layer: layers.Layer, args: tuple, output: Any) -> None:
        window, probe = self._window, self._probe
        if window is None or window[0] != threading.get_ident() or probe is None:
            return None  # a forward on another thread, or outside the training forward being measured
        out = layers.first_tensor(output)
        if layer.is_activation:
            if self._spy is None and out is not None and args and isinstance(args[0], torch.Tensor):
                self._on_activation(layer.activation_kind, args[0], out)  # before `out` is registered below
            if self._act_stack and self._act_stack[-1] == layer.row:
                self._act_stack.pop()
        if out is None:
            return None
        self._busy = True
        try:
            # our own reductions need not pass through the activation spy (a Python call per op), and are
            # float32 whatever autocast would pick
            with torch._C.DisableTorchFunction(), no_autocast(out):
                probe.record_output(layer, args, out, describe=not self._table_written)
        finally:
            self._busy = False
        return None

    def _on_activation(self, kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """An activation function ran on ``x``: attribute it to the layer that produced ``x``."""
        probe = self._probe
        if self._spy is not None and not self._act_stack:
            self._functional_activations = True  # applied outside any activation module: keep the spy on
        if probe is None or out.numel() == 0:
            return
        target = probe.producers.get(storage_key(x))
        if target is None and self._act_stack:
            target = self._act_stack[-1]
        if target is None:
            return
        self._busy = True
        try:
            with torch._C.DisableTorchFunction(), no_autocast(out):
                probe.on_activation(self.layers[target], kind, out)
        finally:
            self._busy = False

    # ------------------------------------------------------- end of the step

    def _collect_params(self, update: bool) -> None:
        probe = self._probe
        self._busy = True
        try:
            with torch.no_grad(), no_autocast(None):
                index = self._param_index()
                params = [local(p) for _, p, _ in index]
                self._sharded = [t is not p for t, (_, p, _) in zip(params, index)]
                with_grad = [k for k, (_, p, _) in enumerate(index) if p.grad is not None]
                grads = [local(index[k][1].grad) for k in with_grad]
                taken = self._weights.take(with_grad)
                # without an optimizer the gradients may still be scaled by a GradScaler: divided on the device
                unscale = grad_scale(self.grad_scaler, grads[0].device) if not update and grads else None
                probe.collect_params(params, grads, with_grad, taken if update else None, unscale)
        finally:
            self._busy = False

    def _finish(self) -> None:
        """The one host transfer and the assembly, then hand the record to the writer."""
        probe, self._probe = self._probe, None
        if probe is None:
            return
        for row, kind in probe.flush_activations().items():
            if not self._table_written and not self.layers[row].info.activation:
                self.layers[row].info.activation = kind
        if probe.on_meta:
            self._warn_once("meta", "meta tensors carry no values: no statistics are logged for them")
            return
        if self._announcement is not None:
            if self._reduce is None:
                self._reduce = self._announcement.all_ranks_watch()
                if not self._reduce and self.rank.rank == 0:
                    self._warn_once("ranks", "not every rank watches this model, so the statistics cover rank 0's "
                                    "batch only; create the DiagnosticWriter and call watch() on every rank")
            if self._reduce:
                probe.pool_across_ranks(self.rank.world, self._sharded)
        if self.rank is not None and not self.rank.writes:
            return
        items, index = probe.to_host(), self._param_index()
        if not self._table_written:
            items, index = self._fix_order(items, index)
        lrs = [float(g.get("lr", float("nan"))) for g in self.optimizer.param_groups] if self.optimizer else []
        record = self._assembler.assemble(
            probe.step, items, probe.hist_meta, ParamLayout.of(index), [layer.name for layer in self.layers],
            count_nonfinite(items, [p for _, p, _ in index]), lrs, self.scalars)
        if not self._table_written:
            self._write_table()
        self.writer.write_step(record)

    def _fix_order(self, items: list, index: list) -> tuple[list, list]:
        """Put the rows in first-forward order (unseen layers last), once; this step's items and index remapped.

        Parameter positions keep their order (this step's items refer to them); only their rows change.
        """
        self.layers, old_to_new = layers.first_forward_order(self.layers)
        index = [(old_to_new[row], p, name) for row, p, name in index]
        if self._params is not None:
            self._params = index
        self._assembler.remap_rows(old_to_new)
        return remap_rows(items, old_to_new), index

    def _write_table(self) -> None:
        """Write the layer table (rows in model order) and the model summary, once."""
        self._table_written = True
        layers.count_params(self.layers)
        self.writer.write_layer_table(schema.LayerTable(
            layers=[layer.info for layer in self.layers],
            log_every=self.log_every,
            has_optimizer=self.optimizer is not None,
            extra={"loss_tags": list(self.loss_tags)} if self.loss_tags is not None else {},
        ))

    def _log_graph(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The graph, traced from this call of ``module`` (the module tree for sharded models)."""
        self._busy = True
        try:
            sharded = any(type(m).__name__.startswith("FSDP") for m in module.modules())
            self.writer.write_graph(graph.graph_events(module, args, kwargs, traceable=not sharded))
        finally:
            self._busy = False
