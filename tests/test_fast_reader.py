"""The report's own event reader (`tbdiag.read.events`) gives exactly what TensorBoard's loader gives.

Each logdir is read twice -- by the fast path and by TensorBoard's
`EventMultiplexer` -- and every part of every `RunData` is compared: the layer
table, every statistic at every step (NaN where NaN), losses, model-level
series, throughput, evaluations, and the findings.  The logdirs are real
training runs, plus the awkward cases: a corrupt file, a file still being
written, a resumed run, nested runs, and TensorFlow session restarts (which the
fast path hands back to TensorBoard's loader).
"""

from __future__ import annotations

import os
import shutil
import struct
import warnings

import numpy as np
import plugin_helpers as h
import pytest
import scenarios
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.contract import records
from tbdiag.read import events, reader
from tbdiag.rules import evaluator


def _same_series(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert np.array_equal(a[key][0], b[key][0]), key
        assert np.array_equal(a[key][1], b[key][1], equal_nan=True), key


def assert_same_runs(logdir: str) -> list:
    with warnings.catch_warnings(record=True) as fast_warnings:
        warnings.simplefilter("always")
        fast = reader._load_local(logdir, None)
    with warnings.catch_warnings(record=True) as tb_warnings:
        warnings.simplefilter("always")
        slow = reader._load_with_tensorboard(logdir, None)
    assert [r.name for r in fast] == [r.name for r in slow]
    for a, b in zip(fast, slow):
        assert a.table.to_json() == b.table.to_json(), a.name
        assert np.array_equal(a.steps, b.steps), a.name
        assert np.array_equal(a.stats, b.stats, equal_nan=True), a.name
        _same_series(a.losses, b.losses)
        _same_series(a.model, b.model)
        _same_series(a.perf, b.perf)
        assert sorted(a.evaluations) == sorted(b.evaluations)
        for tag in a.evaluations:
            assert [(e.step, e.class_names) for e in a.evaluations[tag]] == \
                   [(e.step, e.class_names) for e in b.evaluations[tag]]
            assert all(np.array_equal(x.counts, y.counts) for x, y in zip(a.evaluations[tag], b.evaluations[tag]))
        assert [f.to_json() for f in evaluator.evaluate(a)] == [f.to_json() for f in evaluator.evaluate(b)], a.name
    corrupt = lambda ws: sorted(str(w.message).split(":")[0] for w in ws if "corrupt" in str(w.message))  # noqa
    assert corrupt(fast_warnings) == corrupt(tb_warnings)
    return fast


def test_every_scenario_reads_the_same(scenario_logdir):
    runs = assert_same_runs(scenario_logdir)
    assert len(runs) >= 10


def test_runs_with_evaluations_histograms_images_and_scalars_read_the_same(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    writer = DiagnosticWriter(str(tmp_path / "nested" / "run"))
    writer.watch(model, opt, log_every=2, images_every=2, histograms_every=2)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 3, (16,))
    for step in range(8):
        out = model(x)
        loss = F.cross_entropy(out, y)
        opt.zero_grad(); loss.backward(); opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
        writer.add_scalar("val/loss", loss.item() * 1.1, step)
        writer.add_scalar("other/metric", 0.5, step)
        if step % 4 == 3:
            writer.add_evaluation("val", y, out.detach(), global_step=step, class_names=["a", "b", "c"])
    writer.close()
    (run,) = assert_same_runs(str(tmp_path))
    assert run.name == os.path.join("nested", "run") and run.evaluations and "val/loss" in run.losses


def test_a_resumed_run_and_two_files_read_the_same(tmp_path):
    """A run resumed from a checkpoint rewrites steps 4.. into a second event file of the same directory."""
    for start in (0, 4):
        torch.manual_seed(start)
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        writer = DiagnosticWriter(str(tmp_path / "run"))
        writer.watch(model, opt, log_every=2)
        for _ in range(start):
            opt.step()  # the step counter follows the optimizer: resume at `start`
        x, y = scenarios.teacher_data(32, (6,), classes=2)
        for step in range(start, start + 8):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
            writer.add_scalar("train/loss", loss.item(), step)
        writer.close()
    assert len(os.listdir(tmp_path / "run")) == 2
    assert_same_runs(str(tmp_path))


@pytest.fixture
def trained_copy(tmp_path_factory, tmp_path):
    logdir = h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir)
    copy = tmp_path / "logdir"
    shutil.copytree(logdir, copy, ignore=shutil.ignore_patterns(".complete"))
    return copy


def _event_file(run_dir) -> str:
    (name,) = [f for f in os.listdir(run_dir) if "tfevents" in f]
    return os.path.join(run_dir, name)


def _record_offsets(path: str) -> list[int]:
    return [at for _, _, at in events._records(path)]


@pytest.mark.skipif(not records.available(), reason="TensorBoard's loader and ours agree on data CRCs with a C CRC")
def test_a_corrupt_record_ends_its_file_with_a_warning_in_both_readers(trained_copy):
    path = _event_file(trained_copy / "sick")
    offsets = _record_offsets(path)
    at = offsets[len(offsets) // 2] + 20  # inside the data of a record half-way through
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0xFF]))
    runs = assert_same_runs(str(trained_copy))
    sick = next(r for r in runs if r.name == "sick")
    assert 0 < len(sick.steps) < 20, "what came before the corrupt record is still read"


def test_a_file_still_being_written_reads_up_to_its_last_whole_record(trained_copy):
    path = _event_file(trained_copy / "healthy")
    offsets = _record_offsets(path)
    with open(path, "r+b") as f:
        f.truncate(offsets[-3] + 30)  # a record cut in the middle
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: a run being written is not corrupt
        reader._load_local(str(trained_copy), None)
    assert_same_runs(str(trained_copy))


def test_a_tensorflow_session_restart_is_read_by_tensorboards_loader(trained_copy):
    """SessionLog.START purges orphaned steps in TensorBoard: the fast path hands such a logdir back."""
    from tensorboard.compat.proto import event_pb2

    path = _event_file(trained_copy / "healthy")
    event = event_pb2.Event(step=10, wall_time=0.0)
    event.session_log.status = event_pb2.SessionLog.START
    data = event.SerializeToString()
    header = struct.pack("<Q", len(data))
    with open(path, "ab") as f:
        for _ in range(2):  # the first START opens a session; the second is a restart at step 10
            f.write(header + struct.pack("<I", records.masked_crc32c(header)) + data
                    + struct.pack("<I", records.masked_crc32c(data)))
    with pytest.raises(events.Unsupported):
        reader._load_local(str(trained_copy), None)
    runs = reader.load_logdir(str(trained_copy))  # falls back, and TensorBoard purges steps >= 10
    healthy = next(r for r in runs if r.name == "healthy")
    assert healthy.steps.max() < 10


def test_an_undecodable_value_is_skipped_with_a_warning_by_either_loader():
    from tensorboard.compat.proto import tensor_pb2, tensor_shape_pb2, types_pb2

    shape = tensor_shape_pb2.TensorShapeProto(dim=[tensor_shape_pb2.TensorShapeProto.Dim(size=2)])
    broken = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=b"\x00" * 3)
    good = tensor_pb2.TensorProto(dtype=types_pb2.DT_FLOAT, tensor_shape=shape, tensor_content=b"\x00" * 8)
    with pytest.warns(RuntimeWarning, match="skipped an undecodable value of run/tag at step 1"):
        out = list(events.decoded("run", "tag", [(0, good), (1, broken), (2, 0.5)]))
    assert [step for step, _ in out] == [0, 2]
    assert out[1][1].dtype == np.float32 and float(out[1][1]) == 0.5
