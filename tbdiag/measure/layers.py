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
from .attention import attention_modules
from .modelinfo import type_name

# Modules that are never rows of the layer table: they compute nothing worth
# diagnosing and would only lengthen the table.
_SKIP_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Flatten,
               nn.Unflatten)
# Layers whose output is laid out channels-first ([N, C, ...]): units are channels.
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.modules.pooling._MaxPoolNd,
                   nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd,
                   nn.modules.pooling._AdaptiveMaxPoolNd, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm)
#: Activation modules by type.  LeakyReLU and Hardtanh count only in their rectifier form (`module_kind`).
_MODULE_KINDS = ((nn.ReLU, "relu"), (nn.ReLU6, "relu6"), (nn.GELU, "gelu"), (nn.SiLU, "silu"), (nn.Mish, "mish"),
                 (nn.Hardswish, "hardswish"), (nn.Sigmoid, "sigmoid"), (nn.Tanh, "tanh"))
#: Parameter-free activation modules known by class name, so that Hugging Face's (`transformers.activations`,
#: every rectifier-like entry of its ACT2FN) are recognised without importing transformers.
_MODULE_KINDS_BY_NAME = {
    "GELUActivation": "gelu", "NewGELUActivation": "gelu", "GELUTanh": "gelu", "PytorchGELUTanh": "gelu",
    "FastGELUActivation": "gelu", "AccurateGELUActivation": "gelu", "ClippedGELUActivation": "gelu",
    "QuickGELUActivation": "quick_gelu", "SiLUActivation": "silu", "MishActivation": "mish",
    "ReLUSquaredActivation": "relu2", "SqrtSoftplusActivation": "sqrt_softplus",
}

# fmt: off
#: Rectifier-like activations (the ``dead_relu`` family): kind -> the pre-activation value at or below which a
#: unit is dead.  A unit is dead over a batch when its pre-activation stays at or below this value for every
#: sample (per-unit max <= cutoff), i.e. where the activation's output AND its derivative are negligible, so no
#: gradient reaches the weights that feed it.  Derivation: the largest t such that |f(x)| <= 1e-2 and
#: |f'(x)| <= 1e-2 for every x <= t (1e-2 of the scale both have for x > 0, where f(x) ~ x and f'(x) ~ 1),
#: found in float64 on a 1e-4 grid over [-40, 5] with autograd for f', then rounded down to a tenth:
#: GELU -3.07 (exact) and -3.05 (tanh approximation: NewGELU, FastGELU, GELUTanh) -> -3.1; SiLU/Swish -6.47 ->
#: -6.5; Mish -6.47 -> -6.5; QuickGELU x*sigmoid(1.702x) -3.68 -> -3.7; Hardswish 0 exactly below -3 (its
#: derivative is -0.5 at -3) -> -3.1; sqrt(softplus) -9.21 -> -9.3.  ReLU, ReLU6, LeakyReLU(0), clamp(min=0) and
#: ReLU^2 are exactly 0 with a 0 derivative for x <= 0: cutoff 0, where "pre-activation <= 0" and "output <= 0"
#: are the same test (an in-place ReLU can be judged on its output).  A smooth one is 0 at x = 0 with derivative
#: 0.5, so it is judged on its pre-activation, never on a near-zero output.  tests/test_dead_units.py recomputes
#: each cutoff.
DEAD_BELOW: dict[str, float] = {
    "relu": 0.0, "relu6": 0.0, "leaky_relu": 0.0, "clamp": 0.0, "relu2": 0.0,
    "gelu": -3.1, "silu": -6.5, "mish": -6.5, "quick_gelu": -3.7, "hardswish": -3.1, "sqrt_softplus": -9.3,
}
# fmt: on


def module_kind(module: nn.Module) -> str | None:
    """The activation kind of an activation module (`DEAD_BELOW`'s, "sigmoid" or "tanh"), or None."""
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu" if module.negative_slope == 0 else None  # a leaky slope is never dead
    kind = next((k for t, k in _MODULE_KINDS if isinstance(module, t)), None)
    if kind is None and isinstance(module, nn.Hardtanh) and module.min_val == 0 < module.max_val:
        kind = "clamp"
    if kind is None and not any(True for _ in module.parameters(recurse=False)):
        kind = next((_MODULE_KINDS_BY_NAME[c.__name__] for c in type(module).__mro__
                     if c.__name__ in _MODULE_KINDS_BY_NAME), None)
    return kind


