"""The attention tap: sees each attention module's kernel call in a logging-step forward and measures it beside.

While an attention module (`tbdiag.measure.attention.attention_modules`) runs
in a logging-step training forward, a `TorchFunctionMode` sits on its thread:
it sees ``F.scaled_dot_product_attention`` (Hugging Face's ``sdpa``, a user's
own module), the softmax of an eager attention (Hugging Face's ``eager``) and
``F.multi_head_attention_forward`` (``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``).  It runs the user's call unchanged, then
hands its inputs to `tbdiag.measure.attention` for a few query rows, under
``no_grad``, past every mode and autocast: the user's computation is
bit-identical and nothing is read on the host.  The mode is pushed by the
module's forward pre-hook and popped by its forward hook, so the rest of the
forward never pays for it.  The first call of each attention module per
forward counts.

What it did not see is said once, in the model summary (`seen_note`): an
attention module that ran without any kernel tbdiag knows (FlashAttention's
own functions, a custom CUDA kernel) or a compiled region that hides the
calls.
"""

from __future__ import annotations

import threading
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..measure import attention
from ..measure.layers import Layer
from ..measure.probe import StepProbe, no_autocast

_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax})
_SDPA = F.scaled_dot_product_attention
_MHA = F.multi_head_attention_forward
#: The attention calls tbdiag measures, and how the model summary names them when they run outside any
#: attention module (seen by the activation spy, `stray_call`).
KERNELS = {_SDPA: "F.scaled_dot_product_attention", _MHA: "F.multi_head_attention_forward"}


def _arg(args: tuple, kwargs: dict, position: int, name: str, default: Any = None) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def _last_dim(x: torch.Tensor, dim: Any) -> bool:
    return isinstance(dim, int) and dim in (-1, x.dim() - 1)


class _KernelSpy(TorchFunctionMode):
    """Pushed while one attention module runs; sees its kernel call."""

    def __init__(self, tap: "AttentionTap", layer: Layer):
        super().__init__()
        self.tap, self.layer = tap, layer

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.tap.busy.value or self.layer.row in self.tap.seen:
            return out
        if func is _SDPA or func is _MHA or func in _SOFTMAX:
            self.tap.measure(self.layer, func, args, kwargs)
        return out


