"""The gradient-norm spike tracker: the worst jump of the global gradient norm at any step, kept on the device.

A logging step sees one step in ``log_every``; a bad batch in between spikes
the gradient norm, the optimizer takes the step, and the next logging step
shows only the aftermath.  So every step feeds its per-parameter gradient
norms (`tbdiag.measure.sampled_norms`: exact on an accelerator, estimated
from a fixed sample of each large gradient on a CPU) to a `SpikeTracker`,
which keeps, without any host read:

- a ring of the last `RING` global gradient norms (OLMo-core's stability
  monitor judges against the last 128 values);
- for the step since the previous logging step whose global norm stood
  furthest above that history (robust z-score: median and MAD, so the spike
  itself and the early transient barely move the reference), its z-score, its
  ratio to the median, its step, the loss at that step when the model's
  output carries one (Hugging Face ``.loss``), and every parameter's gradient
  norm at that step and its median over the ring before it (the same
  measure: sampled alike on a CPU), so the layers that carried the jump can
  be named.

A step only hands over its norms, its loss and its step number, kept in
Python lists (no kernel: the per-step cost is the norm itself).  The judging
is batched: at the logging step, or when `WINDOW` steps have gathered, the
buffered steps are stacked and each is scored against the ring values before
it in one pass (the medians of a ``[steps, RING]`` sliding view), the best one
kept with a ``torch.where``.  The logging step sends the kept values with its
single transfer and starts a new window.  The thresholds live in the rule
(`tbdiag.rules.spikes`), so they can change after training: the tracker only
keeps the most unusual step of each window.
"""

from __future__ import annotations

import math

import torch

from . import stats
from .probe import StepProbe

#: Global norms kept as the reference (OLMo-core's StabilityMonitorCallback: the last 128 values).
RING = 128
#: Steps observed before any is judged: the first steps of a run (initialisation settling) have no history.
MIN_HISTORY = 16
#: Steps buffered before they are judged together (at the latest: the logging step judges whatever is there).
WINDOW = 64
#: MAD -> standard deviation for normal noise.
MAD_TO_SD = 1.4826
#: The spread never counts as less than this share of the median: a clipped run's norm sits at the clip value,
#: with a MAD of 0, where any wobble would otherwise score an infinite z.
SPREAD_FLOOR = 0.01


