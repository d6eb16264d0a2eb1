"""Adam's second moments against its eps, read from optimizer.state (`tbdiag.measure.optimizer_state`).

The counts are compared with the exact share, computed here from the whole state with torch's own formula
(``denom = sqrt(v) / sqrt(1 - beta2**step) + eps``), for every form of Adam torch ships (for-loop, foreach,
fused, amsgrad, NAdam, RAdam) and for step counters kept as numbers, CPU tensors or device tensors; optimizers
whose eps means something else (SGD, Adagrad, RMSprop, Adamax, Adafactor) are skipped.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag.measure import optimizer_state as ostate
from tbdiag.measure.probe import UPDATE_SAMPLE

pytestmark = pytest.mark.usefixtures("one_thread")


def _exact(opt, p) -> float:
    """Share of p's coordinates with a non-zero gradient whose sqrt(v_hat) is below eps (torch's own formula)."""
    group = next(g for g in opt.param_groups if any(q is p for q in g["params"]))
    st = opt.state[p]
    v = st["max_exp_avg_sq"] if group.get("amsgrad") else st["exp_avg_sq"]
    step = float(st["step"])
    v_hat = v.double() / (1 - group["betas"][1] ** step)
    live = p.grad != 0
    return float(((v_hat.sqrt() < group["eps"]) & live).sum() / live.sum())


def _stepped(make_opt, scale: float, steps: int = 3, seed: int = 0):
    """A small model whose gradients are ``scale`` times their natural size, after a few steps of ``make_opt``."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 4))
    opt = make_opt(model.parameters())
    for _ in range(steps):
        x = torch.randn(8, 16)
        loss = F.cross_entropy(model(x), torch.randint(0, 4, (8,))) * scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _measured(opt, model) -> list[float]:
    params = list(model.parameters())
    positions, counts = ostate.epsilon_counts(opt, list(enumerate(params)))
    assert positions == list(range(len(params)))
    return [float(d / c) for d, c in counts.tolist()]


ADAMS = {
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
    "adamw_foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-3, foreach=True),
    "adamw_fused": lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True),  # step: a tensor made with device=
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True),
    "adam_amsgrad_fused": lambda ps: torch.optim.Adam(ps, lr=1e-3, amsgrad=True, fused=True),
    "nadam": lambda ps: torch.optim.NAdam(ps, lr=1e-3),
    "radam": lambda ps: torch.optim.RAdam(ps, lr=1e-3),
}


@pytest.mark.parametrize("name", list(ADAMS))
def test_counts_match_torchs_own_denominator(name):
    """Gradients scaled to straddle eps: the measured share is the exact one, layer by layer."""
    model, opt = _stepped(ADAMS[name], scale=1e-6)
    exact = [_exact(opt, p) for p in model.parameters()]
    assert any(0.05 < e < 0.95 for e in exact), f"the scale should put eps inside the range: {exact}"
    assert _measured(opt, model) == pytest.approx(exact, abs=1e-6)


@pytest.mark.parametrize("name", ["adam", "adamw_fused"])
def test_healthy_gradients_are_not_dominated_and_tiny_ones_are(name):
    model, opt = _stepped(ADAMS[name], scale=1.0)
    assert max(_measured(opt, model)) == 0.0
    model, opt = _stepped(ADAMS[name], scale=1e-9)
    assert min(_measured(opt, model)) == 1.0


