"""The watcher: hooks that observe a model and its optimizer.

Cost model
----------
On a non-logging step only two hooks run (a forward pre-hook on the root
module, and the optimizer's step hook or one tensor hook per backward); they
count and return.  On a logging step the watcher installs forward hooks on
every layer for the duration of one forward pass, plus a
`TorchFunctionMode` that sees activations applied functionally (``F.relu``,
``torch.sigmoid``, ``x.tanh()``) or in place (``nn.ReLU(inplace=True)``).
Every reduction is launched on the model's device as the data goes by; the
results are copied to the host in one transfer when the step completes, and
encoding and writing happen on a background thread.

Observing only
--------------
Hooks never modify tensors they see, never draw random numbers (graph tracing
runs under a forked RNG, in eval mode, without gradients), and keep no
reference to activations or autograd graphs past the step.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.rnn import PackedSequence
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from . import distributed, graph, schema, stats
from .modelinfo import macs_of, type_name
from .shield import Shield
from .wrappers import is_compiled, unwrap_model, unwrap_optimizer

if TYPE_CHECKING:  # pragma: no cover
    from .writer import DiagnosticWriter

# Modules that are never rows of the layer table: they compute nothing worth
# diagnosing and would only lengthen the table.
_SKIP_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
               nn.Unflatten)
# Layers whose output is laid out channels-first ([N, C, ...]): units are channels.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6, nn.Sigmoid, nn.Tanh)


def _activation_kinds() -> dict[Any, str]:
    kinds: dict[Any, str] = {}
    for f in (F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        kinds[f] = "relu"
    for f in (torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid):
        kinds[f] = "sigmoid"
    for f in (torch.tanh, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh):
        kinds[f] = "tanh"
    return kinds


ACTIVATION_KINDS = _activation_kinds()
_MODULE_KINDS = ((nn.ReLU, "relu"), (nn.ReLU6, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"))
# The activation spy runs at the first logging step and then at every SPY_PROBE_EVERY-th: if it never
# sees an activation applied outside an activation module (F.relu in a forward), module hooks see them all.
SPY_PROBE_EVERY = 10


def first_tensor(value: Any) -> torch.Tensor | None:
    """The tensor a module output stands for: itself, the first of a tuple/list/dict, a PackedSequence's data."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, PackedSequence):
        return value.data
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        for item in value:
            t = first_tensor(item)
            if t is not None:
                return t
    return None


#: Every model watched in this process, to refuse a second watch of the same model with a clear message.
_WATCHED: "weakref.WeakKeyDictionary[nn.Module, Watcher]" = weakref.WeakKeyDictionary()

#: Hooks PyTorch calls while iterating the registry they sit in: a fault inside one of them must leave
#: the removal of that registry's handles for later (see `Shield`).
_ITERATED_WHILE_CALLED = {
    "optimizer step pre-hook": ("optimizer",),
    "optimizer step hook": ("optimizer",),
    "forward hook": ("post",),  # always-called: iterated in place when the user's forward raised
}


def _no_autocast(t: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Statistics in float32 whatever autocast the user's forward runs under."""
    device_type = t.device.type if t is not None else None
    for dt in ((device_type,) if device_type in ("cpu", "cuda") else ("cpu", "cuda")):
        if torch.is_autocast_enabled(dt):
            return torch.autocast(device_type=dt, enabled=False)
    return contextlib.nullcontext()


def _grad_tensor(output: Any) -> torch.Tensor | None:
    """A tensor of a module's output that gradients will flow back through, if any."""
    first = first_tensor(output)
    if first is not None and first.requires_grad:
        return first
    try:
        leaves = pytree.tree_leaves(output)
    except Exception:  # an output type pytree cannot take apart
        return None
    return next((t for t in leaves if isinstance(t, torch.Tensor) and t.requires_grad), None)


def _local(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's local shard (FSDP2); any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def _on_meta(model: nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether this forward runs on meta tensors (shapes only, no values to measure)."""
    p = next(model.parameters(), None)
    if p is not None:
        return p.is_meta
    x = first_tensor(list(args) + list(kwargs.values()))
    return x is not None and x.is_meta


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    try:
        return (str(t.device), t.untyped_storage().data_ptr())
    except RuntimeError:  # tensors without storage (e.g. some subclasses)
        return (str(t.device), id(t))


@dataclass
class _Layer:
    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]
    channels_first: bool
    is_conv: bool
    is_activation: bool
    info: schema.LayerInfo
    activation_kind: str | None = None  # "relu", "sigmoid" or "tanh" for activation modules
    order: int = -1  # first-forward position, fixed at the first logging step
    row: int = -1  # position in the layer table (`Watcher.layers`)
    hooks: tuple | None = None  # this layer's forward hook and activation pre-hook, made once


class _ActivationSpy(TorchFunctionMode):
    """Sees every activation function call during a logging-step forward."""

    def __init__(self, watcher: "Watcher"):
        super().__init__()
        self.watcher = watcher

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        kind = ACTIVATION_KINDS.get(func)
        if kind is not None and not self.watcher._busy:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor):
                self.watcher._spy_activation(kind, x, out)
        return out


