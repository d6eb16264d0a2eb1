"""Reading tbdiag data from a logdir into `RunData`, for ``tbdiag report``.

A local logdir goes through `tbdiag.read.events` (only tbdiag's values and the
scalars are decoded); remote ones (s3://, gs://, ...) and unusual event files
through TensorBoard's own loader.  The TensorBoard plugin reads through
TensorBoard's data provider instead and shares everything after the bytes.
"""

from __future__ import annotations

import functools
import logging
import os
import urllib.parse
import warnings
from typing import Sequence

import numpy as np
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from tensorboard.backend.event_processing import plugin_event_multiplexer as pem

from ..contract import evaluation, schema
from ..contract.rundata import RunData, is_loss_tag
from ..rules.throughput import is_perf_tag
from . import events


class NoDataError(Exception):
    """LOGDIR is missing or holds no tbdiag data (exit status 2 of `tbdiag report`)."""


class _WarnOnDataLoss(logging.Handler):
    """Turn TensorBoard's note about a corrupt event record into a Python warning.

    TensorBoard's loader stops reading a file at a record that fails its CRC
    check and goes on with every other file; it says so only at debug level.
    A record cut short at the end of a file is not reported: that is a run
    still being written, and the loader picks it up on the next read.
    """

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if "crc32 check" in msg:
            warnings.warn(f"tbdiag: skipped the rest of a corrupt event file: {msg}", RuntimeWarning, stacklevel=2)


def _multiplexer(logdir: str) -> pem.EventMultiplexer:
    mux = pem.EventMultiplexer(
        # keep every tbdiag sample and every scalar; one sample of anything else
        # (histograms, images) is all the report needs to know a tag exists
        size_guidance={pea.TENSORS: 1, pea.GRAPH: 0, pea.META_GRAPH: 0, pea.RUN_METADATA: 0},
        tensor_size_guidance={schema.PLUGIN_NAME: 0, "scalars": 0},
    )
    handler = _WarnOnDataLoss(level=logging.DEBUG)
    tb_logger = logging.getLogger("tensorboard")
    old_level = tb_logger.level
    tb_logger.addHandler(handler)
    tb_logger.setLevel(logging.DEBUG)
    try:
        mux.AddRunsFromDirectory(logdir)
        mux.Reload()
    finally:
        tb_logger.removeHandler(handler)
        tb_logger.setLevel(old_level)
    return mux


def _tensors(mux: pem.EventMultiplexer, run: str, tag: str):
    return events.decoded(run, tag, ((event.step, event.tensor_proto) for event in mux.Tensors(run, tag)))


def _checked_logdir(logdir: str) -> str:
    """``logdir`` as TensorBoard's loader takes it: a local path, or a URL TensorBoard can read (s3://, gs://, ...).

    Raises `NoDataError` saying what is wrong: no such directory, or no
    installed file system for the URL's scheme (and which package adds it).
    """
    if logdir.startswith("file://"):
        logdir = urllib.parse.unquote(urllib.parse.urlparse(logdir).path)
    if "://" not in logdir:
        if not os.path.isdir(logdir):
            raise NoDataError(f"{logdir}: no such directory")
        return logdir
    from tensorboard.compat import tf

    scheme = logdir.split("://", 1)[0]
    try:
        found = tf.io.gfile.isdir(logdir)
    except Exception as e:  # no file system registered for the scheme, missing credentials, ...
        hint = {"s3": "pip install boto3"}.get(scheme, f"pip install fsspec and the fsspec package for {scheme}://")
        raise NoDataError(f"{logdir}: cannot read {scheme}:// URLs here ({type(e).__name__}: {e}); {hint}") from e
    if not found:
        raise NoDataError(f"{logdir}: no such directory")
    return logdir


def load_logdir(logdir: str, loss_tags: Sequence[str] | None = None) -> list[RunData]:
    """Every run under ``logdir`` with tbdiag data (or loss scalars), decoded.

    A local logdir is read by `tbdiag.read.events` (only what the rules need); a URL, or a logdir using an
    event-file feature that reader does not reproduce, by TensorBoard's own loader.  Both give the same runs.
    Raises `NoDataError` when ``logdir`` does not exist or holds no tbdiag data.
    """
    logdir = _checked_logdir(logdir)
    if "://" not in logdir:
        try:
            return _load_local(logdir, loss_tags)
        except events.Unsupported:
            pass
    return _load_with_tensorboard(logdir, loss_tags)


