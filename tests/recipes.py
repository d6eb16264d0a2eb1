"""Modern training recipes, small enough for one CPU thread, each writing one tbdiag run.

Every function trains a randomly initialised model family the way it is
trained today (AdamW without decay on norms and biases, linear warm-up then
cosine or linear decay to ~0, gradient clipping at 1.0; SGD with momentum and
StepLR or cosine for BatchNorm CNNs and a plain MLP; Adafactor for T5, in its
fine-tuning form and in its own relative-step mode; bf16 autocast on the CPU;
the Hugging Face `Trainer`), on a learnable synthetic task, watched by
`tbdiag.DiagnosticWriter`, logging its loss as ``train/loss``.  Each returns
``(first_loss, last_loss)``: the loss of the first step and the mean loss of
the last ``LAST_WINDOW`` steps (a single batch's loss is noisy).

The sick twins are the same recipes with one mistake each (keyword
arguments of the healthy function, or a thin wrapper): a learning rate far
too large (GPT-2 at 0.1 without warm-up, MobileNetV2 at 8x) or too small, a
missing ``optimizer.zero_grad()``, a forgotten ``model.train()``, a backbone
cut off the graph, a softmax before ``cross_entropy``, a dead MLP block.

Nothing here imports pytest: a benchmark or a script can call the functions
(``python tests/recipes.py DIR`` writes every run under DIR).  Nothing is
downloaded: models are built from small configs with random weights.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from collections.abc import Callable
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tbdiag import DiagnosticWriter

LOG_EVERY = 10
LAST_WINDOW = 10  # steps averaged into the returned last loss

# ----------------------------------------------------------------- data (learnable, synthetic, no downloads)

VOCAB, SEQ = 32, 16


def stride_sequences(n: int, seed: int = 0, vocab: int = VOCAB, length: int = SEQ) -> torch.Tensor:
    """Arithmetic sequences mod ``vocab`` with a stride of 1, 2 or 3: after two tokens every next one is known."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, vocab, (n, 1), generator=g)
    stride = torch.randint(1, 4, (n, 1), generator=g)
    return (start + stride * torch.arange(length)) % vocab


def majority_tokens(n: int, seed: int = 0, vocab: int = VOCAB, length: int = SEQ):
    """Sequences with a few marker tokens 1 and 2 among noise; the label says which marker is more frequent.

    The recipes replace 10% of the labels (`noisy_labels`): real data has an irreducible loss."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, vocab, (n, length), generator=g)
    marks = torch.randint(1, 3, (n, 5), generator=g)  # five markers: never a tie
    x[:, 1:6] = marks  # position 0 is left for the [CLS]-like first token
    perm = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.randperm(length - 1, generator=g)])
    x = x[:, perm]
    x[:, 0] = 0
    return x, ((x == 1).sum(1) > (x == 2).sum(1)).long()


def bright_patch_images(n: int, seed: int = 0, size: int = 32, channels: int = 3):
    """Noise images with one bright square in a random quadrant; the label is the quadrant (4 classes, 10% of the
    labels replaced by another class)."""
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, channels, size, size, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    half, patch = size // 2, size // 4
    off = torch.randint(0, half - patch + 1, (n, 2), generator=g)
    for i in range(n):
        r = (y[i] // 2) * half + off[i, 0]
        c = (y[i] % 2) * half + off[i, 1]
        x[i, :, r:r + patch, c:c + patch] += 1.0
    return x, noisy_labels(y, 4, seed=seed)


def repeated_motifs(n: int, seed: int = 0, vocab: int = VOCAB, length: int = SEQ, period: int = 4) -> torch.Tensor:
    """A random motif of ``period`` tokens repeated to ``length``: a masked token is any of its other copies."""
    g = torch.Generator().manual_seed(seed)
    motif = torch.randint(0, vocab, (n, period), generator=g)
    return motif.repeat(1, length // period)


def noisy_labels(y: torch.Tensor, classes: int, frac: float = 0.1, seed: int = 0) -> torch.Tensor:
    """``y`` with a fraction ``frac`` of its labels replaced by another class: an irreducible loss, as real data has."""
    g = torch.Generator().manual_seed(seed + 1)
    flip = torch.rand(len(y), generator=g) < frac
    other = (y + torch.randint(1, classes, (len(y),), generator=g)) % classes
    return torch.where(flip, other, y)


def batch_rows(n: int, batch: int, step: int) -> torch.Tensor:
    """The rows of a data set of ``n`` that make ``step``'s batch: consecutive, wrapping around."""
    return torch.arange(step * batch, (step + 1) * batch) % n


