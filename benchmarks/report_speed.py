"""How long ``tbdiag report`` takes on large logdirs: the report's own reader against TensorBoard's loader.

Two logdirs, written once and reused (``--root``):
- ``long``: one run of 20,000 logged steps x 50 layers, chunked exactly as the
  writer does (statistics synthesised with the schema's own encoder), ~60 MB;
- ``sweep``: a six-run learning-rate sweep of a 12-block GPT-2 trained for real
  (300 steps each, ``log_every=10``, histograms and all), as a user's sweep.

Each is read ``--repeat`` times by ``tbdiag report`` as a user runs it (a fresh
process, end to end: start-up, reading, rules, printing), then in process by
each reader alone.  Prints the median and the spread of every figure, and the
ratio of TensorBoard's loader to the report's reader.

    python benchmarks/report_speed.py [--root DIR] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

SWEEP_LRS = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)


def build_long(root: str) -> str:
    import plugin_helpers

    logdir = os.path.join(root, "long")
    if not os.path.exists(os.path.join(logdir, ".complete")):
        plugin_helpers.write_long_run(os.path.join(logdir, "run"), logged_steps=20_000, log_every=10, layers=50,
                                      dead_from_index=15_000, nan_index=12_345)
        open(os.path.join(logdir, ".complete"), "w").close()
    return logdir


def build_sweep(root: str) -> str:
    import recipes
    import torch

    logdir = os.path.join(root, "sweep")
    if not os.path.exists(os.path.join(logdir, ".complete")):
        torch.set_num_threads(1)
        for lr in SWEEP_LRS:
            recipes.gpt2(os.path.join(logdir, f"lr{lr:g}"), steps=300, lr=lr, n_layer=12)
        open(os.path.join(logdir, ".complete"), "w").close()
    return logdir


def _size_mb(logdir: str) -> float:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(logdir) for f in fs) / 1e6


def _timed(fn, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _cli(logdir: str) -> None:
    subprocess.run([sys.executable, "-m", "tbdiag", "report", logdir, "--format", "json"], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _show(label: str, times: list[float]) -> float:
    med = statistics.median(times)
    print(f"  {label:34s} median {med:6.2f} s   (min {min(times):.2f}, max {max(times):.2f})")
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=os.path.join("runs", "report-bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    from tbdiag.contract import records
    from tbdiag.read import reader

    print(f"CRC32C: {records.describe()}; python {sys.version.split()[0]}")
    for name, build in (("20,000 logged steps x 50 layers", build_long), ("six-run GPT-2 sweep", build_sweep)):
        logdir = build(args.root)
        print(f"{name} ({_size_mb(logdir):.0f} MB, {logdir})")
        _show("tbdiag report (fresh process)", _timed(lambda: _cli(logdir), args.repeat))
        fast = _show("report's reader, in process", _timed(lambda: reader._load_local(logdir, None), args.repeat))
        slow = _show("TensorBoard's loader, in process",
                     _timed(lambda: reader._load_with_tensorboard(logdir, None), args.repeat))
        print(f"  TensorBoard's loader / report's reader: {slow / fast:.1f}x")


if __name__ == "__main__":
    main()
