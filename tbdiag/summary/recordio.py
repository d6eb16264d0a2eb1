"""A faster record writer for event files: the same bytes, CRC32C in C where available.

TensorBoard frames every event-file record as ``length, masked CRC32C of the
length, data, masked CRC32C of the data``; its `RecordWriter` computes the
CRC32C in pure Python (tensorboard.compat.tensorflow_stub.pywrap_tensorflow),
about 6 MB/s, on a thread that competes with training for the GIL.  With the
optional ``google-crc32c`` package (``pip install tbdiag[fast]``) or the
``crc32c`` package installed, `upgrade` switches a writer's record writer to a
C implementation; the bytes on disk are identical.  Without either, nothing
changes.
"""

from __future__ import annotations

import struct
from typing import Any, Callable

from tensorboard.summary.writer.record_writer import RecordWriter

_MASK_DELTA = 0xA282EAD8


def _find_crc32c() -> tuple[Callable[[bytes], int] | None, str]:
    try:
        import google_crc32c

        if getattr(google_crc32c, "implementation", "c") == "c":
            return google_crc32c.value, "google-crc32c"
    except ImportError:
        pass
    try:
        import crc32c

        return crc32c.crc32c, "crc32c"
    except ImportError:
        pass
    return None, ""


_crc32c, _SOURCE = _find_crc32c()


def available() -> bool:
    """Whether a C implementation of CRC32C was found."""
    return _crc32c is not None


def describe() -> str:
    return f"CRC32C from {_SOURCE}" if _crc32c is not None else "TensorBoard's pure-Python CRC32C"


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (same value as TensorBoard's)."""
    if _crc32c is None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow

        return slow(data)
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class FastRecordWriter(RecordWriter):
    """`RecordWriter` with the CRC32C computed in C; writes the same bytes."""

    def write(self, data: bytes) -> None:
        header = struct.pack("<Q", len(data))
        crc = _crc32c
        h = crc(header)
        d = crc(data)
        self._writer.write(
            header
            + struct.pack("<I", (((h >> 15) | (h << 17)) + _MASK_DELTA) & 0xFFFFFFFF)
            + data
            + struct.pack("<I", (((d >> 15) | (d << 17)) + _MASK_DELTA) & 0xFFFFFFFF)
        )


def upgrade(file_writer: Any) -> bool:
    """Switch a torch `FileWriter`'s record writer to `FastRecordWriter`; True if it did.

    Changes nothing (and returns False) when no C CRC32C is installed or the
    writer is not TensorBoard's `RecordWriter` as expected.
    """
    if _crc32c is None:
        return False
    try:
        record_writer = file_writer.event_writer._async_writer._writer
    except AttributeError:
        return False
    if type(record_writer) is RecordWriter:
        record_writer.__class__ = FastRecordWriter
        return True
    return type(record_writer) is FastRecordWriter
