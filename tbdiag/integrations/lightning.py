"""`DiagnosticsMonitor`: tbdiag as a Lightning callback.

Example::

    from lightning.pytorch import Trainer
    from tbdiag.integrations.lightning import DiagnosticsMonitor

    trainer = Trainer(callbacks=[DiagnosticsMonitor(log_every=50)])
    trainer.fit(model, train_loader)
    # then: tensorboard --logdir lightning_logs   or   tbdiag report lightning_logs

Works with the ``lightning.pytorch`` namespace and, when only that is
installed, the standalone ``pytorch_lightning`` package.
"""

from __future__ import annotations

from typing import Any

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.exceptions import MisconfigurationException
except ImportError:  # pragma: no cover - only where the standalone package is installed instead
    try:
        import pytorch_lightning as pl  # type: ignore[no-redef]
        from pytorch_lightning.utilities.exceptions import MisconfigurationException  # type: ignore[no-redef]
    except ImportError as e:
        raise ImportError(
            "tbdiag.integrations.lightning needs Lightning: pip install 'tbdiag[lightning]'"
        ) from e

from ..writer import DiagnosticWriter
from ._common import check_watch_kwargs

__all__ = ["DiagnosticsMonitor"]


def _is_tensorboard_logger(logger: Any) -> bool:
    # By class name along the MRO rather than isinstance: Lightning has the class in three places
    # (lightning.pytorch, lightning.fabric, pytorch_lightning) and a subclass of any of them counts.
    return any(cls.__name__ == "TensorBoardLogger" for cls in type(logger).__mro__)


def tensorboard_log_dir(trainer: "pl.Trainer") -> str:
    """The run directory of the trainer's first `TensorBoardLogger`: where its scalars go.

    Raises `MisconfigurationException` when the trainer has no TensorBoard
    logger: the diagnostics would otherwise land in a run of their own,
    apart from the loss curves the loss rules read.
    """
    for logger in trainer.loggers:
        if _is_tensorboard_logger(logger):
            return logger.log_dir
    have = ", ".join(type(logger).__name__ for logger in trainer.loggers) or "no logger (logger=False)"
    raise MisconfigurationException(
        "DiagnosticsMonitor writes into the run of the trainer's TensorBoardLogger, but the trainer has "
        f"{have}. Add one: Trainer(logger=TensorBoardLogger('lightning_logs'), ...) (from lightning.pytorch.loggers "
        "import TensorBoardLogger), or list it with your other loggers: logger=[TensorBoardLogger(...), ...]."
    )


class DiagnosticsMonitor(pl.Callback):
    r"""Watch the LightningModule with tbdiag and log its health statistics into the TensorBoard run.

    The diagnostics go into the directory of the trainer's (first)
    `TensorBoardLogger`, next to the scalars that ``self.log`` writes, so the
    Diagnostics tab and ``tbdiag report`` see the loss curves too.  Statistics
    are logged at ``trainer.global_step`` (optimizer steps): 0, ``log_every``,
    ``2 * log_every``, ..., the step at which Lightning logs the metrics of the
    same batch.

    Args:
        log_every: optimizer steps between logging steps (step 0 is always logged).
        \**watch_kwargs: any other keyword argument of
            `tbdiag.DiagnosticWriter.watch` (``histograms=False``,
            ``images_every=0``, ``loss_tags=[...]``, ...).

    Raises:
        MisconfigurationException: when fitting starts and the trainer has no
            `TensorBoardLogger`.

    Example::

        trainer = Trainer(callbacks=[DiagnosticsMonitor(log_every=50)])

    The module is watched with the trainer's first optimizer; with several
    optimizers (a GAN), steps count that one's ``step()`` calls.  Under
    DDP/FSDP every rank watches, the statistics cover the global batch, and
    only global rank 0 writes, as the TensorBoard logger does.
    """

    def __init__(self, log_every: int = 100, **watch_kwargs: Any) -> None:
        check_watch_kwargs(log_every, watch_kwargs)
        self.log_every = log_every
        self.watch_kwargs = watch_kwargs
        self.writer: DiagnosticWriter | None = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        """Check for a TensorBoard logger before any data is loaded, rather than after the sanity check."""
        if stage == "fit":
            tensorboard_log_dir(trainer)

    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Start watching: here the optimizers exist and a resumed run's ``global_step`` is restored."""
        self._close()  # a writer left over from an earlier fit() that did not finish
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        # On every rank under DDP/FSDP: the writer pools the statistics over the global batch and only
        # rank 0 writes event files (the other ranks' log_dir is never created).
        self.writer = DiagnosticWriter(tensorboard_log_dir(trainer))
        handle = self.writer.watch(pl_module, optimizer, log_every=self.log_every, **self.watch_kwargs)
        # A resumed fit goes on from the checkpoint's step, and so do the logged steps.
        handle.step = trainer.global_step

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        """Remove the hooks and write what is pending: the model is hook-free again after fit()."""
        self._close()

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Keep what was measured up to the failure (often what explains it) and remove the hooks."""
        self._close()

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        if writer is not None:
            writer.close()
