"""The summary contract on its own: statistics table, encoders, decoders, versions, bad metadata.

Event files here are written by TensorBoard's own event file writer and read
back by TensorBoard's own loaders (`EventFileLoader`, the plugin event
accumulator, the data provider), so the contract is checked against what
TensorBoard really stores, not against our encoder's idea of it.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import warnings

import numpy as np
import plugin_helpers as h
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.compat.proto import event_pb2, summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter
from tensorboard.util import tensor_util

from tbdiag.contract import schema, statistics
from tbdiag.read.reader import load_logdir

#: The column order of every event file written so far.  New statistics may be
#: appended; these positions never change.
WRITTEN_COLUMNS = (
    "act_mean", "act_std", "act_nonfinite", "dead_frac", "saturated_frac", "grad_norm", "grad_rms",
    "grad_nonfinite", "weight_norm", "weight_nonfinite", "update_ratio", "changed", "grad_params",
    "dead_persist_frac",
)


# ------------------------------------------------------------ the statistics


def test_columns_derive_from_the_statistics_table_in_the_written_order():
    assert schema.COLUMNS[: len(WRITTEN_COLUMNS)] == WRITTEN_COLUMNS
    assert schema.COLUMNS == tuple(s.name for s in statistics.STATISTICS)
    assert schema.COLUMN_INDEX == {name: i for i, name in enumerate(schema.COLUMNS)}
    assert schema.COLUMN_LABELS == {s.name: s.label for s in statistics.STATISTICS}
    assert statistics.KEY_STATS == ("grad_rms", "update_ratio", "dead_frac", "saturated_frac", "act_std")


def test_every_statistic_is_fully_described():
    for s in statistics.STATISTICS:
        assert s.meaning and s.label and s.short, s.name
        assert s.scale in statistics.SCALES and s.chart in statistics.CHARTS, s.name
    positions = sorted(s.key_column for s in statistics.STATISTICS if s.key_column is not None)
    assert positions == list(range(len(positions))), "key columns are numbered 0, 1, 2, ... without gaps"
    assert statistics.DEFAULT_HEATMAP in statistics.BY_NAME


def test_a_statistic_unknown_to_this_version_gets_defaults_from_its_name():
    new = statistics.statistic("attention_entropy_frac")
    assert (new.label, new.short, new.scale, new.chart, new.key_column) == (
        "attention_entropy_frac", "attention_entropy_frac", "fraction", "always", None)
    assert statistics.scale_of("token_count") == "linear"
    assert statistics.scale_of("grad_rms") == "log" and statistics.scale_of("dead_persist_frac") == "fraction"


# ------------------------------------------------- round trip through TensorBoard


def _write_events(run_dir: str, summaries: list[tuple[int, summary_pb2.Summary]]) -> str:
    """Write summaries with TensorBoard's own event file writer; returns the event file."""
    os.makedirs(run_dir, exist_ok=True)
    writer = EventFileWriter(run_dir)
    for step, summary in summaries:
        writer.add_event(event_pb2.Event(step=step, wall_time=time.time(), summary=summary))
    writer.close()
    (path,) = glob.glob(os.path.join(run_dir, "events.out.tfevents.*"))
    return path


def _table(n: int = 3, **kw) -> schema.LayerTable:
    return schema.LayerTable(
        layers=[schema.LayerInfo(name=f"block{i}.fc", type="Linear", params=10 + i, trainable_params=10 + i,
                                 output_shape=[8, 4], macs=320, activation="relu", in_optimizer=True)
                for i in range(n)],
        log_every=5, has_optimizer=True, **kw,
    )


def _stats(step: int, n: int = 3) -> np.ndarray:
    stats = np.arange(n * len(schema.COLUMNS), dtype=np.float32).reshape(n, -1) + step
    stats[0, schema.COLUMN_INDEX["saturated_frac"]] = np.nan
    stats[1, schema.COLUMN_INDEX["grad_norm"]] = np.inf
    stats[2, schema.COLUMN_INDEX["grad_rms"]] = -np.inf
    return stats


