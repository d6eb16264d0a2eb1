"""What goes into the model: the input's scale (input_scale) and padding counted in the loss (padding_in_loss).

Real runs, read back with `tbdiag.report`: a small CNN fed 0-255 pixels (its ReLUs die within the first logging
steps, the loss sits at chance) against the same CNN on normalised pixels; a GPT-2 trained on padded batches
with the padding labelled against the twin whose padding is -100.  Twins that must stay silent: normalised
images under bf16 autocast, a model that starts with BatchNorm, embeddings fed as ``inputs_embeds``, an
encoder-decoder whose encoder mask has the labels' shape, a sequence classifier with padded inputs.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.measure import inputs, stats
from tbdiag.read.reader import load_logdir

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

SERIOUS = ("warning", "error")


def _serious(findings):
    """Warnings and errors, but input_bound's (wall-clock time on a shared machine, not the model)."""
    return [f for f in findings if f.severity in SERIOUS and f.issue != "input_bound"]


# ------------------------------------------------------------------ the measurements, pure


def test_the_first_floating_input_skips_ids_masks_labels_and_positions():
    ids, mask = torch.zeros(2, 4, dtype=torch.long), torch.ones(2, 4)
    pixels = torch.rand(2, 3, 4, 4)
    assert inputs.floating_input((ids,), {"attention_mask": mask}) is None
    assert inputs.floating_input((), {"input_ids": ids, "attention_mask": mask, "labels": torch.rand(2),
                                      "pixel_values": pixels}) is pixels
    assert inputs.floating_input((ids, pixels), {}) is pixels
    assert inputs.floating_input((), {"timestep": torch.tensor([500.0]), "sample": pixels}) is pixels
    # the Hugging Face Trainer's label count, and any other 0-dimensional setting
    assert inputs.floating_input((), {"input_ids": ids, "num_items_in_batch": torch.tensor([32.0])}) is None
    assert inputs.floating_input((torch.tensor(0.5),), {}) is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_input_summary_is_mean_std_min_max(dtype):
    x = (torch.rand(4, 3, 8, 8) * 255).to(dtype)
    ref = x.float()
    got = inputs.input_summary(x)
    want = torch.stack([ref.mean(), ref.std(correction=0), ref.min(), ref.max()])
    assert torch.allclose(got, want, rtol=1e-4), (got, want)


def test_a_large_input_is_summarised_in_pieces(monkeypatch):
    x = torch.randn(6, 1000) * 40 + 100
    whole = inputs.input_summary(x)
    monkeypatch.setattr(stats, "STATS_CHUNK", 700)  # several pieces, some of them inside a row
    assert len(stats.pieces(x)) > 6
    assert torch.allclose(inputs.input_summary(x), whole, rtol=1e-5)


def test_the_padding_share_counts_labelled_positions_with_mask_zero():
    labels = torch.tensor([[5, 6, 7, 0, 0], [5, 6, -100, -100, -100]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]])
    assert math.isclose(float(inputs.padding_share(labels, mask)), 2 / 7, rel_tol=1e-6)  # 7 labelled, 2 padded
    assert float(inputs.padding_share(labels.masked_fill(mask == 0, -100), mask)) == 0.0
    assert math.isnan(float(inputs.padding_share(torch.full((1, 3), -100), torch.ones(1, 3))))


def test_labels_and_mask_pair_only_positions_of_the_same_shape():
    labels, mask = torch.zeros(2, 5, dtype=torch.long), torch.ones(2, 5, dtype=torch.long)
    assert inputs.labels_and_mask({"labels": labels, "attention_mask": mask}, False) is not None
    assert inputs.labels_and_mask({"labels": torch.zeros(2, dtype=torch.long), "attention_mask": mask}, False) is None
    # an encoder-decoder's attention_mask is the encoder's: only the decoder's mask pairs with its labels
    assert inputs.labels_and_mask({"labels": labels, "attention_mask": mask}, True) is None
    assert inputs.labels_and_mask({"labels": labels, "decoder_attention_mask": mask}, True) is not None


# ------------------------------------------------------------------ input_scale, trained