def _activation_kinds() -> dict[Any, str]:
    kinds: dict[Any, str] = {}
    for f in (F.relu, F.relu_, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_):
        kinds[f] = "relu"
    kinds.update({F.relu6: "relu6", F.gelu: "gelu", F.silu: "silu", F.mish: "mish", F.hardswish: "hardswish"})
    # kinds that depend on the call's arguments (`call_kind`): a leaky slope, clamp bounds
    for f in (F.leaky_relu, F.leaky_relu_, torch._C._nn.leaky_relu):
        kinds[f] = "leaky_relu"
    for f in (torch.clamp, torch.clip, torch.Tensor.clamp, torch.Tensor.clamp_, torch.Tensor.clip,
              torch.Tensor.clip_, torch.clamp_min, torch.clamp_min_, torch.Tensor.clamp_min,
              torch.Tensor.clamp_min_, F.hardtanh, F.hardtanh_):
        kinds[f] = "clamp"
    for f in (torch.sigmoid, torch.Tensor.sigmoid, torch.Tensor.sigmoid_, F.sigmoid):
        kinds[f] = "sigmoid"
    for f in (torch.tanh, torch.Tensor.tanh, torch.Tensor.tanh_, F.tanh):
        kinds[f] = "tanh"
    return kinds


#: Activation functions the activation spy recognises, by the function object torch dispatches.
ACTIVATION_KINDS = _activation_kinds()


def _argument(args: tuple, kwargs: dict, position: int, name: str, default: Any) -> Any:
    return args[position] if len(args) > position else kwargs.get(name, default)


def call_kind(kind: str, func: Any, args: tuple, kwargs: dict) -> str | None:
    """The kind of one call of an `ACTIVATION_KINDS` function, None when its arguments make it no activation:
    LeakyReLU with a leaky slope, a clamp that is not ``clamp(min=0)`` (``hardtanh(0, 6)`` is a ReLU6)."""
    if kind == "leaky_relu":
        return kind if _argument(args, kwargs, 1, "negative_slope", 0.01) == 0 else None
    if kind != "clamp":
        return kind
    if func is F.hardtanh or func is F.hardtanh_:
        lo, hi = _argument(args, kwargs, 1, "min_val", -1.0), _argument(args, kwargs, 2, "max_val", 1.0)
        return ("relu6" if hi == 6 else "clamp") if _number(lo) and lo == 0 and _number(hi) and hi > 0 else None
    lo = _argument(args, kwargs, 1, "min", None)
    hi = _argument(args, kwargs, 2, "max", None)
    return "clamp" if _number(lo) and lo == 0 and hi is None else None


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class Layer:
    """One row of the layer table and what the probe needs to know about it."""

    name: str
    module: nn.Module
    params: list[tuple[str, nn.Parameter]]
    channels_first: bool
    is_conv: bool
    info: schema.LayerInfo
    activation_kind: str | None = None  # a `DEAD_BELOW` kind, "sigmoid" or "tanh" for activation modules
    order: int = -1  # first-forward position, fixed at the first logging step
    row: int = -1  # position in the layer table
    hooks: tuple | None = None  # this layer's forward hook and activation pre-hook, made once
    # Learned at the logging steps that tap every layer (`tbdiag.watch.forward_tap`): a rectifier-like module
    # (ReLU, GELU, ...) whose every call takes one layer's output as it is needs no hook of its own; that
    # layer's output, its pre-activation, gives the same dead units (`DEAD_BELOW`).
    relu_after: str | None = None  # the kind of the rectifier-like module that takes this output as it is
    untapped: bool = False  # a rectifier-like module whose dead units come from the layer it follows
    # An in-place op changed this layer's output after its hook, at some logging step: it is measured in
    # its hook, not in the batch at the end of the forward (`StepProbe.flush_outputs`).  Never unlearned.
    output_changes: bool = False
    # An attention module (`tbdiag.measure.attention.attention_modules`): its row holds the attention statistics
    # of its softmax (`tbdiag.watch.attention_tap`); one without parameters of its own measures nothing else.
    attention: bool = False
    attention_hooks: tuple | None = None  # its pre-hook and hook for the attention tap, made once
    output_measured: bool = True  # its output's statistics are measured (not for a parameter-free attention row)

    @property
    def is_activation(self) -> bool:
        return self.activation_kind is not None


def discover(model: nn.Module) -> list[Layer]:
    """The rows of ``model``'s layer table; parameter counts are filled in by `count_params` (lazy modules)."""
    layers = []
    attending = attention_modules(model)
    for name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        leaf = next(iter(module.children()), None) is None
        is_attention = id(module) in attending
        if not own and (module is model or not is_attention and (not leaf or isinstance(module, _SKIP_TYPES))):
            continue
        layers.append(Layer(
            name=name,
            module=module,
            params=own,
            channels_first=isinstance(module, _CHANNELS_FIRST),
            is_conv=isinstance(module, nn.modules.conv._ConvNd),
            activation_kind=module_kind(module),
            info=schema.LayerInfo(name=name, type=type_name(module)),
            row=len(layers),
            attention=is_attention,
            output_measured=bool(own) or not is_attention,
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
