"""The tbdiag summary contract: the one module that joins writer and readers.

The writer (`tbdiag.writer`) encodes per-layer health statistics with these
functions; the report command and the TensorBoard plugin decode them with the
same functions.  Nothing else in the project knows the byte layout.

Layout
------
``tbdiag/layers``
    A scalar string tensor holding JSON: the layer table (name, type, parameter
    counts, output shape, multiply-accumulates, the activation that consumes
    the layer's output) plus run facts (``log_every``, whether an optimizer is
    watched).  Rewritten when the layer list grows; readers take the latest.
    The layer list is append-only, so row ``i`` of every health tensor always
    means layer ``i``.

``tbdiag/health/<first step of the chunk>``
    One float32 tensor ``[n_layers, len(COLUMNS)]`` per logging step: 4 bytes
    per statistic, about 60 bytes per layer per step.  Missing values are NaN.
    At most ``STEPS_PER_TAG`` steps share a tag.  TensorBoard's Python loader
    keeps only 10 samples per tag for a plugin it does not know (its Rust loader
    keeps 100) unless the user passes ``--samples_per_plugin``; giving every ten
    logging steps their own tag means nothing is ever sampled away, for runs of
    any length, under both loaders, with no flags.

Both summaries carry ``plugin_name = "tbdiag"`` and ``DATA_CLASS_TENSOR``, since
TensorBoard's data provider hides third-party data left at DATA_CLASS_UNKNOWN.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

PLUGIN_NAME = "tbdiag"
SCHEMA_VERSION = 1

LAYERS_TAG = "tbdiag/layers"
HEALTH_TAG_PREFIX = "tbdiag/health/"
STEPS_PER_TAG = 10

#: Per-layer statistics, in the column order of every health tensor.  Units
#: and meaning are spelled out here once; rules, report and tab refer to them
#: by name.
COLUMNS: tuple[str, ...] = (
    "act_mean",  # mean of the layer's output over the batch
    "act_std",  # standard deviation of the layer's output
    "act_nonfinite",  # count of NaN/Inf elements in the output
    "dead_frac",  # fraction of units (channels / features) a ReLU never fired for over the batch; NaN if no ReLU consumes the output
    "saturated_frac",  # fraction of sigmoid/tanh outputs within 1% of their bounds; NaN if none consumes the output
    "grad_norm",  # L2 norm of the gradients of the layer's own parameters
    "grad_rms",  # grad_norm / sqrt(number of gradient elements)
    "grad_nonfinite",  # count of NaN/Inf gradient elements
    "weight_norm",  # L2 norm of the layer's own parameters
    "weight_nonfinite",  # count of NaN/Inf parameter elements
    "update_ratio",  # ||w_after - w_before|| / ||w_after|| over the optimizer step (needs optimizer=)
    "changed",  # fraction of the layer's gradient-receiving parameter tensors that changed since the previous logging step
    "grad_params",  # number of the layer's parameter tensors that received a gradient this step
    "dead_persist_frac",  # fraction of units that fired neither in this batch nor in the two previous logged ones
)
COLUMN_INDEX: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}

#: Short human descriptions, shared by the report and the tab.
COLUMN_LABELS: dict[str, str] = {
    "act_mean": "activation mean",
    "act_std": "activation std",
    "act_nonfinite": "NaN/Inf in activations",
    "dead_frac": "dead ReLU units",
    "saturated_frac": "saturated sigmoid/tanh outputs",
    "grad_norm": "gradient L2 norm",
    "grad_rms": "gradient RMS",
    "grad_nonfinite": "NaN/Inf in gradients",
    "weight_norm": "weight L2 norm",
    "weight_nonfinite": "NaN/Inf in weights",
    "update_ratio": "update / weight ratio",
    "changed": "parameters changed since last log",
    "grad_params": "parameter tensors with gradients",
    "dead_persist_frac": "ReLU units dead for 3 logged batches",
}


def health_tag(first_step: int) -> str:
    """Tag of the chunk whose first logging step is ``first_step``."""
    return f"{HEALTH_TAG_PREFIX}{first_step:010d}"


def is_health_tag(tag: str) -> bool:
    return tag.startswith(HEALTH_TAG_PREFIX)


@dataclass
class LayerInfo:
    """One row of the layer table, in model (first forward) order."""

    name: str
    type: str
    params: int = 0
    trainable_params: int = 0
    output_shape: list[int] | None = None
    macs: int = 0
    activation: str = ""  # "relu", "sigmoid", "tanh" or "" — what consumes the output
    in_optimizer: bool | None = None  # whether its trainable parameters are in the watched optimizer

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "params": self.params,
            "trainable_params": self.trainable_params,
            "output_shape": self.output_shape,
            "macs": self.macs,
            "activation": self.activation,
            "in_optimizer": self.in_optimizer,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "LayerInfo":
        return cls(
            name=str(obj["name"]),
            type=str(obj.get("type", "")),
            params=int(obj.get("params", 0)),
            trainable_params=int(obj.get("trainable_params", 0)),
            output_shape=obj.get("output_shape"),
            macs=int(obj.get("macs", 0)),
            activation=str(obj.get("activation", "")),
            in_optimizer=obj.get("in_optimizer"),
        )


@dataclass
class LayerTable:
    layers: list[LayerInfo]
    log_every: int = 0
    has_optimizer: bool = False
    columns: tuple[str, ...] = COLUMNS
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": SCHEMA_VERSION,
            "columns": list(self.columns),
            "log_every": self.log_every,
            "has_optimizer": self.has_optimizer,
            "layers": [layer.to_json() for layer in self.layers],
            **self.extra,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "LayerTable":
        known = {"version", "columns", "log_every", "has_optimizer", "layers"}
        return cls(
            layers=[LayerInfo.from_json(x) for x in obj.get("layers", [])],
            log_every=int(obj.get("log_every", 0)),
            has_optimizer=bool(obj.get("has_optimizer", False)),
            columns=tuple(obj.get("columns", COLUMNS)),
            extra={k: v for k, v in obj.items() if k not in known},
        )


def _metadata(description: str, content: bytes) -> summary_pb2.SummaryMetadata:
    return summary_pb2.SummaryMetadata(
        summary_description=description,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def _health_content(columns: Sequence[str]) -> bytes:
    return json.dumps({"version": SCHEMA_VERSION, "columns": list(columns)}).encode()


_HEALTH_METADATA_CONTENT = _health_content(COLUMNS)


def encode_layers(table: LayerTable) -> summary_pb2.Summary:
    """Summary holding the layer table as one JSON string tensor."""
    payload = json.dumps(table.to_json(), allow_nan=False).encode()
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(), string_val=[payload]
    )
    value = summary_pb2.Summary.Value(
        tag=LAYERS_TAG,
        tensor=tensor,
        metadata=_metadata("tbdiag layer table (JSON)", json.dumps({"version": SCHEMA_VERSION}).encode()),
    )
    return summary_pb2.Summary(value=[value])


def encode_health(first_step: int, stats: np.ndarray, with_metadata: bool = True) -> summary_pb2.Summary:
    """Summary holding one logging step's ``[n_layers, len(COLUMNS)]`` float32 statistics.

    TensorBoard's loaders keep the metadata of a tag's first value only (as
    TensorFlow's own writer does, which strips it from the rest), so a writer
    may pass ``with_metadata=False`` for every later value of the same tag in
    the same file: about 270 bytes less per logging step.
    """
    stats = np.ascontiguousarray(stats, dtype="<f4")
    if stats.ndim != 2 or stats.shape[1] != len(COLUMNS):
        raise ValueError(f"health statistics must have shape [layers, {len(COLUMNS)}], got {stats.shape}")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in stats.shape]
        ),
        tensor_content=stats.tobytes(),
    )
    value = summary_pb2.Summary.Value(tag=health_tag(first_step), tensor=tensor)
    if with_metadata:
        value.metadata.CopyFrom(_metadata("tbdiag per-layer health statistics", _HEALTH_METADATA_CONTENT))
    return summary_pb2.Summary(value=[value])


def decode_layers(value: np.ndarray | bytes | str) -> LayerTable:
    """Layer table from the ``tbdiag/layers`` tensor (as a numpy array or raw bytes)."""
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b"{}"
    if isinstance(value, bytes):
        value = value.decode("utf-8")
    return LayerTable.from_json(json.loads(value))


def columns_from_metadata(content: bytes) -> tuple[str, ...]:
    """Column names recorded in a health tag's plugin content (falls back to the current ones)."""
    if not content:
        return COLUMNS
    try:
        return tuple(json.loads(content.decode("utf-8"))["columns"])
    except (ValueError, KeyError, UnicodeDecodeError):
        return COLUMNS


def align_columns(stats: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """Reorder a health array written with ``columns`` into today's COLUMNS (missing ones NaN)."""
    columns = tuple(columns)
    if columns == COLUMNS:
        return stats
    out = np.full(stats.shape[:-1] + (len(COLUMNS),), np.nan, dtype=np.float32)
    for j, name in enumerate(columns):
        i = COLUMN_INDEX.get(name)
        if i is not None and j < stats.shape[-1]:
            out[..., i] = stats[..., j]
    return out