def test_round_trip_through_tensorboards_loaders(tmp_path):
    table = _table(extra={"loss_tags": ["train/loss"]})
    steps = list(range(0, 60, 5))  # 12 logged steps: two health tags
    summaries = [(0, schema.encode_layers(table))]
    for i, step in enumerate(steps):
        first = steps[i - i % schema.STEPS_PER_TAG]
        summaries.append((step, schema.encode_health(first, _stats(step), with_metadata=i % schema.STEPS_PER_TAG == 0)))
    path = _write_events(str(tmp_path / "run"), summaries)

    # the raw records: one value per event, bytes and metadata as encoded
    events = [e for e in event_file_loader.EventFileLoader(path).Load() if e.HasField("summary")]
    assert [e.step for e in events] == [0] + steps
    layers_value = events[0].summary.value[0]
    assert layers_value.tag == schema.LAYERS_TAG
    assert layers_value.metadata.plugin_data.plugin_name == schema.PLUGIN_NAME
    assert json.loads(layers_value.metadata.plugin_data.content) == {"version": schema.SCHEMA_VERSION}
    first_health = events[1].summary.value[0]
    assert first_health.metadata.data_class == summary_pb2.DATA_CLASS_TENSOR
    assert schema.columns_from_metadata(first_health.metadata.plugin_data.content) == schema.COLUMNS
    assert schema.version_from_metadata(first_health.metadata.plugin_data.content) == schema.SCHEMA_VERSION
    assert not events[2].summary.value[0].HasField("metadata"), "later values of a tag carry no metadata"

    # through the accumulator TensorBoard's Python loader uses, then our decoders
    acc = pea.EventAccumulator(str(tmp_path / "run"), tensor_size_guidance={schema.PLUGIN_NAME: 0})
    acc.Reload()
    content = acc.PluginTagToContent(schema.PLUGIN_NAME)
    health_tags = sorted(t for t in content if schema.is_health_tag(t))
    assert health_tags == [schema.health_tag(0), schema.health_tag(50)]
    decoded = schema.decode_layers(tensor_util.make_ndarray(acc.Tensors(schema.LAYERS_TAG)[-1].tensor_proto))
    assert decoded.to_json() == table.to_json() and decoded.version == schema.SCHEMA_VERSION
    assert decoded.extra == {"loss_tags": ["train/loss"]} and decoded.layers[1] == table.layers[1]
    got = {}
    for tag in health_tags:
        columns = schema.columns_from_metadata(content[tag])
        for event in acc.Tensors(tag):
            got[event.step] = schema.align_columns(tensor_util.make_ndarray(event.tensor_proto), columns)
    assert sorted(got) == steps
    for step in steps:
        np.testing.assert_array_equal(got[step], _stats(step))  # NaN, +Inf, -Inf included, bit for bit


def test_encode_health_rejects_a_wrong_width():
    with pytest.raises(ValueError, match="shape"):
        schema.encode_health(0, np.zeros((2, len(schema.COLUMNS) + 1), np.float32))


# ------------------------------------------------------------- column alignment


def test_align_reordered_missing_and_extra_columns():
    known = ["grad_rms", "act_mean", "dead_frac"]
    written = ["future_stat", *reversed(known)]  # an unknown column first, the known ones reordered
    stats = np.array([[9.0, 3.0, 2.0, 1.0], [9.5, 30.0, 20.0, 10.0]], np.float32)
    out = schema.align_columns(stats, written)
    assert out.shape == (2, len(schema.COLUMNS))
    np.testing.assert_array_equal(out[:, schema.COLUMN_INDEX["grad_rms"]], [1.0, 10.0])
    np.testing.assert_array_equal(out[:, schema.COLUMN_INDEX["act_mean"]], [2.0, 20.0])
    np.testing.assert_array_equal(out[:, schema.COLUMN_INDEX["dead_frac"]], [3.0, 30.0])
    missing = [c for c in schema.COLUMNS if c not in known]
    assert np.isnan(out[:, [schema.COLUMN_INDEX[c] for c in missing]]).all(), "columns not written are NaN"


def test_align_keeps_todays_layout_and_survives_width_mismatches():
    stats = np.random.default_rng(0).random((4, len(schema.COLUMNS))).astype(np.float32)
    assert schema.align_columns(stats, schema.COLUMNS) is stats  # the common case costs nothing
    narrow = stats[:, :5]  # metadata says today's columns, the array holds fewer
    out = schema.align_columns(narrow, schema.COLUMNS)
    np.testing.assert_array_equal(out[:, :5], narrow)
    assert np.isnan(out[:, 5:]).all()
    wide = np.concatenate([stats, np.ones((4, 2), np.float32)], axis=1)  # more values than names
    np.testing.assert_array_equal(schema.align_columns(wide, schema.COLUMNS), stats)
    stacked = np.stack([stats, stats])  # [steps, layers, columns]
    out = schema.align_columns(stacked[..., ::-1], schema.COLUMNS[::-1])
    np.testing.assert_array_equal(out, stacked)


