"""A small data-parallel training run under ``torchrun`` (gloo, CPU), used by tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed_train.py LOGDIR MODE

MODE: ``every-rank`` (a DiagnosticWriter on every rank: the normal use),
``rank0`` (only rank 0 watches; the model has BatchNorm), ``per-rank``
(``per_rank=True``), ``fsdp`` (FSDP2 ``fully_shard``), ``nccl`` (every rank
on its own GPU over NCCL, each step's device-host syncs counted with
``torch.cuda.set_sync_debug_mode("warn")`` and written to ``syncs-rank<r>.json``
in LOGDIR; needs two GPUs), or ``single`` (no torchrun: one process trains on
the whole global batch, the reference the pooled statistics are checked
against).  Each rank trains on its own half of
every global batch; DDP averages the gradients, so the weights follow the
single-process run on the whole batch.
"""

import json
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter

GLOBAL_BATCH = 16
STEPS = 7
LOG_EVERY = 3


class Net(nn.Module):
    def __init__(self, batchnorm: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(12, 32)
        self.bn = nn.BatchNorm1d(32) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.bn(self.fc1(x))))))


def data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(GLOBAL_BATCH, 12, generator=g)
    return x, (x[:, :4].argmax(dim=1))


def syncs_of(fn) -> int:
    """Device-host synchronisations while ``fn`` runs (torch's sync debug warnings, counted)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchronizing" in str(w.message) for w in seen)


def main(logdir: str, mode: str) -> None:
    single = mode == "single"
    nccl = mode == "nccl"
    if not single:
        dist.init_process_group("nccl" if nccl else "gloo")
    rank, world = (0, 1) if single else (dist.get_rank(), dist.get_world_size())
    device = torch.device("cuda", rank) if nccl else torch.device("cpu")
    if nccl:
        torch.cuda.set_device(device)
    torch.manual_seed(0)
    model = Net(batchnorm=mode == "rank0").to(device)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        trained = model
    elif single:
        trained = model
    else:
        trained = nn.parallel.DistributedDataParallel(model, device_ids=[rank] if nccl else None)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    writer = None
    if mode != "rank0" or rank == 0:
        writer = DiagnosticWriter(logdir, per_rank=mode == "per-rank")
        writer.watch(trained, opt, log_every=LOG_EVERY)
    share = GLOBAL_BATCH // world
    batches = [tuple(t[rank * share:(rank + 1) * share].to(device) for t in data(step)) for step in range(STEPS)]
    syncs = []
    for step in range(STEPS):
        x, y = batches[step]

        def train_step() -> torch.Tensor:
            loss = F.cross_entropy(trained(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            return loss

        if nccl:
            holder = []
            syncs.append(syncs_of(lambda: holder.append(train_step())))
            loss = holder[0]
        else:
            loss = train_step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)  # (the loop's own sync, outside the count)
    if writer is not None:
        writer.close()
    if nccl:
        with open(os.path.join(logdir, f"syncs-rank{rank}.json"), "w") as f:
            json.dump(syncs, f)
    if not single:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    os._exit(0)  # no lingering gloo threads at exit
