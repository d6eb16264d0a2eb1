"""From a logging step's probe to the writer: parameters collected, one host transfer, assembly, hand-over.

The `StepRecorder` owns what spans logging steps on the measuring side: the
parameter index (fixed once lazy modules have materialised), the weight
copies for the update ratio, the host-side `Assembler`, whether the layer
table is written yet, and, in a distributed job, whether every rank pools
its numbers.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..contract import schema
from ..measure import distributed, layers, optimizer_state, run_facts
from ..measure.probe import StepProbe, WeightCopies, count_nonfinite, grad_scale, local, no_autocast
from ..summary.assembly import Assembler, ParamLayout, StepRecord, remap_rows

if TYPE_CHECKING:  # pragma: no cover
    from ..writer import DiagnosticWriter


def group_lr(group: Mapping[str, Any]) -> float:
    """A param group's learning rate as a float; NaN when it has none to read without waiting for a device.

    Adafactor's relative-step mode keeps ``lr=None``; a capturable optimizer may hold a device tensor, whose
    value on an accelerator would cost a sync (a CPU tensor is read).
    """
    lr = group.get("lr")
    if isinstance(lr, torch.Tensor):
        return float(lr) if lr.device.type == "cpu" and lr.numel() == 1 else float("nan")
    try:
        return float(lr)
    except (TypeError, ValueError):
        return float("nan")


def configured_lr(groups: Sequence[Mapping[str, Any]]) -> float:
    """The largest learning rate the optimizer was configured with, as torch's LR schedulers keep it
    (``initial_lr``, set in every param group when a scheduler is built; Hugging Face's warm-up schedules are
    LambdaLRs); NaN without a scheduler, where the current rate is the configured one."""
    rates = [group_lr({"lr": g.get("initial_lr")}) for g in groups]
    finite = [r for r in rates if math.isfinite(r)]
    return max(finite) if finite else float("nan")


class StepRecorder:
    """Collects parameters into a probe and turns a finished probe into a written `StepRecord`."""

    def __init__(self, writer: "DiagnosticWriter", optimizer: torch.optim.Optimizer | None, log_every: int, *,
                 grad_scaler: Any, scalars: bool, loss_tags: Sequence[str] | None,
                 warn_once: Callable[[str, str], None]):
        self.writer, self.optimizer, self.log_every = writer, optimizer, log_every
        self.grad_scaler, self.scalars, self.loss_tags = grad_scaler, scalars, loss_tags
        self.layers: list[layers.Layer] = []
        self.table_written = False
        self._table_provisional = False  # a layer table in discovery order went out before any measured step
        self.output_width: int | None = None  # the model's class dimension, seen at the first logging forward
        self.blocks: list[str] = []  # the repeated blocks' names (massive_act_block indexes them)
        self.rank = writer.rank  # None outside torch.distributed
        self._warn_once = warn_once
        self._params: list[tuple[int, nn.Parameter, str]] | None = None  # (row, parameter, tag), once not lazy
        self._sharded: list[bool] = []  # per parameter: a DTensor shard (FSDP2)
        self._weights = WeightCopies()
        self._assembler = Assembler()
        self._announcement = distributed.Announcement(self.rank) if self.rank and self.rank.reduces else None
        self._reduce: bool | None = None  # pool across ranks: decided at the end of the first logging step
        #: what the model summary says about the attention modules (`AttentionTap.seen_note`), or None
        self.attention_note: Callable[[], dict[str, Any]] | None = None

    def param_index(self) -> list[tuple[int, nn.Parameter, str]]:
        if self._params is not None:
            return self._params
        index = layers.param_index(self.layers)
        if not layers.has_lazy(self.layers):
            self._params = index  # fixed once no lazy module is left to materialise
        return index

    def capture_weights(self) -> None:
        """Copy the trainable weights before an optimizer step that will be logged."""
        with torch.no_grad():
            trainable = [(k, local(p)) for k, (_, p, _) in enumerate(self.param_index()) if p.requires_grad]
            self._weights.capture([k for k, _ in trainable], [t for _, t in trainable])

    def collect(self, probe: StepProbe, update: bool) -> None:
        """Parameters, gradients and (after an optimizer step) updates into ``probe``."""
        with torch.no_grad(), no_autocast(None):
            index = self.param_index()
            params = [local(p) for _, p, _ in index]
            self._sharded = [t is not p for t, (_, p, _) in zip(params, index)]
            with_grad = [k for k, (_, p, _) in enumerate(index) if p.grad is not None]
            grads = [local(index[k][1].grad) for k in with_grad]
            taken = self._weights.take(with_grad)
            # without an optimizer the gradients may still be scaled by a GradScaler: divided on the device
            unscale = grad_scale(self.grad_scaler, grads[0].device) if not update and grads else None
            probe.collect_params(params, grads, with_grad, taken if update else None, unscale)
            if update and self.optimizer is not None:  # Adam's second moments against its eps, after the step
                found = optimizer_state.epsilon_counts(self.optimizer, [(k, index[k][1]) for k in with_grad])
                if found is not None:
                    probe.add("eps", *found)

    def finish(self, probe: StepProbe, after_sync: Callable[[], list[tuple[str, float]]] | None = None) -> None:
        """Pool across ranks if due, one host transfer, assemble, and hand the record to the writer.

        ``after_sync`` runs right after the host transfer (the device has finished the step's work) and
        returns scalars to write with the record (the step timer's ``perf/*``).
        """
        for row, kind in probe.flush_activations().items():
            if not self.table_written and not self.layers[row].info.activation:
                self.layers[row].info.activation = kind
        if probe.on_meta:
            self._warn_once("meta", "meta tensors carry no values: no statistics are logged for them")
            return
        if self._pools():
            probe.pool_across_ranks(self.rank.world, self._sharded)
        if self.rank is not None and not self.rank.writes:
            return
        index = self.param_index()
        lrs = [group_lr(g) for g in self.optimizer.param_groups] if self.optimizer else []
        items = probe.to_host()
        extra = after_sync() if after_sync is not None else []
        if not self.table_written:
            items, index = self._fix_order(items, index)
        record = self._assembler.assemble(
            probe.step, items, probe.hist_meta, ParamLayout.of(index), [layer.name for layer in self.layers],
            count_nonfinite(items, [p for _, p, _ in index]), lrs, self.scalars)
        if self.optimizer is not None:
            probe.add_model("lr_initial", configured_lr(self.optimizer.param_groups))
        probe.finish_model(record.model)
        record.scalars.extend(extra)
        if not self.table_written:
            self._write_table()
        self.writer.write_step(record)

    def finish_model_only(self, step: int, values: Mapping[str, Any]) -> None:
        """A logging step with model-level statistics but no measured training forward (eval mode).

        Written with an all-NaN health row ("not measured") so every reader
        lists the step.  Before the first measured step the layer table goes
        out provisionally (discovery order, no shapes); the first measured
        step writes it again in first-forward order, and readers take the
        latest.  Device values are read here: a logging step, nothing else
        to transfer.
        """
        if self.rank is not None and not self.rank.writes:
            return
        if not self.table_written and not self._table_provisional:
            self._write_table(final=False)
        model = {name: float(v) for name, v in values.items()
                 if not (isinstance(v, torch.Tensor) and v.is_meta)}  # meta tensors carry no value
        health = np.full((len(self.layers), len(schema.COLUMNS)), np.nan, dtype=np.float32)
        self.writer.write_step(StepRecord(step, health, model=model))

    def _pools(self) -> bool:
        if self._announcement is None:
            return False
        if self._reduce is None:
            self._reduce = self._announcement.all_ranks_watch()
            if not self._reduce and self.rank.rank == 0:
                self._warn_once("ranks", "not every rank watches this model, so the statistics cover rank 0's "
                                "batch only; create the DiagnosticWriter and call watch() on every rank")
        return self._reduce

    def _fix_order(self, items: list, index: list) -> tuple[list, list]:
        """Put the rows in first-forward order (unseen layers last), once; this step's items and index remapped.

        Parameter positions keep their order (this step's items refer to them); only their rows change.
        """
        self.layers[:], old_to_new = layers.first_forward_order(self.layers)
        index = [(old_to_new[row], p, name) for row, p, name in index]
        if self._params is not None:
            self._params = index
        self._assembler.remap_rows(old_to_new)
        return remap_rows(items, old_to_new), index

    def _attention_fact(self) -> dict[str, Any]:
        note = self.attention_note() if self.attention_note is not None else None
        return {"attention": note} if note and (note.get("modules") or note.get("outside")) else {}

    def _write_table(self, final: bool = True) -> None:
        """Write the layer table (rows in model order) and the model summary, once (and once provisionally)."""
        self.table_written = self.table_written or final
        self._table_provisional = self._table_provisional or not final
        layers.count_params(self.layers)
        self.writer.write_layer_table(schema.LayerTable(
            layers=[layer.info for layer in self.layers],
            log_every=self.log_every,
            has_optimizer=self.optimizer is not None,
            extra={**({"loss_tags": list(self.loss_tags)} if self.loss_tags is not None else {}),
                   **run_facts.facts(self.optimizer, self.output_width),
                   **({"blocks": self.blocks} if self.blocks else {}),
                   **self._attention_fact()},
        ))