def _load_local(logdir: str, loss_tags: Sequence[str] | None) -> list[RunData]:
    found = [events.read_run(name, files, schema.PLUGIN_NAME) for name, files in events.run_files(logdir).items()]
    by_name = {run.name: run for run in found}
    diag = {run.name: run.content[schema.PLUGIN_NAME] for run in found if run.content[schema.PLUGIN_NAME]}
    scalars = {run.name: run.content[events.SCALARS] for run in found if run.content[events.SCALARS]}
    return _assemble(logdir, diag, scalars, loss_tags, lambda run, tag: by_name[run].tensors(tag))


def _load_with_tensorboard(logdir: str, loss_tags: Sequence[str] | None) -> list[RunData]:
    mux = _multiplexer(logdir)
    return _assemble(logdir, mux.PluginRunToTagToContent(schema.PLUGIN_NAME), mux.PluginRunToTagToContent("scalars"),
                     loss_tags, lambda run, tag: _tensors(mux, run, tag))


def _assemble(logdir: str, diag: dict, scalars: dict, loss_tags: Sequence[str] | None, tensors) -> list[RunData]:
    """Runs from either source: ``diag``/``scalars`` map run -> tag -> plugin content, ``tensors(run, tag)``
    yields ``(step, value)``."""
    if not diag:
        raise NoDataError(f"{logdir}: no tbdiag data found (did the training script call DiagnosticWriter.watch?)")
    versions = schema.VersionCheck()  # data from a newer tbdiag: one warning per run and version
    runs = []
    for run in sorted(set(diag) | {r for r, tags in scalars.items() if any(is_loss_tag(t, loss_tags) for t in tags)}):
        runs.append(_run_data(functools.partial(tensors, run), run, diag.get(run, {}), scalars.get(run, {}),
                              loss_tags, versions))
    return runs


def _run_data(tensors, run: str, diag_tags: dict, scalar_tags: dict, loss_tags: Sequence[str] | None,
              versions: schema.VersionCheck) -> RunData:
    table = None
    if schema.LAYERS_TAG in diag_tags:
        values = list(tensors(schema.LAYERS_TAG))
        if values:
            try:
                table = schema.decode_layers(values[-1][1])
            except ValueError as e:  # rows get placeholder names; no measurement is lost
                warnings.warn(f"tbdiag: {run}: {e}; layers are named by position", RuntimeWarning, stacklevel=2)
    if table is not None:
        versions.check(run, table.version)
    if table is not None and loss_tags is None and table.extra.get("loss_tags") is not None:
        loss_tags = table.extra["loss_tags"]
    samples, model_samples = [], []
    for tag, content in diag_tags.items():
        if schema.is_health_tag(tag):
            columns = schema.columns_from_metadata(content)
            versions.check(run, schema.version_from_metadata(content))
            samples.extend((step, arr, columns) for step, arr in tensors(tag))
        elif schema.is_model_tag(tag):
            columns = schema.columns_from_metadata(content, schema.MODEL_COLUMNS)
            model_samples.extend((step, schema.decode_model(arr, columns)) for step, arr in tensors(tag))
    losses, perf = {}, {}
    for tag in scalar_tags:
        into = perf if is_perf_tag(tag) else losses if is_loss_tag(tag, loss_tags) else None
        if into is not None:
            pairs = [(step, float(np.asarray(v).reshape(-1)[0])) for step, v in tensors(tag)]
            into[tag] = ([s for s, _ in pairs], [v for _, v in pairs])
    data = RunData.from_samples(run, table, samples, losses, model_samples, perf=perf)
    data.evaluations = _evaluations(tensors, run, diag_tags)
    return data


def _evaluations(tensors, run: str, diag_tags: dict) -> dict[str, list[evaluation.Evaluation]]:
    """The run's `add_evaluation` calls by tag (an unreadable one is skipped with a warning)."""
    found = []
    for tag, content in diag_tags.items():
        if not evaluation.is_eval_tag(tag):
            continue
        for step, arr in tensors(tag):
            try:
                found.append(evaluation.decode(tag, content, step, arr))
            except ValueError as e:
                warnings.warn(f"tbdiag: skipped an evaluation of {run}: {e}", RuntimeWarning, stacklevel=2)
    return evaluation.group(found)
