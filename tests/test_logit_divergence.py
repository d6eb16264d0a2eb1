"""logit_divergence on real training, and log Z as measured (`tbdiag.measure.logits`).

A small GPT-2 without its final LayerNorm learns stride sequences with AdamW at lr 0.1 and no warm-up: its
logits run away within a few dozen steps (log Z from ln 32 to tens of nats, its largest row past 100) and the
loss diverges.  The same model at a sane learning rate (3e-3) stays silent.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import tbdiag
from tbdiag.measure import logits
from tbdiag.read.reader import load_logdir

transformers = pytest.importorskip("transformers")

import recipes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LOG_EVERY = 60, 2


def _train(logdir: str, lr: float) -> list[float]:
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(recipes.gpt2_config(n_layer=2))
    model.transformer.ln_f = torch.nn.Identity()  # nothing normalises what the output head reads
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    data = recipes.stride_sequences(2048, 0)
    losses = []
    writer = tbdiag.DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=LOG_EVERY)
    try:
        for step in range(STEPS):
            x = data[recipes.batch_rows(len(data), 16, step)]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], step)
    finally:
        writer.close()
    return losses


def test_a_high_learning_rate_drifts_log_z_and_is_named_where_the_loss_breaks(tmp_path):
    losses = _train(str(tmp_path), lr=0.1)
    findings = tbdiag.report(str(tmp_path))
    (f,) = [f for f in findings if f.issue == "logit_divergence"]
    assert f.layer is None and f.severity == "warning"
    (run,) = load_logdir(str(tmp_path))
    steps, mean = run.model_series("logz_mean")
    assert mean[0] == pytest.approx(math.log(32), abs=0.2), "at initialisation log Z is about ln C"
    worst_loss_step = int(np.argmax(losses[5:])) + 5
    print(f"log Z named from step {f.first_step}; the loss peaks at step {worst_loss_step}")
    assert f.first_step <= worst_loss_step + LOG_EVERY
    assert max(losses[5:]) > losses[0], "the loss should break"
    assert set(run.losses) == {"train/loss"}, "the log Z curves are not read as losses"


def test_log_z_is_also_a_curve_in_the_scalars_tab(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(str(tmp_path), lr=3e-3)
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    mean = [e.value for e in acc.Scalars("train/log_z/mean")]
    top = [e.value for e in acc.Scalars("train/log_z/max")]
    (run,) = load_logdir(str(tmp_path))
    assert mean == pytest.approx(run.model_series("logz_mean")[1].tolist(), rel=1e-6)
    assert len(top) == len(mean) == STEPS // LOG_EVERY and all(t >= m for t, m in zip(top, mean))


def test_a_sane_learning_rate_stays_silent(tmp_path):
    losses = _train(str(tmp_path), lr=3e-3)
    assert np.mean(losses[-5:]) < 0.8 * losses[0]
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "logit_divergence"] == []


def test_log_z_is_the_logsumexp_of_every_row_for_small_outputs():
    torch.manual_seed(0)
    out = torch.randn(4, 7, 11) * 3
    lse = torch.logsumexp(out, -1)
    assert logits.log_z(out).tolist() == pytest.approx([float(lse.mean()), float(lse.max())], rel=1e-5)
    seg = torch.randn(2, 5, 6, 6)  # [N, C, H, W]: classes along dim 1
    lse = torch.logsumexp(seg, 1)
    assert logits.log_z(seg).tolist() == pytest.approx([float(lse.mean()), float(lse.max())], rel=1e-5)
    assert logits.log_z(torch.randn(8)) is None  # a loss or a regression value: no class dimension
    assert logits.log_z(torch.randn(8, 1)) is None
    assert logits.log_z(torch.randint(0, 3, (8, 4))) is None


def test_a_language_models_logits_are_read_on_a_bounded_sample():
    """[batch, time, vocab] beyond LOGZ_ELEMENTS: a fixed sample of rows, close to the exact mean."""
    torch.manual_seed(0)
    vocab = 50_000
    out = torch.randn(4, 256, vocab, dtype=torch.bfloat16) + torch.linspace(0, 4, 256)[None, :, None]
    assert out.numel() > logits.LOGZ_ELEMENTS
    x = logits._rows(out, logits.LOGZ_ELEMENTS // vocab)
    assert x.numel() <= logits.LOGZ_ELEMENTS
    exact = torch.logsumexp(out.float(), -1)
    mean, top = logits.log_z(out).tolist()
    assert mean == pytest.approx(float(exact.mean()), abs=0.1)
    assert top <= float(exact.max()) + 1e-3 and top > float(exact.max()) - 0.5
