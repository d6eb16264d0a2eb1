"""Rank-aware diagnostics under ``torch.distributed`` (``torchrun``: DDP, FSDP2).

A `DiagnosticWriter` on every rank is the normal use.  By default the job
gives one run: rank 0 writes it, the other ranks write no event files, and
the per-layer statistics cover the whole global batch: at each logging step
every rank's numbers are reduced in **one** ``all_reduce`` (nothing on other
steps).  How each statistic pools:

==================  ===========================================================
activation moments  element counts, sums and sums of squares add up
dead units          a unit is dead when it is dead on every rank's batch
saturation          element-weighted mean over ranks
NaN/Inf counts      add up
norms               replicated tensors (DDP): the same on every rank, averaged;
                    sharded tensors (FSDP2 DTensors): squared shard norms add up
==================  ===========================================================

Histograms and images are rank 0's own.  With ``per_rank=True`` each rank
writes its own run (``<log_dir>/rank<r>``) with its local statistics.

Ranks must agree on whether every rank watches (a collective only some ranks
join would hang).  Each watcher announces itself in the job's key-value store
at ``watch()``; the decision is read once, at the end of the first logging
step: by then every rank has been through its first backward, whose gradient
all-reduce (DDP, FSDP) no rank leaves before every rank has entered it, so
every watcher that will ever announce itself has.
"""

from __future__ import annotations

import itertools
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

_sequence = itertools.count()


@dataclass
class Rank:
    """This process's place in the job, as the writer and the watcher need it."""

    rank: int
    world: int
    per_rank: bool

    @property
    def writes(self) -> bool:
        """Whether this rank writes event files."""
        return self.per_rank or self.rank == 0

    @property
    def reduces(self) -> bool:
        """Whether statistics are pooled across ranks (decided again per watch by `Announcement`)."""
        return not self.per_rank and self.world > 1


def current(per_rank: bool = False) -> Rank | None:
    """The rank of this process, or None outside an initialised ``torch.distributed`` job."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return Rank(dist.get_rank(), dist.get_world_size(), per_rank)


class Announcement:
    """A watch announced in the job's store, so that every rank decides alike whether to reduce."""

    def __init__(self, rank: Rank):
        self.rank = rank
        self._key = f"tbdiag/watch/{next(_sequence)}"
        self._store = None
        try:
            from torch.distributed import distributed_c10d

            self._store = distributed_c10d._get_default_store()
            self._store.add(self._key, 1)
        except Exception as e:  # no store reachable: each rank keeps its own numbers
            self._store = None
            warnings.warn(f"tbdiag: cannot coordinate ranks ({type(e).__name__}: {e}); rank 0 logs its own "
                          "batch's statistics only", RuntimeWarning, stacklevel=4)

    def all_ranks_watch(self) -> bool:
        """Whether every rank watches this model (read at the end of the first logging step)."""
        if self._store is None:
            return False
        return int(self._store.add(self._key, 0)) >= self.rank.world


def reduce_parts(
    parts: Sequence[torch.Tensor], kinds: Sequence[str], weights: Sequence[float | Sequence[float]], world: int
) -> list[torch.Tensor]:
    """Pool per-rank statistics across ranks in one ``all_reduce``; returns them in their pooled form.

    ``kinds`` says how each part pools (see the module docstring):
    ``"act"`` (``[mean, std, nonfinite]``, weight: element count), ``"dead"``
    (a unit mask), ``"frac"`` (weight: element count), ``"norm"`` (a vector of
    norms; weights: per element 1 for a shard, ``1/world`` for a replica).
    """
    device = parts[0].device
    packed = []
    for part, kind, weight in zip(parts, kinds, weights):
        x = part.detach().to(device=device, dtype=torch.float64).reshape(-1)
        if kind == "act":
            n = float(weight)
            mean, std, bad = x[0], x[1], x[2]
            packed.append(torch.stack([x.new_tensor(n), n * mean, n * (std * std + mean * mean), bad]))
        elif kind == "dead":
            packed.append(x)
        elif kind == "frac":
            packed.append(torch.stack([x.new_tensor(float(weight)), float(weight) * x[0]]))
        elif kind == "norm":
            packed.append(x * x * torch.as_tensor(weight, dtype=torch.float64, device=device))
        else:
            raise ValueError(f"unknown reduction kind {kind!r}")
    flat = torch.cat(packed)
    torch.distributed.all_reduce(flat)
    out, offset = [], 0
    for part, kind, chunk in zip(parts, kinds, packed):
        y = flat[offset: offset + chunk.numel()]
        offset += chunk.numel()
        if kind == "act":
            n, s1, s2, bad = y[0], y[1], y[2], y[3]
            mean = s1 / n
            out.append(torch.stack([mean, (s2 / n - mean * mean).clamp_min(0).sqrt(), bad]).float())
        elif kind == "dead":
            out.append((y >= world).reshape(part.shape))
        elif kind == "frac":
            out.append((y[1] / y[0]).reshape(part.shape).float())
        else:
            out.append(y.sqrt().float().reshape(part.shape))
    return out
