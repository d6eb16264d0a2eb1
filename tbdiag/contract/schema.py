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
    per statistic, 80 bytes per layer per step.  Missing values are NaN.
    At most ``STEPS_PER_TAG`` steps share a tag.  TensorBoard's Python loader
    keeps only 10 samples per tag for a plugin it does not know (its Rust loader
    keeps 100) unless the user passes ``--samples_per_plugin``; giving every ten
    logging steps their own tag means nothing is ever sampled away, for runs of
    any length, under both loaders, with no flags.

``tbdiag/model/<first step of the chunk>``
    One float64 tensor ``[len(MODEL_COLUMNS)]`` per logging step: what is
    measured for the model as a whole (`tbdiag.contract.statistics.MODEL_STATISTICS`:
    the NaN sentinel, mistakes in the training loop), chunked like the health
    tags, its column names in the plugin content.

All these summaries carry ``plugin_name = "tbdiag"`` and ``DATA_CLASS_TENSOR``, since
TensorBoard's data provider hides third-party data left at DATA_CLASS_UNKNOWN.

Versions
--------
``SCHEMA_VERSION`` is stored in the layer table's JSON and in the health tags'
plugin content (``{"version": 1, "columns": [...]}``).  Columns are read by
name, so a reader can always take what it knows from newer data; what it
cannot know is what else changed.  `VersionCheck` lets readers say so, once
per run and version, and go on reading.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2

from .statistics import MODEL_STATISTICS, STATISTICS

PLUGIN_NAME = "tbdiag"
SCHEMA_VERSION = 1

LAYERS_TAG = "tbdiag/layers"
HEALTH_TAG_PREFIX = "tbdiag/health/"
MODEL_TAG_PREFIX = "tbdiag/model/"
STEPS_PER_TAG = 10

#: Per-layer statistics, in the column order of every health tensor.  What
#: each one means, its label and scale are declared once, in
#: `tbdiag.contract.statistics`; rules, report and tab refer to them by name.
COLUMNS: tuple[str, ...] = tuple(s.name for s in STATISTICS)
COLUMN_INDEX: dict[str, int] = {name: i for i, name in enumerate(COLUMNS)}

#: Model-level statistics (`tbdiag.contract.statistics.MODEL_STATISTICS`), in the order of every model tensor.
MODEL_COLUMNS: tuple[str, ...] = tuple(s.name for s in MODEL_STATISTICS)

#: Short human descriptions, shared by the report and the tab.
COLUMN_LABELS: dict[str, str] = {s.name: s.label for s in STATISTICS}


def health_tag(first_step: int) -> str:
    """Tag of the chunk whose first logging step is ``first_step``."""
    return f"{HEALTH_TAG_PREFIX}{first_step:010d}"


def is_health_tag(tag: str) -> bool:
    return tag.startswith(HEALTH_TAG_PREFIX)


def model_tag(first_step: int) -> str:
    """Tag of the model-statistics chunk whose first logging step is ``first_step`` (chunked as health tags)."""
    return f"{MODEL_TAG_PREFIX}{first_step:010d}"


def is_model_tag(tag: str) -> bool:
    return tag.startswith(MODEL_TAG_PREFIX)


#: How people name each activation kind stored in `LayerInfo.activation` (the kinds of
#: `tbdiag.measure.layers.DEAD_BELOW`, "sigmoid" and "tanh"); a kind not listed is shown as it is.
ACTIVATION_NAMES: dict[str, str] = {
    "relu": "ReLU", "relu6": "ReLU6", "leaky_relu": "LeakyReLU(0)", "clamp": "clamp(min=0)", "relu2": "squared ReLU",
    "gelu": "GELU", "silu": "SiLU", "mish": "Mish", "quick_gelu": "QuickGELU", "hardswish": "Hardswish",
    "sqrt_softplus": "sqrt(softplus)", "sigmoid": "sigmoid", "tanh": "tanh",
}