# ----------------------------------------------------------------- the standard optimizers and schedules


def adamw(model: nn.Module, lr: float, weight_decay: float = 0.05) -> torch.optim.AdamW:
    """AdamW with the Hugging Face Trainer's parameter groups: no decay on biases and normalisation weights."""
    decay = set(transformers.Trainer.get_decay_parameter_names(None, model))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for n, p in params if n in decay], "weight_decay": weight_decay},
        {"params": [p for n, p in params if n not in decay], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def warmup_cosine(opt: torch.optim.Optimizer, steps: int, warmup: int):
    """Linear warm-up over ``warmup`` steps, then cosine decay to 0 at ``steps``."""
    return transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=warmup, num_training_steps=steps)


# ----------------------------------------------------------------- the training loop


def train_loop(
    logdir: str,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: Any,
    loss_of: Callable[[nn.Module, int], torch.Tensor],
    steps: int,
    log_every: int = LOG_EVERY,
    clip: float | None = 1.0,
    zero_grad: bool = True,
    train_mode: bool = True,
) -> tuple[float, float]:
    """A plain PyTorch loop as written today; returns (first loss, mean of the last LAST_WINDOW losses)."""
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=log_every)
    model.train(train_mode)  # train_mode=False: model.train() forgotten after an evaluation
    losses = []
    try:
        for step in range(steps):
            loss = loss_of(model, step)
            if zero_grad:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            opt.step()
            if sched is not None:
                sched.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], step)
    finally:
        writer.close()
    tail = [v for v in losses[-LAST_WINDOW:] if math.isfinite(v)]
    return losses[0], (sum(tail) / len(tail) if tail else float("nan"))


