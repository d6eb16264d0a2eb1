"""The C CRC32C record writer writes exactly the bytes TensorBoard's own writer does."""

from __future__ import annotations

import io
import os
import random

import pytest
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked_crc32c
from tensorboard.summary.writer.record_writer import RecordWriter

from tbdiag import DiagnosticWriter
from tbdiag.contract import records
from tbdiag.summary import recordio

needs_c_crc = pytest.mark.skipif(not records.available(), reason="no C CRC32C installed (pip install tbdiag[fast])")


def _payloads() -> list[bytes]:
    rng = random.Random(0)
    return [b"", b"a", bytes(range(256))] + [rng.randbytes(rng.randrange(1, 70_000)) for _ in range(20)]


@needs_c_crc
def test_masked_crc32c_matches_tensorboard():
    for data in _payloads():
        assert records.masked_crc32c(data) == tb_masked_crc32c(data)


@needs_c_crc
def test_fast_record_writer_writes_the_same_bytes():
    slow_buf, fast_buf = io.BytesIO(), io.BytesIO()
    slow, fast = RecordWriter(slow_buf), RecordWriter(fast_buf)
    fast.__class__ = recordio.FastRecordWriter
    for data in _payloads():
        slow.write(data)
        fast.write(data)
    assert fast_buf.getvalue() == slow_buf.getvalue()


@needs_c_crc
def test_writer_uses_it_and_tensorboard_reads_the_file(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    for step in range(5):
        writer.add_scalar("train/loss", 1.0 / (step + 1), step)
    record_writer = writer._get_file_writer().event_writer._async_writer._writer
    assert type(record_writer) is recordio.FastRecordWriter
    writer.close()
    (path,) = [os.path.join(tmp_path, f) for f in os.listdir(tmp_path)]
    events = list(EventFileLoader(path).Load())  # checks every record's CRCs
    values = [v.tensor.float_val[0] if v.HasField("tensor") else v.simple_value
              for e in events for v in e.summary.value if v.tag == "train/loss"]
    assert values == pytest.approx([1.0 / (s + 1) for s in range(5)])


def test_without_a_c_crc_nothing_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "crc32c", None)
    assert not records.available()
    assert records.describe() == "TensorBoard's pure-Python CRC32C"
    writer = DiagnosticWriter(str(tmp_path))
    writer.add_scalar("train/loss", 0.5, 0)
    assert type(writer._get_file_writer().event_writer._async_writer._writer) is RecordWriter
    writer.close()
    data = b"tbdiag"
    assert records.masked_crc32c(data) == tb_masked_crc32c(data)