@dataclass
class LayerInfo:
    """One row of the layer table, in model (first forward) order."""

    name: str
    type: str
    params: int = 0
    trainable_params: int = 0
    output_shape: list[int] | None = None
    macs: int = 0
    activation: str = ""  # a kind of `ACTIVATION_NAMES` ("relu", "gelu", "tanh", ...) or "": what consumes the output
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
    version: int | None = SCHEMA_VERSION  # summary format it was written in (None: not stated)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": self.version if self.version is not None else SCHEMA_VERSION,
            "columns": list(self.columns),
            "log_every": self.log_every,
            "has_optimizer": self.has_optimizer,
            "layers": [layer.to_json() for layer in self.layers],
            **self.extra,
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> "LayerTable":
        """Raises ValueError (or KeyError/TypeError from a malformed row) on a table that cannot be read."""
        if not isinstance(obj, Mapping):
            raise ValueError(f"a layer table is a JSON object, got {type(obj).__name__}")
        known = {"version", "columns", "log_every", "has_optimizer", "layers"}
        return cls(
            layers=[LayerInfo.from_json(x) for x in obj.get("layers", [])],
            log_every=int(obj.get("log_every", 0)),
            has_optimizer=bool(obj.get("has_optimizer", False)),
            columns=_column_names(obj.get("columns")) or COLUMNS,
            extra={k: v for k, v in obj.items() if k not in known},
            version=_version(obj.get("version")),
        )


def _column_names(value: Any) -> tuple[str, ...] | None:
    """Column names as stored, or None when the value is not a list of names."""
    if isinstance(value, (list, tuple)) and value and all(isinstance(c, str) for c in value):
        return tuple(value)
    return None


