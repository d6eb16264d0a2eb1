"""The framing of event-file records, as both sides compute it: masked CRC32C, in C where available.

TensorBoard frames every record of an event file (TFRecord) as ``length
(uint64 LE), masked CRC32C of the length (uint32 LE), data, masked CRC32C of
the data``.  Its own code computes the CRC32C in pure Python, about 6 MB/s.
With the optional ``google-crc32c`` package (``pip install tbdiag[fast]``) or
the ``crc32c`` package, the writer (`tbdiag.summary.recordio`) and the report's
reader (`tbdiag.read.events`) compute it in C; the values are the same.
"""

from __future__ import annotations

import struct
from typing import Callable

#: The TFRecord header: the data's length, then the masked CRC32C of those 8 bytes.
HEADER = struct.Struct("<QI")
#: The masked CRC32C of the data that follows it.
FOOTER = struct.Struct("<I")
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


#: The C CRC32C function (bytes -> int), or None when neither package is installed.
crc32c, SOURCE = _find_crc32c()


def available() -> bool:
    """Whether a C implementation of CRC32C was found."""
    return crc32c is not None


def describe() -> str:
    return f"CRC32C from {SOURCE}" if crc32c is not None else "TensorBoard's pure-Python CRC32C"


def mask(crc: int) -> int:
    """TFRecord's mask over a CRC32C (rotate right by 15, add a constant)."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    """TFRecord's masked CRC32C of ``data`` (the same value as TensorBoard's)."""
    if crc32c is None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as slow

        return slow(data)
    return mask(crc32c(data))
