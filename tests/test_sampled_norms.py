"""The per-step gradient norms the spike tracker reads on a CPU (`tbdiag.measure.sampled_norms`): their measured
error against the exact norms on real gradients, and the plan's bookkeeping (order, layout changes, the tensors read
whole)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbdiag.measure import stats
from tbdiag.measure.sampled_norms import GLOBAL_NORM_ERROR, LAYER_NORM_ERROR, SAMPLE, SAMPLE_FROM, SampledNorms


def _mlp() -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(256, 310), nn.ReLU()]
    for _ in range(12):
        layers += [nn.Linear(310, 310), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(310, 10))


def _cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 5), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(32, 64, 5), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Flatten(), nn.Linear(64 * 5 * 5, 288), nn.ReLU(), nn.Linear(288, 10))


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=4096, n_positions=64, n_embd=128, n_layer=3, n_head=4))


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(vocab_size=4096, hidden_size=128, intermediate_size=352, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _batches(name: str, gen: torch.Generator):
    if name == "mlp":
        return lambda m: nn.functional.cross_entropy(m(torch.randn(64, 256, generator=gen)),
                                                     torch.randint(0, 10, (64,), generator=gen))
    if name == "cnn":
        return lambda m: nn.functional.cross_entropy(m(torch.randn(32, 3, 32, 32, generator=gen)),
                                                     torch.randint(0, 10, (32,), generator=gen))

    def lm(m):
        ids = torch.randint(0, 4096, (4, 64), generator=gen)
        return m(input_ids=ids, labels=ids).loss
    return lm


@pytest.mark.parametrize("name, make", [("mlp", _mlp), ("cnn", _cnn), ("gpt2", _gpt2), ("llama", _llama)])
def test_sampled_norms_are_within_the_documented_error_on_real_gradients(name, make):
    """Eight AdamW steps of real training: at each, the global norm and every dense weight's norm (a Linear's,
    a convolution's, GPT-2's Conv1D) against the exact ones; embeddings (named to be read whole) exact."""
    torch.manual_seed(0)
    model = make()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_of = _batches(name, torch.Generator().manual_seed(0))
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    sampler = SampledNorms()
    worst_global, worst_layer, sampled = 0.0, 0.0, 0
    for _ in range(8):
        opt.zero_grad()
        loss_of(model).backward()
        params = [p for p in model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        whole = frozenset(i for i, p in enumerate(params) if id(p) in embeddings)
        norms, order = sampler(grads, whole)
        assert sorted(order) == list(range(len(grads)))
        exact = torch.stack([g.norm() for g in grads])[order]
        worst_global = max(worst_global, abs(float(norms.norm() / exact.norm()) - 1))
        for j, i in enumerate(order):
            if grads[i].numel() < SAMPLE_FROM or i in whole:
                assert float(norms[j]) == pytest.approx(float(exact[j]), rel=1e-5)  # read whole: exact
            elif grads[i].dim() >= 2:
                sampled += 1
                worst_layer = max(worst_layer, abs(float(norms[j] / exact[j]) - 1))
        opt.step()
    assert sampled > 0
    assert worst_global <= GLOBAL_NORM_ERROR, worst_global
    assert worst_layer <= LAYER_NORM_ERROR, worst_layer


def test_a_fused_qkv_weight_is_sampled_across_all_its_columns():
    """GPT-2's c_attn weight is [d, 3d]: query, key and value columns side by side.  The runs of the sample must
    fall in all three (a spacing of one row plus one column once put every run in the query columns)."""
    d = 256
    t = torch.zeros(d, 3 * d)
    step = stats.sample_stride(t.numel(), SAMPLE, stats.SAMPLE_RUN, row=3 * d)
    starts = torch.arange(SAMPLE // stats.SAMPLE_RUN) * step
    thirds = torch.bincount((starts % (3 * d)) // d, minlength=3)
    assert (thirds >= 0.25 * thirds.sum()).all(), thirds.tolist()
    assert starts[-1] + stats.SAMPLE_RUN >= 0.98 * t.numel()  # and still reaching the end of the tensor


def test_the_plan_follows_the_gradients_layout():
    """Norms come back in the plan's order, the order list is reused while the layout holds, and a change of
    sizes, dtype or contiguity makes a new plan instead of reading through stale views."""
    sampler = SampledNorms()
    grads = [torch.randn(300, 300), torch.randn(300), torch.randn(200, 400), torch.randn(100, 100)]
    norms, order = sampler(grads)
    assert order == [0, 2, 1, 3]  # the sampled ones first, then those read whole (under SAMPLE_FROM elements)
    assert sampler(grads)[1] is order
    grads[2] = torch.randn(400, 200).t()  # the same size, no longer contiguous: read whole, exactly
    norms, order = sampler(grads)
    exact = torch.stack([g.norm() for g in grads])
    assert float(norms[order.index(2)]) == pytest.approx(float(exact[2]), rel=1e-5)
    half = [g.to(torch.bfloat16) for g in grads]
    norms, order = sampler(half)
    assert norms.dtype == torch.float32 and len(norms) == 4
    assert sampler([])[0].numel() == 0


def test_exact_reading_keeps_the_gradients_order():
    """``sample_on_cpu=False`` (what an accelerator always gets): exact norms, in the gradients' own order."""
    grads = [torch.randn(300, 300), torch.randn(300), torch.randn(400, 200)]
    norms, order = SampledNorms(sample_on_cpu=False)(grads)
    assert order == [0, 1, 2]
    assert norms.tolist() == pytest.approx([float(g.norm()) for g in grads], rel=1e-5)