def _version(value: Any) -> int | None:
    """A stored format version, or None when absent or not a whole number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value % 1:
        return None
    return int(value)


def _metadata(description: str, content: bytes) -> summary_pb2.SummaryMetadata:
    return summary_pb2.SummaryMetadata(
        summary_description=description,
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=PLUGIN_NAME, content=content),
        data_class=summary_pb2.DATA_CLASS_TENSOR,
    )


def health_metadata_content(columns: Sequence[str] = COLUMNS, version: int = SCHEMA_VERSION) -> bytes:
    """The plugin content of a health tag: its format version and column names."""
    return json.dumps({"version": version, "columns": list(columns)}).encode()


_HEALTH_METADATA_CONTENT = health_metadata_content()
_MODEL_METADATA_CONTENT = health_metadata_content(MODEL_COLUMNS)


def encode_layers(table: LayerTable) -> summary_pb2.Summary:
    """Summary holding the layer table as one JSON string tensor."""
    obj = table.to_json()
    payload_version = obj["version"]
    payload = json.dumps(obj, allow_nan=False).encode()
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(), string_val=[payload]
    )
    value = summary_pb2.Summary.Value(
        tag=LAYERS_TAG,
        tensor=tensor,
        metadata=_metadata("tbdiag layer table (JSON)", json.dumps({"version": payload_version}).encode()),
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


def encode_model(first_step: int, values: Mapping[str, float], with_metadata: bool = True) -> summary_pb2.Summary:
    """Summary holding one logging step's model-level statistics, ``float64 [len(MODEL_COLUMNS)]``.

    Float64 because some are step numbers (exact beyond float32's 2**24).
    Statistics not measured at this step are NaN.  Metadata as `encode_health`.
    """
    unknown = set(values) - set(MODEL_COLUMNS)
    if unknown:
        raise ValueError(f"unknown model statistics {sorted(unknown)}; known: {', '.join(MODEL_COLUMNS)}")
    row = np.array([values.get(name, np.nan) for name in MODEL_COLUMNS], dtype="<f8")
    tensor = tensor_pb2.TensorProto(
        dtype=types_pb2.DT_DOUBLE,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=row.size)]),
        tensor_content=row.tobytes(),
    )
    value = summary_pb2.Summary.Value(tag=model_tag(first_step), tensor=tensor)
    if with_metadata:
        value.metadata.CopyFrom(_metadata("tbdiag model-level statistics", _MODEL_METADATA_CONTENT))
    return summary_pb2.Summary(value=[value])


def decode_model(row: np.ndarray, columns: Sequence[str]) -> dict[str, float]:
    """A model tensor's values by name, for the statistics this version knows."""
    row = np.asarray(row, dtype=np.float64).reshape(-1)
    return {name: float(row[j]) for j, name in enumerate(columns) if name in MODEL_COLUMNS and j < row.size}


def decode_layers(value: np.ndarray | bytes | str) -> LayerTable:
    """Layer table from the ``tbdiag/layers`` tensor (as a numpy array or raw bytes).

    Raises ValueError when the tensor holds no readable table (not JSON, not an
    object, a malformed row): readers then name rows by position and lose no
    measurement.
    """
    if isinstance(value, np.ndarray):
        value = value.reshape(-1)[0] if value.size else b"{}"
    try:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        return LayerTable.from_json(json.loads(value))
    except (ValueError, KeyError, TypeError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ValueError(f"unreadable tbdiag layer table ({type(e).__name__}: {e})") from e


def _metadata_object(content: bytes) -> Mapping[str, Any]:
    """A health tag's plugin content as a JSON object ({} when empty or garbled)."""
    try:
        obj = json.loads(content.decode("utf-8")) if content else {}
    except (ValueError, UnicodeDecodeError, AttributeError):
        return {}
    return obj if isinstance(obj, Mapping) else {}


def columns_from_metadata(content: bytes, default: tuple[str, ...] = COLUMNS) -> tuple[str, ...]:
    """Column names recorded in a health (or model) tag's plugin content.

    Falls back to today's COLUMNS when the content is missing or garbled (not
    JSON, no ``columns`` list of names): the oldest files carry no content, and
    a garbled one is better read in the only order this version knows.
    """
    return _column_names(_metadata_object(content).get("columns")) or default


def version_from_metadata(content: bytes) -> int | None:
    """The format version recorded in a health tag's plugin content (None when not stated or garbled)."""
    return _version(_metadata_object(content).get("version"))


def align_columns(stats: np.ndarray, columns: Sequence[str]) -> np.ndarray:
    """Reorder a health array written with ``columns`` into today's COLUMNS.

    Columns this version does not know are dropped and columns the writer did
    not record are NaN; so is any column the array is too narrow to hold.
    """
    columns = tuple(columns)
    if columns == COLUMNS and stats.shape[-1] == len(COLUMNS):
        return stats
    out = np.full(stats.shape[:-1] + (len(COLUMNS),), np.nan, dtype=np.float32)
    for j, name in enumerate(columns):
        i = COLUMN_INDEX.get(name)
        if i is not None and j < stats.shape[-1]:
            out[..., i] = stats[..., j]
    return out


class NewerFormatWarning(UserWarning):
    """The data was written in a summary format newer than this tbdiag reads."""


class VersionCheck:
    """Warns once per run and version about data written by a newer tbdiag.

    Such data is still read: columns go by name, so every statistic this
    version knows is there.  The warning says what may be missing (statistics
    it does not know, anything else that changed) and how to get it (upgrade).
    A reader keeps one check for as long as repeating itself would be noise:
    one ``tbdiag report``, one TensorBoard process.
    """

    def __init__(self) -> None:
        self._warned: set[tuple[str, int]] = set()

    def check(self, run: str, version: int | None) -> None:
        if version is None or version <= SCHEMA_VERSION or (run, version) in self._warned:
            return
        self._warned.add((run, version))
        warnings.warn(
            f"tbdiag: run {run!r} was written in summary format {version}, newer than the {SCHEMA_VERSION} this "
            "tbdiag reads; showing the statistics it knows (upgrade tbdiag to read everything)",
            NewerFormatWarning,
            stacklevel=2,
        )
