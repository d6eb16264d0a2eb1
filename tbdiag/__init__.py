"""tbdiag: training diagnostics for PyTorch on TensorBoard.

``DiagnosticWriter(logdir).watch(model, optimizer)`` records per-layer health
statistics while training; ``tbdiag.report(logdir)`` (or ``tbdiag report``)
and the TensorBoard "Diagnostics" tab turn them into findings.

The reading side (rules, report, the TensorBoard plugin) never imports torch:
TensorBoard loads every installed plugin at start-up, and a CI job running
``tbdiag report`` should not pay for torch.  The writer side is imported on
first use of `DiagnosticWriter`.
"""

from typing import TYPE_CHECKING, Any

from .read.report import report
from .rules.table import RULES, Finding
from .watch.live import TrainingHealthError

if TYPE_CHECKING:  # pragma: no cover
    from .writer import DiagnosticWriter

__all__ = ["DiagnosticWriter", "Finding", "RULES", "TrainingHealthError", "report"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "DiagnosticWriter":
        from .writer import DiagnosticWriter

        return DiagnosticWriter
    raise AttributeError(f"module 'tbdiag' has no attribute {name!r}")
