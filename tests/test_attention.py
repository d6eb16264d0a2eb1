"""Attention health: the statistics against a reference, every attention path, the rules, and a real instability.

The statistics (`tbdiag.measure.attention`) are checked against attention
computed in full by hand, for causal, padding, float and grouped-query masks,
the eager softmax and ``nn.MultiheadAttention``; watched training stays
bit-identical; Hugging Face GPT-2 and Llama, a hand-written block, an
``nn.TransformerEncoderLayer`` and a compiled model are measured on the
attention module's own name; an attention tbdiag cannot see is said so in the
model summary.  The reproduction: a small pre-LN transformer at a high
learning rate without qk-layernorm (Wortsman et al. 2023) grows its attention
logits and collapses its entropy, named before its loss parts from the
qk-layernorm twin's; the twin and the same model at a sane learning rate
stay silent.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter
from tbdiag.contract import schema
from tbdiag.contract.rundata import RunData
from tbdiag.measure import attention, modelinfo
from tbdiag.read.reader import load_logdir
from tbdiag.rules import RULES_BY_NAME
from tbdiag.rules.transformer import attention as attention_rules
from tbdiag.summary import assembly

pytestmark = pytest.mark.usefixtures("one_thread")

ATTN = ("attention_logit_growth", "attention_entropy_collapse")


# ------------------------------------------------------------------ the statistics against a full computation


def _reference(logits: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[H, 3]`` (max logit, mean normalised entropy, first-key share) over every row, by hand in float64."""
    logits, valid = logits.double(), valid.expand_as(logits)
    B, H, L, K = logits.shape
    out = torch.zeros(H, 3, dtype=torch.float64)
    for h in range(H):
        tops, ents, sinks = [], [], []
        for b in range(B):
            for i in range(L):
                keep = valid[b, h, i]
                n = int(keep.sum())
                if n < 2:
                    continue
                row = logits[b, h, i][keep]
                p = torch.softmax(row, 0)
                tops.append(float(row.max()))
                ents.append(float(-(p * p.log()).sum() / math.log(n)))
                full = torch.zeros(K, dtype=torch.float64)
                full[keep] = p
                sinks.append(float(full[0]))
        out[h] = torch.tensor([max(tops), np.mean(ents), np.mean(sinks)])
    return out


def _qk(B=3, H=4, L=10, D=8, Hk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, L, D, generator=g) * 2
    k = torch.randn(B, Hk or H, L, D, generator=g) * 2
    return q, k


