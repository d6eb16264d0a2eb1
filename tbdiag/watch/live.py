"""Live alerts: the rules evaluated while training runs, ``on_finding`` and ``stop_on``.

``watch(..., on_finding=callback, stop_on=("nonfinite", ...))`` keeps the run
so far on the host (the logged steps' `StepRecord` s, the layer table, the
loss scalars written through the same writer) and, at the end of each logging
step, evaluates the rule table on it with the same `tbdiag.rules.evaluator.evaluate`
the report and the tab use.  Each finding (an issue on a layer) is announced
once: a one-line warning when it is an error, ``on_finding(finding)``, and
`TrainingHealthError` when its issue is in ``stop_on``.

Torch-free, so ``tbdiag.TrainingHealthError`` can be caught without the
writer side.  The cost is the rules' evaluation over the whole run at each
logging step, paid only when ``on_finding`` or ``stop_on`` is given.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, Sequence

from ..contract.rundata import RunData, is_loss_tag
from ..contract.schema import COLUMNS, LayerTable
from ..rules.table import RULES_BY_NAME, Finding


class TrainingHealthError(RuntimeError):
    """Raised out of ``optimizer.step()`` / ``backward()`` when a finding named in ``watch(..., stop_on=...)`` holds.

    ``finding`` is the `tbdiag.Finding`; ``issue``, ``layer``, ``step`` and
    ``advice`` are its main facts.  Everything logged up to that step is
    written and flushed before it is raised.
    """

    def __init__(self, finding: Finding):
        self.finding = finding
        self.issue, self.layer = finding.issue, finding.layer
        self.step, self.advice = finding.first_step, finding.advice
        where = f", layer {finding.layer}" if finding.layer else ""
        super().__init__(f"tbdiag stopped training: {finding.issue}{where}, step {finding.first_step}: "
                         f"{finding.message}. What to try: {finding.advice}")

    def __reduce__(self):  # picklable (multiprocessing, sweeps)
        return (type(self), (self.finding,))


def check_arguments(on_finding: Any, stop_on: Any) -> tuple[str, ...]:
    """Validate ``watch``'s live arguments; returns ``stop_on`` as a tuple of rule names."""
    if on_finding is not None and not callable(on_finding):
        raise TypeError(f"on_finding must be a callable taking a tbdiag.Finding, got {type(on_finding).__name__}")
    if stop_on is None:
        return ()
    names = (stop_on,) if isinstance(stop_on, str) else stop_on
    try:
        names = tuple(names)
    except TypeError:
        raise TypeError(f"stop_on must be a sequence of rule names such as ('nonfinite',), got {stop_on!r}") from None
    unknown = [n for n in names if n not in RULES_BY_NAME]
    if unknown:
        raise ValueError(f"stop_on names unknown rule(s) {', '.join(map(repr, unknown))}; valid names "
                         f"(see `tbdiag rules`): {', '.join(RULES_BY_NAME)}")
    return names


class LiveMonitor:
    """The run so far on the host, and the findings already announced."""

    def __init__(self, run: str, on_finding: Callable[[Finding], Any] | None, stop_on: Sequence[str],
                 loss_tags: Sequence[str] | None, before_raise: Callable[[], None] | None = None):
        self.run, self.on_finding, self.stop_on, self.loss_tags = run, on_finding, tuple(stop_on), loss_tags
        self._before_raise = before_raise  # the writer's flush: what was logged is on disk when training stops
        self._table: LayerTable | None = None
        self._samples: list[tuple[int, Any, Sequence[str]]] = []
        self._model: list[tuple[int, dict[str, float]]] = []
        self._losses: dict[str, tuple[list[int], list[float]]] = {}
        self._lock = threading.Lock()  # losses may come from another thread than the training one
        self._announced: set[tuple[str, str | None]] = set()
        self._new = False  # a logged step arrived since the last evaluation

    def set_table(self, table: LayerTable) -> None:
        self._table = table

    def add_record(self, step: int, health: Any, model: dict[str, float]) -> None:
        self._samples.append((step, health, COLUMNS))
        self._model.append((step, dict(model)))
        self._new = True

    def add_loss(self, tag: str, step: int | None, value: Any) -> None:
        if step is None or not is_loss_tag(tag, self.loss_tags):
            return
        try:
            value = float(value)
        except (TypeError, ValueError):
            return
        with self._lock:
            steps, values = self._losses.setdefault(tag, ([], []))
            steps.append(int(step))
            values.append(value)

    def findings(self) -> list[Finding]:
        """The rules on the run so far."""
        from ..rules.evaluator import evaluate  # the rule checkers, imported where they run

        with self._lock:
            losses = {tag: (list(s), list(v)) for tag, (s, v) in self._losses.items()}
        run = RunData.from_samples(self.run, self._table, self._samples, losses, self._model)
        return evaluate(run)

    def check(self) -> None:
        """At a logging step's end: announce new findings; raise `TrainingHealthError` for one in ``stop_on``."""
        if not self._new:
            return
        self._new = False
        stop: Finding | None = None
        for finding in self.findings():
            key = (finding.issue, finding.layer)
            if key in self._announced:
                continue
            self._announced.add(key)
            if finding.severity == "error":
                warnings.warn(f"tbdiag: {finding.message}", RuntimeWarning, stacklevel=2)
            if self.on_finding is not None:
                try:
                    self.on_finding(finding)
                except Exception as e:  # the user's callback: its fault must not stop training either
                    warnings.warn(f"tbdiag: the on_finding callback raised {type(e).__name__}: {e}; training goes "
                                  "on and later findings are still passed to it", RuntimeWarning, stacklevel=2)
            if stop is None and finding.issue in self.stop_on:
                stop = finding
        if stop is not None:
            if self._before_raise is not None:
                self._before_raise()
            raise TrainingHealthError(stop)

