"""What is measured on the device in one logging step, up to its single host transfer.

A `StepProbe` lives for one logging step.  The watcher's hooks feed it
layer outputs (`record_output`), activation calls (`on_activation`) and, at
the end of the step, the parameters (`collect_params`); every reduction is
launched on the model's device as the data goes by, nothing waits for the
device, and `to_host` copies everything in one transfer.  In a distributed
job `pool_across_ranks` replaces this rank's numbers by the whole job's in
one collective first.  Its items are documented in `tbdiag.summary.assembly`.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from . import distributed, stats
from .layers import DEAD_BELOW, Layer
from .modelinfo import macs_of

#: Layer outputs of up to this many elements are measured together, in one batch of reductions at the end
#: of the forward (`StepProbe.flush_outputs`): for a small layer the per-call overhead of its reductions
#: is most of its cost, and a batch pays it once per output size rather than once per layer.  Larger
#: outputs are cheaper reduced in their hook, still in cache, than copied into the batch's stack.
BATCH_NUMEL = 1 << 15
#: At most this many outputs wait for their batch (`BATCH_NUMEL` each: the memory they keep alive is bounded).
BATCH_COUNT = 64

#: How each item kind pools across ranks (`distributed.reduce_parts`); other kinds stay rank 0's own.
_POOLED = {"act": "act", "dead": "dead", "sat": "frac", "w_norm": "norm", "g_norm": "norm", "u_norm": "norm"}


def autocast_device(t: torch.Tensor | None) -> str | None:
    """The device type whose autocast would change ops on ``t`` (any, for None), or None when autocast is off."""
    device_type = t.device.type if t is not None else None
    for dt in ((device_type,) if device_type in ("cpu", "cuda") else ("cpu", "cuda")):
        if torch.is_autocast_enabled(dt):
            return dt
    return None


def no_autocast(t: torch.Tensor | None) -> contextlib.AbstractContextManager:
    """Statistics in float32 whatever autocast the user's forward runs under."""
    dt = autocast_device(t)
    return torch.autocast(device_type=dt, enabled=False) if dt is not None else contextlib.nullcontext()


def local(t: torch.Tensor) -> torch.Tensor:
    """A sharded DTensor's local shard (FSDP2); any other tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if to_local is not None and type(t).__name__ == "DTensor" else t


def storage_key(t: torch.Tensor) -> tuple[torch.device, int]:
    """Identifies the memory a tensor lives in: an activation's input is matched to the layer that wrote it."""
    try:
        return (t.device, t.untyped_storage().data_ptr())
    except RuntimeError:  # tensors without storage (e.g. some subclasses)
        return (t.device, id(t))


@dataclass
class ProbeOptions:
    """What a logging step measures besides the health statistics."""

    param_histograms: bool = True
    activation_histograms: bool = True
    images: bool = False
    max_image_layers: int = 8
    max_image_channels: int = 16


