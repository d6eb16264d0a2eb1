"""Peak memory of a watched run against the same run unwatched, each in a process of its own.

Workloads at the sizes people train, with AdamW: a 12-block, 768-wide GPT-2 (Hugging Face
``GPT2LMHeadModel``, 124M parameters with its tied embeddings) and a 24-layer, 2048-wide MLP (100M). Each
trains ``--steps`` steps (default 21) with ``log_every=5`` (default content: histograms, activation
statistics, update ratios), so several logging steps land inside the measured peak. Reports the peak RSS of
each process (``ru_maxrss``; on CUDA, ``torch.cuda.max_memory_allocated``), the difference, and that
difference as a share of the plain peak and of the parameters' size.

    python benchmarks/memory.py [--steps 21] [--workloads gpt2,mlp]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile


def _run(workload: str, watched: bool, steps: int) -> dict:
    import torch
    import torch.nn.functional as F
    from torch import nn

    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if workload == "gpt2":
        import transformers

        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=12, n_embd=768, n_head=12))
        batch = torch.randint(0, 50257, (4, 128))

        def loss_of(m):
            return m(input_ids=batch.to(device), labels=batch.to(device)).loss
    else:
        layers = [nn.Linear(2048, 2048) for _ in range(24)]
        model = nn.Sequential(*[x for layer in layers for x in (layer, nn.GELU())], nn.Linear(2048, 10))
        x, y = torch.randn(64, 2048), torch.randint(0, 10, (64,))

        def loss_of(m):
            return F.cross_entropy(m(x.to(device)), y.to(device))
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    writer = None
    if watched:
        from tbdiag import DiagnosticWriter

        writer = DiagnosticWriter(tempfile.mkdtemp())
        writer.watch(model, opt, log_every=5)
    for step in range(steps):
        loss = loss_of(model)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
    if writer is not None:
        writer.close()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak": peak, "params": params, "device": device}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=21)
    parser.add_argument("--workloads", default="gpt2,mlp")
    parser.add_argument("--child", nargs=2, metavar=("WORKLOAD", "WATCHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_run(args.child[0], args.child[1] == "1", args.steps)))
        return
    print(f"{'workload':8s} {'plain peak':>12s} {'watched peak':>13s} {'difference':>11s} {'of plain':>9s} "
          f"{'of params':>10s}")
    for workload in args.workloads.split(","):
        out = {}
        for watched in (False, True):
            proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", workload,
                                   "1" if watched else "0"], capture_output=True, text=True, check=True)
            out[watched] = json.loads(proc.stdout.strip().splitlines()[-1])
        plain, watched_ = out[False]["peak"], out[True]["peak"]
        diff, params = watched_ - plain, out[False]["params"]
        print(f"{workload:8s} {plain / 2**20:10.0f} MB {watched_ / 2**20:11.0f} MB {diff / 2**20:+9.0f} MB "
              f"{100 * diff / plain:+8.1f}% {100 * diff / params:+9.1f}%   ({out[False]['device']}, "
              f"parameters {params / 2**20:.0f} MB)")


if __name__ == "__main__":
    main()