def quadrant_images(n: int = 2048, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """8-bit images (0-255 as floats) with a brighter square in one quadrant; the label is the quadrant."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 16, 16, generator=g) * 0.6 + 0.1
    y = torch.randint(0, 4, (n,), generator=g)
    for i in range(n):
        r, c = int(y[i] // 2) * 8, int(y[i] % 2) * 8
        x[i, :, r:r + 6, c:c + 6] += 0.3
    return (x.clamp(0, 1) * 255).round(), y


def normalised(x255: torch.Tensor) -> torch.Tensor:
    return (x255 / 255 - 0.5) / 0.25


def train_cnn(logdir, x, y, steps: int = 120, first: nn.Module | None = None, autocast: bool = False) -> list[float]:
    torch.manual_seed(0)
    layers = [first] if first is not None else []
    model = nn.Sequential(*layers, nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1),
                          nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 4)).to(x.dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    writer = DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=5)
    losses = []
    for step in range(steps):
        idx = torch.arange(step * 32, step * 32 + 32) % len(x)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        writer.add_scalar("train/loss", losses[-1], step)
    writer.close()
    return losses


def test_pixels_0_to_255_are_named_at_step_0_and_explain_the_dead_relus(tmp_path):
    x255, y = quadrant_images()
    losses = train_cnn(tmp_path, x255, y)
    assert sum(losses[-10:]) / 10 > 1.3  # the damage: the loss sits at chance (ln 4) once the ReLUs are dead
    findings = tbdiag.report(str(tmp_path))
    (scale,) = [f for f in findings if f.issue == "input_scale"]
    assert scale.severity == "warning" and scale.layer is None and scale.first_step == 0
    assert scale.value > 100 and "from 26 to 255" in scale.message
    dead = [f for f in findings if f.issue == "dead_relu"]
    assert dead and all(f.explained_by == "input_scale" and f.severity == "info" for f in dead)
    assert min(f.first_step for f in dead) == 5  # one logging interval after the input was named
    assert _serious(findings) == [scale]


def test_the_normalised_twin_learns_and_stays_silent(tmp_path):
    x255, y = quadrant_images()
    losses = train_cnn(tmp_path, normalised(x255), y)
    assert sum(losses[-10:]) / 10 < 0.1
    findings = tbdiag.report(str(tmp_path))
    assert [f for f in findings if f.issue == "input_scale"] == []
    assert _serious(findings) == []


@pytest.mark.parametrize("precision", ["bf16 autocast", "bf16 model and inputs"])
def test_normalised_pixels_in_mixed_precision_stay_silent(tmp_path, precision):
    x255, y = quadrant_images(512)
    x = normalised(x255) if precision == "bf16 autocast" else normalised(x255).bfloat16()
    train_cnn(tmp_path, x, y, steps=20, autocast=precision == "bf16 autocast")
    (run,) = load_logdir(str(tmp_path))
    assert run.model_series("input_max")[1] == pytest.approx(2.0, abs=0.05)  # measured: (255/255 - 0.5) / 0.25
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "input_scale"] == []


def test_a_model_that_normalises_its_own_input_takes_raw_pixels(tmp_path):
    x255, y = quadrant_images(512)
    train_cnn(tmp_path, x255, y, steps=20, first=nn.BatchNorm2d(3))
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "input_scale"] == []


def test_embeddings_fed_as_inputs_embeds_stay_silent(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=1, n_head=2, n_inner=64)
    model = transformers.GPT2LMHeadModel(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    ids = torch.randint(0, 32, (8, 16))
    for _ in range(6):
        loss = model(inputs_embeds=model.transformer.wte(ids).detach(), labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    (run,) = load_logdir(str(tmp_path))
    _, rms = run.model_series("input_std")
    assert len(rms) == 3 and (rms > 0.01).all() and (rms < 1).all()  # measured: GPT-2's embeddings (std 0.02)
    assert [f for f in tbdiag.report(str(tmp_path)) if f.issue == "input_scale"] == []


# ------------------------------------------------------------------ padding_in_loss, trained

PAD = 0


def padded_stride_batches(n: int = 1024, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic token sequences (tokens 1..32) of 4 to 16 tokens, right-padded with token 0, and their mask."""
    g = torch.Generator().manual_seed(seed)
    start, stride = torch.randint(0, 32, (n, 1), generator=g), torch.randint(1, 4, (n, 1), generator=g)
    ids = (start + stride * torch.arange(16)) % 32 + 1
    lengths = torch.randint(4, 17, (n,), generator=g)
    mask = (torch.arange(16)[None] < lengths[:, None]).long()
    return ids.masked_fill(mask == 0, PAD), mask


def train_padded_lm(logdir, label_padding: bool, steps: int = 100, watch: bool = True) -> tuple[list, list]:
    """GPT-2 on padded batches (AdamW, warm-up + linear decay); (logged losses, losses on the text positions)."""
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=33, n_positions=16, n_embd=48, n_layer=2, n_head=4, n_inner=192,
                                  bos_token_id=PAD, eos_token_id=PAD, pad_token_id=PAD)
    model = transformers.GPT2LMHeadModel(cfg)
    ids, mask = padded_stride_batches()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
    sched = transformers.get_linear_schedule_with_warmup(opt, 10, steps)
    writer = DiagnosticWriter(str(logdir)) if watch else None
    if writer is not None:
        writer.watch(model, opt, log_every=10)
    logged, text = [], []
    for step in range(steps):
        idx = torch.arange(step * 16, step * 16 + 16) % len(ids)
        x, m = ids[idx], mask[idx]
        target = x.masked_fill(m == 0, -100)
        out = model(input_ids=x, attention_mask=m, labels=x if label_padding else target)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            text.append(F.cross_entropy(out.logits[:, :-1].reshape(-1, 33), target[:, 1:].reshape(-1)).item())
        logged.append(out.loss.item())
        if writer is not None:
            writer.add_scalar("train/loss", logged[-1], step)
    if writer is not None:
        writer.close()
    return logged, text


