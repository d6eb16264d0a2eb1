"""`DiagnosticsCallback`: tbdiag as a Hugging Face `transformers.TrainerCallback`.

Example::

    from transformers import Trainer, TrainingArguments
    from tbdiag.integrations.transformers import DiagnosticsCallback

    args = TrainingArguments(output_dir="out", report_to="tensorboard", logging_steps=50)
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[DiagnosticsCallback(log_every=50)])
    trainer.train()
    # then: tensorboard --logdir out/runs   or   tbdiag report out/runs
"""

from __future__ import annotations

import os
import sys
from typing import Any

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.integrations import TensorBoardCallback, rewrite_logs
    from transformers.trainer_callback import CallbackHandler
except ImportError as e:  # pragma: no cover - only without transformers
    raise ImportError(
        "tbdiag.integrations.transformers needs transformers: pip install 'tbdiag[transformers]'"
    ) from e

from torch import nn

from ..writer import DiagnosticWriter
from ._common import check_watch_kwargs

__all__ = ["DiagnosticsCallback"]


def _sibling_callbacks(callback: TrainerCallback) -> list[TrainerCallback] | None:
    """The callbacks of the `Trainer` that is calling ``callback`` right now.

    Callbacks receive no handle on the trainer or on each other, yet the
    directory of HF's `TensorBoardCallback` is chosen inside its own
    ``on_train_begin`` (from the clock, in transformers 5) and kept on that
    instance.  The `CallbackHandler` dispatching the event is on the call
    stack a frame or two up; we look for the one that holds ``callback``.
    """
    frame = sys._getframe(1)
    try:
        for _ in range(8):
            if frame is None:
                return None
            owner = frame.f_locals.get("self")
            if isinstance(owner, CallbackHandler) and any(cb is callback for cb in owner.callbacks):
                return list(owner.callbacks)
            frame = frame.f_back
        return None
    finally:
        del frame  # frames reference their locals: no cycle left behind


def _default_logging_dir(args: TrainingArguments, state: TrainerState) -> str:
    """Where HF's `TensorBoardCallback` writes when nothing else says: the same rules, in the same order."""
    env = os.getenv("TENSORBOARD_LOGGING_DIR")
    if env:
        return os.path.expanduser(env)
    legacy = getattr(args, "logging_dir", None)  # transformers 4.x: an argument, defaulting to output_dir/runs/...
    if legacy:
        base = legacy
    else:
        from transformers.integrations.integration_utils import default_logdir

        base = os.path.join(args.output_dir, default_logdir())
    if state.is_hyper_param_search and state.trial_name:
        base = os.path.join(base, state.trial_name)
    return base


class DiagnosticsCallback(TrainerCallback):
    r"""Watch the model with tbdiag during `Trainer.train` and log its health statistics to TensorBoard.

    With ``report_to="tensorboard"`` the diagnostics go into the directory of
    HF's own `TensorBoardCallback`, next to its ``train/loss``, so the
    Diagnostics tab and ``tbdiag report`` read the loss curves too.  Without it,
    the callback writes into the directory HF would have used and logs the loss
    scalars itself (``train/loss`` at ``state.global_step``), so the loss rules
    still have data.

    Statistics are logged at optimizer steps 0, ``log_every``, ``2 * log_every``,
    ...: the statistics of the batch trained while ``state.global_step`` had
    that value.  (HF logs its loss after the step, at the incremented
    ``global_step``: the loss at step 50 is the mean over batches 0-49.)

    Args:
        log_every: optimizer steps between logging steps (step 0 is always logged).
        \**watch_kwargs: any other keyword argument of
            `tbdiag.DiagnosticWriter.watch` (``histograms=False``,
            ``images_every=0``, ``loss_tags=[...]``, ...).

    In a distributed job every process watches, the statistics cover the
    global batch, and only the main process (``state.is_world_process_zero``)
    writes.  The writer is closed and the hooks removed when training ends;
    if training raises, what was measured is still written when the process
    exits.
    """

    def __init__(self, log_every: int = 100, **watch_kwargs: Any) -> None:
        check_watch_kwargs(log_every, watch_kwargs)
        self.log_every = log_every
        self.watch_kwargs = watch_kwargs
        self.writer: DiagnosticWriter | None = None
        self._write_losses = False

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: Any = None,
        **kwargs: Any,
    ) -> None:
        """Create the writer in HF's TensorBoard run and watch the model with the trainer's optimizer."""
        self._close()  # a writer left over from an earlier train() that did not finish
        if model is None:
            raise ValueError("DiagnosticsCallback needs the Trainer's model; none was passed to on_train_begin")
        siblings = _sibling_callbacks(self)
        if siblings is None:  # called outside a Trainer's handler: trust the arguments
            tensorboard = None
            hf_writes_tensorboard = any(r in ("tensorboard", "all") for r in (args.report_to or []))
        else:
            tensorboard = next((cb for cb in siblings if isinstance(cb, TensorBoardCallback)), None)
            hf_writes_tensorboard = tensorboard is not None
        # On every process of a distributed job: the writer pools the statistics over the global batch and
        # only rank 0 writes event files; the other processes' directory is never created.
        if state.is_world_process_zero:
            log_dir = self._log_dir(tensorboard, args, state)
        else:
            log_dir = _default_logging_dir(args, state)
        self._write_losses = not hf_writes_tensorboard
        self.writer = DiagnosticWriter(log_dir)
        kwargs = dict(self.watch_kwargs)
        if hf_writes_tensorboard:  # HF writes train/grad_norm itself: one curve per tag in the run
            kwargs.setdefault("scalars", False)
        handle = self.writer.watch(model, optimizer, log_every=self.log_every, **kwargs)
        # resume_from_checkpoint: the steps go on from the checkpoint's, as HF's own logs do
        handle.step = state.global_step

    @staticmethod
    def _log_dir(tensorboard: TensorBoardCallback | None, args: TrainingArguments, state: TrainerState) -> str:
        if tensorboard is not None:
            tb_writer = getattr(tensorboard, "tb_writer", None)
            if tb_writer is not None:  # it ran before us (report_to callbacks come first): its run, exactly
                return tb_writer.get_logdir()
            if getattr(tensorboard, "logging_dir", None):
                return tensorboard.logging_dir
            # it runs after us (listed after this callback): pick the directory for both of us
            log_dir = _default_logging_dir(args, state)
            if hasattr(tensorboard, "logging_dir"):
                tensorboard.logging_dir = log_dir
            return log_dir
        return _default_logging_dir(args, state)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        """Write the loss scalars when HF's TensorBoard callback does not (the loss rules read them)."""
        if self.writer is None or not self._write_losses or not logs:
            return
        # HF's own tag names (train/loss, eval/loss): the same run reads the same whichever wrote it
        for tag, value in rewrite_logs(logs).items():
            if "loss" in tag and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, state.global_step)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        """Remove the hooks and write what is pending: the model is hook-free after train()."""
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
