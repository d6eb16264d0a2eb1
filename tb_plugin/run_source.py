"""Turning TensorBoard data-provider results into `RunData`, once per change.

This is the only place in the plugin that talks to the data provider.  It
reads through ``context.data_provider`` (never event files), so the tab works
with both of TensorBoard's loaders (the Python multiplexer and the Rust data
server behind ``--load_fast``) and with remote logdirs.

Why a cache: a run of 500 layers x 2,000 logged steps is ~50 MB of float32;
decoding it for every click would make the tab sluggish.  Each run keeps the
samples of every health tag, keyed by the tag's ``(max_step, max_wall_time)``
as the provider lists it.  A request first lists the run's tags (cheap), then
reads only the tags that are new or changed -- in a run still training that is
the last chunk of ten steps -- and rebuilds the `RunData` only when something
changed.  Findings are cached per threshold setting on top of that.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from tensorboard.data import provider

from tbdiag import rules
from tbdiag.contract import evaluation, schema
from tbdiag.contract.evaluation import Evaluation
from tbdiag.contract.rundata import RunData, is_loss_tag
from tbdiag.rules import evaluator
from tbdiag.rules.throughput import is_perf_tag

logger = logging.getLogger(__name__)

#: Scalars (the loss curves the loss rules read) live under TensorBoard's own
#: scalars plugin.
SCALARS_PLUGIN = "scalars"

#: ``downsample`` passed to the provider: far above what either loader keeps
#: per tag (10 or 100 tensors; the writer puts at most 10 steps in one tag), so
#: the provider hands back every sample it has.
READ_ALL = 1_000_000

#: Decoded runs kept in memory (least recently used are dropped first).
DEFAULT_MAX_RUNS = 8


@dataclass
class RunView:
    """What a route needs about one run: its data, its findings, and per-version memos.

    ``memo`` holds derived values that are costly on big runs (which columns
    were measured at all, the packed heatmap of a statistic); it lives exactly
    as long as this version of the run's data.
    """

    data: RunData
    findings: list[rules.Finding]
    version: int
    memo: dict[Hashable, Any]


class UnknownRunError(KeyError):
    """The requested run has no tbdiag data (a bad ``run`` parameter)."""


@dataclass
class _RunEntry:
    """What is cached for one run: per-tag samples, the assembled RunData, findings."""

    tag_keys: dict[str, Hashable] = field(default_factory=dict)
    # health tags: (step, array, columns) samples; model tags: (step, {statistic: value})
    tag_samples: dict[str, list[tuple]] = field(default_factory=dict)
    table_key: Hashable = None
    table: schema.LayerTable | None = None
    loss_key: Hashable = None
    losses: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    data: RunData | None = None
    version: int = 0
    findings: dict[Hashable, list[rules.Finding]] = field(default_factory=dict)
    memo: dict[Hashable, Any] = field(default_factory=dict)
    eval_keys: dict[str, Hashable] = field(default_factory=dict)  # evaluation tags, keyed as tag_keys
    evals: dict[str, list[Evaluation]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _series_key(ts: provider._TimeSeries) -> Hashable:
    return (ts.max_step, ts.max_wall_time)


def thresholds_key(thresholds: Mapping[str, float] | None) -> Hashable:
    return tuple(sorted((thresholds or {}).items()))


class RunSource:
    """Decoded tbdiag runs of one TensorBoard data provider, cached per run."""

    def __init__(self, data_provider: provider.DataProvider, max_runs: int = DEFAULT_MAX_RUNS):
        self._provider = data_provider
        self._max_runs = max_runs
        self._entries: collections.OrderedDict[tuple[str, str], _RunEntry] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._versions = schema.VersionCheck()  # one warning per run and newer format, for the process's life

    # ------------------------------------------------------------------ runs

    def list_runs(self, ctx: Any, experiment: str) -> dict[str, dict[str, Any]]:
        """``{run: {"last_step", "chunks", "has_layers"}}`` for every run with tbdiag data.

        Uses only ``list_tensors`` (no tensor is read) so the run selector
        appears at once even for huge logdirs.
        """
        listing = self._provider.list_tensors(ctx, experiment_id=experiment, plugin_name=schema.PLUGIN_NAME)
        out = {}
        for run, tags in listing.items():
            health = [ts for tag, ts in tags.items() if schema.is_health_tag(tag)]
            evals = [ts for tag, ts in tags.items() if evaluation.is_eval_tag(tag)]
            if not health and not evals:
                continue
            out[run] = {
                "last_step": max(ts.max_step for ts in health + evals),
                "last_wall_time": max(ts.max_wall_time for ts in health + evals),
                "chunks": len(health),
                "evaluations": len(evals),
            }
        return out

    # -------------------------------------------------------------- run data

    def run_data(self, ctx: Any, experiment: str, run: str) -> tuple[RunData, int]:
        """The run's decoded data and a version number that changes whenever it does.

        Raises `UnknownRunError` if the provider has no tbdiag health data for ``run``.
        """
        entry = self._entry(experiment, run)
        with entry.lock:
            self._refresh(ctx, experiment, run, entry)
            assert entry.data is not None
            return entry.data, entry.version

    def view(self, ctx: Any, experiment: str, run: str, thresholds: Mapping[str, float] | None = None) -> RunView:
        """The run's data and its findings under ``thresholds`` (validated by the caller), cached until new data."""
        entry = self._entry(experiment, run)
        with entry.lock:
            self._refresh(ctx, experiment, run, entry)
            assert entry.data is not None
            key = thresholds_key(thresholds)
            found = entry.findings.get(key)
            if found is None:
                found = evaluator.evaluate(entry.data, thresholds)
                if len(entry.findings) >= 16:  # a user trying many thresholds: keep memory bounded
                    entry.findings.pop(next(iter(entry.findings)))
                entry.findings[key] = found
            return RunView(data=entry.data, findings=found, version=entry.version, memo=entry.memo)

    # ------------------------------------------------------------- internals

    def _entry(self, experiment: str, run: str) -> _RunEntry:
        with self._lock:
            key = (experiment, run)
            entry = self._entries.get(key)
            if entry is None:
                entry = self._entries[key] = _RunEntry()
                while len(self._entries) > self._max_runs:
                    self._entries.popitem(last=False)
            else:
                self._entries.move_to_end(key)
            return entry

    def _refresh(self, ctx: Any, experiment: str, run: str, entry: _RunEntry) -> None:
        only_run = provider.RunTagFilter(runs=[run])
        listing = self._provider.list_tensors(
            ctx, experiment_id=experiment, plugin_name=schema.PLUGIN_NAME, run_tag_filter=only_run
        ).get(run, {})
        health = {tag: ts for tag, ts in listing.items() if schema.is_health_tag(tag)}
        evals = {tag: ts for tag, ts in listing.items() if evaluation.is_eval_tag(tag)}
        if not health and not evals:
            raise UnknownRunError(run)
        chunks = {**health, **{tag: ts for tag, ts in listing.items() if schema.is_model_tag(tag)}}
        changed = False

        # the layer table: one tag, the latest value wins
        layers_ts = listing.get(schema.LAYERS_TAG)
        table_key = _series_key(layers_ts) if layers_ts is not None else None
        if table_key != entry.table_key:
            entry.table = self._read_table(ctx, experiment, run) if layers_ts is not None else None
            entry.table_key = table_key
            if entry.table is not None:
                self._versions.check(run, entry.table.version)
            changed = True

        # health and model chunks: read only the tags that are new or changed
        stale = [tag for tag, ts in chunks.items() if entry.tag_keys.get(tag) != _series_key(ts)]
        for gone in set(entry.tag_keys) - set(chunks):
            entry.tag_keys.pop(gone)
            entry.tag_samples.pop(gone, None)
            changed = True
        if stale:
            read = self._read_tensors(ctx, experiment, run, stale)
            for tag in stale:
                content = chunks[tag].plugin_content
                if schema.is_model_tag(tag):
                    columns = schema.columns_from_metadata(content, schema.MODEL_COLUMNS)
                    entry.tag_samples[tag] = [
                        (int(d.step), schema.decode_model(d.numpy, columns)) for d in read.get(tag, [])
                    ]
                else:
                    columns = schema.columns_from_metadata(content)
                    self._versions.check(run, schema.version_from_metadata(content))
                    entry.tag_samples[tag] = [
                        (int(d.step), np.asarray(d.numpy, dtype=np.float32), columns) for d in read.get(tag, [])
                    ]
                entry.tag_keys[tag] = _series_key(chunks[tag])
            changed = True

        # loss scalars for the loss rules, and tbdiag's perf/* scalars (the input_bound rule) read with them
        loss_tags = entry.table.extra.get("loss_tags") if entry.table is not None else None
        scalars = self._provider.list_scalars(
            ctx, experiment_id=experiment, plugin_name=SCALARS_PLUGIN, run_tag_filter=only_run
        ).get(run, {})
        losses = {tag: ts for tag, ts in scalars.items() if is_loss_tag(tag, loss_tags) or is_perf_tag(tag)}
        loss_key = tuple(sorted((tag, _series_key(ts)) for tag, ts in losses.items()))
        if loss_key != entry.loss_key:
            entry.losses = self._read_losses(ctx, experiment, run, list(losses))
            entry.loss_key = loss_key
            changed = True

        changed |= self._refresh_evaluations(ctx, experiment, run, evals, entry)

        if changed or entry.data is None:
            samples = [s for tag in sorted(entry.tag_samples) if schema.is_health_tag(tag)
                       for s in entry.tag_samples[tag]]
            model_samples = [s for tag in sorted(entry.tag_samples) if schema.is_model_tag(tag)
                             for s in entry.tag_samples[tag]]
            table = entry.table
            if table is not None:  # from_samples may append placeholder rows: never touch the cached table
                table = schema.LayerTable(
                    layers=list(table.layers), log_every=table.log_every, has_optimizer=table.has_optimizer,
                    columns=table.columns, extra=dict(table.extra), version=table.version,
                )
            read = entry.losses.items()
            entry.data = RunData.from_samples(run, table, samples, {t: v for t, v in read if not is_perf_tag(t)},
                                              model_samples, perf={t: v for t, v in read if is_perf_tag(t)})
            entry.data.evaluations = evaluation.group(e for tag in sorted(entry.evals) for e in entry.evals[tag])
            entry.version += 1
            entry.findings.clear()
            entry.memo = {}

    def _refresh_evaluations(self, ctx: Any, experiment: str, run: str, listing: Mapping[str, Any],
                             entry: _RunEntry) -> bool:
        """Read the evaluation tags that are new or changed (one per `add_evaluation` call); whether any was."""
        stale = [tag for tag, ts in listing.items() if entry.eval_keys.get(tag) != _series_key(ts)]
        gone = set(entry.eval_keys) - set(listing)
        for tag in gone:
            entry.eval_keys.pop(tag)
            entry.evals.pop(tag, None)
        if stale:
            read = self._read_tensors(ctx, experiment, run, stale)
            for tag in stale:
                found = []
                for d in read.get(tag, []):
                    try:
                        found.append(evaluation.decode(tag, listing[tag].plugin_content, int(d.step), d.numpy))
                    except ValueError as e:
                        logger.warning("tbdiag: skipped an evaluation of %s: %s", run, e)
                entry.evals[tag] = found
                entry.eval_keys[tag] = _series_key(listing[tag])
        return bool(stale or gone)

    def _read_tensors(self, ctx: Any, experiment: str, run: str, tags: list[str]) -> dict[str, list]:
        """Every value of some of a run's tbdiag tensor tags, by tag."""
        return self._provider.read_tensors(
            ctx,
            experiment_id=experiment,
            plugin_name=schema.PLUGIN_NAME,
            downsample=READ_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})

    def _read_table(self, ctx: Any, experiment: str, run: str) -> schema.LayerTable | None:
        data = self._read_tensors(ctx, experiment, run, [schema.LAYERS_TAG]).get(schema.LAYERS_TAG, [])
        if not data:
            return None
        latest = max(data, key=lambda d: (d.step, d.wall_time))
        try:
            return schema.decode_layers(latest.numpy)
        except ValueError:
            return None  # an unreadable table: rows get placeholder names, no measurement is lost

    def _read_losses(self, ctx: Any, experiment: str, run: str, tags: list[str]) -> dict[str, tuple]:
        if not tags:
            return {}
        read = self._provider.read_scalars(
            ctx,
            experiment_id=experiment,
            plugin_name=SCALARS_PLUGIN,
            downsample=READ_ALL,
            run_tag_filter=provider.RunTagFilter(runs=[run], tags=tags),
        ).get(run, {})
        return {tag: ([d.step for d in data], [d.value for d in data]) for tag, data in read.items()}