def next_token_loss(data: torch.Tensor, batch: int, bad_batch: int | None = None):
    """``bad_batch=s``: at step ``s`` the labels are shifted by half the vocabulary (a misaligned shard)."""
    def loss_of(model, step):
        x = data[batch_rows(len(data), batch, step)]
        return model(input_ids=x, labels=(x + VOCAB // 2) % VOCAB if step == bad_batch else x).loss
    return loss_of


# ----------------------------------------------------------------- language models


def gpt2_config(n_layer: int = 8) -> transformers.GPT2Config:
    return transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ, n_embd=48, n_layer=n_layer, n_head=4,
                                   n_inner=192, bos_token_id=0, eos_token_id=0)


def gpt2(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 3e-3,
         warmup: int | None = None, n_layer: int = 8, batch: int = 16, zero_grad: bool = True,
         train_mode: bool = True, dead_block: int | None = None, bad_batch: int | None = None) -> tuple[float, float]:
    """GPT2LMHeadModel on stride sequences: AdamW, warm-up + cosine, clipping 1.0.

    ``dead_block=i``: after init, ``transformer.h[i].mlp.c_fc.bias`` is set to -20, so that block's GELU
    outputs 0 and passes back no gradient.  ``warmup=0`` removes the warm-up (default: 10% of the steps).
    ``bad_batch=s``: the batch of step ``s`` has its labels shifted by half the vocabulary (`next_token_loss`).
    """
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(gpt2_config(n_layer))
    if dead_block is not None:
        with torch.no_grad():
            model.transformer.h[dead_block].mlp.c_fc.bias.fill_(-20.0)
    opt = adamw(model, lr, weight_decay=0.1)
    sched = warmup_cosine(opt, steps, steps // 10 if warmup is None else warmup)
    return train_loop(logdir, model, opt, sched, next_token_loss(stride_sequences(4096, seed), batch, bad_batch), steps,
                      log_every, zero_grad=zero_grad, train_mode=train_mode)


def llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                                    bos_token_id=0, eos_token_id=0, pad_token_id=None)


def llama(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 3e-3,
          batch: int = 16) -> tuple[float, float]:
    """LlamaForCausalLM (RMSNorm, SwiGLU, rotary positions) on stride sequences: AdamW, warm-up + cosine, clip 1."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config())
    opt = adamw(model, lr, weight_decay=0.1)
    sched = warmup_cosine(opt, steps, steps // 10)
    return train_loop(logdir, model, opt, sched, next_token_loss(stride_sequences(4096, seed), batch), steps, log_every)


def llama_bf16(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 3e-3,
               batch: int = 16) -> tuple[float, float]:
    """`llama` under bf16 autocast on the CPU: ``torch.autocast("cpu", dtype=torch.bfloat16)`` around the forward
    and the loss (fp32 master weights, AdamW, warm-up + cosine, clipping 1.0)."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(llama_config())
    opt = adamw(model, lr, weight_decay=0.1)
    sched = warmup_cosine(opt, steps, steps // 10)
    lm_loss = next_token_loss(stride_sequences(4096, seed), batch)

    def loss_of(m, step):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return lm_loss(m, step)

    return train_loop(logdir, model, opt, sched, loss_of, steps, log_every)


def gpt2_long(logdir: str, steps: int = 720, log_every: int = LOG_EVERY, seed: int = 0) -> tuple[float, float]:
    """`gpt2` run three times as long (720 steps, same recipe): a long cosine tail, where the updates shrink by
    design."""
    return gpt2(logdir, steps, log_every, seed)


def mixtral(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 3e-3,
            batch: int = 16, aux: float = 0.02, biased_router: bool = False) -> tuple[float, float]:
    """MixtralForCausalLM (2 layers, 4 experts, top-2 routing, the router's load-balancing loss at Mixtral's 0.02)
    on stride sequences: AdamW, warm-up + cosine, clipping 1.0.

    ``biased_router``: every token's hidden state shares a direction (a constant added to the embeddings) that
    the routers' rows for experts 0 and 1 point along, so they send every token there; ``aux``: the balancing
    loss's weight (0: none).
    """
    torch.manual_seed(seed)
    cfg = transformers.MixtralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=SEQ, output_router_logits=aux > 0,
                                     router_aux_loss_coef=aux, bos_token_id=0, eos_token_id=0, pad_token_id=None)
    model = transformers.MixtralForCausalLM(cfg)
    if biased_router:
        with torch.no_grad():
            model.model.embed_tokens.weight.add_(0.5)
            for layer in model.model.layers:
                gain = layer.post_attention_layernorm.weight
                layer.mlp.gate.weight[:2] += 5.0 * gain / gain.norm()
    opt = adamw(model, lr, weight_decay=0.1)
    sched = warmup_cosine(opt, steps, steps // 10)
    return train_loop(logdir, model, opt, sched, next_token_loss(stride_sequences(4096, seed), batch), steps, log_every)


# ----------------------------------------------------------------- T5 with Adafactor


def t5_config() -> transformers.T5Config:
    return transformers.T5Config(vocab_size=VOCAB, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                 num_heads=4, relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 dropout_rate=0.1, feed_forward_proj="relu", pad_token_id=0, eos_token_id=1,
                                 decoder_start_token_id=0)


def _continuation_loss(data: torch.Tensor, batch: int):
    """Seq2seq on stride sequences: the encoder reads the first half, the decoder writes the second half."""
    half = data.shape[1] // 2

    def loss_of(model, step):
        x = data[batch_rows(len(data), batch, step)]
        return model(input_ids=x[:, :half].contiguous(), labels=x[:, half:].contiguous()).loss
    return loss_of


def t5_adafactor(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 1e-3,
                 batch: int = 16, relative_step: bool = False, adafactor_schedule: bool = False) -> tuple[float, float]:
    """T5ForConditionalGeneration on stride-sequence continuation with transformers' `Adafactor`, clipping 1.0.

    Default: Adafactor's common fine-tuning form, ``Adafactor(lr=1e-3, scale_parameter=False,
    relative_step=False, warmup_init=False)``, warm-up then linear decay to 0.
    ``relative_step=True``: Adafactor's own default mode, ``lr=None, relative_step=True, scale_parameter=True,
    warmup_init=True``: the step size is computed inside ``step`` (1e-6 x step x the parameter's RMS, still
    rising at the end of a short run) and the param groups carry ``lr=None``.
    ``adafactor_schedule=True`` (with ``relative_step``): `AdafactorSchedule` as the scheduler, as the
    transformers docs pair them; it writes the step size into the groups' ``lr`` (0.0, then a 0-d tensor).
    """
    from transformers.optimization import Adafactor, AdafactorSchedule

    torch.manual_seed(seed)
    model = transformers.T5ForConditionalGeneration(t5_config())
    if relative_step:
        opt = Adafactor(model.parameters(), lr=None, relative_step=True, scale_parameter=True, warmup_init=True)
        sched = AdafactorSchedule(opt) if adafactor_schedule else None
    else:
        opt = Adafactor(model.parameters(), lr=lr, scale_parameter=False, relative_step=False, warmup_init=False)
        sched = transformers.get_linear_schedule_with_warmup(opt, steps // 10, steps)
    return train_loop(logdir, model, opt, sched, _continuation_loss(stride_sequences(4096, seed), batch), steps,
                      log_every)


def t5_adafactor_relative_step(logdir: str, steps: int = 600, log_every: int = LOG_EVERY,
                               seed: int = 0) -> tuple[float, float]:
    """`t5_adafactor` in Adafactor's default relative-step mode, no scheduler: ``lr=None`` in every param group.

    600 steps: the warm-up-init step size is tiny (6e-4 x RMS at step 600); 240 steps reach only 0.82x."""
    return t5_adafactor(logdir, steps, log_every, seed, relative_step=True)


def t5_adafactor_schedule(logdir: str, steps: int = 600, log_every: int = LOG_EVERY,
                          seed: int = 0) -> tuple[float, float]:
    """`t5_adafactor_relative_step` with `AdafactorSchedule`: the same training; the groups' ``lr`` is a tensor."""
    return t5_adafactor(logdir, steps, log_every, seed, relative_step=True, adafactor_schedule=True)


# ----------------------------------------------------------------- BERT


def bert_config() -> transformers.BertConfig:
    return transformers.BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                   intermediate_size=256, max_position_embeddings=SEQ, num_labels=2, pad_token_id=0)


class DetachedBackboneBert(transformers.BertForSequenceClassification):
    """A "frozen" encoder done wrong: its output is detached, but its parameters still require grad and sit in
    the optimizer (the same layers and init as `BertForSequenceClassification`)."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        pooled = self.bert(input_ids=input_ids, **kwargs).pooler_output.detach()  # the mistake
        logits = self.classifier(self.dropout(pooled))
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def bert(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 1e-3,
         batch: int = 32, detach_backbone: bool = False, zero_mask: bool = False) -> tuple[float, float]:
    """BertForSequenceClassification on the majority-marker task: AdamW, warm-up + cosine, clipping 1.0."""
    torch.manual_seed(seed)
    cls = DetachedBackboneBert if detach_backbone else transformers.BertForSequenceClassification
    model = cls(bert_config())
    x, y = majority_tokens(8192, seed)
    y = noisy_labels(y, 2, seed=seed)
    opt = adamw(model, lr, weight_decay=0.01)
    sched = warmup_cosine(opt, steps, steps // 10)

    def loss_of(m, step):
        idx = batch_rows(len(x), batch, step)
        if zero_mask:  # every position masked out: attention passes back exactly zero to queries and keys
            return m(input_ids=x[idx], attention_mask=torch.zeros_like(x[idx]), labels=y[idx]).loss
        return m(input_ids=x[idx], labels=y[idx]).loss

    return train_loop(logdir, model, opt, sched, loss_of, steps, log_every)


def masked_tokens(x: torch.Tensor, step: int, seed: int = 0, p: float = 0.15, mask_id: int = VOCAB - 1):
    """BERT's masking: a fraction ``p`` of the tokens is chosen (the only ones in the loss); of those, 80% become
    ``mask_id``, 10% a random token and 10% stay.  Fresh masks every step."""
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    chosen = torch.rand(x.shape, generator=g) < p
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    roll = torch.rand(x.shape, generator=g)
    inputs = torch.where(chosen & (roll < 0.8), torch.full_like(x, mask_id), x)
    random_tokens = torch.randint(0, mask_id, x.shape, generator=g)
    inputs = torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_tokens, inputs)
    return inputs, labels


def bert_mlm(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 3e-3,
             batch: int = 32) -> tuple[float, float]:
    """BertForMaskedLM on repeated motifs (token id VOCAB is [MASK]; BERT's 15% with 80/10/10 masking): AdamW,
    warm-up then linear decay to 0, clipping 1.0.

    Repeated motifs, not stride sequences: with 15% of the tokens in the loss, the modular arithmetic of the
    stride task took BERT 400 steps to reach 0.57x; lr 1e-3 reached only 0.65-0.72x in 240 steps.
    """
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=VOCAB + 1, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  intermediate_size=256, max_position_embeddings=SEQ, pad_token_id=0)
    model = transformers.BertForMaskedLM(cfg)
    data = repeated_motifs(4096, seed)
    opt = adamw(model, lr, weight_decay=0.01)
    sched = transformers.get_linear_schedule_with_warmup(opt, steps // 10, steps)

    def loss_of(m, step):
        inputs, labels = masked_tokens(data[batch_rows(len(data), batch, step)], step, seed, mask_id=VOCAB)
        return m(input_ids=inputs, labels=labels).loss

    return train_loop(logdir, model, opt, sched, loss_of, steps, log_every)


# ----------------------------------------------------------------- vision


def _image_loss(x: torch.Tensor, y: torch.Tensor, batch: int, softmax_in_loss: bool = False):
    def loss_of(model, step):
        idx = batch_rows(len(x), batch, step)
        logits = model(pixel_values=x[idx]).logits
        if softmax_in_loss:
            logits = logits.softmax(-1)  # the mistake: cross_entropy(logits.softmax(-1), y)
        return F.cross_entropy(logits, y[idx])
    return loss_of


def vit(logdir: str, steps: int = 300, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 1e-3,
        batch: int = 32, softmax_head: bool = False, softmax_in_loss: bool = False) -> tuple[float, float]:
    """ViTForImageClassification on bright-patch images: AdamW, warm-up + cosine, clipping 1.0.

    300 steps at lr 1e-3: the [CLS] token must first learn where to look, and at 240 steps or lr 2e-3 some seeds
    still sit at ln 4 when the schedule ends.

    ``softmax_head``: the classifier is ``nn.Sequential(nn.Linear, nn.Softmax(-1))``, feeding cross-entropy.
    ``softmax_in_loss``: the loss line is ``cross_entropy(logits.softmax(-1), y)``.
    """
    torch.manual_seed(seed)
    cfg = transformers.ViTConfig(image_size=16, patch_size=4, num_channels=3, hidden_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, intermediate_size=256, num_labels=4)
    model = transformers.ViTForImageClassification(cfg)
    if softmax_head:
        model.classifier = nn.Sequential(model.classifier, nn.Softmax(dim=-1))
    x, y = bright_patch_images(4096, seed, size=16)
    opt = adamw(model, lr, weight_decay=0.05)
    sched = warmup_cosine(opt, steps, steps // 10)
    return train_loop(logdir, model, opt, sched, _image_loss(x, y, batch, softmax_in_loss), steps, log_every)


def convnext(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 4e-3,
             batch: int = 32) -> tuple[float, float]:
    """ConvNextForImageClassification (LayerScale at its default 1e-6 init): AdamW, warm-up + cosine, clip 1.0."""
    torch.manual_seed(seed)
    cfg = transformers.ConvNextConfig(num_channels=3, patch_size=4, num_stages=2, hidden_sizes=[32, 64],
                                      depths=[2, 2], image_size=32, num_labels=4)
    model = transformers.ConvNextForImageClassification(cfg)
    x, y = bright_patch_images(4096, seed)
    opt = adamw(model, lr, weight_decay=0.05)
    sched = warmup_cosine(opt, steps, steps // 10)
    return train_loop(logdir, model, opt, sched, _image_loss(x, y, batch), steps, log_every)


def resnet(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 0.1,
           batch: int = 32) -> tuple[float, float]:
    """ResNetForImageClassification (BatchNorm, basic blocks): SGD momentum 0.9, weight decay 5e-4, StepLR
    dividing the learning rate by 10 at 1/3 and 2/3 of the steps; no clipping (the classic recipe)."""
    torch.manual_seed(seed)
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64], depths=[2, 2],
                                    layer_type="basic", num_labels=4)
    model = transformers.ResNetForImageClassification(cfg)
    x, y = bright_patch_images(4096, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=math.ceil(steps / 3), gamma=0.1)
    return train_loop(logdir, model, opt, sched, _image_loss(x, y, batch), steps, log_every, clip=None)


def swin(logdir: str, steps: int = 300, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 2e-3,
         batch: int = 32) -> tuple[float, float]:
    """SwinForImageClassification (shifted windows, relative position bias tables, patch merging, stochastic
    depth 0.1) on bright-patch images: AdamW, warm-up + cosine, clipping 1.0.

    A 4x4 grid of 8-pixel patches in 2x2 windows (shifted in stage 1; stage 2's 2x2 grid is one window): Swin
    has no absolute positions, and with 4-pixel patches in 4x4 windows it sat at ln 4 for 360 steps at lr 2e-3
    (with absolute position embeddings too)."""
    torch.manual_seed(seed)
    cfg = transformers.SwinConfig(image_size=32, patch_size=8, num_channels=3, embed_dim=32, depths=[2, 2],
                                  num_heads=[2, 4], window_size=2, num_labels=4)
    model = transformers.SwinForImageClassification(cfg)
    x, y = bright_patch_images(4096, seed)
    opt = adamw(model, lr, weight_decay=0.05)
    sched = warmup_cosine(opt, steps, steps // 10)
    return train_loop(logdir, model, opt, sched, _image_loss(x, y, batch), steps, log_every)


def mobilenet_v2(logdir: str, steps: int = 160, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 0.02,
                 batch: int = 32) -> tuple[float, float]:
    """MobileNetV2ForImageClassification (width 0.35, inverted residuals, BatchNorm, ReLU6, stock HF init) on
    bright-patch images: SGD momentum 0.9, weight decay 4e-5, cosine decay to 0; no clipping (the classic
    recipe).

    lr 0.02 at batch 32: torchvision's reference (0.036 at batch 256) scaled up.  At 16x16 images (half the time)
    some seeds sit at ln 4 for the whole run; at lr 0.01 one seed's loss really jumps (0.4 -> 2.3) for a few
    batches; lr 0.05 oscillates.
    """
    torch.manual_seed(seed)
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=32, depth_multiplier=0.35, num_labels=4,
                                         classifier_dropout_prob=0.2)
    model = transformers.MobileNetV2ForImageClassification(cfg)
    x, y = bright_patch_images(4096, seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=4e-5)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    return train_loop(logdir, model, opt, sched, _image_loss(x, y, batch), steps, log_every, clip=None)


# ----------------------------------------------------------------- a plain MLP whose loss bounces


def noisy_teacher_task(n: int, seed: int = 0, dim: int = 16, classes: int = 8, noise: float = 0.2):
    """Gaussian inputs labelled by a random two-layer teacher network, a fraction ``noise`` of the labels replaced:
    learnable, but hard, and the loss of small batches bounces."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    w1, w2 = torch.randn(dim, 32, generator=g), torch.randn(32, classes, generator=g)
    y = (torch.relu(x @ w1) @ w2).argmax(1)
    return x, noisy_labels(y, classes, frac=noise, seed=seed)


def mlp_sgd(logdir: str, steps: int = 600, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 0.05,
            batch: int = 16) -> tuple[float, float]:
    """A plain ReLU MLP classifier: SGD lr 0.05, momentum 0.9, cosine decay to 0, no clipping, small batches of a
    hard task with noisy labels; the loss bounces from batch to batch, as it should."""
    torch.manual_seed(seed)
    x, y = noisy_teacher_task(8192, seed)
    model = nn.Sequential(nn.Linear(x.shape[1], 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(),
                          nn.Linear(128, int(y.max()) + 1))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)

    def loss_of(m, step):
        idx = batch_rows(len(x), batch, step)
        return F.cross_entropy(m(x[idx]), y[idx])

    return train_loop(logdir, model, opt, sched, loss_of, steps, log_every, clip=None)


# ----------------------------------------------------------------- the Hugging Face Trainer


class _MajorityDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int):
        self.ids, labels = majority_tokens(n, seed)
        self.labels = noisy_labels(labels, 2, seed=seed)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def hf_trainer(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0, *, lr: float = 1e-3,
               batch: int = 32) -> tuple[float, float]:
    """BertForSequenceClassification through `transformers.Trainer` with tbdiag's `DiagnosticsCallback`.

    The Trainer's own recipe: AdamW (no decay on biases and LayerNorms), warm-up then cosine to 0, clipping at
    1.0, ``report_to="tensorboard"``.  ``logdir`` is the output directory (the run lands in ``logdir/runs/...``).
    The losses returned are HF's logged ones: means over ``log_every`` steps.
    """
    from tbdiag.integrations.transformers import DiagnosticsCallback

    torch.manual_seed(seed)
    model = transformers.BertForSequenceClassification(bert_config())
    args = transformers.TrainingArguments(
        output_dir=logdir, report_to="tensorboard", max_steps=steps, logging_steps=log_every,
        per_device_train_batch_size=batch, learning_rate=lr, weight_decay=0.01, lr_scheduler_type="cosine",
        warmup_steps=steps // 10, max_grad_norm=1.0, use_cpu=True, save_strategy="no", disable_tqdm=True,
        seed=seed, dataloader_num_workers=0,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_MajorityDataset(8192, seed),
                                   callbacks=[DiagnosticsCallback(log_every=log_every)])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses[0], losses[-1]


# ----------------------------------------------------------------- sick twins (one mistake each)


def gpt2_lr_too_high(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` at lr 0.1 with no warm-up."""
    return gpt2(logdir, steps, log_every, seed, lr=0.1, warmup=0)


def gpt2_lr_too_low(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` at lr 1e-7."""
    return gpt2(logdir, steps, log_every, seed, lr=1e-7)


def gpt2_no_zero_grad(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` with ``optimizer.zero_grad()`` missing: gradients accumulate from step to step."""
    return gpt2(logdir, steps, log_every, seed, zero_grad=False)


def gpt2_eval_mode(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` trained with the model in eval() mode (model.train() forgotten)."""
    return gpt2(logdir, steps, log_every, seed, train_mode=False)


def gpt2_dead_mlp(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` (8 blocks) whose block 6 MLP is dead: ``h[6].mlp.c_fc.bias`` is -20, so its GELU outputs 0."""
    return gpt2(logdir, steps, log_every, seed, dead_block=6)


def bert_detached_backbone(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`bert` whose encoder output is detached while its parameters still require grad and are in the optimizer."""
    return bert(logdir, steps, log_every, seed, detach_backbone=True)


def bert_zero_attention_mask(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`bert` called with an all-zero ``attention_mask`` (a padding mask built the wrong way round)."""
    return bert(logdir, steps, log_every, seed, zero_mask=True)


def vit_softmax_head(logdir: str, steps: int = 300, log_every: int = LOG_EVERY, seed: int = 0):
    """`vit` with an ``nn.Softmax`` at the end of its classifier, feeding cross-entropy."""
    return vit(logdir, steps, log_every, seed, softmax_head=True)


def vit_softmax_in_loss(logdir: str, steps: int = 300, log_every: int = LOG_EVERY, seed: int = 0):
    """`vit` with ``cross_entropy(logits.softmax(-1), y)`` in the loss line."""
    return vit(logdir, steps, log_every, seed, softmax_in_loss=True)


def gpt2_bad_batch(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`gpt2` with one bad batch at step 137 (not a logging step): labels shifted by half the vocabulary."""
    return gpt2(logdir, steps, log_every, seed, bad_batch=137)


def mixtral_collapsed_router(logdir: str, steps: int = 240, log_every: int = LOG_EVERY, seed: int = 0):
    """`mixtral` with a router biased towards two experts and no load-balancing loss."""
    return mixtral(logdir, steps, log_every, seed, aux=0.0, biased_router=True)


def mobilenet_v2_lr_too_high(logdir: str, steps: int = 160, log_every: int = LOG_EVERY, seed: int = 0):
    """`mobilenet_v2` at 8x its learning rate (SGD lr 0.16)."""
    return mobilenet_v2(logdir, steps, log_every, seed, lr=8 * 0.02)


HEALTHY: dict[str, Callable[..., tuple[float, float]]] = {
    "gpt2": gpt2, "llama": llama, "bert": bert, "vit": vit, "convnext": convnext,
    "resnet": resnet, "hf_trainer": hf_trainer,
    "t5_adafactor": t5_adafactor, "t5_adafactor_relative_step": t5_adafactor_relative_step,
    "t5_adafactor_schedule": t5_adafactor_schedule, "mixtral": mixtral,
    "swin": swin, "mobilenet_v2": mobilenet_v2, "llama_bf16": llama_bf16, "gpt2_long": gpt2_long,
    "bert_mlm": bert_mlm, "mlp_sgd": mlp_sgd,
}
SICK: dict[str, Callable[..., tuple[float, float]]] = {
    "gpt2_lr_too_high": gpt2_lr_too_high, "gpt2_lr_too_low": gpt2_lr_too_low,
    "gpt2_no_zero_grad": gpt2_no_zero_grad, "gpt2_eval_mode": gpt2_eval_mode, "gpt2_dead_mlp": gpt2_dead_mlp,
    "bert_detached_backbone": bert_detached_backbone, "bert_zero_attention_mask": bert_zero_attention_mask,
    "vit_softmax_head": vit_softmax_head, "vit_softmax_in_loss": vit_softmax_in_loss, "mobilenet_v2_lr_too_high": mobilenet_v2_lr_too_high,
    "gpt2_bad_batch": gpt2_bad_batch, "mixtral_collapsed_router": mixtral_collapsed_router,
}
ALL = {**HEALTHY, **SICK}


def build_all(root: str, names=None, **kwargs: Any) -> dict[str, tuple[float, float, float]]:
    """Write the named recipes (default: all) as runs under ``root``: name -> (first loss, last loss, seconds)."""
    out = {}
    for name in names or ALL:
        start = time.perf_counter()
        first, last = ALL[name](os.path.join(root, name), **kwargs)
        out[name] = (first, last, time.perf_counter() - start)
    return out


if __name__ == "__main__":  # python tests/recipes.py DIR [NAME ...]: write the runs for a look in TensorBoard
    import sys

    torch.set_num_threads(1)
    warnings.simplefilter("default")
    root = sys.argv[1] if len(sys.argv) > 1 else "runs/recipes"
    for name, (first, last, seconds) in build_all(root, sys.argv[2:] or None).items():
        print(f"{name:24s} loss {first:.3f} -> {last:.3f}  {seconds:.1f}s")
