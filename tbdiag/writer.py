"""`DiagnosticWriter`: a `SummaryWriter` that can watch a model.

Every ``add_*`` method of `torch.utils.tensorboard.SummaryWriter` works as
before; `watch` adds the diagnostics.  Encoding and writing of what the
watcher measured happen on one background thread, so the training thread
pays only for the on-device reductions and their single host transfer.
"""

from __future__ import annotations

import atexit
import io
import queue
import threading
import warnings
import weakref
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tensorboard.compat.proto import graph_pb2, node_def_pb2, summary_pb2, versions_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from . import images, recordio, schema, stats
from .hooks import Watcher
from .modelinfo import summary_markdown

SUMMARY_TAG = "tbdiag/model_summary"


class DiagnosticWriter(SummaryWriter):
    """A drop-in `SummaryWriter` with `watch(model, ...)` for training diagnostics.

    Example::

        writer = DiagnosticWriter("runs/exp1")
        writer.watch(model, optimizer, log_every=100)
        for step, (x, y) in enumerate(loader):
            loss = loss_fn(model(x), y)
            optimizer.zero_grad(); loss.backward(); optimizer.step()
            writer.add_scalar("train/loss", loss.item(), step)
        writer.close()
    """

    def __init__(self, log_dir: str | None = None, *args: Any, **kwargs: Any):
        super().__init__(log_dir, *args, **kwargs)
        self._watchers: list[Watcher] = []
        self._jobs: "queue.Queue[Callable[[], None] | None]" = queue.Queue()
        self._worker: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._chunk_first: int | None = None
        self._chunk_count = 0
        self._health_tag_written: tuple[Any, int] | None = None

    def _get_file_writer(self):
        """The event file writer, with TensorBoard's record writer swapped for one with a C CRC32C.

        Same bytes on disk (`tbdiag.recordio`); unchanged when no C CRC32C package is installed.
        """
        file_writer = super()._get_file_writer()
        if getattr(self, "_fast_records_for", None) is not file_writer:
            self._fast_records_for = file_writer
            recordio.upgrade(file_writer)
        return file_writer

    # ----------------------------------------------------------------- public

    def watch(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        log_every: int = 100,
        *,
        log_graph: bool = True,
        example_input: Any = None,
        histograms: bool = True,
        activation_histograms: bool = True,
        images_every: int | None = None,
        max_image_layers: int = 8,
        max_image_channels: int = 16,
        loss_tags: Sequence[str] | None = None,
    ) -> Watcher:
        """Observe ``model`` (and ``optimizer``) and log diagnostics every ``log_every`` steps.

        Args:
            model: the module being trained.
            optimizer: the optimizer stepping it.  With it, a step is one
                ``optimizer.step()`` and the update-to-weight ratio is measured;
                without it, a step is one backward pass through the model.
            log_every: steps between logging steps (step 0 is always logged).
            log_graph: log the model graph once (traced from ``example_input``
                or from the first training forward's inputs).
            example_input: an input to trace the graph from right away.
            histograms: parameter, gradient and activation histograms.
            activation_histograms: activation histograms (needs ``histograms``).
            images_every: steps between activation images of convolutional
                layers; default ``10 * log_every``; 0 turns them off.
            max_image_layers, max_image_channels: bound the images' count and size.
            loss_tags: scalar tags the loss rules read; default: tags
                containing "loss".

        Returns the `Watcher`; ``handle.remove()`` stops watching.
        """
        if self._watchers:
            raise RuntimeError(
                "this DiagnosticWriter already watches a model; use one DiagnosticWriter (one run directory) "
                "per watched model, or call handle.remove() first"
            )
        watcher = Watcher(
            self, model, optimizer, log_every,
            log_graph=log_graph, example_input=example_input, histograms=histograms,
            activation_histograms=activation_histograms, images_every=images_every,
            max_image_layers=max_image_layers, max_image_channels=max_image_channels, loss_tags=loss_tags,
        )
        self._watchers.append(watcher)
        return watcher

    def flush(self) -> None:
        """Write everything measured so far (waits for the background writer)."""
        self._drain()
        super().flush()

    def close(self) -> None:
        """Remove every hook this writer installed, write what is pending, close the files."""
        for watcher in self._watchers:
            watcher.remove()
        self._watchers.clear()
        self._drain()
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None
        super().close()

    # ------------------------------------------------------ background thread

    def _enqueue(self, job: Callable[[], None]) -> None:
        if self._worker is None:
            self._worker = threading.Thread(target=self._work, name="tbdiag-writer", daemon=True)
            self._worker.start()
            # A script that never calls close() still gets what it measured written at exit.
            atexit.register(_flush_at_exit, weakref.ref(self))
        self._jobs.put(job)

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception as e:  # never let a logging failure stop training
                self._errors.append(e)
                warnings.warn(f"tbdiag could not write a summary: {e!r}", RuntimeWarning)
            finally:
                self._jobs.task_done()

    def _drain(self) -> None:
        if self._worker is not None:
            self._jobs.join()

    # -------------------------------------------------- called by the watcher

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        self._get_file_writer().add_summary(summary, step)

    def _submit(self, step: int, health: np.ndarray, extras: dict) -> None:
        if self._chunk_first is None or self._chunk_count >= schema.STEPS_PER_TAG:
            self._chunk_first, self._chunk_count = step, 0
        self._chunk_count += 1
        tag_step = self._chunk_first
        self._enqueue(lambda: self._write_step(step, tag_step, health, extras))

    def _write_step(self, step: int, tag_step: int, health: np.ndarray, extras: dict) -> None:
        # metadata on the first value of each health tag in this writer's file only (see encode_health)
        file_writer = self._get_file_writer()
        last = self._health_tag_written
        first_of_tag = last is None or last[0] is not file_writer or last[1] != tag_step
        self._health_tag_written = (file_writer, tag_step)
        self._add(schema.encode_health(tag_step, health, with_metadata=first_of_tag), step)
        for tag, value in extras["scalars"]:
            self.add_scalar(tag, value, step)
        # every histogram of the step in one Summary: one event and one record instead of one per tensor
        values = []
        if extras["histograms"]:
            tags, rows, numels = zip(*extras["histograms"])
            values += _histogram_values(tags, np.stack(rows), numels)
        for tags, samples, lengths, scales, numels in extras.get("histogram_samples", ()):
            values += _histogram_values(tags, stats.host_histograms(samples, lengths, scales), numels)
        if values:
            self._add(summary_pb2.Summary(value=values), step)
        for tag, grid in extras["images"]:
            self._add(images.image_summary(tag, grid), step)

    def _submit_table(self, table: schema.LayerTable) -> None:
        summary = schema.encode_layers(table)
        self._enqueue(lambda: self._add(summary, 0))

    def _submit_summary_text(self, table: schema.LayerTable) -> None:
        text = summary_markdown(table)
        self._enqueue(lambda: self.add_text(SUMMARY_TAG, text, 0))

    def _log_graph_safely(self, model: nn.Module, args: tuple) -> None:
        """Log the graph without disturbing training; fall back to the module tree when tracing fails.

        Tracing runs in eval mode (no BatchNorm statistics updated), without
        gradients, and under a forked RNG (no random numbers consumed).
        """
        from torch.utils.tensorboard._pytorch_graph import graph

        devices = sorted({p.device.index for p in model.parameters() if p.device.type == "cuda"} - {None})
        errors = []
        for strict in (True, False):
            try:
                with torch.random.fork_rng(devices=devices), torch.no_grad(), warnings.catch_warnings(record=True) \
                        as caught, _quiet():
                    warnings.simplefilter("always")
                    graph_def, step_stats = graph(model, args, verbose=False, use_strict_trace=strict)
                tracer = [w for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
                if tracer:
                    warnings.warn(
                        "tbdiag: the model graph was traced along one path only (data-dependent control flow): "
                        f"{tracer[0].message}", RuntimeWarning, stacklevel=2,
                    )
                self._get_file_writer().add_graph((graph_def, step_stats))
                return
            except Exception as e:  # jit.trace raises many kinds of errors
                errors.append(e)
        warnings.warn(
            "tbdiag: torch.jit.trace could not trace the model "
            f"({type(errors[-1]).__name__}: {str(errors[-1]).splitlines()[0] if str(errors[-1]) else ''}); "
            "logging the module tree as the graph instead. Training is not affected.",
            RuntimeWarning, stacklevel=2,
        )
        self._get_file_writer().add_graph((module_tree_graph(model), None))


def _flush_at_exit(ref: "weakref.ref[DiagnosticWriter]") -> None:
    writer = ref()
    if writer is not None and writer._worker is not None:
        writer.flush()


class _quiet:
    """Silence the prints torch's graph tracer makes on failure (the warning says it better)."""

    def __enter__(self):
        import contextlib
        import sys

        self._redirect = contextlib.redirect_stdout(io.StringIO())
        self._redirect.__enter__()
        self._sys = sys

    def __exit__(self, *exc):
        return self._redirect.__exit__(*exc)


def module_tree_graph(model: nn.Module) -> graph_pb2.GraphDef:
    """A GraphDef of the module hierarchy: one node per module, leaves chained in definition order."""
    nodes = []
    previous_leaf = None
    for name, module in model.named_modules():
        if not name:
            continue
        path = name.replace(".", "/")
        leaf = next(iter(module.children()), None) is None
        node = node_def_pb2.NodeDef(name=path, op=type(module).__name__)
        if leaf and previous_leaf is not None:
            node.input.append(previous_leaf)
        if leaf:
            previous_leaf = path
        nodes.append(node)
    return graph_pb2.GraphDef(node=nodes, versions=versions_pb2.VersionDef(producer=22))


def _histogram_summary(tag: str, row: np.ndarray, numel: int | None) -> summary_pb2.Summary | None:
    """HistogramProto summary from ``[min, max, scale, counts...]`` (see `stats.histograms`)."""
    values = _histogram_values([tag], np.asarray(row)[None, :], [numel])
    return summary_pb2.Summary(value=values) if values else None


def _histogram_values(
    tags: Sequence[str], rows: np.ndarray, numels: Sequence[int | None]
) -> list[summary_pb2.Summary.Value]:
    """HistogramProto values from rows of ``[min, max, scale, counts...]``, the arithmetic vectorised over rows.

    A row without a finite value (NaN range) is left out: nothing to draw; the
    nonfinite rule reports it.
    """
    rows = np.asarray(rows)
    if rows.size == 0:
        return []
    lo = rows[:, 0].astype(np.float64)
    hi = rows[:, 1].astype(np.float64)
    counts = rows[:, 3:].astype(np.float64) * rows[:, 2:3].astype(np.float64)
    bins = counts.shape[1]
    limits = lo[:, None] + (hi - lo)[:, None] * np.arange(1, bins + 1) / bins
    centers = (np.concatenate([lo[:, None], limits[:, :-1]], axis=1) + limits) / 2
    totals = counts.sum(axis=1)
    sums = (centers * counts).sum(axis=1)
    sums_sq = (centers**2 * counts).sum(axis=1)
    finite = np.isfinite(lo) & np.isfinite(hi)
    out = []
    for i in np.flatnonzero(finite):
        numel = numels[i]
        if hi[i] <= lo[i]:  # one value: a single bucket at it
            limit, bucket, center = [float(hi[i])], [float(totals[i])], float((lo[i] + hi[i]) / 2)
            total_sum, total_sq = center * bucket[0], center**2 * bucket[0]
        else:
            limit, bucket = limits[i].tolist(), counts[i].tolist()
            total_sum, total_sq = float(sums[i]), float(sums_sq[i])
        histo = summary_pb2.HistogramProto(
            min=float(lo[i]), max=float(hi[i]), num=float(numel) if numel is not None else float(totals[i]),
            sum=total_sum, sum_squares=total_sq, bucket_limit=limit, bucket=bucket,
        )
        out.append(summary_pb2.Summary.Value(tag=tags[i], histo=histo))
    return out
