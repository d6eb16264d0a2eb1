"""Every step's per-parameter gradient norms for the spike tracker: exact on an accelerator, sampled on a CPU.

The spike tracker (`tbdiag.measure.gradient_spikes`) needs a norm per
parameter at every step, not only at logging steps, so what it costs is paid
at every step.

- On an accelerator, one ``torch._foreach_norm`` over every gradient is one
  fused kernel launch per few dozen tensors, queued and never waited for:
  exact, and the cheapest thing the host can do.
- On a CPU, ``torch._foreach_norm`` is a loop of kernels over every byte of
  every gradient.  So a gradient of `SAMPLE_FROM` elements or more is read on
  a fixed subset (`stats.sample_stride`, as for the histograms: `SAMPLE` /
  `RUN` runs of `RUN` consecutive elements spread over the tensor's rows and
  columns), and its norm scaled to the whole tensor (``sqrt(numel /
  SAMPLE)``): one strided view per tensor, one ``stack`` and one reduction.
  Smaller gradients are read whole in one fused call (only that, when none
  is large enough).  In a 26-layer MLP's training loop (52 tensors, 2.4M
  parameters, 14 ms steps, one core; ``benchmarks/spike_norms.py``) the steps
  between logging steps cost 0.29 ms more than plain ones this way, 0.68 ms
  with every gradient read exactly, 0.14 ms with no read at all.  A sample of
  1,024 in runs of 64 cost 0.2 ms less again, but its layer estimates were off
  by up to 87% (Llama) and its global norm by 23% (a CNN).

Why an estimate is enough there: a spike is judged against the same estimate
at the previous 128 steps (a ratio of like to like, whose sampling noise only
widens the tracker's robust spread), and the layers that carried it are named
for growths of x3 and more; the gradient norms logged at logging steps stay
exact.  An embedding's gradient sits in the rows of the batch's tokens, where
a fixed sample reads a few of them or none (its estimate was off by 107% on
Llama's): the caller names those to read whole.  Measured error
(tests/test_sampled_norms.py, on the real gradients of an MLP, a CNN, GPT-2
and Llama): within `GLOBAL_NORM_ERROR` for the global norm and
`LAYER_NORM_ERROR` for a dense weight's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from . import stats

#: Elements read of each larger gradient at every step (the histograms' sample) ...
SAMPLE = stats.HISTOGRAM_SAMPLE
#: ... in runs of this many consecutive elements (one cache line of float32) ...
RUN = stats.SAMPLE_RUN
#: ... from gradients of at least this many elements.  A strided view and its share of the stacking cost a few
#: microseconds per tensor in a training loop; reading a gradient of 64K float32 elements whole costs about as
#: much.  Below it a sample saves nothing: with a ResNet-20's 65 gradients (0.27M parameters, the largest 37K) the
#: steps between logging steps cost 0.18 ms more than plain ones read exactly, 0.75 ms sampled
#: (`benchmarks/spike_norms.py`).
SAMPLE_FROM = 16 * SAMPLE

#: Largest relative error of the sampled global gradient norm (every parameter) against the exact one, asserted by
#: tests/test_sampled_norms.py on eight steps of real gradients of an MLP, a CNN, GPT-2 and Llama (measured: at most
#: 8.6%, the CNN, whose first fully connected weight holds most of its norm; 0.1-1.1% on the others).
GLOBAL_NORM_ERROR = 0.12
#: Largest relative error of one dense weight's sampled gradient norm (a Linear's, a convolution's), asserted by the
#: same test (measured: up to 36%, a CNN's and Llama's, whose gradients sit in a few rows or channels).  Enough to name
#: the layers that carried a jump of x3 or more; the logged gradient norms of logging steps stay exact.
LAYER_NORM_ERROR = 0.5


class _Plan:
    """How a CPU list of gradients (its sizes, one dtype) is read; built once, reused at every step."""

    def __init__(self, grads: Sequence[torch.Tensor], whole: frozenset[int]):
        first = grads[0]
        self.whole_asked = whole
        self.kind = (len(grads), first.dtype, first.device)
        self.numels = [g.numel() for g in grads]
        strides = [stats.sample_stride(g.numel(), SAMPLE, RUN, g.shape[-1] if g.dim() > 1 else None) for g in grads]
        same = [g.dtype == first.dtype and g.device == first.device for g in grads]
        self.large = [i for i, g in enumerate(grads) if same[i] and strides[i] is not None and g.numel() >= SAMPLE_FROM
                      and g.is_contiguous() and i not in whole]
        chosen = set(self.large)
        self.whole = [i for i in range(len(grads)) if i not in chosen]
        self.strides = [strides[i] for i in self.large]
        self.shape = (SAMPLE // RUN, RUN)
        self.scale = torch.tensor([math.sqrt(self.numels[i] / SAMPLE) for i in self.large],
                                  dtype=torch.float32)
        #: the norms come out in this order: sampled first, then the whole ones
        self.order = self.large + self.whole

    def fits(self, grads: Sequence[torch.Tensor], whole: frozenset[int]) -> bool:
        """Whether ``grads`` still have this plan's layout, and the sampled ones are contiguous (their views valid).

        A gradient has its parameter's dtype and device (autograd's rule): a cast of the model changes all of
        them, so the first stands for them; sizes change one by one (lazy modules).
        """
        first = grads[0]
        if (len(grads), first.dtype, first.device) != self.kind or whole != self.whole_asked:
            return False
        return all(g.numel() == n for g, n in zip(grads, self.numels)) \
            and all(grads[i].is_contiguous() for i in self.large)

    def norms(self, grads: Sequence[torch.Tensor]) -> torch.Tensor:
        shape = self.shape
        parts = []
        if self.large:
            views = [grads[i].as_strided(shape, (step, 1), grads[i].storage_offset())
                     for i, step in zip(self.large, self.strides)]
            parts.append(torch.linalg.vector_norm(torch.stack(views), dim=(1, 2), dtype=torch.float32)
                         .mul_(self.scale))
        if self.whole:
            parts.append(stats.norms([grads[i] for i in self.whole]))
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class SampledNorms:
    """Per-parameter gradient norms of every step (module docstring); no host read."""

    def __init__(self, sample_on_cpu: bool = True) -> None:
        #: False: exact on a CPU too (one ``torch._foreach_norm``), for measuring what the sample saves
        self.sample_on_cpu = sample_on_cpu
        self._plan: _Plan | None = None
        self._identity: list[int] = []

    def __call__(self, grads: Sequence[torch.Tensor], whole: frozenset[int] = frozenset()
                 ) -> tuple[torch.Tensor, list[int]]:
        """``(norms, order)``: float32 norms on the first gradient's device, ``norms[j]`` of ``grads[order[j]]``.

        ``whole``: positions in ``grads`` read exactly whatever their size: those whose gradient sits in a few
        rows (an embedding's: the batch's tokens), where a sample's estimate is poor.  ``order`` is the same list
        object at every step while the layout holds.
        """
        if not grads:
            return torch.zeros(0), []
        with torch.no_grad():
            if grads[0].device.type != "cpu" or not self.sample_on_cpu:
                if len(self._identity) != len(grads):
                    self._identity = list(range(len(grads)))
                return stats.norms(grads), self._identity
            plan = self._plan
            if plan is None or not plan.fits(grads, whole):
                plan = self._plan = _Plan(grads, whole)
            return plan.norms(grads), plan.order


__all__ = ["SampledNorms", "SAMPLE", "RUN", "SAMPLE_FROM", "GLOBAL_NORM_ERROR", "LAYER_NORM_ERROR"]