@dataclass
class StepProbe:
    """Device tensors of one logging step, waiting for the single host transfer."""

    step: int
    options: ProbeOptions
    parts: list[torch.Tensor | np.ndarray] = field(default_factory=list)
    layout: list[tuple[str, Any]] = field(default_factory=list)
    weights: list[Any] = field(default_factory=list)  # how a part pools across ranks (element counts)
    # histogram kind -> (sample lengths, numel / length), known on the host from shapes alone
    hist_meta: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    recorded: set[int] = field(default_factory=set)
    # output storage -> (layer row, shape, storage offset, the output itself, weakly) of the layer that wrote it,
    # while `track_producers`: a freed output's memory may hold the next tensor, which no layer wrote
    producers: dict[tuple[torch.device, int], tuple[int, torch.Size, int, Any]] = field(default_factory=dict)
    track_producers: bool = True  # some activation in this forward is attributed to the layer it follows
    calls: dict[int, int] = field(default_factory=dict)  # layer row -> calls in the current forward
    act_seen: dict[int, tuple[str, torch.Tensor, int]] = field(default_factory=dict)  # row -> kind, value, numel
    images: dict[int, int] = field(default_factory=dict)  # layer row -> position of its feature maps in parts
    # small outputs waiting for `flush_outputs`: (layer, output, its version counter then, measured already)
    held: list[tuple[Layer, torch.Tensor, int, bool]] = field(default_factory=list)
    batch: bool = False  # this forward measures small outputs in batches (set by the forward tap)
    stack_buffer: "StackBuffer" = field(default_factory=lambda: StackBuffer())  # the tap's, kept across steps
    order_counter: int = 0
    # model-level values known on the host: a number, or a callable read once the step's layer rows are final
    host_model: dict[str, Any] = field(default_factory=dict)
    model_offsets: dict[str, float] = field(default_factory=dict)  # added on the host to transferred values
    # where the step's results are gathered before any stack or concatenation, and its host transfer starts:
    # the first accelerator a measurement was on (else the CPU); a model spread over several devices in one
    # process (``device_map="auto"``, pipeline stages) has its other devices' results copied there
    device: torch.device | None = None

    def add_model(self, name: str, value: "torch.Tensor | float | Callable[[], float]", offset: float = 0.0) -> None:
        """A model-level statistic (`schema.MODEL_COLUMNS`): a device scalar rides in the step's host transfer.

        The transfer is float32: send small numbers (a step as an offset from
        this step) and the ``offset`` is added back on the host.  A callable is
        evaluated on the host after the rows are put in model order (a layer row).
        """
        if isinstance(value, torch.Tensor):
            self.add("model", name, value.detach().reshape(-1)[:1])  # `stats.to_host` makes it float32
            if offset:
                self.model_offsets[name] = offset
        else:
            self.host_model[name] = value if callable(value) else float(value)

    def finish_model(self, model: dict[str, float]) -> None:
        """Complete a record's transferred model-level values on the host: offsets added, host values set."""
        for name, offset in self.model_offsets.items():
            if name in model:
                model[name] += offset
        for name, value in self.host_model.items():
            model[name] = float(value() if callable(value) else value)

    def add(self, kind: str, key: Any, tensor: torch.Tensor | np.ndarray, weight: Any = None) -> None:
        """One measurement: a device tensor, or a numpy array for values already on the host (CPU statistics)."""
        if (self.device is None or self.device.type == "cpu") and isinstance(tensor, torch.Tensor):
            self.gather_device(tensor)
        self.parts.append(tensor)
        self.layout.append((kind, key))
        self.weights.append(weight)

    def gather_device(self, t: torch.Tensor) -> torch.device:
        """The device this step's results are gathered on (`device`): ``t``'s when none is chosen yet, or when
        only the CPU is and ``t`` is on an accelerator."""
        if self.device is None or (self.device.type == "cpu" and t.device.type != "cpu"):
            self.device = t.device
        return self.device

    def producer(self, x: torch.Tensor) -> tuple[int, bool] | None:
        """The layer row that wrote ``x``'s memory in this forward, and whether ``x`` is that output as it is."""
        produced = self.producers.get(storage_key(x))
        if produced is None or produced[3]() is None:
            return None  # nothing, or an output freed since (its memory reused)
        row, shape, offset, _ = produced
        return row, shape == x.shape and offset == x.storage_offset()

    def record_output(self, layer: Layer, args: tuple, out: torch.Tensor, describe: bool) -> None:
        """A layer's output: its moments, a histogram sample, feature maps; its shape and MACs when ``describe``."""
        row = layer.row
        if describe and layer.order < 0:
            layer.order = self.order_counter
            layer.info.output_shape = list(out.shape)
            layer.info.macs = macs_of(layer.module, args, out)
        self.order_counter += 1
        self.calls[row] = self.calls.get(row, 0) + 1
        if not layer.output_measured:
            return  # an attention row: its statistics come from its kernel (`tbdiag.watch.attention_tap`)
        if self.track_producers:
            self.producers[storage_key(out)] = (row, out.shape, out.storage_offset(), weakref.ref(out))
        if not out.is_floating_point() or row in self.recorded:
            return  # integer outputs; a module called twice in one forward keeps its first call
        self.recorded.add(row)
        # An activation module's output is summarised where it matters: its dead or saturated fraction, on
        # the layer that fed it.  Its mean/std would add a row of reductions per activation (half the
        # layers of a Linear+ReLU stack) to every logging step.
        work = layer.relu_after or not layer.is_activation or (self.options.activation_histograms and layer.params)
        small = work and 0 < out.numel() <= BATCH_NUMEL
        if small and self.batch and not layer.output_changes:
            self.held.append((layer, out.detach(), out._version, False))
            if len(self.held) >= BATCH_COUNT:
                self.flush_outputs()
            return
        if layer.relu_after:  # the untapped rectifier-like module that follows: its dead units, from its input
            self.on_activation(layer, layer.relu_after, out)
        if not layer.is_activation:
            self.add("act", row, stats.activation_stats(out), float(out.numel()))
        if self.options.activation_histograms and layer.params:
            self.add("act_hist_src", [row], stats.histogram_sample(out).reshape(1, -1))
        if small and not self.batch:  # measured now; whether an in-place op changes it later is seen at the end
            self.held.append((layer, out.detach(), out._version, True))
        if self.options.images and layer.is_conv and out.dim() >= 3 and len(self.images) < self.options.max_image_layers:
            # the raw output for now; replaced by what the activation it feeds makes of it (`on_activation`)
            self.images[row] = len(self.parts)
            self.add("image", row, stats.feature_grid(out, self.options.max_image_channels))

    def flush_outputs(self) -> None:
        """Measure the held small outputs in one batch; learn which layers' outputs in-place ops change.

        Runs at the end of the forward (and whenever `BATCH_COUNT` outputs
        wait).  An output whose version counter moved since its hook was
        changed in place (``ReLU(inplace=True)`` after a layer): its values are
        no longer the layer's, so that layer is measured in its hook from then
        on; the forwards that measure every output in its hook learn this
        before any is held.
        """
        held, self.held = self.held, []
        todo: dict[tuple, list[tuple[Layer, torch.Tensor]]] = {}  # outputs of one shape: stacked, reduced together
        for layer, out, version, measured in held:
            if out._version != version:
                layer.output_changes = True
            elif not measured:
                dim = stats.unit_dim(out.shape, layer.channels_first or out.dim() >= 4)
                todo.setdefault((tuple(out.shape), out.device, dim), []).append((layer, out))
        hist_of = self.options.activation_histograms
        for (_, _, dim), group in todo.items():
            # stacked in the order [histogram and moments, moments, the rest] (a GELU's output beside a Linear's):
            # each reduction reads a leading run of rows, a view, never rows picked by a list of positions (an
            # index tensor made from Python numbers and copied to the device, which waits for it, mid-forward)
            group.sort(key=lambda item: (not (hist_of and item[0].params), item[0].is_activation))
            x = self.stack_buffer.stack([out for _, out in group])  # [k, *shape] float32, until the next stack
            n = math.prod(x.shape[1:])
            flat = x.view(len(group), -1)
            measured = max((j + 1 for j, (layer, _) in enumerate(group) if not layer.is_activation), default=0)
            if measured:
                for (layer, _), values in zip(group, stats.moments(flat[:measured])):
                    if not layer.is_activation:
                        self.add("act", layer.row, values, float(n))
            # one reduction per cutoff among the group's rectifier-like kinds (nearly always one)
            for below in {DEAD_BELOW[layer.relu_after] for layer, _ in group if layer.relu_after}:
                for (layer, _), mask in zip(group, stats.dead_units_rows(x, dim, below)):
                    if layer.relu_after and DEAD_BELOW[layer.relu_after] == below:
                        self._activation_seen(layer.row, layer.relu_after, mask, n)
            hist = sum(1 for layer, _ in group if hist_of and layer.params)  # the leading rows
            if hist:  # the group's samples in one copy (the stack is overwritten by the next group's)
                self.add("act_hist_src", [layer.row for layer, _ in group[:hist]],
                         stats.histogram_sample_rows(flat[:hist]))

    def on_activation(self, layer: Layer, kind: str, x: torch.Tensor, out: torch.Tensor | None = None) -> None:
        """An activation of ``kind`` took ``x`` (``layer``'s output) and made ``out`` (None: not made yet).

        A rectifier-like one (`DEAD_BELOW`) gives its dead units, judged on
        ``x``, its pre-activation (for the ReLU family its output is as good);
        sigmoid/tanh their saturated fraction, from ``out``.
        """
        below = DEAD_BELOW.get(kind)
        if below is not None:  # per-unit mask; several calls in one forward: dead only if dead in all
            value = stats.dead_units(x, stats.unit_dim(x.shape, layer.channels_first or x.dim() >= 4), below)
        else:  # several calls (shared module, recurrent loop): the worst one counts
            value = stats.saturated_fraction(out, kind)
        shown = out if out is not None else x
        at = self.images.get(layer.row)
        if at is not None and self.layout[at] == ("image", layer.row) and layer.row not in self.act_seen:
            scale = kind if below is None else "relu" if below == 0 else None  # (smooth ones: their own range)
            self.parts[at] = stats.feature_grid(shown, self.options.max_image_channels, kind=scale)
        self._activation_seen(layer.row, kind, value, shown.numel())

    def _activation_seen(self, row: int, kind: str, value: torch.Tensor, numel: int) -> None:
        prev = self.act_seen.get(row)
        dead = kind in DEAD_BELOW
        if prev is not None and (prev[0] == kind or dead and prev[0] in DEAD_BELOW) and prev[1].shape == value.shape:
            value = prev[1] & value if dead else torch.maximum(prev[1], value)
            kind = prev[0]  # (two rectifier-like kinds on one output: dead only where dead for both)
        self.act_seen[row] = (kind, value, numel)

    def flush_activations(self) -> dict[int, str]:
        """Move the activation results into the step's parts; returns which activation consumes which row."""
        self.flush_outputs()  # (at the forward's end normally; here too, should that not have run)
        for row, (kind, value, n) in self.act_seen.items():
            if kind in DEAD_BELOW:
                # the per-unit mask itself goes to the host (a few bytes per unit): fractions and the
                # persistence over logged batches are computed there (`Assembler.dead_fractions`)
                self.add("dead", row, value.reshape(-1))
            else:
                self.add("sat", row, value.reshape(1), float(n))
        kinds = {row: kind for row, (kind, _, _) in self.act_seen.items()}
        self.act_seen.clear()
        return kinds

    def collect_params(self, params: list[torch.Tensor], grads: list[torch.Tensor], with_grad: list[int],
                       update: tuple[list[int], list[torch.Tensor], list[float]] | None,
                       unscale: torch.Tensor | None) -> None:
        """Norms and histogram samples of parameters, gradients (divided by ``unscale``) and updates.

        ``update`` is ``(positions, weights before the step, scales)`` from `WeightCopies.take`: the copies
        are the probe's to overwrite (|w0 - w1| == |w1 - w0|, no new buffer).
        Per-tensor results are gathered on the step's `device` before they are stacked.
        """
        act_src = [(rows, t) for (kind, rows), t in zip(self.layout, self.parts) if kind == "act_hist_src"]
        first = params[0] if params else grads[0] if grads else act_src[0][1] if act_src else None
        if first is None:
            return
        device = self.gather_device(first)
        if unscale is not None:
            unscale = stats.gather([unscale], device)[0]
        if params:
            self.add("w_norm", None, stats.norms(params, device))
        if grads:
            g_norm = stats.norms(grads, device)
            self.add("g_norm", with_grad, g_norm / unscale if unscale is not None else g_norm)
        if update is not None and update[0]:
            positions, before, scales = update
            after = [update_sample(params[k])[0] for k in positions]
            torch._foreach_sub_(before, after)  # (under no_grad: `StepRecorder.collect`)
            # a sample's change, scaled to the whole tensor's
            self.add("u_norm", positions, stats.norms(before, device, scales=scales))
        if self.options.param_histograms:
            for kind, tensors, keys in (("p_hist", params, list(range(len(params)))), ("g_hist", grads, with_grad)):
                if tensors:
                    flat, lengths, scales, order = stats.histogram_samples(tensors, device)
                    if kind == "g_hist" and unscale is not None:
                        flat = flat / unscale
                    self._add_histograms(kind, [keys[i] for i in order], flat, lengths, scales)
        # layer outputs' samples: [k, length] blocks of k rows each; counted as sampled (scale 1)
        if act_src:
            rows = [row for block_rows, _ in act_src for row in block_rows]
            lengths = [t.shape[1] for _, t in act_src for _ in range(t.shape[0])]
            flat = torch.cat(stats.gather([t.reshape(-1) for _, t in act_src], device))
            self._add_histograms("a_hist", rows, flat, lengths, [1.0] * len(rows))

    def _add_histograms(self, kind: str, keys: list, flat: torch.Tensor, lengths: list[int],
                        scales: list[float]) -> None:
        """Histogram samples of many tensors: binned on an accelerator (a few hundred bytes per tensor go to
        the host), or shipped as they are from a CPU, where the writer thread bins them (`tbdiag.measure.stats`)."""
        self.add(kind, keys, flat if flat.device.type == "cpu" else stats.device_histograms(flat, lengths))
        self.hist_meta[kind] = (lengths, scales)

    def pool_across_ranks(self, world: int, sharded: list[bool]) -> None:
        """Replace this rank's statistics by the whole job's, in one all_reduce (see `tbdiag.measure.distributed`)."""
        device = self.device or torch.device("cpu")
        self.parts = [torch.from_numpy(t).to(device, non_blocking=True) if isinstance(t, np.ndarray) else t
                      for t in self.parts]
        at, kinds, weights = [], [], []
        for j, (kind, key) in enumerate(self.layout):
            if kind not in _POOLED:
                continue
            at.append(j)
            kinds.append(_POOLED[kind])
            if _POOLED[kind] == "norm":
                keys = range(len(sharded)) if key is None else key
                weights.append([1.0 if sharded[k] else 1.0 / world for k in keys])
            else:
                weights.append(self.weights[j])
        if at:
            pooled = distributed.reduce_parts([self.parts[j] for j in at], kinds, weights, world, device)
            for j, value in zip(at, pooled):
                self.parts[j] = value

    @property
    def on_meta(self) -> bool:
        return any(isinstance(t, torch.Tensor) and t.is_meta for t in self.parts)

    def to_host(self) -> list[tuple[tuple[str, Any], np.ndarray]]:
        """Every measurement of the step on the host, in one transfer."""
        keep = [(k, t) for k, t in zip(self.layout, self.parts) if k[0] != "act_hist_src"]
        return list(zip((k for k, _ in keep), stats.to_host([t for _, t in keep], self.device)))