def test_labelled_padding_is_named_from_step_0(tmp_path):
    logged, text = train_padded_lm(tmp_path / "watched", label_padding=True)
    # the damage: the logged loss reads well below the loss on the text
    assert sum(logged[-10:]) < 0.85 * sum(text[-10:])
    findings = tbdiag.report(str(tmp_path / "watched"))
    (pad,) = [f for f in findings if f.issue == "padding_in_loss"]
    assert pad.severity == "warning" and pad.layer is None and pad.first_step == 0 and pad.last_step == 90
    assert 0.3 < pad.value < 0.8 and "-100" in pad.advice
    assert _serious(findings) == [pad]
    # watching changes nothing in the training
    unwatched, _ = train_padded_lm(None, label_padding=True, watch=False)
    assert unwatched == logged


def test_the_twin_with_padding_at_minus_100_stays_silent(tmp_path):
    logged, text = train_padded_lm(tmp_path, label_padding=False)
    assert logged == pytest.approx(text, rel=1e-5)  # the loss counts the text only
    (run,) = load_logdir(str(tmp_path))
    _, share = run.model_series("padding_labelled_frac")
    assert len(share) == 10 and (share == 0).all()  # measured at every logging step, and nothing is padding
    assert _serious(tbdiag.report(str(tmp_path))) == []


def _one_hf_run(logdir, model, call) -> list:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    writer = DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=2)
    for _ in range(6):
        loss = model(**call).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    return tbdiag.report(str(logdir))


def test_an_encoder_mask_of_the_labels_shape_is_not_theirs(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=33, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=2,
                                decoder_start_token_id=0, pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    ids, mask = padded_stride_batches(8)
    labels = torch.randint(1, 32, (8, 16))  # every target position real; the encoder input is padded
    findings = _one_hf_run(tmp_path, model, {"input_ids": ids, "attention_mask": mask, "labels": labels})
    assert [f for f in findings if f.issue == "padding_in_loss"] == []


def test_a_sequence_classifier_on_padded_inputs_stays_silent(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=33, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = transformers.BertForSequenceClassification(cfg)
    ids, mask = padded_stride_batches(8)
    findings = _one_hf_run(tmp_path, model, {"input_ids": ids, "attention_mask": mask,
                                             "labels": torch.randint(0, 2, (8,))})
    assert [f for f in findings if f.issue == "padding_in_loss"] == []
