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

The choice among steps is a ``torch.where`` on the device; the logging step
sends the kept values with its single transfer and starts a new window.  The
thresholds live in the rule (`tbdiag.rules.spikes`), so they can change after
training: the tracker only keeps the most unusual step of each window.
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
#: MAD -> standard deviation for normal noise.
MAD_TO_SD = 1.4826
#: The spread never counts as less than this share of the median: a clipped run's norm sits at the clip value,
#: with a MAD of 0, where any wobble would otherwise score an infinite z.
SPREAD_FLOOR = 0.01


def robust_jump(history: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(z, ratio)`` of ``value`` against ``history`` (NaN entries ignored), as 0-dim device tensors.

    ``z = (value - median) / spread`` with ``spread = 1.4826 * MAD`` (at least `SPREAD_FLOOR` x the median);
    ``ratio = value / median``.  No host read.
    """
    med = history.nanmedian()
    mad = (history - med).abs().nanmedian()
    spread = torch.maximum(MAD_TO_SD * mad, SPREAD_FLOOR * med.abs()).clamp(min=torch.finfo(torch.float32).tiny)
    return (value - med) / spread, value / med.clamp(min=torch.finfo(torch.float32).tiny)


class SpikeTracker:
    """Keeps, per window between logging steps, the step whose global gradient norm jumped most (module docstring)."""

    def __init__(self, ring: int | None = None, min_history: int | None = None):
        self.ring_size = RING if ring is None else ring
        self.min_history = MIN_HISTORY if min_history is None else min_history
        self._ring: torch.Tensor | None = None  # [ring] global norms (NaN: empty); loss ring alongside
        self._loss_ring: torch.Tensor | None = None
        self._seen = 0  # steps written into the ring
        self._index: dict[tuple[int, ...], torch.Tensor] = {}  # parameter positions -> index tensor (device)
        self._best: dict[str, torch.Tensor] | None = None  # this window's kept step
        self._judged = False  # some step of this window was judged

    def observe(self, step: int, norms: torch.Tensor, positions: list[int], n_params: int,
                loss: torch.Tensor | None = None) -> None:
        """One step's per-parameter gradient norms (float32 vector at ``positions`` of ``n_params``), and its loss."""
        device = norms.device
        if self._ring is None or self._ring.device != device:
            self._ring = torch.full((self.ring_size,), math.nan, device=device)
            self._loss_ring = torch.full((self.ring_size,), math.nan, device=device)
            self._index.clear()
            self._best = None
        total = torch.linalg.vector_norm(norms)
        total = torch.where(torch.isfinite(total), total, math.nan)  # Inf/NaN is the sentinel's: not a reference
        loss_value = None
        if loss is not None and loss.numel() == 1 and loss.is_floating_point():
            loss_value = stats.gather([loss.detach().reshape(()).float()], device)[0]
            loss_value = torch.where(torch.isfinite(loss_value), loss_value, math.nan)
        if self._seen >= self.min_history:
            self._judge(step, total, norms, positions, n_params, loss_value)
        at = self._seen % self.ring_size
        self._ring[at] = total
        if loss_value is not None:
            self._loss_ring[at] = loss_value
        else:  # (a fill kernel: assigning a Python number would copy a new host tensor to the device)
            self._loss_ring[at].fill_(math.nan)
        self._seen += 1

    def _judge(self, step: int, total: torch.Tensor, norms: torch.Tensor, positions: list[int], n_params: int,
               loss: torch.Tensor | None) -> None:
        z, ratio = robust_jump(self._ring, total)
        z = torch.where(torch.isfinite(z), z, -math.inf)
        if len(positions) == n_params:
            full = norms
        else:  # parameters without a gradient at this step count as 0 there
            key = tuple(positions)
            index = self._index.get(key)
            if index is None:
                index = self._index[key] = torch.tensor(positions, device=norms.device)
            full = torch.zeros(n_params, device=norms.device).index_copy_(0, index, norms)
        loss_ratio = loss / self._loss_ring.nanmedian() if loss is not None else torch.full((), math.nan,
                                                                                             device=z.device)
        here = {"z": z, "ratio": ratio, "step": torch.full((), float(step), dtype=torch.float64, device=z.device),
                "loss_ratio": loss_ratio, "norms": full}
        best = self._best
        if best is None or best["norms"].shape != full.shape:
            self._best = here
        else:
            better = z > best["z"]
            self._best = {k: torch.where(better, v, best[k]) for k, v in here.items()}
        self._judged = True

    def add_to(self, probe: StepProbe, positions: list[int]) -> None:
        """Send this window's kept step with the logging step's transfer, and start a new window.

        ``positions``: the parameter positions of the kept per-parameter norms (all of them, in order).
        """
        best, self._best = self._best, None
        if best is None or not self._judged:
            return
        self._judged = False
        probe.add_model("grad_spike_z", best["z"])
        probe.add_model("grad_spike_ratio", best["ratio"])
        # small numbers through the float32 transfer: the offset from this logging step, the step added back
        probe.add_model("grad_spike_step", best["step"] - probe.step, offset=float(probe.step))
        probe.add_model("grad_spike_loss_ratio", best["loss_ratio"])
        probe.add("spike_g_norm", positions, best["norms"])


__all__ = ["SpikeTracker", "robust_jump", "RING", "MIN_HISTORY"]