def test_amsgrad_reads_the_running_maximum():
    """Large gradients first, then tiny ones: exp_avg_sq decays below eps, max_exp_avg_sq does not; Adam divides
    by the latter, so nothing is dominated."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(64))
    opt = torch.optim.Adam([p], lr=1e-3, betas=(0.9, 0.5), amsgrad=True)
    for scale in [1.0] + [1e-12] * 80:
        p.grad = torch.randn(64) * scale
        opt.step()
    (_, counts) = ostate.epsilon_counts(opt, [(0, p)])
    assert counts.tolist() == [[0.0, 64.0]]
    assert (opt.state[p]["exp_avg_sq"].sqrt() < 1e-8).all(), "exp_avg_sq alone would have said 100%"


def test_a_step_counter_on_the_device_is_never_read():
    """capturable/fused keep ``step`` as a tensor where the parameters are: the bias correction is a tensor op."""
    threshold = ostate.dominated_threshold({"eps": 1e-8, "betas": (0.9, 0.999), "fused": True},
                                           {"step": torch.tensor(10.0)})
    assert isinstance(threshold, torch.Tensor)
    assert float(threshold) == pytest.approx(1e-8 * math.sqrt(1 - 0.999 ** 10), rel=1e-5)
    for plain in (10, torch.tensor(10.0)):  # a plain Adam's step: a number, or a CPU tensor (a host value)
        assert ostate.dominated_threshold({"eps": 1e-8, "betas": (0.9, 0.999)}, {"step": plain}) == \
            pytest.approx(1e-8 * math.sqrt(1 - 0.999 ** 10))
    assert ostate.dominated_threshold({"eps": 1e-8, "betas": (0.9, 0.999)}, {}) is None  # not stepped yet


OTHERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "adamax": lambda ps: torch.optim.Adamax(ps, lr=1e-3),
}


@pytest.mark.parametrize("name", list(OTHERS))
def test_optimizers_whose_eps_plays_another_part_are_skipped(name):
    model, opt = _stepped(OTHERS[name], scale=1e-9)
    assert ostate.epsilon_counts(opt, list(enumerate(model.parameters()))) is None


def test_adafactor_is_skipped():
    from transformers.optimization import Adafactor

    model, opt = _stepped(lambda ps: Adafactor(ps, lr=1e-3, relative_step=False, scale_parameter=False), 1e-9)
    assert ostate.epsilon_counts(opt, list(enumerate(model.parameters()))) is None


def test_embedding_rows_of_unseen_tokens_do_not_count():
    """Tokens 0-9 seen early, then only 10-19: the early rows' v decays far below eps, but they receive no
    gradient now (their update is ~0 whatever eps is) and are not counted."""
    torch.manual_seed(0)
    emb = nn.Embedding(100, 8)
    opt = torch.optim.Adam(emb.parameters(), lr=1e-3, betas=(0.9, 0.9))
    for step in range(400):
        ids = torch.randint(0, 10, (32,)) if step < 20 else torch.randint(10, 20, (32,))
        loss = emb(ids).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    (_, counts) = ostate.epsilon_counts(opt, [(0, emb.weight)])
    dominated, counted = counts[0].tolist()
    assert counted == 10 * 8, "only the rows of this step's tokens count"
    assert dominated == 0.0
    v_hat = opt.state[emb.weight]["exp_avg_sq"] / (1 - 0.9 ** 400)
    assert (v_hat[:10].sqrt() < 1e-8).all(), "the unseen rows would have counted had v > 0 been the test"


@pytest.mark.parametrize("contiguous", [True, False])
def test_a_large_parameter_is_read_on_a_sample_within_a_few_percent(contiguous):
    """Over `UPDATE_SAMPLE` elements: a strided sample, scaled; a transposed (not contiguous) one too."""
    torch.manual_seed(0)
    w = torch.randn(1024, 512) if contiguous else torch.randn(512, 1024).t()
    p = nn.Parameter(w)
    assert p.numel() > UPDATE_SAMPLE and p.is_contiguous() == contiguous
    opt = torch.optim.Adam([p], lr=1e-3)
    grad = torch.randn(p.shape) * torch.logspace(-12, -4, p.shape[1])  # columns straddle eps: a 5/8 share
    grad[::3] = 0.0  # a third of the rows get no gradient (not counted)
    p.grad = grad
    opt.step()
    (_, counts) = ostate.epsilon_counts(opt, [(0, p)])
    dominated, counted = counts[0].tolist()
    assert counted == pytest.approx(p.numel() * 2 / 3, rel=0.02)
    assert dominated / counted == pytest.approx(_exact(opt, p), abs=0.02)


def test_nothing_is_written():
    model, opt = _stepped(ADAMS["adam"], scale=1e-6)
    before = {id(t): t.clone() for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)}
    grads = [p.grad.clone() for p in model.parameters()]
    ostate.epsilon_counts(opt, list(enumerate(model.parameters())))
    for st in opt.state.values():
        for t in st.values():
            if isinstance(t, torch.Tensor):
                assert torch.equal(t, before[id(t)])
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