class AttentionTap:
    """Forward hooks on the attention rows of a logging-step forward, and the measurement of their kernels."""

    def __init__(self, guard: Callable[[str, Callable], Callable], busy: Any):
        self.busy = busy
        self.probe: StepProbe | None = None
        self.thread: int | None = None
        self.seen: set[int] = set()  # rows measured in this forward
        self._layers: list[Layer] = []
        self.ever_seen: set[str] = set()  # names of the rows measured at some logging step (rows get renumbered)
        self.stray: set[str] = set()  # attention calls seen outside any attention module (not measured)
        self._stack: list[_KernelSpy] = []
        self._guard = guard
        self._pre: Callable[[Layer], None] | None = None  # guarded at the first logging step (watch() set-up
        self.measure: Callable[..., None] | None = None  # stays as it was for models without attention)
        # not guarded: it must pop its spy even after a fault turned the guards off (hidden from Dynamo as they are)
        self._post = torch.compiler.disable(self._leave)

    def open(self, probe: StepProbe, layers: list[Layer], hooks: list[tuple[str, Any]]) -> None:
        """Hook this thread's forward: every attention row gets a pre-hook and an always-called hook."""
        self.probe, self.thread, self._layers = probe, threading.get_ident(), layers
        self.seen.clear()
        if self._pre is None:
            self._pre = self._guard("attention tap", self._enter)
            self.measure = self._guard("attention tap", self._measure)
        for layer in layers:
            if layer.attention:
                module = layer.module
                hooks.append(("pre", module.register_forward_pre_hook(self._pre_of(layer))))
                hooks.append(("post", module.register_forward_hook(self._post_of(layer), always_call=True)))

    def _pre_of(self, layer: Layer):
        if layer.attention_hooks is None:  # the same objects at every logging step (torch.compile guards on them)
            layer.attention_hooks = (lambda module, args: self._pre(layer),
                                     lambda module, args, out: self._post(layer))
        return layer.attention_hooks[0]

    def _post_of(self, layer: Layer):
        return layer.attention_hooks[1]

    def _enter(self, layer: Layer) -> None:
        if self.probe is None or threading.get_ident() != self.thread or self.busy.value:
            return
        spy = _KernelSpy(self, layer)
        spy.__enter__()
        self._stack.append(spy)

    def _leave(self, layer: Layer) -> None:
        """Pop the module's spy; raises nothing (a mode stack it cannot pop is left to `pop`)."""
        try:
            if self._stack and self._stack[-1].layer is layer and threading.get_ident() == self.thread:
                self._stack.pop().__exit__(None, None, None)
        except Exception:  # pragma: no cover - popping a mode we pushed on this thread does not fail
            pass

    def close(self) -> None:
        """Pop what an interrupted forward left pushed; remember which rows were seen."""
        self.pop()
        if self.probe is not None:
            self.ever_seen.update(layer.name for layer in self._layers if layer.row in self.seen)
        self.probe = self.thread = None

    def pop(self) -> None:
        """Pop every spy this tap pushed (on the thread that pushed them: the forward's own)."""
        while self._stack:
            self._stack.pop().__exit__(None, None, None)

    def _measure(self, layer: Layer, func: Any, args: tuple, kwargs: dict) -> None:
        probe = self.probe
        if probe is None:
            return
        first = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if func is _SDPA:
            get = lambda i, name, default=None: _arg(args, kwargs, i, name, default)  # noqa: E731
            compute = lambda: attention.sdpa_rows(  # noqa: E731
                get(0, "query"), get(1, "key"), get(3, "attn_mask"), bool(get(5, "is_causal", False)),
                get(6, "scale"), bool(kwargs.get("enable_gqa", False)))
        elif func is _MHA:
            compute = lambda: attention.mha_rows(args, kwargs)  # noqa: E731
        else:
            x = first if first is not None else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or x.dim() < 3 or not _last_dim(x, _arg(args, kwargs, 1, "dim")):
                return
            heads = getattr(layer.module, "num_heads", None)
            compute = lambda: attention.softmax_rows(x, heads if isinstance(heads, int) else None)  # noqa: E731
        self.busy.value = True
        try:
            with torch.no_grad(), torch._C.DisableTorchFunction(), no_autocast(first):
                rows = compute()
                if rows is None:
                    return
                self.seen.add(layer.row)
                probe.add("attn", layer.row, attention.head_stats(*rows))
        finally:
            self.busy.value = False

    def stray_call(self, func: Any) -> None:
        """The activation spy saw ``func`` (one of `KERNELS`) run: noted when no attention module is running."""
        if not self._stack and self.probe is not None:
            self.stray.add(KERNELS[func])

    def seen_note(self, layers: list[Layer], compiled: bool) -> dict[str, Any]:
        """What the model summary says about attention: the rows measured, those whose kernel was not seen, and
        attention calls made outside any attention module."""
        rows = [layer for layer in layers if layer.attention]
        unseen = [layer.name for layer in rows if layer.name not in self.ever_seen]
        note: dict[str, Any] = {"modules": len(rows), "measured": len(rows) - len(unseen), "not_seen": unseen}
        if self.stray:
            note["outside"] = sorted(self.stray)
        if unseen:
            note["why"] = ("under torch.compile the attention kernel runs inside the compiled graph, out of tbdiag's "
                           "sight" if compiled else
                           "their attention kernel is none tbdiag sees (F.scaled_dot_product_attention, an eager "
                           "softmax, F.multi_head_attention_forward): a fused or custom kernel, or the module did "
                           "not run")
        return note
