"""What tbdiag costs between its logging steps, and how much of it is the spike tracker's gradient read.

One process, pinned to one core from its first instruction (as ``overhead.py
--one-core``), one torch thread.  Configurations train their own copies of the
same model on the same batches and take turns in blocks of steps, the order
rotating every round:

    baseline    the loss scalar each step (torch.utils.tensorboard.SummaryWriter)
    A/A         a second baseline: the noise floor
    sampled     DiagnosticWriter.watch(...) as shipped: on a CPU, every step's gradient norms read on a fixed
                sample of each large gradient (tbdiag.measure.sampled_norms)
    exact       the same with the norms read exactly (one torch._foreach_norm over every gradient)
    no-spikes   watch(..., gradient_spikes=False): nothing read between logging steps

Only steps between logging steps are timed (the step before a logging step,
which arms the weight copy, and the logging step are left out): the figure is
the median excess per step over the baseline's, in microseconds and percent.

    python benchmarks/spike_norms.py                    # the 26-layer MLP, 20 rounds
    python benchmarks/spike_norms.py --workloads mlp,gpt2 --rounds 10
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead  # noqa: E402  (the workloads and the pinning, from the side-by-side benchmark)

CONFIGS = ("baseline", "A/A", "sampled", "exact", "no-spikes")


def trainer(label: str, workload: overhead.Workload, state: dict, data: list, log_every: int, logdir: str):
    """A training step for one configuration, and the list its non-logging step times go to."""
    from torch.utils.tensorboard import SummaryWriter

    from tbdiag import DiagnosticWriter

    model = workload.make()
    model.load_state_dict(state)
    opt = workload.optimizer(model)
    if label in ("baseline", "A/A"):
        writer = SummaryWriter(logdir)
    else:
        writer = DiagnosticWriter(logdir)
        handle = writer.watch(model, opt, log_every=log_every, gradient_spikes=label != "no-spikes")
        if label == "exact":
            handle.spikes.norms.sample_on_cpu = False
    times: list[float] = []
    counter = [0]

    def step(timed: bool) -> None:
        i = counter[0]
        x, y = data[i % len(data)]
        t0 = time.perf_counter()
        loss = workload.loss(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), i)
        if timed and i % log_every not in (0, log_every - 1):
            times.append(time.perf_counter() - t0)
        counter[0] += 1

    return step, times, writer


def run(name: str, rounds: int, block: int, log_every: int) -> None:
    workload = overhead.WORKLOADS[name]
    torch.manual_seed(0)
    state = workload.make().state_dict()
    gen = torch.Generator().manual_seed(0)
    data = [workload.sample(overhead.BATCH, gen) for _ in range(8)]
    with tempfile.TemporaryDirectory() as tmp:
        runs = {c: trainer(c, workload, state, data, log_every, os.path.join(tmp, c.replace("/", ""))) for c in CONFIGS}
        for step, _, _ in runs.values():  # warm-up: the first logging step describes the model
            for _ in range(log_every + 2):
                step(False)
        gc.collect()
        gc.freeze()
        for r in range(rounds):
            k = r % len(CONFIGS)
            for c in CONFIGS[k:] + CONFIGS[:k]:
                step = runs[c][0]
                for _ in range(block):
                    step(True)
        base = statistics.median(runs["baseline"][1])
        print(f"{workload.title}: baseline step {base * 1e3:.2f} ms (median of {len(runs['baseline'][1])} steps "
              f"between logging steps, {rounds} rounds)")
        for c in CONFIGS[1:]:
            m = statistics.median(runs[c][1])
            print(f"  {c:10s} {(m - base) * 1e6:+7.0f} us  {(m / base - 1) * 100:+5.1f}%")
        for _, _, writer in runs.values():
            writer.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workloads", default="mlp", help="comma-separated: " + ", ".join(overhead.WORKLOADS))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=30, help="steps per configuration per round")
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--cpu", type=int, default=-1, help="the CPU to pin to (default: the last one allowed)")
    args = p.parse_args(argv)
    overhead.pin_to_one_core(args.cpu, argv, script=os.path.abspath(__file__))
    torch.set_num_threads(1)
    for name in args.workloads.split(","):
        run(name.strip(), args.rounds, args.block, args.log_every)
    return 0


if __name__ == "__main__":
    sys.exit(main())
