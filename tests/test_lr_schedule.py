"""The learning-rate schedule (lr_schedule): a rate stuck at 0, or one that never comes near the configured rate.

Pure checks of the two signatures on schedules written out step by step (warm-up + cosine to 0, WSD,
constant-then-decay, step decay, OneCycle, a warm-up still under way: silent), then real runs read back with
`tbdiag.report`: a small GPT-2 whose warm-up scheduler is stepped once per epoch, one whose scheduler is never
stepped, one whose schedule was built for fewer steps than the run takes, each with its twin stepped right.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tbdiag
from tbdiag.rules import RULES_BY_NAME
from tbdiag.rules.schedule import at_zero, below_configured

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

RULE = RULES_BY_NAME["lr_schedule"]
PEAK = 3e-3


def logged(schedule, steps: int, log_every: int = 10) -> np.ndarray:
    """The rate a run would log every ``log_every`` steps: ``schedule(step)`` x PEAK."""
    return np.array([PEAK * schedule(s) for s in range(0, steps, log_every)])


def warmup_cosine(warmup: int, total: int):
    return lambda s: s / warmup if s < warmup else 0.5 * (1 + math.cos(math.pi * (s - warmup) / (total - warmup)))


def wsd(total: int):  # warm-up, stable, decay over the last 20%
    return lambda s: min(1.0, s / 100) if s < 0.8 * total else max(0.0, (total - s) / (0.2 * total))


HEALTHY = {
    "warm-up + cosine to 0": (warmup_cosine(100, 1000), 1000),
    "warm-up + cosine, cut one step past its end": (lambda s: warmup_cosine(100, 990)(min(s, 990)), 1000),
    "WSD": (wsd(1000), 1000),
    "constant then linear decay": (lambda s: min(1.0, (1000 - s) / 300), 1000),
    "step decay /10 twice": (lambda s: 0.1 ** (s // 334), 1000),
    "a warm-up still under way (live run)": (lambda s: s / 20000, 1000),
    "a long warm-up in progress, logged often": (lambda s: s / 50000, 2000),
    "OneCycle (rises above initial_lr)": (lambda s: 1 + 24 * math.sin(math.pi * s / 1000), 1000),
}


@pytest.mark.parametrize("name", HEALTHY)
def test_healthy_schedules_are_silent(name):
    schedule, steps = HEALTHY[name]
    lr = logged(schedule, steps)
    assert at_zero(lr, RULE.persistence, RULE.params["zero_share"]) == []
    assert below_configured(lr, PEAK, RULE.threshold, RULE.persistence) == []


def test_a_schedule_at_zero_for_a_stretch_is_found():
    linear_too_short = lambda s: min(s / 10, max(0.0, (500 - s) / 490))  # built for 500 of 1000
    assert at_zero(logged(linear_too_short, 1000), RULE.persistence, RULE.params["zero_share"]) == [(50, 100)]
    assert at_zero(logged(lambda s: 0.0, 1000), RULE.persistence, RULE.params["zero_share"]) == [(0, 100)]


def test_a_warm_up_stepped_per_epoch_is_found_and_one_stepped_per_step_is_not():
    per_epoch = lambda s: min(1.0, (s // 50) / 500)  # 50 steps an epoch, 500-step warm-up
    assert below_configured(logged(per_epoch, 1000), PEAK, RULE.threshold, RULE.persistence) == [(0, 100)]
    per_step = lambda s: min(1.0, s / 500)
    assert below_configured(logged(per_step, 1000), PEAK, RULE.threshold, RULE.persistence) == []
    # without a scheduler there is no configured rate to fall short of
    assert below_configured(logged(per_epoch, 1000), float("nan"), RULE.threshold, RULE.persistence) == []


# ------------------------------------------------------------------ trained

STEPS, STEPS_PER_EPOCH = 200, 20


def train_lm(logdir, stepping: str = "step", warmup: int = 20, total: int = STEPS) -> list[float]:
    """A 2-block GPT-2 on stride sequences, AdamW + HF linear warm-up/decay; the scheduler stepped per ``stepping``
    ("step", "epoch" or "never")."""
    import recipes

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=48, n_layer=2, n_head=4, n_inner=192, bos_token_id=0, eos_token_id=0))
    data = recipes.stride_sequences(2048)
    opt = recipes.adamw(model, PEAK, weight_decay=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    writer = tbdiag.DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=10)
    losses = []
    for step in range(STEPS):
        x = data[torch.arange(step * 16, step * 16 + 16) % len(data)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if stepping == "step" or (stepping == "epoch" and (step + 1) % STEPS_PER_EPOCH == 0):
            sched.step()
        losses.append(loss.item())
        writer.add_scalar("train/loss", losses[-1], step)
    writer.close()
    return losses


def _serious(findings):
    return [f for f in findings if f.severity in ("warning", "error") and f.issue != "input_bound"]


def _tail(losses):
    return sum(losses[-10:]) / 10


def test_a_warm_up_stepped_per_epoch_is_named_from_step_0(tmp_path):
    sick = train_lm(tmp_path / "sick", stepping="epoch", warmup=200, total=2000)
    twin = train_lm(tmp_path / "twin", stepping="step", warmup=200, total=2000)
    assert _tail(sick) > 2 * _tail(twin)  # the damage: the per-epoch run learns far less
    findings = tbdiag.report(str(tmp_path / "sick"))
    (f,) = [f for f in findings if f.issue == "lr_schedule"]
    assert f.severity == "warning" and f.layer is None and f.first_step == 0 and f.ongoing
    assert f.value == pytest.approx(9 / 200, rel=1e-6)  # 9 epochs stepped of a 200-step warm-up
    assert "once per epoch" in f.message
    assert _serious(findings) == [f]
    # its twin, stepped per step, is still warming up at the end: silent
    assert _serious(tbdiag.report(str(tmp_path / "twin"))) == []


def test_a_scheduler_never_stepped_is_named_and_explains_the_frozen_layers(tmp_path):
    losses = train_lm(tmp_path, stepping="never")
    assert _tail(losses) > 0.99 * losses[0]  # nothing learned
    findings = tbdiag.report(str(tmp_path))
    (f,) = [f for f in findings if f.issue == "lr_schedule"]
    assert (f.first_step, f.last_step, f.value) == (0, 190, 0.0) and "never stepped" in f.message
    frozen = [g for g in findings if g.issue == "frozen_layer"]
    assert len(frozen) > 10 and all(g.explained_by == "lr_schedule" and g.severity == "info" for g in frozen)
    assert [g.explained_by for g in findings if g.issue == "loss_plateau"] == ["lr_schedule"]
    assert _serious(findings) == [f]


def test_a_schedule_built_for_too_few_steps_is_named_where_it_reaches_0(tmp_path):
    train_lm(tmp_path / "sick", total=80)
    findings = tbdiag.report(str(tmp_path / "sick"))
    (f,) = [f for f in findings if f.issue == "lr_schedule"]
    assert (f.first_step, f.last_step) == (80, 190) and "num_training_steps" in f.message
    assert _serious(findings) == [f]
    train_lm(tmp_path / "twin", total=STEPS)  # built for the run: reaches 0 after its last step
    assert _serious(tbdiag.report(str(tmp_path / "twin"))) == []
