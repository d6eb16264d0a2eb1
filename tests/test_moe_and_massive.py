"""expert_collapse and massive_activations: the structure of transformers, measured at logging steps.

Pure pieces first (which modules are blocks and routers, the expert load, the
outlier statistics), then real training: a small Hugging Face Mixtral whose
router favours two experts and has no balancing loss collapses (named on the
router), its unbiased twin does not; a tiny GPT-2 with one residual
dimension planted far above the rest is `info`, and a warning when that
dimension runs away while the loss gets worse; the same GPT-2 unplanted is
silent.
"""

from __future__ import annotations

import math
import sys

import pytest
import torch
from torch import nn

import tbdiag
from tbdiag.measure import blocks

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")

sys.path.insert(0, __file__.rsplit("/", 1)[0])
import recipes


def tiny_mixtral(aux: float = 0.0) -> nn.Module:
    cfg = transformers.MixtralConfig(vocab_size=recipes.VOCAB, hidden_size=64, intermediate_size=128,
                                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                     num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=recipes.SEQ,
                                     output_router_logits=aux > 0, router_aux_loss_coef=aux, bos_token_id=0,
                                     eos_token_id=0, pad_token_id=None)
    return transformers.MixtralForCausalLM(cfg)


# ------------------------------------------------------------------ pure pieces


def test_repeated_blocks_of_the_common_families():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=32, n_positions=16, n_embd=16, n_layer=3,
                                                                n_head=2))
    bert = transformers.BertModel(transformers.BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=2,
                                                          num_attention_heads=2, intermediate_size=32))
    assert [n for n, _ in blocks.repeated_blocks(gpt2)] == ["transformer.h.0", "transformer.h.1", "transformer.h.2"]
    assert [n for n, _ in blocks.repeated_blocks(bert)] == ["encoder.layer.0", "encoder.layer.1"]
    assert [n for n, _ in blocks.repeated_blocks(tiny_mixtral())] == ["model.layers.0", "model.layers.1"]
    heads = nn.Sequential(nn.ModuleList([nn.Linear(4, 4) for _ in range(3)]))  # leaf layers: not blocks
    assert blocks.repeated_blocks(heads) == []


class QwenStyleMoE(nn.Module):
    """A router that is a plain Linear giving logits; the block knows top-k (Qwen-MoE, older Mixtral)."""

    def __init__(self, d: int = 8, experts: int = 6, top_k: int = 2):
        super().__init__()
        self.top_k = top_k
        self.gate = nn.Linear(d, experts, bias=False)
        self.experts = nn.ModuleList([nn.Linear(d, d) for _ in range(experts)])


def test_routers_of_both_kinds():
    (r,) = blocks.routers(QwenStyleMoE())
    assert (r.name, r.num_experts, r.top_k) == ("gate", 6, 2)
    found = blocks.routers(tiny_mixtral())
    assert [(r.name, r.num_experts, r.top_k) for r in found] == [
        ("model.layers.0.mlp.gate", 4, 2), ("model.layers.1.mlp.gate", 4, 2)]


def test_expert_load_from_logits_and_from_choices():
    logits = torch.zeros(64, 4)
    logits[:, 1] = 5.0
    logits[:, 2] = 4.0  # every token picks experts 1 and 2
    chosen = blocks.choices(logits, num_experts=4, top_k=2)
    assert blocks.expert_load(chosen, 4).tolist() == [1.0, 0.5]
    balanced = torch.arange(64).remainder(4).reshape(32, 2)  # tokens spread evenly
    assert torch.equal(blocks.choices((logits, None, balanced), 4, 2), balanced)
    assert blocks.expert_load(balanced, 4).tolist() == [0.5, 0.0]
    share, idle = blocks.expert_load(chosen[:4], 4).tolist()  # 8 choices for 4 experts: idle is not judged
    assert share == 1.0 and math.isnan(idle)


def test_massive_stats_are_exact_max_and_sampled_median():
    h = torch.randn(4, 300, 64)
    h[0, 0, 7] = -900.0
    peak, median = blocks.massive_stats(h)
    assert float(peak) == 900.0
    assert float(median) == pytest.approx(float(h.abs().median()), rel=0.05)
    peak_t, _ = blocks.massive_stats(h.transpose(1, 2))  # a strided view
    assert float(peak_t) == 900.0


# ------------------------------------------------------------------ real training: expert collapse


