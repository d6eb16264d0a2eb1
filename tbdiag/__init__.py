"""tbdiag: training diagnostics for PyTorch on TensorBoard.

``DiagnosticWriter(logdir).watch(model, optimizer)`` records per-layer health
statistics while training; ``tbdiag.report(logdir)`` (or ``tbdiag report``)
and the TensorBoard "Diagnostics" tab turn them into findings.
"""

from .rules import Finding, RULES
from .writer import DiagnosticWriter
from .report import report

__all__ = ["DiagnosticWriter", "Finding", "RULES", "report"]
__version__ = "0.1.0"
