"""Latency of the Diagnostics tab's routes on a big run: 500 layers x 2,000 logged steps.

Writes the run with the schema's encoder (chunked like `DiagnosticWriter`),
loads it with TensorBoard's own ingester and data provider in this process
(the Python loader, as ``tensorboard --load_fast=false``), builds TensorBoard's
WSGI application with the plugin found through its entry point, and times the
routes the tab calls, with ``Accept-Encoding: gzip`` like a browser (so
TensorBoard's response compression is included).

"cold" is the first request for a run (reads and decodes every sample through
the data provider); every later request is served from the per-run cache until
new steps arrive.  Goal: p50 <= 300 ms for the layer-table and series routes.

    python benchmarks/plugin_latency.py [--layers 500] [--steps 2000] [--repeat 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np


def write_run(logdir: str, layers: int, steps: int, log_every: int = 10) -> list[str]:
    from torch.utils.tensorboard import SummaryWriter

    from tbdiag.contract import schema

    rng = np.random.default_rng(0)
    names = [f"blocks.{i // 4}.{['conv', 'bn', 'fc1', 'fc2'][i % 4]}" for i in range(layers)]
    table = schema.LayerTable(
        layers=[schema.LayerInfo(name=n, type="Linear", params=4096, trainable_params=4096, activation="relu")
                for n in names],
        log_every=log_every, has_optimizer=True,
    )
    writer = SummaryWriter(logdir)
    fw = writer._get_file_writer()
    fw.add_summary(schema.encode_layers(table), 0)
    col = schema.COLUMN_INDEX
    # plausible healthy statistics: gradients spread over decades with depth, small updates, no NaN
    base = np.full((layers, len(schema.COLUMNS)), np.nan, dtype=np.float32)  # columns not set: not measured
    base[:, col["act_mean"]] = 0.2
    base[:, col["act_std"]] = 1.0
    base[:, col["saturated_frac"]] = np.nan
    base[:, col["grad_norm"]] = np.logspace(-3, 0, layers)
    base[:, col["grad_rms"]] = np.logspace(-5, -2, layers)
    base[:, col["weight_norm"]] = 5.0
    base[:, col["update_ratio"]] = 1e-3
    base[:, col["changed"]] = 1.0
    base[:, col["grad_params"]] = 2
    for name in ("act_nonfinite", "grad_nonfinite", "weight_nonfinite"):
        base[:, col[name]] = 0
    dead = col["dead_frac"]
    for t in range(steps):
        stats = base * (1 + 0.05 * rng.standard_normal(base.shape).astype(np.float32))
        stats[:, dead] = 0.1 * rng.random(layers)
        if t >= steps // 2:
            stats[layers // 3, dead] = 1.0  # one layer dies half-way: a finding to report
        first = (t - t % schema.STEPS_PER_TAG) * log_every
        fw.add_summary(schema.encode_health(first, stats), t * log_every)
    writer.close()
    return names


def build_app(logdir: str):
    from tensorboard import default, program
    from tensorboard.backend import application
    from tensorboard.backend.event_processing import data_ingester

    tb = program.TensorBoard(plugins=default.get_plugins())
    tb.configure(argv=["tensorboard", "--logdir", logdir, "--load_fast", "false", "--reload_interval", "0",
                       "--reload_task", "blocking"])
    ingester = data_ingester.LocalDataIngester(tb.flags)
    ingester.start()
    return application.TensorBoardWSGIApp(tb.flags, default.get_plugins(), ingester.data_provider, None,
                                          ingester.deprecated_multiplexer)


def timed(client, url: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = client.get(url, headers={"Accept-Encoding": "gzip"})
    body = r.get_data()
    dt = time.perf_counter() - t
    if r.status_code != 200:
        raise SystemExit(f"{url}: HTTP {r.status_code} {body[:300]!r}")
    return dt, len(body)


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values) * 1000, q))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=500)
    parser.add_argument("--steps", type=int, default=2000, help="logged steps")
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args(argv)

    from werkzeug.test import Client

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        names = write_run(os.path.join(tmp, "big"), args.layers, args.steps)
        print(f"wrote {args.layers} layers x {args.steps} logged steps in {time.perf_counter() - t:.1f} s")
        t = time.perf_counter()
        client = Client(build_app(tmp))
        print(f"TensorBoard (Python loader) loaded the logdir in {time.perf_counter() - t:.1f} s")

        p = "/data/plugin/tbdiag"
        cold, size = timed(client, f"{p}/findings?run=big")
        print(f"cold first request (read + decode + rules): {cold * 1000:.0f} ms")

        rng = np.random.default_rng(1)
        stats = ["grad_norm", "dead_frac", "update_ratio", "act_std"]
        routes = {
            "layers": lambda i: f"{p}/layers?run=big&step={int(rng.integers(0, args.steps)) * 10}",
            "series": lambda i: f"{p}/series?run=big&layer={names[int(rng.integers(0, len(names)))]}",
            "heatmap": lambda i: f"{p}/heatmap?run=big&stat={stats[i % len(stats)]}",
            "findings": lambda i: f"{p}/findings?run=big",
        }
        print(f"\n{'route':<10} {'p50 ms':>8} {'p90 ms':>8} {'max ms':>8} {'bytes (gzip)':>14}")
        result = {}
        for name, make in routes.items():
            times, sizes = [], []
            for i in range(args.repeat):
                dt, size = timed(client, make(i))
                times.append(dt)
                sizes.append(size)
            result[name] = pct(times, 50)
            print(f"{name:<10} {pct(times, 50):8.1f} {pct(times, 90):8.1f} {max(times) * 1000:8.1f} "
                  f"{int(statistics.median(sizes)):14,d}")
        # a threshold change: findings re-evaluated on the cached run
        t_thr, _ = timed(client, f"{p}/findings?run=big&threshold=dead_relu=0.9")
        print(f"\nfindings with a new threshold (rules re-run on cached data): {t_thr * 1000:.0f} ms")
        ok = result["layers"] <= 300 and result["series"] <= 300
        print(f"goal p50 <= 300 ms for layers and series: {'met' if ok else 'NOT met'}")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
