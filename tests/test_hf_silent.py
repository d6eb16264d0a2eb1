"""Small randomly initialised Hugging Face models trained with AdamW on a learnable task draw no warning.

Adam-family optimizers move a layer whatever its gradient's size, so attention
query/key weights with small gradients, LayerNorms, embeddings with rows a batch
never touches, and zero-initialised biases must not read as vanishing, tiny or
oversized updates.
"""

import pytest
import torch
import torch.nn.functional as F

import tbdiag
from tbdiag import DiagnosticWriter

transformers = pytest.importorskip("transformers")

STEPS, LOG_EVERY, BATCH = 200, 10, 16
SERIOUS = ("warning", "error")


def _tokens(n, length=12, vocab=32, seed=0):
    """Sequences labelled by whether token 1 or token 2 is more frequent: learnable by attention."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (n, length), generator=g)
    marks = torch.randint(1, 3, (n, 4), generator=g)
    x[:, :4] = marks
    x = x[:, torch.randperm(length, generator=g)]
    return x, ((x == 1).sum(1) > (x == 2).sum(1)).long()


def _train(logdir, model, batches, loss_of, lr=1e-3):
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    writer = DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=LOG_EVERY, histograms=False, log_graph=False)
    first = last = None
    for step in range(STEPS):
        loss = loss_of(model, *batches(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
        first = loss.item() if first is None else first
        last = loss.item()
    writer.close()
    return first, last


def _serious(logdir):
    return [(f.issue, f.layer, f.message) for f in tbdiag.report(str(logdir))
            if f.severity in SERIOUS and f.issue != "input_bound"]  # input_bound: wall-clock, not the model


def test_bert_classifier(tmp_path):
    cfg = transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=16, num_labels=2)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(cfg)
    x, y = _tokens(1024)
    batches = lambda s: (x[torch.arange(s * BATCH, (s + 1) * BATCH) % len(x)],  # noqa: E731
                         y[torch.arange(s * BATCH, (s + 1) * BATCH) % len(x)])
    _train(tmp_path, model, batches, lambda m, xb, yb: m(input_ids=xb, labels=yb).loss)
    assert _serious(tmp_path) == []


def test_gpt2_language_model(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    g = torch.Generator().manual_seed(0)
    start = torch.randint(0, 32, (1024, 1), generator=g)
    x = (start + torch.arange(12)) % 32  # counting sequences: the next token is learnable
    batches = lambda s: (x[torch.arange(s * BATCH, (s + 1) * BATCH) % len(x)],)  # noqa: E731
    first, last = _train(tmp_path, model, batches, lambda m, xb: m(input_ids=xb, labels=xb).loss)
    assert last < first / 2
    assert _serious(tmp_path) == []


def test_vit_classifier(tmp_path):
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=4)
    torch.manual_seed(0)
    model = transformers.ViTForImageClassification(cfg)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(512, 3, 8, 8, generator=g)
    labels = images.mean(1).reshape(512, 4, 16).mean(2).argmax(1)  # the brightest quadrant
    batches = lambda s: (images[torch.arange(s * BATCH, (s + 1) * BATCH) % 512],  # noqa: E731
                         labels[torch.arange(s * BATCH, (s + 1) * BATCH) % 512])
    _train(tmp_path, model, batches, lambda m, xb, yb: F.cross_entropy(m(pixel_values=xb).logits, yb))
    assert _serious(tmp_path) == []
