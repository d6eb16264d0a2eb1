"""Event files read record by record, decoding only the values the report needs.

TensorBoard's loader decodes every record of every file (histograms turned into
tensors, images kept) and checks each record's CRC32C in pure Python: for a
long run that is most of the time ``tbdiag report`` takes.  This reader walks
the same runs and files in the same order, checks the framing of every record
and its checksums (all of them with a C CRC32C, ``pip install tbdiag[fast]``;
without one, those of the summaries that may be kept), parses each event with
protobuf's C parser, and keeps only tbdiag's values and scalars: histograms,
images and graphs are never converted or kept.

It follows TensorBoard's rules where they matter to the findings: a run is a
directory holding ``*tfevents*`` files, named by its path under the logdir;
files are read in name order; a tag's plugin and metadata are those of its
first value; a record whose checksum fails ends the reading of its file, with
a warning; a record cut short at the end of a file (a run still being written)
ends it silently.  What it does not reproduce -- TensorFlow session restarts
(``SessionLog.START``) and files written without a file version -- it reports
through `Unsupported`, and the caller reads that logdir with TensorBoard's own
loader instead.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.util import tensor_util

from ..contract import records

#: TensorBoard's scalar plugin: add_scalar's ``simple_value`` is read as its data.
SCALARS = "scalars"


class Unsupported(Exception):
    """The logdir uses an event-file feature this reader does not reproduce; read it with TensorBoard's loader."""


@dataclass
class RunEvents:
    """One run's kept values: per plugin, tag -> the plugin content of its first value; per tag, its samples."""

    name: str
    #: plugin name -> tag -> plugin content (bytes), from the tag's first value with metadata
    content: dict[str, dict[str, bytes]] = field(default_factory=dict)
    #: tag -> [(step, TensorProto or float)], in file order
    samples: dict[str, list] = field(default_factory=dict)

    def tensors(self, tag: str) -> Iterator[tuple[int, np.ndarray]]:
        """``(step, value)`` of one tag, decoded (`decoded`)."""
        return decoded(self.name, tag, self.samples.get(tag, ()))


def decoded(run: str, tag: str, samples: Iterable[tuple[int, Any]]) -> Iterator[tuple[int, np.ndarray]]:
    """``(step, array)`` of ``(step, TensorProto or float)`` samples; an undecodable value is skipped with a
    warning, whichever loader read it."""
    for step, value in samples:
        if isinstance(value, float):  # a simple_value, as TensorBoard migrates it: a float32 scalar
            yield step, np.asarray(value, dtype=np.float32)
            continue
        try:
            yield step, tensor_util.make_ndarray(value)
        except (ValueError, TypeError) as e:
            warnings.warn(f"tbdiag: skipped an undecodable value of {run}/{tag} at step {step}: {e}",
                          RuntimeWarning, stacklevel=3)


def run_files(logdir: str) -> dict[str, list[str]]:
    """Run name -> its event files in reading order, as TensorBoard names runs (``"."`` for the logdir itself)."""
    runs: dict[str, list[str]] = {}
    for root, dirs, files in os.walk(logdir):
        dirs.sort()
        events = sorted(os.path.join(root, f) for f in files if "tfevents" in f)
        if events:
            runs[os.path.relpath(root, logdir)] = events
    return runs


def _records(path: str) -> Iterator[tuple[bytes, int, int]]:
    """``(data, its masked CRC32C as stored, byte offset)`` of each record of one file, in order.

    The length's checksum is checked here (a bad one ends the file with a warning: nothing after it can be
    framed); a record cut short at the end (a run still being written) ends it silently.
    """
    with open(path, "rb") as f:
        while True:
            at = f.tell()
            header = f.read(records.HEADER.size)
            if len(header) < records.HEADER.size:
                return  # the end, or a header still being written
            length, length_crc = records.HEADER.unpack(header)
            if records.masked_crc32c(header[:8]) != length_crc:
                _corrupt(path, f"bad length checksum at byte {at}")
                return
            data = f.read(length)
            footer = f.read(records.FOOTER.size)
            if len(footer) < records.FOOTER.size:
                return  # a record still being written
            yield data, records.FOOTER.unpack(footer)[0], at


def _corrupt(path: str, why: str) -> None:
    warnings.warn(f"tbdiag: skipped the rest of a corrupt event file: {path} ({why})", RuntimeWarning, stacklevel=4)


def read_run(name: str, files: list[str], plugin: str) -> RunEvents:
    """The values of ``plugin``'s tags and every scalar of one run; nothing else is decoded."""
    run = RunEvents(name, content={plugin: {}, SCALARS: {}})
    seen_metadata: set[str] = set()
    fast = records.crc32c is not None
    for path in files:
        version_checked = False
        for data, data_crc, at in _records(path):
            # every record's checksum with a C CRC32C; without one (pure Python, ~6 MB/s) those whose values
            # can be kept: summaries, checked after parsing, before anything of theirs is kept
            if fast and records.masked_crc32c(data) != data_crc:
                _corrupt(path, f"bad data checksum at byte {at}")
                break
            try:
                event = event_pb2.Event.FromString(data)
            except Exception as e:  # a record that is no event: treat as corrupt
                _corrupt(path, f"undecodable record at byte {at}: {type(e).__name__}")
                break
            if not fast and event.HasField("summary") and records.masked_crc32c(data) != data_crc:
                _corrupt(path, f"bad data checksum at byte {at}")
                break
            if event.HasField("file_version"):
                if not event.file_version.startswith("brain.Event:") or float(event.file_version.split(":")[1]) < 2:
                    raise Unsupported(f"{path}: event file version {event.file_version!r}")
                version_checked = True
                continue
            if not version_checked:
                raise Unsupported(f"{path}: no file version before its first event")
            if event.HasField("session_log"):
                raise Unsupported(f"{path}: TensorFlow session log events (restarts purge data)")
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                _keep(run, value, event.step, plugin, seen_metadata)
    return run


def _keep(run: RunEvents, value, step: int, plugin: str, seen_metadata: set[str]) -> None:
    tag = value.tag
    kind = value.WhichOneof("value")
    if kind == "simple_value":  # TensorBoard migrates it to a float32 tensor of the scalars plugin
        if tag not in seen_metadata:
            seen_metadata.add(tag)
            run.content[SCALARS].setdefault(tag, b"")
        if tag in run.content[SCALARS]:
            run.samples.setdefault(tag, []).append((int(step), float(np.float32(value.simple_value))))
        return
    if value.HasField("metadata") and tag not in seen_metadata:
        seen_metadata.add(tag)
        name = value.metadata.plugin_data.plugin_name
        if name in run.content:
            run.content[name][tag] = value.metadata.plugin_data.content
    if kind == "tensor" and (tag in run.content[plugin] or tag in run.content[SCALARS]):
        run.samples.setdefault(tag, []).append((int(step), value.tensor))