GARBAGE = [
    b"",
    b"not json",
    b"\xff\xfe\x00",
    b"null",
    b"[1, 2, 3]",
    b'"columns"',
    b'{"version": 1}',
    b'{"columns": 5}',
    b'{"columns": "act_mean"}',
    b'{"columns": [1, 2]}',
    b'{"columns": []}',
    b'{"columns": {"act_mean": 0}}',
    b'{"columns": ["act_mean", null]}',
]


@pytest.mark.parametrize("content", GARBAGE)
def test_garbage_metadata_falls_back_to_todays_columns(content):
    assert schema.columns_from_metadata(content) == schema.COLUMNS


@pytest.mark.parametrize("content, version", [
    (b"", None), (b"not json", None), (b"[2]", None), (b'{"columns": ["act_mean"]}', None),
    (b'{"version": "2"}', None), (b'{"version": true}', None), (b'{"version": 2.5}', None),
    (b'{"version": null}', None), (b'{"version": 2.0}', 2), (b'{"version": 7}', 7),
])
def test_version_from_metadata(content, version):
    assert schema.version_from_metadata(content) == version


@pytest.mark.parametrize("payload", [b"not json", b"[1]", b'"x"', b'{"layers": [{"type": "Linear"}]}',
                                     b'{"layers": 5}', b'{"layers": [{"name": "a", "params": "many"}]}', b"\xff"])
def test_an_unreadable_layer_table_is_a_value_error(payload):
    with pytest.raises(ValueError):
        schema.decode_layers(payload)


def test_a_layer_table_with_odd_fields_still_reads():
    table = schema.decode_layers(json.dumps({
        "layers": [{"name": "fc"}], "columns": 7, "version": "two", "future_fact": {"x": 1},
    }).encode())
    assert [layer.name for layer in table.layers] == ["fc"]
    assert table.columns == schema.COLUMNS and table.version is None and table.extra == {"future_fact": {"x": 1}}
    assert schema.decode_layers(np.array([], dtype=object)).layers == []


def test_garbage_metadata_and_table_in_an_event_file_still_read(tmp_path):
    bad_table = summary_pb2.Summary(value=[summary_pb2.Summary.Value(
        tag=schema.LAYERS_TAG,
        tensor=tensor_pb2.TensorProto(dtype=types_pb2.DT_STRING, tensor_shape=tensor_shape_pb2.TensorShapeProto(),
                                      string_val=[b"{not json"]),
        metadata=summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=schema.PLUGIN_NAME, content=b"?"),
            data_class=summary_pb2.DATA_CLASS_TENSOR),
    )])
    health = []
    for step in range(3):
        summary = schema.encode_health(0, _stats(step))
        summary.value[0].metadata.plugin_data.content = b'{"columns": 5, "version": "x"}'
        health.append((step, summary))
    _write_events(str(tmp_path / "odd"), [(0, bad_table), *health])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (run,) = load_logdir(str(tmp_path))
    assert run.layer_names == ["layer0", "layer1", "layer2"], "rows named by position, none lost"
    np.testing.assert_array_equal(run.stats[2], _stats(2))
    assert [str(w.message) for w in caught if "layer table" in str(w.message)], [str(w.message) for w in caught]
    assert not [w for w in caught if issubclass(w.category, schema.NewerFormatWarning)]


# ------------------------------------------------------------------ versions


NEWER = schema.SCHEMA_VERSION + 1


def _newer_health(first_step: int, step: int, with_metadata: bool) -> summary_pb2.Summary:
    """A health value as a newer tbdiag might write it: an extra column first, the others reversed."""
    columns = ("future_stat", *reversed(schema.COLUMNS))
    values = np.concatenate([np.full((3, 1), 42.0, np.float32), _stats(step)[:, ::-1]], axis=1)
    value = summary_pb2.Summary.Value(tag=schema.health_tag(first_step), tensor=tensor_pb2.TensorProto(
        dtype=types_pb2.DT_FLOAT,
        tensor_shape=tensor_shape_pb2.TensorShapeProto(
            dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in values.shape]),
        tensor_content=values.astype("<f4").tobytes(),
    ))
    if with_metadata:
        value.metadata.CopyFrom(summary_pb2.SummaryMetadata(
            plugin_data=summary_pb2.SummaryMetadata.PluginData(
                plugin_name=schema.PLUGIN_NAME, content=schema.health_metadata_content(columns, version=NEWER)),
            data_class=summary_pb2.DATA_CLASS_TENSOR,
        ))
    return summary_pb2.Summary(value=[value])


