"""`DiagnosticWriter`: a `SummaryWriter` that can watch a model.

Every ``add_*`` method of `torch.utils.tensorboard.SummaryWriter` works as
before; `watch` adds the diagnostics.  Encoding and writing of what the
watcher measured happen on one background thread, so the training thread
pays only for the on-device reductions and their single host transfer.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
import warnings
import weakref
from typing import Any, Callable, Iterable, Sequence

import torch
from tensorboard.compat.proto import event_pb2, summary_pb2
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from .contract import evaluation, schema
from .measure import distributed, stats
from .measure.modelinfo import summary_markdown
from .rules.table import Finding
from .summary import confusion_image, evaluation_inputs, images, recordio
from .summary.assembly import StepRecord
from .summary.histograms import histogram_summary
from .watch.live import LiveMonitor
from .watch.timing import TimedLoader
from .watch.watcher import Watcher

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

    Under ``torch.distributed`` (``torchrun``) create it on every rank with
    the same ``log_dir``: rank 0 writes one run whose statistics cover the
    global batch, the other ranks write nothing (their ``add_*`` calls are
    dropped, so a loss logged on every rank is logged once).  With
    ``per_rank=True`` each rank writes its own run, ``<log_dir>/rank<r>``,
    with its local statistics.  See `tbdiag.measure.distributed`.

    ``writer.add_evaluation("val", targets, logits, epoch)`` records a
    classifier's evaluation (confusion matrix, per-class precision, recall,
    F1, accuracy) for the tab, the report and its evaluation rules.
    """

    live: LiveMonitor | None = None  # the live rules of watch(..., on_finding=, stop_on=), fed what is written

    def __init__(self, log_dir: str | None = None, *args: Any, per_rank: bool = False, **kwargs: Any):
        self.rank = distributed.current(per_rank)
        if self.rank is not None and per_rank:
            if log_dir is None:
                raise ValueError("per_rank=True needs a log_dir shared by every rank, e.g. DiagnosticWriter('runs/exp1', "
                                 "per_rank=True)")
            log_dir = os.path.join(log_dir, f"rank{self.rank.rank}")
        super().__init__(log_dir, *args, **kwargs)
        self._watchers: list[Watcher] = []
        self._jobs: "queue.Queue[Callable[[], None] | None]" = queue.Queue()
        self._worker: threading.Thread | None = None
        self._errors: list[BaseException] = []
        self._chunk_first: int | None = None
        self._chunk_count = 0
        self._health_tag_written: tuple[Any, int] | None = None
        self._evaluations: dict[str, tuple[int, tuple[str, ...]]] = {}  # tag -> (calls so far, class names)
        self._model_tag_written: tuple[Any, int] | None = None

    def _get_file_writer(self):
        """The event file writer, with TensorBoard's record writer swapped for one with a C CRC32C.

        Same bytes on disk (`tbdiag.summary.recordio`); unchanged when no C CRC32C package is installed.
        """
        if self.rank is not None and not self.rank.writes:
            if self.file_writer is None:  # this rank writes no event files: rank 0 writes the run
                self.file_writer = _NullFileWriter(self.log_dir)
                self.all_writers = {self.log_dir: self.file_writer}
            return self.file_writer
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
        histograms_every: int | None = None,
        images_every: int | None = None,
        gradient_spikes: bool = True,
        max_image_layers: int = 8,
        max_image_channels: int = 16,
        loss_tags: Sequence[str] | None = None,
        grad_scaler: Any = None,
        scalars: bool = True,
        on_finding: Callable[[Finding], Any] | None = None,
        stop_on: Sequence[str] = (),
    ) -> Watcher:
        """Observe ``model`` (and ``optimizer``) and log diagnostics every ``log_every`` steps.

        Args:
            model: the module being trained.
            optimizer: the optimizer stepping it.  With it, a step is one
                ``optimizer.step()`` and the update-to-weight ratio is measured;
                without it, a step is one backward pass through the model (or
                one training forward, where no gradient flows back through
                it: a frozen model).
            log_every: steps between logging steps (step 0 is always logged).
            log_graph: log the model graph once (traced from ``example_input``
                or from the first training forward's inputs).
            example_input: an input to trace the graph from right away.
            histograms: parameter, gradient and activation histograms.
            activation_histograms: activation histograms (needs ``histograms``).
            histograms_every: steps between histograms; default
                ``10 * log_every``.  The health statistics (what the rules
                read) are logged every ``log_every`` steps; histograms are for
                reading by eye and cost more than all the rest of a logging
                step on a small model.  ``log_every`` logs them at every
                logging step; 0 turns them off.
            images_every: steps between activation images of convolutional
                layers; default ``10 * log_every``; 0 turns them off.
            gradient_spikes: take every parameter's gradient norm at every
                step, not only at logging steps, so that ``gradient_spike``
                names a bad batch between logging steps
                (`tbdiag.measure.gradient_spikes`).  It is the one thing
                tbdiag reads between logging steps: on an accelerator one
                fused kernel launch per step; on a CPU a fixed sample of each
                gradient, a few microseconds per tensor (0.3 ms of a 13 ms
                step for a 26-layer MLP's 52 tensors).  False leaves the steps
                between logging steps with no reads at all.
            max_image_layers, max_image_channels: bound the images' count and size.
            loss_tags: scalar tags the loss rules read; default: tags
                containing "loss".
            grad_scaler: the ``torch.amp.GradScaler`` scaling the loss, when
                there is no ``optimizer``: gradients are logged unscaled.  With
                an optimizer it is not needed (the optimizer steps on unscaled
                gradients: ``scaler.step`` unscales first).
            scalars: the learning-rate and global gradient-norm scalars
                (``train/lr/group<i>``, ``train/grad_norm``); off where the
                training framework logs its own under the same tags.  The
                throughput scalars (``perf/step_time_ms``,
                ``perf/input_wait_frac``, ``perf/samples_per_sec``) are
                tbdiag's own and always written: the ``input_bound`` rule
                reads them.
            on_finding: called with each new `tbdiag.Finding` (an issue on a
                layer, announced once) as the rules see it at the end of a
                logging step, on the training thread.  An exception inside it
                is shown as a warning and training goes on.
            stop_on: rule names (``tbdiag rules``), e.g. ``("nonfinite",)``:
                when one of them holds, ``optimizer.step()`` (or ``backward()``
                without an optimizer) raises `tbdiag.TrainingHealthError`
                carrying the finding, after what was logged is flushed.
                ``"nonfinite"`` stops at the step the NaN/Inf is born at (one
                step later for one born in a backward, found through the weights it
                poisoned), whatever ``log_every``; on an accelerator it reads
                the sentinel every step (one device-host sync per step).  Other
                rules are checked at logging steps.

        With ``on_finding`` or ``stop_on`` the rules run on the run so far at
        every logging step (losses logged through this writer included), and
        an error-level finding prints a one-line warning when it starts.
        Without them, NaN/Inf found by the per-step sentinel (`tbdiag.watch.sentinel`)
        still prints one warning.

        The model may be wrapped (DDP, ``torch.compile``): hooks go on the
        user's own module and layer names carry no wrapper prefix.  So may the
        optimizer (accelerate, Lightning).  Anything tbdiag does inside the
        training loop is shielded: on an internal fault it warns once, stops
        watching and training goes on.

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
            activation_histograms=activation_histograms, histograms_every=histograms_every, images_every=images_every,
            gradient_spikes=gradient_spikes,
            max_image_layers=max_image_layers, max_image_channels=max_image_channels, loss_tags=loss_tags,
            grad_scaler=grad_scaler, scalars=scalars, on_finding=on_finding, stop_on=stop_on,
        )
        self._watchers.append(watcher)
        return watcher

    def add_evaluation(
        self,
        tag: str,
        targets: Any,
        outputs: Any,
        global_step: int | None = None,
        class_names: Sequence[str] | None = None,
        *,
        max_pr_curves: int = 10,
    ) -> None:
        """Record one evaluation of a classifier: its confusion matrix and what follows from it.

        Args:
            tag: the evaluation's name ("val", "test"); one series per tag.
            targets: true class indices ``[N]`` (tensor, array or list).
            outputs: predicted labels ``[N]``, class scores ``[N, C]`` (logits,
                or probabilities when every row sums to 1), or one binary
                score per sample ``[N]`` (a logit or the probability of class 1).
            global_step: the step (or epoch) to file it under; default: the
                number of earlier evaluations with this tag.
            class_names: a name per class; remembered for later calls of the
                tag.  The class count may grow between calls, never shrink.
            max_pr_curves: with scores, one PR curve per class for the first
                this-many classes (PR Curves tab, ``<tag>/pr_curve/<class>``).

        Writes the confusion-matrix counts (``tbdiag/eval/<tag>/<step>``: the
        report and the Diagnostics tab compute precision, recall, F1 and
        accuracy from them, and the rules ``prediction_collapse`` and
        ``neglected_class`` read them), and a picture of the matrix to the
        Images tab (``<tag>/confusion_matrix``).  Raises ValueError, saying
        what to pass instead, on mismatched lengths, bad shapes, labels out
        of range or a class name list of the wrong length.
        """
        if not isinstance(tag, str) or not tag:
            raise ValueError(f"add_evaluation: tag must be a non-empty string, got {tag!r}")
        prepared = evaluation_inputs.prepare(targets, outputs)
        calls, known = self._evaluations.get(tag, (0, ()))
        if class_names is not None:
            class_names = tuple(str(name) for name in class_names)
            if len(class_names) < prepared.n_classes or (
                    prepared.probabilities is not None and len(class_names) != prepared.n_classes):
                what = ("outputs score" if prepared.probabilities is not None else "the labels need")
                raise ValueError(f"add_evaluation: {len(class_names)} class_names but {what} "
                                 f"{prepared.n_classes} classes; pass one name per class")
            if len(class_names) < len(known):
                raise ValueError(f"add_evaluation: {len(class_names)} class_names, fewer than the {len(known)} "
                                 f"classes of earlier {tag!r} evaluations; the class list may grow, never shrink")
        else:
            class_names = known + evaluation.default_class_names(prepared.n_classes)[len(known):]
        n = len(class_names)
        step = calls if global_step is None else int(global_step)
        self._evaluations[tag] = (calls + 1, class_names)
        counts = evaluation.confusion_counts(prepared.targets, prepared.predictions, n)
        self._add(evaluation.encode(tag, step, counts, class_names), step)
        self.add_image(f"{tag}/confusion_matrix", confusion_image.render(counts, class_names), step,
                       dataformats="HWC")
        if prepared.probabilities is not None:
            for c in range(min(prepared.probabilities.shape[1], max(0, max_pr_curves))):
                self.add_pr_curve(f"{tag}/pr_curve/{class_names[c]}", prepared.targets == c,
                                  prepared.probabilities[:, c], step)

    def watch_loader(self, loader: Iterable) -> TimedLoader:
        """``loader``, timed: iterate over what this returns and the input wait is measured exactly.

        Without it the input wait is the gap between one step's end and the next
        training forward (the loader plus the loop's own code).  The wrapper
        yields the loader's batches unchanged, and passes ``len()`` and
        attributes (``dataset``, ``sampler``, ``batch_size``) through.
        Optional; for loops that iterate the loader themselves (trainers that
        want a real ``DataLoader`` take the unwrapped one).
        """
        return TimedLoader(loader, self._loader_fetched)

    def _loader_fetched(self, seconds: float) -> None:
        for watcher in self._watchers:
            watcher.timer.loader_fetched(seconds)

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

    def add_scalar(self, tag: str, scalar_value: Any, global_step: int | None = None, *args: Any, **kwargs: Any) -> None:
        """`SummaryWriter.add_scalar`; a loss also feeds the live rules of ``watch(..., on_finding=, stop_on=)``."""
        super().add_scalar(tag, scalar_value, global_step, *args, **kwargs)
        if self.live is not None:
            self.live.add_loss(tag, global_step, scalar_value)

    # ------------------------------------------- what the watcher hands over

    def write_step(self, record: StepRecord) -> None:
        """Write one logging step (health table, scalars, histograms, images), on the background thread."""
        if self._chunk_first is None or self._chunk_count >= schema.STEPS_PER_TAG:
            self._chunk_first, self._chunk_count = record.step, 0
        self._chunk_count += 1
        tag_step = self._chunk_first
        self._enqueue(lambda: self._write_step(record, tag_step))
        if self.live is not None:
            self.live.add_record(record.step, record.health, record.model)

    def write_layer_table(self, table: schema.LayerTable) -> None:
        """Write the layer table (read by the rules) and the model summary (the Text tab)."""
        summary, text = schema.encode_layers(table), summary_markdown(table)
        if self.live is not None:
            self.live.set_table(table)
        self._enqueue(lambda: (self._add(summary, 0), self.add_text(SUMMARY_TAG, text, 0)))

    def write_graph(self, events: Sequence[event_pb2.Event]) -> None:
        """Write the events that put the model graph in the Graphs tab (see `tbdiag.measure.graph`)."""
        self._enqueue(lambda: [self._get_file_writer().add_event(event) for event in events])

    def _add(self, summary: summary_pb2.Summary, step: int) -> None:
        self._get_file_writer().add_summary(summary, step)

    def _write_step(self, record: StepRecord, tag_step: int) -> None:
        # metadata on the first value of each health tag in this writer's file only (see encode_health)
        file_writer = self._get_file_writer()
        last = self._health_tag_written
        first_of_tag = last is None or last[0] is not file_writer or last[1] != tag_step
        self._health_tag_written = (file_writer, tag_step)
        step = record.step
        self._add(schema.encode_health(tag_step, record.health, with_metadata=first_of_tag), step)
        if record.model:
            model_first = first_of_tag or self._model_tag_written != (file_writer, tag_step)
            self._model_tag_written = (file_writer, tag_step)
            self._add(schema.encode_model(tag_step, record.model, with_metadata=model_first), step)
        for tag, value in record.scalars:
            self.add_scalar(tag, value, step)
        # every histogram of the step in one Summary: one event and one record instead of one per tensor
        binned = [(tags, stats.host_histograms(samples, lengths, scales), numels)
                  for tags, samples, lengths, scales, numels in record.histogram_samples]
        summary = summary_pb2.Summary()
        for tags, rows, numels in binned + record.histogram_rows:
            summary.MergeFrom(histogram_summary(tags, rows, numels))
        if summary.value:
            self._add(summary, step)
        for tag, grid in record.images:
            self._add(images.image_summary(tag, grid), step)


class _NullFileWriter:
    """The file writer of a rank that writes no event files: accepts everything, writes nothing."""

    def __init__(self, log_dir: str):
        self._log_dir = log_dir

    def get_logdir(self) -> str:
        return self._log_dir

    def add_event(self, *args: Any, **kwargs: Any) -> None:
        pass

    add_summary = add_graph = add_onnx_graph = add_event

    def flush(self) -> None:
        pass

    close = reopen = flush


def _flush_at_exit(ref: "weakref.ref[DiagnosticWriter]") -> None:
    writer = ref()
    if writer is not None and writer._worker is not None:
        writer.flush()
