"""What both integrations share: checking ``watch``'s keyword arguments when the callback is built."""

from __future__ import annotations

import inspect
from typing import Any


def check_watch_kwargs(log_every: int, kwargs: dict[str, Any]) -> None:
    """Fail when the callback is built, not when training starts, on a misspelt ``watch`` argument.

    A typo would otherwise surface only after the framework has set up the
    model and the data (and, for Lightning, run the validation sanity check).
    """
    from ..writer import DiagnosticWriter

    params = inspect.signature(DiagnosticWriter.watch).parameters
    fixed = {"self", "model", "optimizer", "log_every"}
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k in fixed or (k not in params and not open_ended))
    if unknown:
        accepted = ", ".join(name for name, p in params.items()
                             if name not in fixed and p.kind is not inspect.Parameter.VAR_KEYWORD)
        raise TypeError(
            f"unexpected argument(s) {', '.join(unknown)}: the model and optimizer come from the trainer; "
            f"the accepted arguments are log_every, {accepted}"
        )
    if isinstance(log_every, bool) or not isinstance(log_every, int) or log_every < 1:
        raise ValueError(f"log_every must be a positive integer (steps between logs), got {log_every!r}")