@dataclass
class _Pending:
    """Device tensors of one logging step, waiting for the single host transfer."""

    step: int
    parts: list[torch.Tensor] = field(default_factory=list)
    layout: list[tuple[str, Any]] = field(default_factory=list)
    # histogram kind -> (sample lengths, numel / length), known on the host from shapes alone
    hist_meta: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    # how a part pools across ranks: the element count behind an activation statistic
    weights: list[float | None] = field(default_factory=list)

    def add(self, kind: str, key: Any, tensor: torch.Tensor, weight: float | None = None) -> None:
        self.parts.append(tensor)
        self.layout.append((kind, key))
        self.weights.append(weight)


class Watcher:
    """What `DiagnosticWriter.watch` returns; `remove()` detaches every hook.

    Entry points into the user's training (every hook, the activation spy,
    graph logging) run through one `Shield`: a fault inside tbdiag warns once
    and detaches the watcher; training goes on untouched.
    """

    def __init__(
        self,
        writer: "DiagnosticWriter",
        model: nn.Module,
        optimizer: Any = None,
        log_every: int = 100,
        *,
        log_graph: bool = True,
        example_input: Any = None,
        histograms: bool = True,
        activation_histograms: bool = True,
        images_every: int | None = None,
        max_image_layers: int = 8,
        max_image_channels: int = 16,
        loss_tags: Sequence[str] | None = None,
        grad_scaler: Any = None,
        scalars: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"watch() needs a torch.nn.Module as model, got {type(model).__name__}")
        if optimizer is not None:
            optimizer = unwrap_optimizer(optimizer)
        if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
            raise ValueError(f"log_every must be a positive integer (steps between logs), got {log_every!r}")
        if images_every is not None and (not isinstance(images_every, int) or images_every < 0):
            raise ValueError(f"images_every must be None, 0 (no images) or a positive integer, got {images_every!r}")
        if grad_scaler is not None and not callable(getattr(grad_scaler, "get_scale", None)):
            raise TypeError(f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}")
        self.writer = writer
        self.model = unwrap_model(model)
        self.compiled = is_compiled(model)
        other = _WATCHED.get(self.model)
        if other is not None:
            raise RuntimeError(
                f"this model is already watched by DiagnosticWriter(log_dir={other.writer.log_dir!r}); "
                "watch a model with one writer only, or stop the other first (its handle.remove() or writer.close())"
            )
        self.optimizer = optimizer
        self.log_every = log_every
        self.log_graph = log_graph
        self.histograms = histograms
        self.activation_histograms = activation_histograms
        self.images_every = 10 * log_every if images_every is None else images_every
        self.max_image_layers = max_image_layers
        self.max_image_channels = max_image_channels
        self.loss_tags = list(loss_tags) if loss_tags is not None else None
        self.grad_scaler = grad_scaler
        self.scalars = scalars
        self.rank = writer.rank  # None outside torch.distributed
        if self.rank is not None and not self.rank.writes:  # what only rank 0 writes, only rank 0 measures
            self.histograms, self.images_every, self.log_graph = False, 0, False
        self._announcement = distributed.Announcement(self.rank) if self.rank and self.rank.reduces else None
        self._reduce: bool | None = None  # pool across ranks: decided at the end of the first logging step
        self._sharded: list[bool] = []  # per parameter of _param_index: a DTensor shard (FSDP2)

        self.step = 0
        self.shield = Shield(self._describe, self._detach)
        # (registry kind, handle): kind is "pre" / "post" (module forward hooks) or "optimizer"
        self._hooks: list[tuple[str, Any]] = []  # for the watcher's lifetime
        self._entry_hooks: list[tuple[str, Any]] = []  # children as entry points, until the root itself runs
        self._temp_hooks: list[tuple[str, Any]] = []  # layer hooks of one logging forward
        self._root_pre_handle: Any = None
        self._tls = threading.local()  # per-thread: inside our own work (the spy and hooks ignore it)
        self._window: tuple[int, nn.Module] | None = None  # (thread, module) of the open training forward
        self._window_depth = 0
        self._root_seen = False
        self._collected_step = -1
        self._pending: _Pending | None = None
        self._spy: _ActivationSpy | None = None
        self._order_counter = 0
        self._producers: dict[tuple[str, int], int] = {}
        self._act_stack: list[int] = []
        self._act_seen: dict[int, tuple[str, torch.Tensor, int]] = {}  # kind, unit mask or fraction, elements
        self._dead_history: dict[int, list[np.ndarray]] = {}  # last two logged dead-unit masks per layer
        self._functional_activations = False  # the spy saw F.relu & co. outside activation modules
        self._logged = 0  # logging steps begun
        self._spy_due = False  # the spy probes this logging step
        self._forward_seen = False
        self._recorded: set[int] = set()
        self._prev_weight_norms: np.ndarray | None = None
        self._prev_weights: list[torch.Tensor] | None = None
        self._prev_at: dict[int, int] = {}  # parameter position -> its copy in _prev_weights
        self._kept_weights: list[torch.Tensor] | None = None  # CPU only: reused buffers for _prev_weights
        self._param_index_cache: list[tuple[int, nn.Parameter, str]] | None = None
        self._graph_done = not self.log_graph
        self._table_written = False
        self._backward_queued = False
        self._removed = False
        self._warned: set[str] = set()

        _WATCHED[self.model] = self
        try:
            self._install(example_input)
        except Exception as e:  # half-installed: take everything off again, keep training untouched
            self.shield.trip("watch() set-up", e)
            self.remove()

    def _install(self, example_input: Any) -> None:
        guard = self.shield.guard
        self.layers = self._discover(self.model)
        for row, layer in enumerate(self.layers):
            layer.row = row
        if self.optimizer is not None:
            in_opt = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
            trainable_all = [p for _, p, _ in self._iter_params() if p.requires_grad]
            for layer in self.layers:
                trainable = [p for _, p in layer.params if p.requires_grad]
                if trainable:
                    layer.info.in_optimizer = all(id(p) in in_opt for p in trainable)
            if trainable_all and not any(id(p) in in_opt for p in trainable_all):
                warnings.warn(
                    "the optimizer passed to watch() holds none of the model's trainable parameters; steps are still "
                    "counted from it, but check that you passed the right optimizer",
                    stacklevel=4,
                )
        self._entry_pre_hook = guard("forward pre-hook", self._entry_pre)
        self._entry_post_hook = guard("forward hook", self._entry_post)
        for module in [self.model, *self.model.children()]:
            hooks = self._hooks if module is self.model else self._entry_hooks
            pre = module.register_forward_pre_hook(self._entry_pre_hook, prepend=True, with_kwargs=True)
            hooks.append(("pre", pre))
            hooks.append(("post", module.register_forward_hook(self._entry_post_hook, always_call=True)))
            if module is self.model:
                self._root_pre_handle = pre
        if self.optimizer is not None:
            opt = self.optimizer
            self._hooks.append(("optimizer", opt.register_step_pre_hook(guard("optimizer step pre-hook", self._opt_pre))))
            self._hooks.append(("optimizer", opt.register_step_post_hook(guard("optimizer step hook", self._opt_post))))
        else:
            self._output_grad_hook = guard("gradient hook", self._on_output_grad)
            self._after_backward_callback = guard("backward callback", self._after_backward)
        self._layer_hook_guard = guard("layer hook", lambda layer, module, args, output: self._layer_hook(layer.row, args, output))
        self._spy_activation = guard("activation spy", self._on_activation)
        self._act_pre_guard = guard("layer hook", lambda layer, module, args: self._act_stack.append(layer.row))
        self._graph_guard = guard("graph", self._log_graph)
        if example_input is not None and self.log_graph:
            self._graph_done = True
            self._graph_guard(self.model, example_input if isinstance(example_input, tuple) else (example_input,), {})

    def _describe(self) -> str:
        return f"{type(self.model).__name__} (DiagnosticWriter log_dir={self.writer.log_dir!r}, step {self.step})"

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _discover(model: nn.Module) -> list[_Layer]:
        """Rows of the layer table; parameter counts are filled in when the table is written (lazy modules)."""
        layers = []
        for name, module in model.named_modules():
            own = list(module.named_parameters(recurse=False))
            leaf = next(iter(module.children()), None) is None
            if not own and (not leaf or isinstance(module, _SKIP_TYPES) or module is model):
                continue
            layers.append(
                _Layer(
                    name=name,
                    module=module,
                    params=own,
                    channels_first=isinstance(module, _CHANNELS_FIRST),
                    is_conv=isinstance(module, nn.modules.conv._ConvNd),
                    is_activation=isinstance(module, _ACTIVATION_MODULES),
                    activation_kind=next((k for t, k in _MODULE_KINDS if isinstance(module, t)), None),
                    info=schema.LayerInfo(name=name, type=type_name(module)),
                )
            )
        return layers

    def _iter_params(self) -> list[tuple[int, nn.Parameter, str]]:
        return [(i, p, f"{layer.name}.{pname}" if layer.name else pname)
                for i, layer in enumerate(self.layers) for pname, p in layer.params]

    @property
    def _param_index(self) -> list[tuple[int, nn.Parameter, str]]:
        """(layer row, parameter, tag name) of every parameter with values: not lazy, not on the meta device."""
        if self._param_index_cache is None:
            index = [(i, p, name) for i, p, name in self._iter_params() if not is_lazy(p) and not p.is_meta]
            if len(index) < len(self._iter_params()) and any(is_lazy(p) for _, p, _ in self._iter_params()):
                return index  # lazy modules not materialised yet: look again next time
            self._param_index_cache = index
        return self._param_index_cache

    def remove(self) -> None:
        """Detach every hook; safe to call twice.  Pending data of a half-done step is dropped."""
        self.shield.stop("remove")

    def _detach(self, entry: str, args: tuple = ()) -> bool:
        """Take our hooks off, as far as is safe from inside ``entry``; True once nothing of ours is left.

        The activation spy is a mode on the thread that opened the training
        forward; it is popped only on that thread, where nesting is restored:
        by the forward hook that closes the window, or by ``remove()``.
        """
        me = threading.get_ident()
        window = self._window
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
        for kind, h in hooks:
            if all(h is not k for _, k in keep):
                h.remove()
        self._hooks, self._entry_hooks, self._temp_hooks = keep, [], []
        self._pending = None
        self._removed = True
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
        self._window = (threading.get_ident(), module)
        self._window_depth = 0
        self._forward_seen = True
        if module is self.model and not self._root_seen:
            self._root_seen = True  # the model's own forward runs: its children need no entry hooks
            for _, h in self._entry_hooks:
                h.remove()
            self._entry_hooks.clear()
        if not self._graph_done and not any(is_lazy(p) for p in module.parameters()):
            self._graph_done = True  # (lazy modules are traced once their shapes are known)
            self._graph_guard(module, args, kwargs)
            if self.shield.tripped:
                return None
        step = self.step
        if step % self.log_every != 0:
            return None
        self._check_precision()
        if self._pending is None:
            if step == self._collected_step:
                return None
            self._collected_step = step
            if _on_meta(self.model, args, kwargs):
                self._warn_once("meta", "meta tensors carry no values: no statistics are logged for this model")
                return None
            self._pending = _Pending(step=step)
            self._recorded.clear()
            self._act_seen.clear()
            self._order_counter = 0
            self._spy_due = self._logged % SPY_PROBE_EVERY == 0
            self._logged += 1
        if self._pending.step == step:
            self._begin_forward()
        return None

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
        if self._pending is not None and self._pending.step == self.step:
            self._collect_params(update=False)
            self._finish()
        self.step += 1

    # with an optimizer: a step is one optimizer.step()
    def _opt_pre(self, optimizer, args, kwargs) -> None:
        # Due to be logged, whether or not its forward has run yet: with a closure (LBFGS, Lightning) the
        # forward and backward run inside optimizer.step(), after this hook.
        if self.step % self.log_every == 0 and (self._pending is None or self._pending.step == self.step):
            with torch.no_grad():
                trainable = [(k, _local(p.detach())) for k, (_, p, _) in enumerate(self._param_index)
                             if p.requires_grad]
                self._prev_at = {k: j for j, (k, _) in enumerate(trainable)}
                self._prev_weights = self._weight_copies([t for _, t in trainable]) if trainable else None
        return None

    def _weight_copies(self, live: list[torch.Tensor]) -> list[torch.Tensor]:
        """Copies of the weights before the step, for the update ratio.

        On the CPU the copies are kept and refilled at every logging step:
        fresh multi-megabyte allocations cost page faults, about ten times the
        copy itself.  On accelerators (caching allocators) they are allocated
        per logging step and freed after it.
        """
        kept = self._kept_weights
        if (kept is not None and len(kept) == len(live)
                and all(k.shape == t.shape and k.dtype == t.dtype and k.device == t.device for k, t in zip(kept, live))):
            torch._foreach_copy_(kept, live)
            return kept
        copies = [t.clone() for t in live]
        self._kept_weights = copies if all(t.device.type == "cpu" for t in live) else None
        return copies

    def _opt_post(self, optimizer, args, kwargs) -> None:
        if self._pending is not None and self._pending.step == self.step:
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
        self._producers.clear()
        self._act_stack.clear()
        for i, layer in enumerate(self.layers):
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
        self._producers.clear()
        self._act_stack.clear()

    def _layer_hook(self, i: int, args: tuple, output: Any) -> None:
        window = self._window
        if window is None or window[0] != threading.get_ident() or self._pending is None:
            return None  # a forward on another thread, or outside the training forward being measured
        layer = self.layers[i]
        out = first_tensor(output)
        if layer.is_activation:
            if (self._spy is None and layer.activation_kind and out is not None
                    and args and isinstance(args[0], torch.Tensor)):
                self._on_activation(layer.activation_kind, args[0], out)  # before `out` is registered below
            if self._act_stack and self._act_stack[-1] == i:
                self._act_stack.pop()
        if out is None:
            return None
        self._busy = True
        try:
            # our own reductions need not pass through the activation spy (a Python call per op), and are
            # float32 whatever autocast would pick
            with torch._C.DisableTorchFunction(), _no_autocast(out):
                self._record_output(i, layer, args, out)
        finally:
            self._busy = False
        return None

    def _record_output(self, i: int, layer: _Layer, args: tuple, out: torch.Tensor) -> None:
        pending = self._pending
        assert pending is not None
        first_time = layer.order < 0 and not self._table_written
        if first_time:
            layer.order = self._order_counter
            layer.info.output_shape = list(out.shape)
            layer.info.macs = macs_of(layer.module, args, out)
        self._order_counter += 1
        self._producers[_storage_key(out)] = i
        if not out.is_floating_point():
            return
        if i in self._recorded:
            return  # a module called twice in one forward: keep the first call
        self._recorded.add(i)
        if not layer.is_activation:
            # An activation module's output is summarised where it matters: its dead or saturated
            # fraction, on the layer that fed it.  Its mean/std would add a row of reductions per
            # activation (half the layers of a Linear+ReLU stack) to every logging step.
            pending.add("act", i, stats.activation_stats(out), float(out.numel()))
        if self.activation_histograms and self.histograms and layer.params:
            pending.add("act_hist_src", i, stats.histogram_sample(out))
        if layer.is_conv and out.dim() >= 3 and self._images_due(pending.step):
            n_img = sum(1 for k, _ in pending.layout if k == "image")
            if n_img < self.max_image_layers:
                pending.add("image", i, stats.feature_grid(out, self.max_image_channels))

    def _images_due(self, step: int) -> bool:
        return self.images_every > 0 and step % self.images_every == 0

    def _on_activation(self, kind: str, x: torch.Tensor, out: torch.Tensor) -> None:
        """An activation function ran on ``x``: attribute it to the layer that produced ``x``."""
        if self._spy is not None and not self._act_stack:
            self._functional_activations = True  # applied outside any activation module: keep the spy on
        target = self._producers.get(_storage_key(x))
        if target is None and self._act_stack:
            target = self._act_stack[-1]
        if target is None or self._pending is None or out.numel() == 0:
            return
        self._busy = True
        try:
            layer = self.layers[target]
            if kind == "relu":  # per-unit mask; several calls in one forward: dead only if dead in all
                value = stats.dead_units(out, stats.unit_dim(out.shape, layer.channels_first or out.dim() >= 4))
            else:  # several calls (shared module, recurrent loop): the worst one counts
                value = stats.saturated_fraction(out, kind)
            prev = self._act_seen.get(target)
            if prev is None or prev[0] != kind or prev[1].shape != value.shape:
                self._act_seen[target] = (kind, value, out.numel())
            else:
                merged = prev[1] & value if kind == "relu" else torch.maximum(prev[1], value)
                self._act_seen[target] = (kind, merged, out.numel())
        finally:
            self._busy = False

    def _flush_activations(self) -> None:
        if self._pending is None:
            return
        for i, (kind, value, n) in self._act_seen.items():
            if kind == "relu":
                # the per-unit mask itself goes to the host (a few bytes per unit): fractions and the
                # persistence over logged batches are computed there, in `_dead_fractions`
                self._pending.add("dead", i, value.reshape(-1))
            else:
                self._pending.add("sat", i, value.reshape(1), float(n))
            if not self._table_written and not self.layers[i].info.activation:
                self.layers[i].info.activation = kind
        self._act_seen.clear()

    # --------------------------------------------------- parameter collection

    def _collect_params(self, update: bool) -> None:
        pending = self._pending
        assert pending is not None
        self._busy = True
        try:
            with torch.no_grad(), _no_autocast(None):
                index = self._param_index
                params = [_local(p) for _, p, _ in index]
                self._sharded = [_local(p) is not p for _, p, _ in index]
                with_grad = [k for k, (_, p, _) in enumerate(index) if p.grad is not None]
                grads = [_local(index[k][1].grad) for k in with_grad]
                # without an optimizer the gradients may still be scaled by a GradScaler: divided on the device
                unscale = self._grad_scale(grads) if not update and grads else None
                if params:
                    pending.add("w_norm", None, stats.norms(params))
                if grads:
                    g_norm = stats.norms(grads)
                    pending.add("g_norm", with_grad, g_norm / unscale if unscale is not None else g_norm)
                updated = [k for k in with_grad if k in self._prev_at]
                if update and updated and self._prev_weights is not None:
                    # the copies are ours: subtract in place (no new buffer); |w0 - w1| == |w1 - w0|
                    before = [self._prev_weights[self._prev_at[k]] for k in updated]
                    torch._foreach_sub_(before, [params[k].detach() for k in updated])
                    pending.add("u_norm", updated, stats.norms(before))
                self._prev_weights = None
                self._prev_at = {}
                # histograms: only the (sampled) values go to the host; binning happens on the writer thread
                if self.histograms:
                    for kind, tensors, keys in (("p_hist", params, list(range(len(params)))),
                                                ("g_hist", grads, with_grad)):
                        if tensors:
                            flat, lengths, scales = stats.histogram_samples(tensors)
                            if kind == "g_hist" and unscale is not None:
                                flat = flat / unscale
                            pending.add(kind, keys, flat)
                            pending.hist_meta[kind] = (lengths, scales)
                act_src = [(k, t) for k, t in zip(pending.layout, pending.parts) if k[0] == "act_hist_src"]
                if act_src:
                    flat, lengths, scales = stats.histogram_samples([t for _, t in act_src], sampled=True)
                    pending.add("a_hist", [k[1] for k, _ in act_src], flat)
                    pending.hist_meta["a_hist"] = (lengths, scales)
        finally:
            self._busy = False

    def _grad_scale(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """The GradScaler's current scale as a device tensor (no host sync), or None without one."""
        scaler = self.grad_scaler
        if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
            return None
        scale = getattr(scaler, "_scale", None)  # torch's GradScaler keeps it on the device
        if not isinstance(scale, torch.Tensor):
            scale = torch.tensor(float(scaler.get_scale()))
        return scale.to(device=grads[0].device, dtype=torch.float32).reshape(())

    def _finish(self) -> None:
        """The one host transfer, then hand the numbers to the writer thread."""
        self._flush_activations()
        pending, self._pending = self._pending, None
        if pending is None:
            return
        if any(t.is_meta for t in pending.parts):
            self._warn_once("meta", "meta tensors carry no values: no statistics are logged for them")
            return
        if self._announcement is not None:
            if self._reduce is None:
                self._reduce = self._announcement.all_ranks_watch()
                if not self._reduce and self.rank.rank == 0:
                    self._warn_once("ranks", "not every rank watches this model, so the statistics cover rank 0's "
                                    "batch only; create the DiagnosticWriter and call watch() on every rank")
            if self._reduce:
                self._pool_across_ranks(pending)
        if self.rank is not None and not self.rank.writes:
            return
        keep = [(k, t) for k, t in zip(pending.layout, pending.parts) if k[0] != "act_hist_src"]
        host = stats.to_host([t for _, t in keep])
        items = [(k, v) for (k, _), v in zip(keep, host)]
        if not self._table_written:
            items = self._fix_order(items)
        data = {"step": pending.step, "items": items, "hist_meta": pending.hist_meta}
        # Exact NaN/Inf counts only where a norm says there are some: never on a healthy step.
        data["nonfinite"] = self._count_nonfinite(data["items"])
        data["lrs"] = [float(g.get("lr", float("nan"))) for g in self.optimizer.param_groups] if self.optimizer else []
        health, extras = self._assemble(data)
        if not self._table_written:
            self._write_table()
        self.writer._submit(pending.step, health, extras)

    def _pool_across_ranks(self, pending: _Pending) -> None:
        """Replace this rank's statistics by the whole job's, in one all_reduce (see `tbdiag.distributed`)."""
        pooled = {"act": "act", "dead": "dead", "sat": "frac", "w_norm": "norm", "g_norm": "norm", "u_norm": "norm"}
        world = self.rank.world
        at, kinds, weights = [], [], []
        for j, (kind, key) in enumerate(pending.layout):
            if kind not in pooled:
                continue
            at.append(j)
            kinds.append(pooled[kind])
            if pooled[kind] == "norm":
                keys = range(len(self._sharded)) if key is None else key
                weights.append([1.0 if self._sharded[k] else 1.0 / world for k in keys])
            else:
                weights.append(pending.weights[j])
        if at:
            reduced = distributed.reduce_parts([pending.parts[j] for j in at], kinds, weights, world)
            for j, value in zip(at, reduced):
                pending.parts[j] = value

    def _count_nonfinite(self, items) -> dict[tuple[str, int], float]:
        counts: dict[tuple[str, int], float] = {}
        params = [p for _, p, _ in self._param_index]
        for (kind, keys), values in items:
            if kind not in ("w_norm", "g_norm"):
                continue
            keys = list(range(len(params))) if keys is None else keys
            bad = [k for k, v in zip(keys, values) if not math.isfinite(float(v))]
            if not bad:
                continue
            tensors = [_local(params[k] if kind == "w_norm" else params[k].grad) for k in bad]
            with torch.no_grad():
                host = stats.nonfinite_counts(tensors).cpu().numpy()
            for k, c in zip(bad, host):
                counts[(kind, k)] = float(c)
        return counts

    def _assemble(self, data: dict) -> tuple[np.ndarray, dict]:
        """Host-side: per-parameter numbers -> the [layers, columns] health array and the extras to write."""
        n = len(self.layers)
        col = schema.COLUMN_INDEX
        health = np.full((n, len(schema.COLUMNS)), np.nan, dtype=np.float32)
        n_params = len(self._param_index)
        w_norm = np.full(n_params, np.nan)
        g_norm = np.full(n_params, np.nan)
        u_norm = np.full(n_params, np.nan)
        extras: dict[str, Any] = {"histograms": [], "histogram_samples": [], "images": [], "scalars": []}
        for (kind, key), value in data["items"]:
            if kind == "act":
                health[key, col["act_mean"]], health[key, col["act_std"]], health[key, col["act_nonfinite"]] = value
            elif kind == "dead":
                health[key, col["dead_frac"]], health[key, col["dead_persist_frac"]] = self._dead_fractions(key, value)
            elif kind == "sat":
                health[key, col["saturated_frac"]] = value[0]
            elif kind == "w_norm":
                w_norm[:] = value
            elif kind == "g_norm":
                g_norm[key] = value
            elif kind == "u_norm":
                u_norm[key] = value
            elif kind in ("p_hist", "g_hist"):
                # (tags, samples, lengths, scales, numels): binned on the writer thread (stats.host_histograms)
                prefix = "params/" if kind == "p_hist" else "grads/"
                tags = [prefix + self._param_index[k][2] for k in key]
                numels = [self._param_index[k][1].numel() for k in key]
                extras["histogram_samples"].append((tags, value, *data["hist_meta"][kind], numels))
            elif kind == "a_hist":
                tags = [f"activations/{self.layers[i].name}" for i in key]
                extras["histogram_samples"].append((tags, value, *data["hist_meta"][kind], [None] * len(key)))
            elif kind == "image":
                extras["images"].append((f"images/{self.layers[key].name}", value))
        nonfinite = data["nonfinite"]
        changed = np.full(n_params, np.nan)
        if self._prev_weight_norms is not None and self._prev_weight_norms.shape == w_norm.shape:
            changed = (w_norm != self._prev_weight_norms).astype(np.float64)
        self._prev_weight_norms = w_norm.copy()
        # Per-parameter numbers summed into their layers' rows: one bincount per column, no loop over layers.
        layer_of = np.fromiter((li for li, _, _ in self._param_index), dtype=np.intp, count=n_params)
        numel = np.fromiter((p.numel() for _, p, _ in self._param_index), dtype=np.float64, count=n_params)
        w_bad = np.array([nonfinite.get(("w_norm", k), 0.0) for k in range(n_params)]) if nonfinite else np.zeros(n_params)
        g_bad = np.array([nonfinite.get(("g_norm", k), 0.0) for k in range(n_params)]) if nonfinite else np.zeros(n_params)

        def per_layer(values: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
            if mask is None:
                return np.bincount(layer_of, weights=values, minlength=n)
            return np.bincount(layer_of[mask], weights=values[mask], minlength=n)

        rows = per_layer(np.ones(n_params)) > 0
        health[rows, col["weight_norm"]] = np.sqrt(per_layer(w_norm ** 2))[rows]
        health[rows, col["weight_nonfinite"]] = per_layer(w_bad)[rows]
        # a gradient with NaN/Inf has a non-finite norm but still counts as received
        has_g = np.isfinite(g_norm) | np.array([("g_norm", k) in nonfinite for k in range(n_params)], dtype=bool)
        n_grads = per_layer(has_g.astype(np.float64))
        health[rows, col["grad_params"]] = n_grads[rows]
        got = n_grads > 0
        gn = np.sqrt(per_layer(g_norm ** 2, has_g))
        health[got, col["grad_norm"]] = gn[got]
        health[got, col["grad_rms"]] = (gn / np.sqrt(np.maximum(per_layer(numel, has_g), 1.0)))[got]
        health[got, col["grad_nonfinite"]] = per_layer(g_bad, has_g)[got]
        ch = per_layer(changed, has_g) / np.maximum(n_grads, 1.0)  # NaN where a comparison is missing
        done = got & np.isfinite(ch)
        health[done, col["changed"]] = ch[done]
        upd = np.isfinite(u_norm)
        if upd.any():
            has_u = per_layer(upd.astype(np.float64)) > 0
            denom = np.sqrt(per_layer(w_norm ** 2, upd))
            num = np.sqrt(per_layer(u_norm ** 2, upd))
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(denom > 0, num / denom, np.nan)
            health[has_u, col["update_ratio"]] = ratio[has_u]
        if has_g.any() and self.scalars:
            # NaN/Inf in any gradient makes the global norm NaN/Inf, as clip_grad_norm_ would report it
            extras["scalars"].append(("train/grad_norm", math.sqrt(float(np.sum(g_norm[has_g] ** 2)))))
        for gi, lr in enumerate(data["lrs"] if self.scalars else ()):
            extras["scalars"].append((f"train/lr/group{gi}", lr))
        return health, extras

    def _dead_fractions(self, i: int, mask: np.ndarray) -> tuple[float, float]:
        """Fraction of layer ``i``'s units dead in this batch, and dead in this and the previous two logged batches."""
        dead = np.asarray(mask) > 0
        if dead.size == 0:
            return math.nan, math.nan
        history = [m for m in self._dead_history.get(i, []) if m.shape == dead.shape]
        persist = dead.copy()
        for m in history:
            persist &= m
        self._dead_history[i] = ([dead] + history)[:2]
        return float(dead.mean()), float(persist.mean())

    # ----------------------------------------------------------- one-off logs

    def _fix_order(self, items: list) -> list:
        """Put the rows in first-forward order (unseen layers last), once, and remap this step's items."""
        executed = sorted((l for l in self.layers if l.order >= 0), key=lambda l: l.order)
        new_order = executed + [l for l in self.layers if l.order < 0]
        position = {id(l): j for j, l in enumerate(new_order)}
        old_to_new = [position[id(l)] for l in self.layers]
        self.layers = new_order
        for row, layer in enumerate(self.layers):
            layer.row = row
        self._param_index_cache = [(old_to_new[li], p, name) for li, p, name in self._param_index]
        self._dead_history = {old_to_new[i]: masks for i, masks in self._dead_history.items()}
        layer_keyed = {"act", "dead", "sat", "image"}
        out = []
        for (kind, key), value in items:
            if kind in layer_keyed:
                key = old_to_new[key]
            elif kind == "a_hist":
                key = [old_to_new[k] for k in key]
            out.append(((kind, key), value))
        return out

    def _write_table(self) -> None:
        """Write the layer table (rows in model order) and the model summary, once."""
        self._table_written = True
        for layer in self.layers:  # counted now: lazy modules have their shapes after the first forward
            counted = [p for _, p in layer.params if not is_lazy(p)]
            layer.info.params = sum(p.numel() for p in counted)
            layer.info.trainable_params = sum(p.numel() for p in counted if p.requires_grad)
        table = schema.LayerTable(
            layers=[l.info for l in self.layers],
            log_every=self.log_every,
            has_optimizer=self.optimizer is not None,
            extra={"loss_tags": self.loss_tags} if self.loss_tags is not None else {},
        )
        self.writer._submit_table(table)
        self.writer._submit_summary_text(table)

    def _log_graph(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        """The graph, traced from this call of ``module`` (the module tree for sharded models)."""
        self._busy = True
        try:
            sharded = any(type(m).__name__.startswith("FSDP") for m in module.modules())
            self.writer._write_graph(graph.graph_events(module, args, kwargs, traceable=not sharded))
        finally:
            self._busy = False

