"""Each loss and update-size illness reproduced in a real training run, and its fixed twin silent.

Every run trains a small MLP on a learnable teacher task (`scenarios.teacher_data`), watched by
`DiagnosticWriter`, and is read back from its event files by `tbdiag.report`.
"""

import pytest
import torch
import torch.nn.functional as F
from scenarios import mlp, teacher_data
from torch import nn

import tbdiag
from tbdiag import DiagnosticWriter

SERIOUS = ("warning", "error")


def _train(logdir, *, lr=0.05, steps=150, groups=None, adam=False, shuffle_labels=False, kill_at=None,
           n_train=2048, label_noise=0.0, width=64, val_every=0, seed=0):
    torch.manual_seed(seed)
    model = mlp(width, 2, nn.ReLU)
    x, y = teacher_data(n_train + 1024, (20,), seed=seed)
    x_val, y_val = x[n_train:], y[n_train:]
    x, y = x[:n_train], y[:n_train].clone()
    g = torch.Generator().manual_seed(seed + 1)
    if shuffle_labels:
        y = y[torch.randperm(n_train, generator=g)]  # the labels shuffled apart from their inputs
    if label_noise:
        flip = torch.rand(n_train, generator=g) < label_noise
        y[flip] = torch.randint(0, 10, (int(flip.sum()),), generator=g)
    params = [{"params": model.net[i].parameters(), "lr": (groups or {}).get(i, lr)} for i in (0, 2, 4)]
    opt = torch.optim.Adam(params, lr=lr) if adam else torch.optim.SGD(params, lr=lr, momentum=0.9)
    writer = DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=5, histograms=False, log_graph=False)
    for step in range(steps):
        idx = torch.arange(step * 32, (step + 1) * 32) % n_train
        if kill_at is not None and step == kill_at:
            with torch.no_grad():
                model.net[2].bias.fill_(-20.0)  # a layer dies mid-run: the loss jumps back to guessing
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
        if val_every and step % val_every == 0:
            model.eval()
            with torch.no_grad():
                writer.add_scalar("val/loss", F.cross_entropy(model(x_val), y_val).item(), step)
            model.train()
    writer.close()
    # input_bound reads the wall clock of a shared machine, not the model: not what these runs are about
    return [f for f in tbdiag.report(str(logdir)) if f.severity in SERIOUS and f.issue != "input_bound"]


def _kinds(findings):
    return {(f.issue, f.layer) for f in findings}


CASES = {
    # name: (sick kwargs, fixed kwargs, expected (issue, layer) among the findings)
    "lr_1000x_too_small": (dict(lr=5e-5), dict(lr=0.05), ("loss_plateau", None)),
    "shuffled_labels": (dict(shuffle_labels=True, n_train=8192), dict(n_train=8192), ("loss_plateau", None)),
    # the dead layer is the warning; the loss's jump back to guessing is reported with it (below)
    "layer_dies_mid_run": (dict(kill_at=120), dict(), ("dead_relu", "net.2")),
    "overfitting": (dict(n_train=96, label_noise=0.3, width=256, steps=200, val_every=10, adam=True, lr=3e-3),
                    dict(n_train=4096, width=256, steps=200, val_every=10, adam=True, lr=3e-3),
                    ("overfitting", None)),
    "one_group_lr_far_too_large": (dict(lr=0.05, groups={4: 3.0}), dict(lr=0.05), ("update_too_large", "net.4")),
    "one_group_lr_1e-7": (dict(adam=True, lr=1e-3, groups={2: 1e-7}), dict(adam=True, lr=1e-3),
                          ("update_too_small", "net.2")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_sick_run_is_named_and_its_fixed_twin_is_silent(tmp_path, name):
    sick, fixed, expected = CASES[name]
    found = _train(tmp_path / "sick", **sick)
    assert expected in _kinds(found), f"{name}: {[(f.issue, f.layer, f.message) for f in found]}"
    if name == "shuffled_labels":
        assert "chance level ln 10" in next(f.message for f in found if f.issue == "loss_plateau")
    if name == "layer_dies_mid_run":
        spike = next(f for f in tbdiag.report(str(tmp_path / "sick")) if f.issue == "loss_spike")
        assert spike.first_step >= 120 and spike.explained_by == "dead_relu:net.2", spike.message
    assert _train(tmp_path / "fixed", **fixed) == []


def _train_alternating(logdir, *, sorted_by_class: bool, steps=240, block=15):
    """Batches drawn from one half of the classes, then the other, every ``block`` steps (data sorted by
    class and never shuffled): the model unlearns each half while it learns the other."""
    torch.manual_seed(0)
    model = mlp(64, 2, nn.ReLU)
    x, y = teacher_data(4096, (20,))
    halves = ((y < 5).nonzero().squeeze(1), (y >= 5).nonzero().squeeze(1))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writer = DiagnosticWriter(str(logdir))
    writer.watch(model, opt, log_every=5, histograms=False, log_graph=False)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        pool = halves[(step // block) % 2] if sorted_by_class else torch.arange(len(y))
        idx = pool[torch.randint(0, len(pool), (32,), generator=g)]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()
    return tbdiag.report(str(logdir))


def test_batches_alternating_between_kinds_of_samples_make_the_loss_oscillate(tmp_path):
    found = _train_alternating(tmp_path / "sorted", sorted_by_class=True)
    (osc,) = [f for f in found if f.issue == "loss_oscillation"]
    assert osc.severity == "warning" and osc.layer is None, osc.message
    assert not [f for f in found if f.issue == "loss_divergence"], "swings that do not climb are not divergence"
    assert all(f.severity == "info" for f in found if f.issue == "loss_spike"), "each jump is part of the swings"
    shuffled = _train_alternating(tmp_path / "shuffled", sorted_by_class=False)
    assert [f for f in shuffled if f.severity in SERIOUS and f.issue != "input_bound"] == []
