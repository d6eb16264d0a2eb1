"""The output's log-partition log Z, measured at a logging step's training forward.

``log Z = logsumexp(logits)`` over the class (vocabulary) dimension is what a
softmax subtracts from every logit.  Cross-entropy does not depend on it (a
shift of every logit changes nothing), so nothing holds it in place: at a high
learning rate it drifts far from 0, and the logits with it, until the softmax
saturates and low-precision arithmetic loses the differences between logits
(Wortsman et al. 2023, "output logit divergence"; PaLM's z-loss
``1e-4 · log² Z`` pulls it back towards 0).  The watcher records the mean and
the largest log Z over the output's rows (`tbdiag.contract.statistics`:
``logz_mean``, ``logz_max``), as model-level statistics that ride in the
logging step's single host transfer.

The output is the one `softmax_output` and ``output_width`` read (a Hugging
Face output's ``logits``, else the model's first output tensor); its class
dimension is the last one of ``[batch, C]`` / ``[batch, time, C]``, the second
of ``[batch, C, H, W]``.  A language model's logits are large (batch × positions
× vocabulary): a fixed, evenly spread sample of at most `LOGZ_ROWS` rows and
`LOGZ_ELEMENTS` elements is read, in float32 pieces of at most
`tbdiag.measure.stats.STATS_CHUNK` elements.
"""

from __future__ import annotations

from typing import Any

import torch

from .layers import model_output
from .probe import StepProbe, local, no_autocast
from .stats import pieces

#: At most this many rows (positions of the batch) are read for log Z, evenly spread (an odd stride, so that a
#: sample visits every position of a sequence across the batch).
LOGZ_ROWS = 4096
#: ... and at most this many logits in all (a 128k vocabulary: 128 rows, 16M logits read per logging step).
LOGZ_ELEMENTS = 1 << 24


def class_dim(out: torch.Tensor) -> int | None:
    """The class dimension of a model output (`tbdiag.measure.run_facts.output_width`'s), None when it has none."""
    if out.dim() < 2:
        return None
    return out.dim() - 1 if out.dim() <= 3 else 1


def _rows(x: torch.Tensor, want: int) -> torch.Tensor:
    """About ``want`` rows of ``x`` (``[..., C]``), a fixed spread: a strided view of a contiguous ``x``, else
    a strided slice of its leading dimensions (copied to ``[rows, C]``: the sample only)."""
    width = x.shape[-1]
    rows = x.numel() // width
    if x.is_contiguous():
        flat = x.view(-1, width)
        return flat if rows <= want else flat[:: -(-rows // want) | 1]
    view = x
    for d in range(x.dim() - 1):
        n = view.numel() // width
        if n <= want:
            break
        step = min(view.shape[d], -(-n // want))
        view = view[(slice(None),) * d + (slice(None, None, step),)]
    return view.reshape(-1, width)


def log_z(out: torch.Tensor) -> torch.Tensor | None:
    """``[mean, max]`` of log Z over (a sample of) the rows of a model output, float32 on its device; None when
    the output has no class dimension of two or more (a loss, a regression value, an integer tensor)."""
    if not out.is_floating_point() or out.is_meta or out.numel() == 0:
        return None
    d = class_dim(out)
    if d is None or out.shape[d] < 2:
        return None
    with torch.no_grad(), no_autocast(out):
        x = local(out.detach()).movedim(d, -1)
        width = x.shape[-1]
        sample = _rows(x, max(1, min(LOGZ_ROWS, LOGZ_ELEMENTS // width)))
        lse = torch.cat([torch.logsumexp(p if p.dtype == torch.float32 else p.float(), dim=-1).reshape(-1)
                         for p in pieces(sample)])
        return torch.stack([lse.mean(), lse.amax()])


def record_log_z(probe: StepProbe, output: Any) -> None:
    """Add ``logz_mean`` and ``logz_max`` of a training forward's output to the step's probe (its first
    forward's: under gradient accumulation the later micro-batches add nothing)."""
    if ("model", "logz_mean") in probe.layout:
        return
    out = model_output(output)
    value = log_z(out) if out is not None else None
    if value is not None:
        probe.add_model("logz_mean", value[0])
        probe.add_model("logz_max", value[1])


__all__ = ["LOGZ_ROWS", "LOGZ_ELEMENTS", "class_dim", "log_z", "record_log_z"]