def test_sdpa_statistics_match_a_full_causal_computation():
    q, k = _qk()
    ours = attention.head_stats(*attention.sdpa_rows(q, k, is_causal=True))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    valid = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(ours.double(), _reference(logits, valid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["bool_padding", "float_padding", "float_bias"])
def test_sdpa_statistics_respect_masks(kind):
    q, k = _qk()
    pad = torch.ones(3, 10, dtype=torch.bool)
    pad[0, :4] = False  # item 0: its first four keys are padding (left padding)
    pad[2, 7:] = False
    if kind == "bool_padding":
        mask, bias, valid = pad[:, None, None, :], 0.0, pad[:, None, None, :]
    elif kind == "float_padding":  # Hugging Face's: the dtype's lowest value where masked
        mask = torch.zeros(3, 1, 1, 10).masked_fill(~pad[:, None, None, :], torch.finfo(torch.float32).min)
        bias, valid = 0.0, pad[:, None, None, :]
    else:  # a finite additive bias (relative positions): every key is attended, the bias is in the logits
        mask = torch.randn(1, 4, 10, 10)
        bias, valid = mask, torch.ones(1, 1, 1, 1, dtype=torch.bool)
    ours = attention.head_stats(*attention.sdpa_rows(q, k, attn_mask=mask))
    logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + bias
    torch.testing.assert_close(ours.double(), _reference(logits, valid), rtol=1e-5, atol=1e-5)


def test_grouped_query_attention_uses_each_query_heads_shared_key_head():
    q, k = _qk(H=4, Hk=2)
    ours = attention.head_stats(*attention.sdpa_rows(q, k, is_causal=True, scale=0.3, enable_gqa=True))
    logits = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 0.3
    valid = torch.ones(10, 10, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(ours.double(), _reference(logits, valid), rtol=1e-5, atol=1e-5)


def test_eager_softmax_input_with_a_lowest_value_mask_matches():
    q, k = _qk()
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    causal = torch.ones(10, 10, dtype=torch.bool).tril()
    x = scores.masked_fill(~causal, torch.finfo(torch.float32).min)
    ours = attention.head_stats(*attention.softmax_rows(x))
    torch.testing.assert_close(ours.double(), _reference(scores, causal[None, None]), rtol=1e-5, atol=1e-5)
    minus_inf = attention.head_stats(*attention.softmax_rows(scores.masked_fill(~causal, -math.inf)))
    torch.testing.assert_close(minus_inf, ours)


@pytest.mark.parametrize("need_weights", [True, False])
def test_multihead_attention_is_rebuilt_from_its_inputs(need_weights):
    """nn.MultiheadAttention: the entropy and first-key share of the weights it returns, with a causal mask and
    key padding; the call runs as the user wrote it (need_weights=False goes through SDPA)."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(3, 9, 16) * 3
    causal = torch.ones(9, 9, dtype=torch.bool).triu(1)  # True: not allowed
    padding = torch.zeros(3, 9, dtype=torch.bool)
    padding[1, 6:] = True
    seen = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is F.multi_head_attention_forward:
                seen.append(attention.head_stats(*attention.mha_rows(args, kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Spy():
        mha(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=need_weights)
    _, weights = mha(x, x, x, attn_mask=causal, key_padding_mask=padding, need_weights=True,
                     average_attn_weights=False)
    valid = (~causal)[None, None] & (~padding)[:, None, None, :]
    n = valid.expand_as(weights).sum(-1)
    use = n >= 2
    ent = -(torch.special.xlogy(weights, weights)).sum(-1) / n.clamp(min=2).log()
    expect_entropy = (ent * use).sum((0, 2)) / use.sum((0, 2))
    expect_sink = (weights[..., 0] * use).sum((0, 2)) / use.sum((0, 2))
    (ours,) = seen
    torch.testing.assert_close(ours[:, 1], expect_entropy, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ours[:, 2], expect_sink, rtol=1e-4, atol=1e-5)


def test_long_sequences_are_sampled_within_the_memory_bound():
    q = torch.randn(8, 8, 4096, 16)
    k = torch.randn(8, 8, 4096, 16)
    logits, valid = attention.sdpa_rows(q, k, is_causal=True)
    assert logits.numel() <= attention.LOGIT_ELEMENTS
    assert logits.shape[-1] == 4096  # every key
    assert bool(valid[0, 0, -1].all()), "the last query row (which sees every key) is in the sample"
    full = torch.randn(2, 8, 40, 40)
    rows, _ = attention.softmax_rows(full)
    assert rows.shape[:2] == (2, 8) and rows.shape[2] <= attention.MAX_ROWS and rows.shape[3] == 40
    assert torch.equal(rows[0, 0, -1], full[0, 0, -1])


def test_a_layers_columns_name_its_worst_heads():
    heads = np.array([[3.0, 0.9, 0.1], [120.0, 0.5, 0.2], [7.0, 0.05, 0.3], [math.nan, math.nan, math.nan]])
    row = assembly.attention_columns(heads)
    assert row[:2] == [120.0, 1.0]
    assert row[2] == pytest.approx((0.9 + 0.5 + 0.05) / 3)
    assert row[3:5] == [pytest.approx(0.05), 2.0]
    assert row[5] == pytest.approx(0.2)
    assert np.isnan(assembly.attention_columns(np.full((2, 3), np.nan))).all()


def test_attention_modules_are_the_innermost_ones_named_so():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=32, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=64))
    names = {n for n, m in bert.named_modules() if id(m) in attention.attention_modules(bert)}
    assert names == {"encoder.layer.0.attention.self", "encoder.layer.1.attention.self"}
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 2, 32), 2, enable_nested_tensor=False)
    names = {n for n, m in enc.named_modules() if id(m) in attention.attention_modules(enc)}
    assert names == {"layers.0.self_attn", "layers.1.self_attn"}


# ------------------------------------------------------------------ watched training


def _attention_rows(logdir):
    (run,) = load_logdir(str(logdir))
    ent = run.column("attn_entropy")
    return run, {run.table.layers[i].name: i for i in range(ent.shape[1]) if np.isfinite(ent[:, i]).any()}


def _train(model, steps, logdir=None, make_input=None, lr=1e-3, **watch):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    writer = None
    if logdir is not None:
        writer = DiagnosticWriter(str(logdir))
        writer.watch(model, opt, log_every=2, **watch)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        x = make_input(g)
        loss = model(x).float().pow(2).mean() if not isinstance(x, dict) else model(**x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
    if writer is not None:
        writer.close()
    return model


def test_watched_training_with_dropout_is_bit_identical_and_measured(tmp_path):
    """The encoder layer (MultiheadAttention) and an eager attention, both with dropout: the same weights
    watched or not, and both modules measured on their own names."""
    from sync_budget import AttentionNet

    torch.manual_seed(0)
    model = AttentionNet()
    twin = copy.deepcopy(model)
    make = lambda g: torch.randn(8, 12, 32, generator=g)  # noqa: E731
    torch.manual_seed(5)
    _train(model, 6, tmp_path, make)
    torch.manual_seed(5)
    _train(twin, 6, None, make)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    run, rows = _attention_rows(tmp_path)
    assert set(rows) == {"encoder.self_attn", "attn"}
    assert run.table.extra["attention"] == {"modules": 2, "measured": 2, "not_seen": []}
    assert np.isnan(run.column("attn_entropy")[:, run.layer_names.index("head")]).all()  # no attention: NaN


def test_sdpa_eager_and_multihead_paths_agree_on_the_same_weights(tmp_path):
    """One set of q/k weights: the fused call, the eager softmax and MultiheadAttention read the same logits."""
    from attention_runs import TinyLM

    runs = {}
    torch.manual_seed(0)
    base = TinyLM(attention="sdpa")
    for path in ("sdpa", "eager", "mha"):
        model = TinyLM(attention=path)
        state = base.state_dict()
        if path == "mha":  # the same projections, in MultiheadAttention's layout
            for i in range(2):
                state = dict(state)
                w = state.pop(f"blocks.{i}.attn.qkv.weight")
                state[f"blocks.{i}.attn.mha.in_proj_weight"] = w
                state[f"blocks.{i}.attn.mha.out_proj.weight"] = state.pop(f"blocks.{i}.attn.proj.weight")
        model.load_state_dict(state)
        x = torch.randint(0, 32, (4, 31), generator=torch.Generator().manual_seed(0))
        _train(model, 1, tmp_path / path, lambda g: x)
        run, rows = _attention_rows(tmp_path / path)
        assert set(rows) == {"blocks.0.attn.mha" if path == "mha" else "blocks.0.attn",
                             "blocks.1.attn.mha" if path == "mha" else "blocks.1.attn"}
        runs[path] = np.stack([run.column(c)[0, sorted(rows.values())] for c in
                               ("attn_logit_max", "attn_entropy", "attn_sink")])
    np.testing.assert_allclose(runs["eager"], runs["sdpa"], rtol=1e-4)
    np.testing.assert_allclose(runs["mha"], runs["sdpa"], rtol=1e-4)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_hugging_face_models_are_named_on_their_attention_modules(tmp_path, impl):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=32, n_positions=16, n_embd=32, n_layer=2, n_head=4, attn_implementation=impl,
        bos_token_id=0, eos_token_id=0))
    ids = torch.randint(0, 32, (4, 16))
    _train(gpt2, 3, tmp_path / "gpt2", lambda g: {"input_ids": ids, "labels": ids})
    _, rows = _attention_rows(tmp_path / "gpt2")
    assert set(rows) == {"transformer.h.0.attn", "transformer.h.1.attn"}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation=impl, bos_token_id=0, eos_token_id=0, pad_token_id=None))
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[0, :5] = 0  # left padding
    _train(llama, 3, tmp_path / "llama", lambda g: {"input_ids": ids, "labels": ids, "attention_mask": mask})
    run, rows = _attention_rows(tmp_path / "llama")
    assert set(rows) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert run.table.extra["attention"]["not_seen"] == []


def test_a_compiled_model_is_measured(tmp_path):
    from attention_runs import TinyLM

    torch.manual_seed(0)
    model = torch.compile(TinyLM(attention="sdpa"))
    x = torch.randint(0, 32, (4, 17), generator=torch.Generator().manual_seed(0))
    _train(model, 3, tmp_path, lambda g: x)
    run, rows = _attention_rows(tmp_path)
    assert set(rows) == {"blocks.0.attn", "blocks.1.attn"}
    assert run.table.extra["attention"]["measured"] == 2


class FusedAttention(nn.Module):
    """An attention whose kernel tbdiag does not know (its softmax written out by hand)."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, -1)
        s = (q @ k.transpose(-1, -2)).exp()
        return (s / s.sum(-1, keepdim=True)) @ v


def test_an_attention_tbdiag_cannot_see_is_said_once_in_the_model_summary(tmp_path):
    model = nn.Sequential(FusedAttention(), nn.Linear(16, 4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(model, 4, tmp_path, lambda g: torch.randn(2, 5, 16, generator=g) * 0.1)
    assert not [w for w in caught if "tbdiag" in str(w.message)]
    (run,) = load_logdir(str(tmp_path))
    note = run.table.extra["attention"]
    assert note["not_seen"] == ["0"] and note["measured"] == 0
    text = modelinfo.summary_markdown(run.table)
    assert "measured in 0 of 1 attention modules" in text and "Not measured: `0`" in text
    assert "fused or custom kernel" in text
    assert np.isnan(run.column("attn_entropy")).all()


class Block(nn.Module):
    """A block that calls the fused kernel in its own forward, with no attention module around it."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).unflatten(-1, (3, 2, -1)).permute(2, 0, 3, 1, 4)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2))


def test_an_attention_call_outside_any_attention_module_is_said_in_the_model_summary(tmp_path):
    model = nn.Sequential(Block(), nn.Linear(16, 4))
    _train(model, 3, tmp_path, lambda g: torch.randn(2, 5, 16, generator=g))
    (run,) = load_logdir(str(tmp_path))
    assert run.table.extra["attention"]["outside"] == ["F.scaled_dot_product_attention"]
    text = modelinfo.summary_markdown(run.table)
    assert "Not measured: F.scaled_dot_product_attention called outside any attention module" in text


# ------------------------------------------------------------------ the rules on hand-made runs


def _run(logits, entropy, steps=None) -> RunData:
    logits, entropy = np.asarray(logits, float), np.asarray(entropy, float)
    T = len(logits)
    stats = np.full((T, 2, len(schema.COLUMNS)), np.nan, dtype=np.float32)
    stats[:, 0, schema.COLUMN_INDEX["attn_logit_max"]] = logits
    stats[:, 0, schema.COLUMN_INDEX["attn_logit_head"]] = 3
    stats[:, 0, schema.COLUMN_INDEX["attn_entropy"]] = entropy
    stats[:, 0, schema.COLUMN_INDEX["attn_entropy_min"]] = entropy / 2
    stats[:, 0, schema.COLUMN_INDEX["attn_entropy_head"]] = 1
    table = schema.LayerTable(layers=[schema.LayerInfo("model.layers.3.self_attn", "LlamaAttention"),
                                      schema.LayerInfo("lm_head", "Linear")])
    return RunData("r", table, np.arange(T, dtype=np.int64) * 10 if steps is None else steps, stats)


def test_logit_growth_needs_two_logged_steps_above_tau():
    rule = RULES_BY_NAME["attention_logit_growth"]
    assert attention_rules.attention_logit_growth(_run([5, 150, 8, 9, 7], [1] * 5), rule) == []
    (f,) = attention_rules.attention_logit_growth(_run([5, 20, 130, 400, 900], [1] * 5), rule)
    assert (f.layer, f.first_step, f.value) == ("model.layers.3.self_attn", 20, 900.0)
    assert "head 3" in f.message


def test_entropy_collapse_is_relative_to_the_layers_early_level():
    rule = RULES_BY_NAME["attention_entropy_collapse"]
    (f,) = attention_rules.attention_entropy_collapse(_run([1] * 6, [0.95, 0.9, 0.6, 0.08, 0.03, 0.02]), rule)
    assert (f.first_step, f.layer) == (30, "model.layers.3.self_attn") and "head 1" in f.message
    sharp_from_the_start = [0.05, 0.04, 0.05, 0.04, 0.05, 0.04]  # Swin's -100 window mask: not a collapse
    assert attention_rules.attention_entropy_collapse(_run([1] * 6, sharp_from_the_start), rule) == []
    assert attention_rules.attention_entropy_collapse(_run([1] * 6, [0.9, 0.5, 0.3, 0.2, 0.15, 0.12]), rule) == []


def test_runs_without_attention_rows_draw_nothing():
    run = _run([np.nan] * 4, [np.nan] * 4)
    assert [f for f in tbdiag.rules.evaluate(run) if f.issue in ATTN] == []


# ------------------------------------------------------------------ a real instability and its fixed twins


def _loss(logdir) -> tuple[np.ndarray, np.ndarray]:
    (run,) = load_logdir(str(logdir))
    return run.losses["train/loss"]


def _smoothed(values: np.ndarray, window: int = 5) -> np.ndarray:
    return np.array([values[max(0, i - window + 1): i + 1].mean() for i in range(len(values))])


def test_high_learning_rate_without_qk_layernorm_is_named_before_the_loss_shows_it(tmp_path):
    """Wortsman et al.'s regime: AdamW at lr 0.1 without warm-up.  Without qk-layernorm both attention modules
    grow their logits past 100 and collapse to one-hot attention by step 10; the loss parts from the qk-layernorm
    twin's only later (its 5-step mean 25% above the twin's) and ends far above it.  The twin, and the same model
    at lr 3e-3, draw no attention finding."""
    from attention_runs import tiny_lm

    tiny_lm(str(tmp_path / "sick"), steps=150, lr=0.1)
    tiny_lm(str(tmp_path / "qk_norm"), steps=150, lr=0.1, qk_norm=True)
    tiny_lm(str(tmp_path / "sane_lr"), steps=150, lr=3e-3)
    sick = tbdiag.report(str(tmp_path / "sick"))
    steps, sick_loss = _loss(tmp_path / "sick")
    _, twin_loss = _loss(tmp_path / "qk_norm")
    sick_loss, twin_loss = _smoothed(sick_loss), _smoothed(twin_loss)
    damaged = int(steps[np.flatnonzero(sick_loss > 1.25 * twin_loss)[0]])
    assert sick_loss[-1] > 5 * twin_loss[-1], "the instability did not cost the sick run its loss"
    for issue in ATTN:
        named = {f.layer: f.first_step for f in sick if f.issue == issue and f.severity == "warning"}
        assert set(named) == {"blocks.0.attn", "blocks.1.attn"}, (issue, sick)
        assert max(named.values()) <= min(10, damaged), (issue, named, damaged)
    for twin in ("qk_norm", "sane_lr"):
        found = [f for f in tbdiag.report(str(tmp_path / twin)) if f.issue in ATTN]
        assert found == [], (twin, found)


def test_gpt2_lr_too_high_grows_attention_logits_from_the_first_interval(tmp_path):
    """The GPT-2 recipe at lr 0.1 without warm-up (tests/recipes.py): attention logits past 100 at the first
    logging interval, on the first block; the healthy recipe's stay under 15."""
    import recipes

    recipes.gpt2_lr_too_high(str(tmp_path / "sick"), steps=40)
    found = [f for f in tbdiag.report(str(tmp_path / "sick")) if f.issue == "attention_logit_growth"]
    assert any(f.layer == "transformer.h.0.attn" and f.first_step == recipes.LOG_EVERY for f in found), found


def test_a_fault_in_the_attention_measurement_detaches_and_training_goes_on(tmp_path, monkeypatch):
    """The shield: a fault inside the measurement warns once, tbdiag detaches, no mode is left pushed, and the
    weights are those of an unwatched run."""
    from sync_budget import AttentionNet

    def broken(logits, valid):
        raise RuntimeError("fault injected into the attention statistics")

    monkeypatch.setattr(attention, "head_stats", broken)
    torch.manual_seed(0)
    model = AttentionNet()
    twin = copy.deepcopy(model)
    make = lambda g: torch.randn(8, 12, 32, generator=g)  # noqa: E731
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.manual_seed(5)
        _train(model, 5, tmp_path, make)
    stopped = [w for w in caught if "tbdiag stopped watching" in str(w.message)]
    assert len(stopped) == 1 and "fault injected into the attention statistics" in str(stopped[0].message)
    assert torch._C._len_torch_function_stack() == 0
    torch.manual_seed(5)
    _train(twin, 5, None, make)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
