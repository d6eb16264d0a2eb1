"""epsilon_dominated on real training: Adam updates that stop following the gradient, and their healthy twins.

A small GPT-2 learns stride sequences with AdamW (eps 1e-8), its loss scaled by 1e-9 (a loss weight or a
normaliser gone wrong: a mean over the whole data set's tokens): the gradients are ~1e-12, far below eps, Adam
divides by eps instead of by the gradient's scale, and the loss never falls.  The same run with eps 1e-15
(Wortsman et al. 2023's fix) learns, since Adam is otherwise blind to the loss's scale; so does the unscaled run.

(A loss scaled down mid-run takes longer to show: exp_avg_sq remembers the earlier gradients for ~1/(1 - beta2)
steps and more, and until it has forgotten them the updates are small because sqrt(v_hat) is large, not eps.)
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tbdiag
from tbdiag.read.reader import load_logdir

transformers = pytest.importorskip("transformers")

import recipes  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, LOG_EVERY = 100, 10


def _train(logdir: str, eps: float, scale: float) -> list[float]:
    """The run; returns the (unscaled) loss at every step."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(recipes.gpt2_config(n_layer=2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), eps=eps, weight_decay=0.1)
    data = recipes.stride_sequences(2048, 0)
    losses = []
    writer = tbdiag.DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=LOG_EVERY)
    try:
        for step in range(STEPS):
            x = data[recipes.batch_rows(len(data), 16, step)]
            loss = model(input_ids=x, labels=x).loss
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            opt.step()
            losses.append(loss.item())
            writer.add_scalar("train/loss", losses[-1], step)
    finally:
        writer.close()
    return losses


def _serious(findings, issue):
    return [f for f in findings if f.issue == issue and f.severity in ("warning", "error")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eps")
    out = {}
    for name, eps, scale in [("sick", 1e-8, 1e-9), ("eps_1e-15", 1e-15, 1e-9), ("unscaled", 1e-8, 1.0)]:
        losses = _train(str(root / name), eps, scale)
        out[name] = (str(root / name), losses, tbdiag.report(str(root / name)))
    return out


def test_the_scaled_loss_never_falls_and_every_layer_is_named_from_the_first_step(runs):
    logdir, losses, findings = runs["sick"]
    assert np.mean(losses[-10:]) > 0.95 * np.mean(losses[:5]), "the loss should not improve while eps dominates"
    hits = _serious(findings, "epsilon_dominated")
    (run,) = load_logdir(logdir)
    with_params = [info.name for info in run.table.layers if info.trainable_params > 0]
    assert {f.layer for f in hits} == set(with_params), [f.layer for f in hits]
    assert {f.first_step for f in hits} == {0}, sorted({f.first_step for f in hits})
    assert all(f.value > 0.99 and f.ongoing for f in hits)
    assert "eps=1e-08" in hits[0].message
    # its consequences are not separate illnesses: tiny updates and vanishing gradients follow from it
    for f in findings:
        if f.issue in ("update_too_small", "vanishing_gradient"):
            assert f.severity == "info" and f.explained_by.startswith("epsilon_dominated:"), f


def test_the_same_run_with_eps_1e_15_learns_and_stays_silent(runs):
    _, losses, findings = runs["eps_1e-15"]
    assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:5])
    assert _serious(findings, "epsilon_dominated") == []


def test_the_unscaled_run_stays_silent_and_measures_little(runs):
    logdir, _, findings = runs["unscaled"]
    assert _serious(findings, "epsilon_dominated") == []
    (run,) = load_logdir(logdir)
    frac = run.column("eps_dominated_frac")
    assert np.isfinite(frac).any() and np.nanmax(frac) < 0.1


def test_sgd_is_not_measured(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = tbdiag.DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    for _ in range(6):
        loss = model(torch.randn(4, 8)).pow(2).mean() * 1e-9
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    (run,) = load_logdir(str(tmp_path))
    assert np.isnan(run.column("eps_dominated_frac")).all()
    assert "adam_eps" not in run.table.extra
