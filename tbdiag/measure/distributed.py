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

import functools
import itertools
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from .stats import gather

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
    parts: Sequence[torch.Tensor], kinds: Sequence[str], weights: Sequence[float | Sequence[float]], world: int,
    device: torch.device | None = None,
) -> list[torch.Tensor]:
    """Pool per-rank statistics across ranks in one ``all_reduce``; returns them in their pooled form.

    ``kinds`` says how each part pools (see the module docstring):
    ``"act"`` (``[mean, std, nonfinite]``, weight: element count), ``"dead"``
    (a unit mask), ``"frac"`` (weight: element count), ``"norm"`` (a vector of
    norms; weights: per element 1 for a shard, ``1/world`` for a replica).

    The parts are gathered on ``device`` (default: the first part's) and
    pooled a kind at a time, a few batched ops for all layers.  The weights
    reach the device as one tensor, made once for each set of weights and
    kept (`_device_weights`; the same at every logging step): no per-layer
    scalar is made from a Python number on the device, which would wait for
    its copy.
    """
    device = parts[0].device if device is None else device
    at: dict[str, list[int]] = {"act": [], "frac": [], "dead": [], "norm": []}
    for j, kind in enumerate(kinds):
        if kind not in at:
            raise ValueError(f"unknown reduction kind {kind!r}")
        at[kind].append(j)
    flat_parts = gather([p.detach().reshape(-1) for p in parts], device)
    act_w = tuple(float(weights[j]) for j in at["act"])
    frac_w = tuple(float(weights[j]) for j in at["frac"])
    norm_w = tuple(float(w) for j in at["norm"] for w in weights[j])
    w = _device_weights(device, act_w, frac_w, norm_w)
    w_act, w_frac, w_norm = w.split([len(act_w), len(frac_w), len(norm_w)])
    packed = []
    if at["act"]:  # [n, n mean, n (std^2 + mean^2), nonfinite] per layer: counts, sums, sums of squares add up
        x = torch.stack([flat_parts[j] for j in at["act"]]).to(torch.float64)
        mean, std = x[:, 0], x[:, 1]
        packed.append(torch.stack([w_act, w_act * mean, w_act * (std * std + mean * mean), x[:, 2]], 1).reshape(-1))
    if at["frac"]:  # [n, n fraction]
        x = torch.cat([flat_parts[j] for j in at["frac"]]).to(torch.float64)
        packed.append(torch.stack([w_frac, w_frac * x], 1).reshape(-1))
    if at["dead"]:  # masks: a unit is dead where every rank says so
        packed.append(torch.cat([flat_parts[j] for j in at["dead"]]).to(torch.float64))
    if at["norm"]:  # squared norms, a replica's divided by the world size
        x = torch.cat([flat_parts[j] for j in at["norm"]]).to(torch.float64)
        packed.append(x * x * w_norm)
    flat = torch.cat(packed)
    torch.distributed.all_reduce(flat)
    out: list[torch.Tensor | None] = [None] * len(parts)
    offset = 0
    if at["act"]:
        k = len(at["act"])
        y = flat[offset: offset + 4 * k].view(k, 4)
        offset += 4 * k
        n = y[:, 0]
        mean = y[:, 1] / n
        pooled = torch.stack([mean, (y[:, 2] / n - mean * mean).clamp_min(0).sqrt(), y[:, 3]], 1).float()
        for j, value in zip(at["act"], pooled.unbind(0)):
            out[j] = value
    if at["frac"]:
        k = len(at["frac"])
        y = flat[offset: offset + 2 * k].view(k, 2)
        offset += 2 * k
        for j, value in zip(at["frac"], (y[:, 1] / y[:, 0]).float().unbind(0)):
            out[j] = value.reshape(parts[j].shape)
    for kind in ("dead", "norm"):
        if not at[kind]:
            continue
        sizes = [flat_parts[j].numel() for j in at[kind]]
        y = flat[offset: offset + sum(sizes)]
        offset += sum(sizes)
        y = y >= world if kind == "dead" else y.sqrt().float()
        for j, value in zip(at[kind], y.split(sizes)):
            out[j] = value.reshape(parts[j].shape)
    return out  # type: ignore[return-value]


@functools.lru_cache(maxsize=8)
def _device_weights(device: torch.device, *groups: tuple[float, ...]) -> torch.Tensor:
    """The weights of `reduce_parts`, concatenated, as one float64 tensor on ``device``: made once for each
    set of weights (element counts and replica weights depend on shapes only), copied without blocking."""
    host = torch.tensor([w for group in groups for w in group], dtype=torch.float64)
    return host.to(device, non_blocking=True)