def count_nonfinite(items: list, params: list[torch.Tensor]) -> dict[tuple[str, int], float]:
    """Exact NaN/Inf counts, only where a norm says there are some: never on a healthy step.

    The weights and gradients whose norms are not finite are counted on their devices and read in one
    transfer (the step's second, only on a logging step that has some).
    """
    bad: list[tuple[str, int]] = []
    for (kind, keys), values in items:
        if kind not in ("w_norm", "g_norm") or np.isfinite(values).all():
            continue
        keys = list(range(len(params))) if keys is None else keys
        bad += [(kind, k) for k, v in zip(keys, values) if not math.isfinite(float(v))]
    if not bad:
        return {}
    tensors = [local(params[k] if kind == "w_norm" else params[k].grad) for kind, k in bad]
    by_device: dict[torch.device, list[int]] = {}
    for j, t in enumerate(tensors):
        by_device.setdefault(t.device, []).append(j)
    # (a copy between accelerators is no host sync: the counts meet on one, then one copy to the host)
    target = next((d for d in by_device if d.type != "cpu"), tensors[0].device)
    with torch.no_grad():
        parts = [stats.nonfinite_counts([tensors[j] for j in at]) for at in by_device.values()]
        host = torch.cat(stats.gather(parts, target)).cpu().numpy()
    order = [j for at in by_device.values() for j in at]
    return {bad[j]: float(c) for j, c in zip(order, host)}


