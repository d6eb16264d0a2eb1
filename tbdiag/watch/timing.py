"""Timing training steps on the host: how long a step takes, and how much of it waits for input.

A `StepTimer` is told four things by the watcher: a training forward begins,
a step ends, a logging step's host transfer is done (`flush`), and tbdiag's
own work at the end of a step is done (`ready`).  The input wait of a step
is the time from the previous step's ``ready`` to its first training forward:
the loader plus the loop's own code.  A loader wrapped with
`DiagnosticWriter.watch_loader` reports the exact time spent in its
``__next__`` instead.  Step time is wall-clock time between logging steps
divided by the steps taken, so it includes everything (tbdiag's own logging
too).  The aggregates cover every step since the previous logging step and
leave as the ``perf/*`` scalars (`tbdiag.rules.throughput`).

Cost: a few ``time.perf_counter()`` calls and integer additions per step; no
tensor is created and nothing waits for the device.  On CUDA the host runs
ahead of the device, so the window's end is stamped right after the logging
step's single host transfer, which has waited for the device already: the
window's length is exact.  The wait inside it is host time, the time the
loop spent fetching; where the device still had queued work meanwhile (no
``.item()`` in the loop) part of that wait overlapped with computing.

Evaluation between steps (forwards in ``eval()`` mode or under
``torch.no_grad()`` of the watched model) is not input wait: such a forward
restarts the wait clock.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable, Iterator

from ..measure.layers import first_tensor
from ..rules.throughput import INPUT_WAIT_TAG, SAMPLES_TAG, STEP_TIME_TAG


class StepTimer:
    """Host-clock step timing between logging steps (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self._clock = clock
        self._window_start: float | None = None  # the last flush (or the first step's end)
        self._ready: float | None = None  # the previous step is done, tbdiag's work included: waiting begins
        self._first_forward = True  # the next training forward is its step's first
        self._zero()

    def _zero(self) -> None:
        self._steps = 0
        self._gap = 0.0  # seconds between a step's end and its successor's first training forward
        self._fetch = 0.0  # seconds inside a watched loader's __next__
        self._fetched = False
        self._samples = 0

    def forward_begins(self, args: tuple, kwargs: dict) -> None:
        """A training forward begins: the first of its step ends that step's wait; every one counts samples."""
        if self._first_forward:
            self._first_forward = False
            if self._ready is not None:
                self._gap += self._clock() - self._ready
        x = first_tensor(args)
        if x is None and kwargs:
            x = first_tensor(kwargs)
        if x is not None and x.dim() > 0:
            self._samples += x.shape[0]

    def other_forward(self) -> None:
        """A forward that is not training (evaluation) runs between steps: the wait so far was not for input."""
        if self._first_forward and self._ready is not None:
            self._ready = self._clock()

    def loader_fetched(self, seconds: float) -> None:
        """A watched loader spent ``seconds`` producing a batch."""
        self._fetch += seconds
        self._fetched = True

    def step_ends(self) -> None:
        """A training step ends (before tbdiag's own work at its end)."""
        self._steps += 1
        self._first_forward = True

    def flush(self) -> list[tuple[str, float]]:
        """At a logging step, after its host transfer: the ``perf/*`` scalars of the steps since the last flush."""
        now = self._clock()
        start, steps = self._window_start, self._steps
        if start is None or steps == 0 or now <= start:
            return []  # the first logging step: no earlier step end to measure from
        elapsed = now - start
        wait = self._fetch if self._fetched else self._gap
        out = [(STEP_TIME_TAG, 1000.0 * elapsed / steps), (INPUT_WAIT_TAG, min(1.0, wait / elapsed))]
        if self._samples:
            out.append((SAMPLES_TAG, self._samples / elapsed))
        self._window_start = now
        self._zero()
        return out

    def ready(self) -> None:
        """tbdiag's work at the end of a step is done: the next step's wait starts now."""
        self._ready = self._clock()
        if self._window_start is None:  # the first step's end opens the first window
            self._window_start = self._ready
            self._zero()


class TimedLoader:
    """An iterable that yields exactly what ``loader`` yields and reports the time each batch took to produce.

    What `DiagnosticWriter.watch_loader` returns.  ``len()`` and attributes
    (``dataset``, ``sampler``, ``batch_size``, ...) are the loader's.  The
    first batch's time includes ``iter(loader)`` (starting worker processes).
    """

    def __init__(self, loader: Iterable, report: Callable[[float], None],
                 clock: Callable[[], float] = time.perf_counter):
        if not hasattr(loader, "__iter__"):
            raise TypeError(
                f"watch_loader() needs an iterable (a DataLoader, a generator), got {type(loader).__name__}")
        self.loader = loader
        self._report, self._clock = report, clock

    def __iter__(self) -> Iterator[Any]:
        clock, report = self._clock, self._report
        t0 = clock()
        it = iter(self.loader)
        while True:
            try:
                batch = next(it)
            except StopIteration:
                return
            report(clock() - t0)
            yield batch
            t0 = clock()

    def __len__(self) -> int:
        return len(self.loader)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, pickle): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __repr__(self) -> str:
        return f"TimedLoader({self.loader!r})"