def robust_jump(history: torch.Tensor, value: torch.Tensor, dim: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, ratio)`` of ``value`` against ``history`` (NaN entries ignored), as device tensors.

    ``z = (value - median) / spread`` with ``spread = 1.4826 * MAD`` (at least `SPREAD_FLOOR` x the median);
    ``ratio = value / median``.  With ``dim``, each of ``value``'s entries against its own row of ``history``
    (``[values, ring]``, ``dim=1``).  No host read.
    """
    if dim is None:
        med = history.nanmedian()
        mad = (history - med).abs().nanmedian()
    else:
        med = history.nanmedian(dim=dim).values
        mad = (history - med.unsqueeze(dim)).abs().nanmedian(dim=dim).values
    spread = torch.maximum(MAD_TO_SD * mad, SPREAD_FLOOR * med.abs()).clamp(min=torch.finfo(torch.float32).tiny)
    return (value - med) / spread, value / med.clamp(min=torch.finfo(torch.float32).tiny)


class SpikeTracker:
    """Keeps, per window between logging steps, the step whose global gradient norm jumped most (module docstring)."""

    def __init__(self, ring: int | None = None, min_history: int | None = None, window: int | None = None):
        self.ring_size = RING if ring is None else ring
        self.min_history = MIN_HISTORY if min_history is None else min_history
        self.window = WINDOW if window is None else window
        self._history: torch.Tensor | None = None  # [ring] global norms before the buffered steps, oldest first
        self._loss_history: torch.Tensor | None = None
        self._param_history: torch.Tensor | None = None  # [ring, parameters] the same steps' per-parameter norms
        self._n_params = 0
        # the buffered steps, as handed over (no device work per step): norms, their parameter positions, loss
        self._rows: list[torch.Tensor] = []
        self._positions: list[int] | None = None  # the buffered rows' positions (one list for the window)
        self._losses: list[torch.Tensor | None] = []
        self._steps: list[int] = []
        self._seen = 0  # steps written into the ring before the buffered ones
        self._judged = False  # some step of this window had history enough to be judged
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # parameter positions -> index tensor (device)
        self._best: dict[str, torch.Tensor] | None = None  # this window's kept step

    def _allocate(self, n_params: int, device: torch.device) -> None:
        self._history = torch.full((self.ring_size,), math.nan, device=device)
        self._loss_history = torch.full((self.ring_size,), math.nan, device=device)
        self._param_history = torch.full((self.ring_size, n_params), math.nan, device=device)
        self._n_params = n_params
        self._index.clear()
        self._rows, self._losses, self._steps, self._positions = [], [], [], None
        self._seen, self._judged, self._best = 0, False, None

    def observe(self, step: int, norms: torch.Tensor, positions: list[int], n_params: int,
                loss: torch.Tensor | None = None) -> None:
        """One step's per-parameter gradient norms (float32 vector at ``positions`` of ``n_params``), and its loss.

        Only kept (Python list appends): a step costs no kernel here.  Parameters without a gradient at this
        step count as 0 there.
        """
        history = self._history
        if history is None or history.device != norms.device or n_params != self._n_params:
            self._allocate(n_params, norms.device)
        elif self._positions is not None and positions is not self._positions and positions != self._positions:
            self._judge()  # (rows of one window share their positions)
        self._positions = positions
        self._rows.append(norms)
        self._losses.append(loss.detach() if loss is not None and loss.numel() == 1 and loss.is_floating_point()
                            else None)
        self._steps.append(step)
        self._judged = self._judged or self._seen + len(self._rows) > self.min_history
        if len(self._rows) == self.window:
            self._judge()

    def _scatter(self, rows: torch.Tensor) -> torch.Tensor:
        """``[k, len(positions)]`` rows -> ``[k, n_params]`` in parameter order (0 where a parameter had none)."""
        positions = self._positions
        if len(positions) == self._n_params and positions == list(range(self._n_params)):
            return rows
        key = tuple(positions)
        index = self._index.get(key)
        if index is None:
            if len(self._index) >= 16:
                self._index.clear()
            index = self._index[key] = torch.tensor(positions, device=rows.device)
        return rows.new_zeros((rows.shape[0], self._n_params)).index_copy_(1, index, rows)

    def _judge(self) -> None:
        """Score every buffered step against the ring values before it; keep the window's best; roll the ring."""
        k, ring = len(self._rows), self.ring_size
        if k == 0:
            return
        device = self._history.device
        norms = self._scatter(torch.stack(stats.gather(self._rows, device)))
        totals = torch.linalg.vector_norm(norms, dim=1)
        totals = torch.where(torch.isfinite(totals), totals, math.nan)  # Inf/NaN is the sentinel's: no reference
        nan = torch.full((), math.nan, device=device)
        losses = torch.stack(stats.gather([nan if x is None else x.reshape(()).to(torch.float32)
                                           for x in self._losses], device))
        losses = torch.where(torch.isfinite(losses), losses, math.nan)
        every = torch.cat([self._history, totals])
        every_loss = torch.cat([self._loss_history, losses])
        every_params = torch.cat([self._param_history, norms])
        before = every.unfold(0, ring, 1)[:k]  # row j: the ring values just before buffered step j
        z, ratio = robust_jump(before, totals, dim=1)
        enough = (~torch.isnan(before)).sum(dim=1) >= self.min_history
        z = torch.where(enough & torch.isfinite(z), z, -math.inf)
        loss_median = every_loss.unfold(0, ring, 1)[:k].nanmedian(dim=1).values
        at = z.argmax().reshape(1)
        steps, first = self._steps, self._steps[0]
        if steps[-1] - first == k - 1:  # consecutive (the rule): the step is an offset, a kernel argument
            step = at[0].to(torch.float64) + first
        else:  # a step without gradients in between: the steps as a device vector (k small kernels, not a copy)
            values = torch.empty(k, dtype=torch.float64, device=device)
            for j, value in enumerate(steps):
                values[j].fill_(value)
            step = values.index_select(0, at)[0]
        # each parameter's usual norm before the kept step: the median of its ring rows (like with like)
        rows = torch.arange(ring, device=device) + at
        typical = every_params.index_select(0, rows).nanmedian(dim=0).values
        here = {"z": z.index_select(0, at)[0], "ratio": ratio.index_select(0, at)[0], "step": step,
                "loss_ratio": (losses / loss_median).index_select(0, at)[0],
                "norms": norms.index_select(0, at)[0], "typical": typical}
        best = self._best
        if best is None:
            self._best = here
        else:
            better = here["z"] > best["z"]
            self._best = {name: torch.where(better, value, best[name]) for name, value in here.items()}
        self._history = every[-ring:].clone()
        self._loss_history = every_loss[-ring:].clone()
        self._param_history = every_params[-ring:].clone()
        self._seen += k
        self._rows, self._losses, self._steps = [], [], []

    def add_to(self, probe: StepProbe, positions: list[int]) -> None:
        """Send this window's kept step with the logging step's transfer, and start a new window.

        ``positions``: the parameter positions of the kept per-parameter norms (all of them, in order).
        """
        self._judge()
        best, self._best = self._best, None
        judged, self._judged = self._judged, False
        if best is None or not judged:
            return
        probe.add_model("grad_spike_z", best["z"])
        probe.add_model("grad_spike_ratio", best["ratio"])
        # small numbers through the float32 transfer: the offset from this logging step, the step added back
        probe.add_model("grad_spike_step", best["step"] - probe.step, offset=float(probe.step))
        probe.add_model("grad_spike_loss_ratio", best["loss_ratio"])
        probe.add("spike_g_norm", positions, best["norms"])
        probe.add("spike_g_typical", positions, best["typical"])


__all__ = ["SpikeTracker", "robust_jump", "RING", "MIN_HISTORY", "WINDOW"]
