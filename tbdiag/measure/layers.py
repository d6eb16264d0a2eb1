"""What the model is: its layers (the rows of the layer table), their parameters and activations.

A layer is a module with parameters of its own, or a leaf module that
computes something worth diagnosing (pooling, activations); containers,
dropout and reshapes are not rows.  Rows start in ``named_modules()`` order
and are put in first-forward order once, at the first logging step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parameter import is_lazy
from torch.nn.utils.rnn import PackedSequence

from ..contract import schema
from .modelinfo import type_name

# Modules that are never rows of the layer table: they compute nothing worth
# diagnosing and would only lengthen the table.
_SKIP_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
               nn.Unflatten)
# Layers whose output is laid out channels-first ([N, C, ...]): units are channels.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
_MODULE_KINDS = ((nn.ReLU, "relu"), (nn.ReLU6, "relu"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"))


def _activation_kinds() -> dict[Any, str]:
    kinds: dict[Any, str] = {}
    for f in (F.relu, F.relu_, F.relu6, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        kinds[f] = "relu"
    for f in (torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid):
        kinds[f] = "sigmoid"
    for f in (torch.tanh, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh):
        kinds[f] = "tanh"
    return kinds


#: Activation functions the activation spy recognises, by the function object torch dispatches.
ACTIVATION_KINDS = _activation_kinds()


@dataclass
class Layer:
    """One row of the layer table and what the probe needs to know about it."""

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]
    channels_first: bool
    is_conv: bool
    info: schema.LayerInfo
    activation_kind: str | None = None  # "relu", "sigmoid" or "tanh" for activation modules
    order: int = -1  # first-forward position, fixed at the first logging step
    row: int = -1  # position in the layer table
    hooks: tuple | None = None  # this layer's forward hook and activation pre-hook, made once
    # Learned at the logging steps that tap every layer (`tbdiag.watch.forward_tap`): a ReLU module whose every
    # call takes one layer's output as it is needs no hook of its own; that layer's output gives the
    # same dead units (relu(x) <= 0 exactly where x <= 0).
    relu_after: bool = False  # a ReLU module takes this layer's output as it is
    untapped: bool = False  # a ReLU module whose dead units come from the layer it follows
    # An in-place op changed this layer's output after its hook, at some logging step: it is measured in
    # its hook, not in the batch at the end of the forward (`StepProbe.flush_outputs`).  Never unlearned.
    output_changes: bool = False

    @property
    def is_activation(self) -> bool:
        return self.activation_kind is not None


def discover(model: nn.Module) -> list[Layer]:
    """The rows of ``model``'s layer table; parameter counts are filled in by `count_params` (lazy modules)."""
    layers = []
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        leaf = next(iter(module.children()), None) is None
        if not own and (not leaf or isinstance(module, _SKIP_TYPES) or module is model):
            continue
        layers.append(Layer(
            name=name,
            module=module,
            params=own,
            channels_first=isinstance(module, _CHANNELS_FIRST),
            is_conv=isinstance(module, nn.modules.conv._ConvNd),
            activation_kind=next((k for t, k in _MODULE_KINDS if isinstance(module, t)), None),
            info=schema.LayerInfo(name=name, type=type_name(module)),
            row=len(layers),
        ))
    return layers


def first_forward_order(layers: list[Layer]) -> tuple[list[Layer], list[int]]:
    """The layers in first-forward order (unseen ones last), and each old row's new row."""
    executed = sorted((layer for layer in layers if layer.order >= 0), key=lambda layer: layer.order)
    new_order = executed + [layer for layer in layers if layer.order < 0]
    position = {id(layer): row for row, layer in enumerate(new_order)}
    old_to_new = [position[id(layer)] for layer in layers]
    for row, layer in enumerate(new_order):
        layer.row = row
    return new_order, old_to_new


def param_index(layers: list[Layer]) -> list[tuple[int, nn.Parameter, str]]:
    """(row, parameter, tag name) of every parameter that has values: not lazy, not on the meta device."""
    return [(row, p, f"{layer.name}.{pname}" if layer.name else pname)
            for row, layer in enumerate(layers) for pname, p in layer.params
            if not is_lazy(p) and not p.is_meta]


def has_lazy(layers: list[Layer]) -> bool:
    """Whether some parameter is still uninitialised (a lazy module that has not run yet)."""
    return any(is_lazy(p) for layer in layers for _, p in layer.params)


def count_params(layers: list[Layer]) -> None:
    """Fill in the table's parameter counts; lazy modules have their shapes after their first forward."""
    for layer in layers:
        counted = [p for _, p in layer.params if not is_lazy(p)]
        layer.info.params = sum(p.numel() for p in counted)
        layer.info.trainable_params = sum(p.numel() for p in counted if p.requires_grad)


def model_output(output: Any) -> torch.Tensor | None:
    """The tensor that stands for a model's prediction: ``output.logits`` when it has one (Hugging Face), else
    the first tensor of the output."""
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return first_tensor(output)


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
