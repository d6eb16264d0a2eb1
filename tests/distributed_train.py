"""A small data-parallel training run under ``torchrun`` (gloo, CPU), used by tests/test_distributed.py.

    torchrun --standalone --nproc_per_node=2 tests/distributed_train.py LOGDIR MODE

MODE: ``every-rank`` (a DiagnosticWriter on every rank: the normal use),
``rank0`` (only rank 0 watches; the model has BatchNorm), ``per-rank``
(``per_rank=True``), ``fsdp`` (FSDP2 ``fully_shard``), or ``single`` (no
torchrun: one process trains on the whole global batch, the reference the
pooled statistics are checked against).  Each rank trains on its own half of
every global batch; DDP averages the gradients, so the weights follow the
single-process run on the whole batch.
"""

import os
import sys

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


def main(logdir: str, mode: str) -> None:
    single = mode == "single"
    if not single:
        dist.init_process_group("gloo")
    rank, world = (0, 1) if single else (dist.get_rank(), dist.get_world_size())
    torch.manual_seed(0)
    model = Net(batchnorm=mode == "rank0")
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model)
        trained = model
    elif single:
        trained = model
    else:
        trained = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    writer = None
    if mode != "rank0" or rank == 0:
        writer = DiagnosticWriter(logdir, per_rank=mode == "per-rank")
        writer.watch(trained, opt, log_every=LOG_EVERY)
    share = GLOBAL_BATCH // world
    for step in range(STEPS):
        x, y = data(step)
        x, y = x[rank * share:(rank + 1) * share], y[rank * share:(rank + 1) * share]
        loss = F.cross_entropy(trained(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
    if writer is not None:
        writer.close()
    if not single:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
    os._exit(0)  # no lingering gloo threads at exit
