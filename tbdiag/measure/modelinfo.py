"""What the model summary says about each layer: type, parameters, output shape, multiply-accumulates.

Multiply-accumulates (MACs) are counted the way torchsummary-style tools do:
the weight multiplications of the layer's main operation for the batch that
was observed, ignoring bias additions and element-wise work.  Layers whose
cost is not a weight product (activations, pooling) count 0; normalisation
layers count one per output element.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..contract import schema


def type_name(module: nn.Module) -> str:
    return type(module).__name__


def _numel(shape) -> int:
    return int(math.prod(shape)) if shape is not None else 0


def macs_of(module: nn.Module, args: tuple, out: torch.Tensor) -> int:
    """Multiply-accumulates of one forward call of ``module`` that produced ``out``."""
    try:
        if isinstance(module, nn.Linear):
            return module.in_features * out.numel()
        if isinstance(module, nn.Bilinear):
            return module.in1_features * module.in2_features * out.numel()
        if isinstance(module, nn.modules.conv._ConvNd):
            per_output = (module.in_channels // module.groups) * _numel(module.kernel_size)
            return per_output * out.numel()
        if isinstance(module, nn.modules.rnn.RNNBase):
            gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
            x = args[0] if args else None
            tokens = (x.data.shape[0] if isinstance(x, nn.utils.rnn.PackedSequence)
                      else (x.shape[0] * x.shape[1] if x is not None and x.dim() == 3 else 0))
            dirs = 2 if module.bidirectional else 1
            h = module.hidden_size
            total = 0
            for layer in range(module.num_layers):
                inp = module.input_size if layer == 0 else h * dirs
                total += gates * (inp + h) * h * tokens * dirs
            return total
        if isinstance(module, nn.MultiheadAttention):
            e = module.embed_dim
            q = args[0] if args else None
            if q is None or q.dim() != 3:
                return 0
            tokens = q.shape[0] * q.shape[1]
            length = q.shape[0] if not module.batch_first else q.shape[1]
            return 4 * e * e * tokens + 2 * tokens * length * e
        if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
                               nn.modules.instancenorm._InstanceNorm)):
            return out.numel()
    except (AttributeError, TypeError, IndexError):
        return 0
    return 0


def _human(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


def _attention_lines(note: Any) -> list[str]:
    """What the summary says about attention health (`tbdiag.watch.attention_tap.AttentionTap.seen_note`)."""
    if not isinstance(note, dict) or not (note.get("modules") or note.get("outside")):
        return []
    lines = ["", f"Attention health (logits, entropy, first-key share): measured in {note.get('measured', 0)} of "
                 f"{note.get('modules', 0)} attention modules."]
    unseen = note.get("not_seen") or []
    if unseen:
        names = ", ".join(f"`{n}`" for n in unseen[:8]) + (f" and {len(unseen) - 8} more" if len(unseen) > 8 else "")
        lines.append(f"Not measured: {names}; {note.get('why', '')}.")
    if note.get("outside"):
        lines.append(f"Not measured: {', '.join(note['outside'])} called outside any attention module (a module "
                     "whose class name contains 'Attention' or 'Attn', or nn.MultiheadAttention): tbdiag measures "
                     "attention on the module that computes it.")
    return lines


def summary_markdown(table: schema.LayerTable) -> str:
    """The model summary as a Markdown table (TensorBoard's Text tab renders it)."""
    lines = [
        "| # | layer | type | output shape | params | trainable | MACs (batch) |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, layer in enumerate(table.layers):
        shape = "x".join(str(d) for d in layer.output_shape) if layer.output_shape else "(not run)"
        name = (layer.name or "(model)").replace("|", "\\|")
        lines.append(
            f"| {i} | `{name}` | {layer.type} | {shape} | {layer.params:,} | {layer.trainable_params:,} "
            f"| {_human(layer.macs)} |"
        )
    total = sum(layer.params for layer in table.layers)
    trainable = sum(layer.trainable_params for layer in table.layers)
    macs = sum(layer.macs for layer in table.layers)
    lines.append("")
    lines.append(f"Total parameters: {total:,} ({trainable:,} trainable); multiply-accumulates per batch: {_human(macs)}")
    lines += _attention_lines(table.extra.get("attention"))
    return "\n".join(lines)

