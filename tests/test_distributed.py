"""Distributed training under real ``torchrun`` (2 processes, gloo, CPU): one run, pooled statistics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing import event_accumulator as ea

from tbdiag.read.reader import load_logdir

HERE = os.path.dirname(__file__)
SCRIPT = os.path.join(HERE, "distributed_train.py")
POOLED = ("act_mean", "act_std", "dead_frac", "grad_norm", "weight_norm", "update_ratio")


def _launch(logdir: str, mode: str) -> None:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]))
    if mode == "single":
        cmd = [sys.executable, SCRIPT, logdir, mode]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", SCRIPT, logdir,
               mode]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stderr


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    stderr = {mode: _launch(str(root / mode), mode) for mode in ("single", "every-rank", "rank0", "per-rank", "fsdp")}
    return str(root), {r.name: r for r in load_logdir(str(root))}, stderr


def _event_files(path):
    return sorted(f for f in os.listdir(path) if f.startswith("events.out.tfevents"))


@pytest.mark.parametrize("mode", ["every-rank", "fsdp"])
def test_every_rank_watching_gives_one_run_with_global_batch_statistics(runs, mode):
    root, by_name, _ = runs
    assert len(_event_files(os.path.join(root, mode))) == 1, "only rank 0 writes event files"
    run, single = by_name[mode], by_name["single"]
    assert list(run.steps) == [0, 3, 6] and run.layer_names == ["fc1", "fc2", "head"]  # no `module.` prefix
    # pooled over both ranks' halves == one process on the whole global batch
    for col in POOLED:
        np.testing.assert_allclose(run.column(col), single.column(col), rtol=1e-4, atol=1e-6, err_msg=col)
    acc = ea.EventAccumulator(os.path.join(root, mode), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(7)), "the loss every rank logs is written once"
    assert acc.Tags()["graph"]


def test_only_rank0_watching_a_batchnorm_model_trains_and_says_what_it_covers(runs):
    root, by_name, stderr = runs
    run = by_name["rank0"]
    assert list(run.steps) == [0, 3, 6] and "bn" in run.layer_names
    assert np.isfinite(run.column("grad_norm")).all()
    assert "statistics cover rank 0's batch only" in stderr["rank0"]
    acc = ea.EventAccumulator(os.path.join(root, "rank0"))
    acc.Reload()
    assert acc.Tags()["graph"], "traced on the module inside DDP: no collective on one rank"
    assert "could not trace" not in stderr["rank0"]


def test_per_rank_mode_writes_one_run_per_rank_with_local_statistics(runs):
    root, by_name, _ = runs
    assert {"per-rank/rank0", "per-rank/rank1"} <= set(by_name)
    a, b = by_name["per-rank/rank0"], by_name["per-rank/rank1"]
    assert list(a.steps) == list(b.steps) == [0, 3, 6]
    assert not np.allclose(a.column("act_mean"), b.column("act_mean")), "each rank's own batch"
    np.testing.assert_allclose(a.column("grad_norm"), b.column("grad_norm"), rtol=1e-5)  # DDP-averaged


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2
                    or not torch.distributed.is_nccl_available(), reason="needs two CUDA devices and NCCL")
def test_data_parallel_over_nccl_pools_on_the_devices_with_no_sync_between_logging_steps(tmp_path, runs):
    """Every rank on its own GPU: the same pooled statistics as one process, and the sync budget per step.

    A step that is not logged makes no device-host sync on any rank (the pooling is an asynchronous
    all_reduce on the devices); a logging step makes one, its single transfer, on the rank that writes, and
    none on the others, which only join the collective.
    """
    logdir = str(tmp_path / "nccl")
    _launch(logdir, "nccl")
    (run,) = load_logdir(logdir)
    single = runs[1]["single"]
    assert list(run.steps) == [0, 3, 6] and run.layer_names == ["fc1", "fc2", "head"]
    for col in POOLED:
        np.testing.assert_allclose(run.column(col), single.column(col), rtol=1e-3, atol=1e-5, err_msg=col)
    for rank in (0, 1):
        with open(os.path.join(logdir, f"syncs-rank{rank}.json")) as f:
            syncs = json.load(f)
        logged = [step % 3 == 0 for step in range(len(syncs))]
        budget = [(1 if rank == 0 else 0) if is_logged else 0 for is_logged in logged]
        assert all(n <= b for n, b in zip(syncs, budget)), f"rank {rank}: syncs per step {syncs}, budget {budget}"


def test_without_a_reachable_store_ranks_keep_their_own_numbers():
    """No process group (so no store): the announcement says so once and never asks for a collective."""
    import warnings

    from tbdiag.measure import distributed

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        announcement = distributed.Announcement(distributed.Rank(rank=0, world=2, per_rank=False))
    assert any("cannot coordinate ranks" in str(w.message) for w in caught)
    assert announcement.all_ranks_watch() is False