def biased_router(model: nn.Module, strength: float = 5.0) -> None:
    """Every token's hidden state shares a direction (a constant added to the embeddings) that the router's rows
    for experts 0 and 1 point along: the router sends every token to them."""
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)
        for layer in model.model.layers:
            gain = layer.post_attention_layernorm.weight
            layer.mlp.gate.weight[:2] += strength * gain / gain.norm()


def train_lm(logdir: str, model: nn.Module, steps: int, lr: float = 3e-3, each_step=None) -> list:
    opt = recipes.adamw(model, lr, weight_decay=0.1)
    sched = recipes.warmup_cosine(opt, steps, steps // 10)
    loss_of = recipes.next_token_loss(recipes.stride_sequences(4096, 0), 16)

    def stepped(m, step):
        if each_step is not None:
            each_step(m, step)
        return loss_of(m, step)

    recipes.train_loop(logdir, model, opt, sched, stepped, steps, 10)
    return tbdiag.report(logdir)


def test_a_biased_router_without_balancing_loss_collapses(tmp_path):
    torch.manual_seed(0)
    model = tiny_mixtral(aux=0.0)
    biased_router(model)
    findings = train_lm(str(tmp_path / "sick"), model, steps=80)
    collapsed = [f for f in findings if f.issue == "expert_collapse"]
    assert "model.layers.0.mlp.gate" in [f.layer for f in collapsed], findings
    f = next(f for f in collapsed if f.layer == "model.layers.0.mlp.gate")
    assert f.severity == "warning" and f.first_step == 0 and f.ongoing
    assert "100% of the tokens" in f.message and "50% of its experts get none" in f.message

    torch.manual_seed(0)
    twin = train_lm(str(tmp_path / "twin"), tiny_mixtral(aux=0.0), steps=80)
    assert [f for f in twin if f.issue == "expert_collapse"] == []


# ------------------------------------------------------------------ real training: massive activations


def tiny_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=recipes.VOCAB, n_positions=recipes.SEQ, n_embd=32, n_layer=3, n_head=2,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


def plant(model: nn.Module, size: list[float], first_token_only: bool) -> None:
    """Add ``size[0]`` to residual dimension 7 of the second block's output: at the first token only (an
    attention sink, as in Sun et al.'s trained models), or at every token."""
    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        bump = torch.zeros_like(h)
        bump[:, :1 if first_token_only else None, 7] = size[0]
        h = h + bump
        return (h, *out[1:]) if isinstance(out, tuple) else h

    model.transformer.h[1].register_forward_hook(hook)


@pytest.mark.parametrize("case", ["healthy", "first_token_sink", "runaway"])
def test_massive_activations(tmp_path, case):
    torch.manual_seed(0)
    model = tiny_gpt2()
    size = [300.0 if case == "first_token_sink" else 3.0]
    if case != "healthy":
        plant(model, size, first_token_only=case == "first_token_sink")

    def run_away(m, step):  # from step 30 the dimension at every token grows 10x per 10 steps: the loss gets worse
        if case == "runaway" and step >= 30 and step % 10 == 0:
            size[0] *= 10.0

    findings = [f for f in train_lm(str(tmp_path), model, steps=80, each_step=run_away)
                if f.issue == "massive_activations"]
    if case == "healthy":
        assert findings == []
        return
    (f,) = findings
    assert f.layer in ("transformer.h.1", "transformer.h.2"), f  # the block that writes it, or the next
    assert f.value > 100
    assert f.severity == ("warning" if case == "runaway" else "info"), f.message


def test_the_tab_shows_a_block_finding_with_the_models(tmp_path):
    """A block is no row of the layer table: its finding goes with the model-level ones, not lost."""
    from tb_plugin import payloads
    from tb_plugin.run_source import RunView
    from tbdiag.read.reader import load_logdir
    from tbdiag.rules import evaluator

    torch.manual_seed(0)
    model = tiny_gpt2()
    plant(model, [300.0], first_token_only=True)
    train_lm(str(tmp_path), model, steps=40)
    (data,) = load_logdir(str(tmp_path))
    view = RunView(data=data, findings=evaluator.evaluate(data), version=1, memo={})
    body = payloads.layers_payload(view, None)
    (f,) = [f for f in body["model_findings"] if f["issue"] == "massive_activations"]
    assert f["layer"] == "transformer.h.1"
    assert all(flag["issue"] != "massive_activations" for row in body["layers"] for flag in row["flags"])