def grad_scale(scaler: Any, device: torch.device) -> torch.Tensor | None:
    """A GradScaler's current scale as a device tensor (no host sync), or None without an enabled one."""
    if scaler is None or not getattr(scaler, "is_enabled", lambda: True)():
        return None
    scale = getattr(scaler, "_scale", None)  # torch's GradScaler keeps it on the device
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scaler.get_scale()))
    return scale.to(device=device, dtype=torch.float32).reshape(())


class StackBuffer:
    """Memory kept for stacking a forward's small outputs (`StepProbe.flush_outputs`).

    A fresh multi-megabyte CPU allocation costs page faults, several times the
    copy itself; the stack is read within the flush only, so one buffer serves
    every logging step.  On accelerators (caching allocators) a plain stack.
    """

    def __init__(self) -> None:
        self._kept: torch.Tensor | None = None

    def stack(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``tensors`` (of one shape) as one float32 ``[k, *shape]`` tensor, valid until the next call."""
        shape = (len(tensors), *tensors[0].shape)
        if tensors[0].device.type != "cpu":
            return torch.stack(tensors).float()
        n = math.prod(shape)
        if self._kept is None or self._kept.numel() < n:
            self._kept = torch.empty(n, dtype=torch.float32)
        out = self._kept[:n].view(shape)
        torch.stack(tensors, out=out)
        return out


#: Parameters above this many elements have their update measured on a fixed strided sample of about this
#: many elements (copied before the step) instead of a full copy: the update ratio of a large tensor is then an
#: estimate (docs/performance.md measures its error), and the copies take ~0.26 MB per tensor, not its size.
UPDATE_SAMPLE = 65_536


def update_sample(t: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(view, scale)``: the elements of ``t`` whose change is measured, and sqrt(numel / their count).

    The whole tensor when it is small or not contiguous; otherwise every ``stride``-th element of its flat
    view, with an odd stride so that the sample walks across the columns of a matrix instead of staying in
    a few of them (every row of an embedding is visited: a sparse update still shows).
    """
    n = t.numel()
    if n <= UPDATE_SAMPLE or not t.is_contiguous():
        return t, 1.0
    stride = -(-n // UPDATE_SAMPLE) | 1
    view = t.view(-1)[::stride]
    return view, math.sqrt(n / view.numel())


class WeightCopies:
    """The weights before an optimizer step, for the update ratio: small tensors whole, large ones sampled.

    Copying every parameter right before ``optimizer.step()`` would double the parameters' memory at the
    step's peak; a sample of `UPDATE_SAMPLE` elements per large tensor bounds it.  On the CPU the copies are
    kept and refilled at every logging step (fresh allocations cost page faults); on accelerators (caching
    allocators) they are allocated per logging step and freed after it.
    """

    def __init__(self) -> None:
        self._kept: list[torch.Tensor] | None = None
        self._taken: tuple[dict[int, int], list[torch.Tensor], list[float]] | None = None

    def capture(self, positions: list[int], live: list[torch.Tensor]) -> None:
        """Copy (the sample of) ``live`` (the parameters at ``positions``) before the step."""
        self._taken = None
        if not live:  # nothing trainable (a frozen model stepped by another module's optimizer)
            return
        views, scales = zip(*(update_sample(t) for t in live))
        kept = self._kept
        if (kept is not None and len(kept) == len(views)
                and all(k.shape == v.shape and k.dtype == v.dtype and k.device == v.device
                        for k, v in zip(kept, views))):
            torch._foreach_copy_(kept, list(views))
            copies = kept
        else:
            copies = [v.clone() for v in views]
            self._kept = copies if all(t.device.type == "cpu" for t in live) else None
        self._taken = ({k: j for j, k in enumerate(positions)}, copies, list(scales))

    def take(self, with_grad: list[int]) -> tuple[list[int], list[torch.Tensor], list[float]] | None:
        """``(positions, copies, scales)`` of the captured parameters that received a gradient; forgets the capture.

        A copy is of `update_sample`'s view of its parameter; ``scale`` turns the sample's change into an
        estimate of the whole tensor's (1.0 where the copy is whole).
        """
        taken, self._taken = self._taken, None
        if taken is None:
            return None
        at, copies, scales = taken
        positions = [k for k in with_grad if k in at]
        return positions, [copies[at[k]] for k in positions], [scales[at[k]] for k in positions]
