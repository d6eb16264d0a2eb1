"""The gradient-norm spike tracker: the worst jump of the global gradient norm at any step, kept on the device.

A logging step sees one step in ``log_every``; a bad batch in between spikes
the gradient norm, the optimizer takes the step, and the next logging step
shows only the aftermath.  So every step feeds its per-parameter gradient
norms (one fused ``torch._foreach_norm``) to a `SpikeTracker`, which keeps,
without any host read:

- a ring of the last `RING` global gradient norms (OLMo-core's stability
  monitor judges against the last 128 values);
- for the step since the previous logging step whose global norm stood
  furthest above that history (robust z-score: median and MAD, so the spike
  itself and the early transient barely move the reference), its z-score, its
  ratio to the median, its step, the loss at that step when the model's
  output carries one (Hugging Face ``.loss``), and every parameter's gradient
  norm at that step, so the layers that carried the jump can be named.

A step only writes its norms, its loss and its step number into a row of a
buffer (a few small copies: the per-step cost is the norm itself).  The
judging is batched: at the logging step, or when `WINDOW` steps have
gathered, every buffered step is scored against the ring values before it in
one pass (the medians of a ``[steps, RING]`` sliding view) and the best one
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
        self._norms: torch.Tensor | None = None  # [window, parameters] buffered steps' per-parameter norms
        self._losses: torch.Tensor | None = None  # [window] their losses (NaN: none)
        self._steps: torch.Tensor | None = None  # [window] their step numbers (float64)
        self._count = 0  # steps buffered
        self._seen = 0  # steps written into the ring before the buffered ones
        self._judged = False  # some step of this window had history enough to be judged
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # parameter positions -> index tensor (device)
        self._best: dict[str, torch.Tensor] | None = None  # this window's kept step

    def _allocate(self, n_params: int, device: torch.device) -> None:
        nan = math.nan
        self._history = torch.full((self.ring_size,), nan, device=device)
        self._loss_history = torch.full((self.ring_size,), nan, device=device)
        self._norms = torch.zeros((self.window, n_params), device=device)
        self._losses = torch.full((self.window,), nan, device=device)
        self._steps = torch.zeros((self.window,), dtype=torch.float64, device=device)
        self._index.clear()
        self._count, self._seen, self._judged, self._best = 0, 0, False, None

    def observe(self, step: int, norms: torch.Tensor, positions: list[int], n_params: int,
                loss: torch.Tensor | None = None) -> None:
        """One step's per-parameter gradient norms (float32 vector at ``positions`` of ``n_params``), and its loss."""
        device = norms.device
        if self._norms is None or self._norms.device != device or self._norms.shape[1] != n_params:
            self._allocate(n_params, device)
        i = self._count
        row = self._norms[i]
        if len(positions) == n_params:
            row.copy_(norms)
        else:  # parameters without a gradient at this step count as 0 there
            key = tuple(positions)
            index = self._index.get(key)
            if index is None:
                index = self._index[key] = torch.tensor(positions, device=device)
            row.zero_().index_copy_(0, index, norms)
        if loss is not None and loss.numel() == 1 and loss.is_floating_point():
            self._losses[i].copy_(stats.gather([loss.detach().reshape(())], device)[0])
        self._steps[i].fill_(step)  # (a kernel argument: no host-to-device copy)
        self._judged = self._judged or self._seen + i >= self.min_history
        self._count += 1
        if self._count == self.window:
            self._judge()

    def _judge(self) -> None:
        """Score every buffered step against the ring values before it; keep the window's best; roll the ring."""
        k, ring = self._count, self.ring_size
        if k == 0:
            return
        totals = torch.linalg.vector_norm(self._norms[:k], dim=1)
        totals = torch.where(torch.isfinite(totals), totals, math.nan)  # Inf/NaN is the sentinel's: no reference
        losses = self._losses[:k]
        losses = torch.where(torch.isfinite(losses), losses, math.nan)
        every = torch.cat([self._history, totals])
        every_loss = torch.cat([self._loss_history, losses])
        before = every.unfold(0, ring, 1)[:k]  # row j: the ring values just before buffered step j
        z, ratio = robust_jump(before, totals, dim=1)
        enough = (~torch.isnan(before)).sum(dim=1) >= self.min_history
        z = torch.where(enough & torch.isfinite(z), z, -math.inf)
        loss_median = every_loss.unfold(0, ring, 1)[:k].nanmedian(dim=1).values
        at = z.argmax().reshape(1)
        here = {"z": z.index_select(0, at)[0], "ratio": ratio.index_select(0, at)[0],
                "step": self._steps[:k].index_select(0, at)[0],
                "loss_ratio": (losses / loss_median).index_select(0, at)[0],
                "norms": self._norms[:k].index_select(0, at)[0]}
        best = self._best
        if best is None:
            self._best = {name: value.clone() for name, value in here.items()}
        else:
            better = here["z"] > best["z"]
            self._best = {name: torch.where(better, value, best[name]) for name, value in here.items()}
        self._history = every[-ring:].clone()
        self._loss_history = every_loss[-ring:].clone()
        self._losses.fill_(math.nan)
        self._seen += k
        self._count = 0

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


__all__ = ["SpikeTracker", "robust_jump", "RING", "MIN_HISTORY", "WINDOW"]