@pytest.fixture(scope="module")
def newer_logdir(tmp_path_factory):
    """Two runs written by a 'newer tbdiag' (bumped version), 25 logged steps each: three health tags."""
    root = tmp_path_factory.mktemp("newer")
    for run in ("future_a", "future_b"):
        summaries = [(0, schema.encode_layers(_table(version=NEWER, extra={"future_fact": True})))]
        for t in range(25):
            first = t - t % schema.STEPS_PER_TAG
            summaries.append((t, _newer_health(first, t, with_metadata=t == first)))
        _write_events(str(root / run), summaries)
    return str(root)


def _newer_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if issubclass(w.category, schema.NewerFormatWarning)]


def test_report_reads_newer_data_and_warns_once_per_run(newer_logdir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runs = load_logdir(newer_logdir)
    said = _newer_warnings(caught)
    assert len(said) == 2, said  # one per run, although the table and three tags all say so
    assert all(f"format {NEWER}" in m and "upgrade tbdiag" in m for m in said)
    assert {"'future_a'", "'future_b'"} == {m.split("run ")[1].split(" ")[0] for m in said}
    for run in runs:  # everything this version knows is read, by name
        assert run.steps.tolist() == list(range(25)) and run.table.version == NEWER
        for t in (0, 13, 24):
            np.testing.assert_array_equal(run.stats[t], _stats(t))


def test_report_command_prints_the_warning_once(newer_logdir):
    proc = subprocess.run([sys.executable, "-m", "tbdiag", "report", newer_logdir], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("newer than") == 2, proc.stderr


def test_plugin_reads_newer_data_and_warns_once_per_run(newer_logdir):
    from tensorboard import context

    from tb_plugin.run_source import RunSource

    _, ingester = h.wsgi_app(newer_logdir)
    source = RunSource(ingester.data_provider)
    ctx = context.RequestContext()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            view = source.view(ctx, "", "future_a")
        source.view(ctx, "", "future_b", {"dead_relu": 0.9})
    said = _newer_warnings(caught)
    assert len(said) == 2 and "'future_a'" in said[0] and "'future_b'" in said[1], said
    np.testing.assert_array_equal(view.data.stats[7], _stats(7))


def test_version_check_stays_quiet_for_this_version_and_unknown_ones():
    check = schema.VersionCheck()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for version in (None, 0, schema.SCHEMA_VERSION):
            check.check("run", version)
        check.check("run", NEWER)
        check.check("run", NEWER)
        check.check("run", NEWER + 1)  # a different newer version is worth saying again
    assert len(_newer_warnings(caught)) == 2


def test_model_statistics_round_trip_through_both_readers(tmp_path):
    """Model-level values written by the DiagnosticWriter (two chunks, NaN where unmeasured, a step number
    beyond float32's exact range) read back by name through the report's reader and the plugin's source."""
    from tensorboard import context

    from tb_plugin.run_source import RunSource
    from tbdiag import DiagnosticWriter
    from tbdiag.summary.assembly import StepRecord

    logdir = str(tmp_path)
    writer = DiagnosticWriter(os.path.join(logdir, "run"))
    writer.write_layer_table(_table())
    steps = list(range(0, 120, 10))  # 12 logging steps: two chunks
    big = 2**25 + 1  # not exact in float32
    for step in steps:
        model = {"eval_mode_steps": float(step // 10), "nonfinite_step": float(big) if step >= 60 else float("nan")}
        writer.write_step(StepRecord(step, _stats(step), model=model))
    writer.close()

    (run,) = load_logdir(logdir)
    s, v = run.model_series("eval_mode_steps")
    assert s.tolist() == steps and v.tolist() == [float(x // 10) for x in steps]
    s, v = run.model_series("nonfinite_step")
    assert s.tolist() == steps[6:] and set(v.tolist()) == {float(big)}, "NaN means unmeasured; steps stay exact"
    assert run.model_series("softmax_output")[0].size == 0

    _, ingester = h.wsgi_app(logdir)
    view = RunSource(ingester.data_provider).view(context.RequestContext(), "", "run")
    for name in ("eval_mode_steps", "nonfinite_step"):
        for got, want in zip(view.data.model_series(name), run.model_series(name)):
            np.testing.assert_array_equal(got, want)


def test_encode_model_rejects_an_unknown_statistic():
    with pytest.raises(ValueError, match="unknown model statistics.*known: nonfinite_step"):
        schema.encode_model(0, {"typo": 1.0})
