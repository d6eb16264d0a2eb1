"""Training loops beyond the plain one: accumulation, GradScaler with an optimizer, low-precision weights,
closures (LBFGS): steps are optimizer steps and the statistics are the true ones."""

import copy
import warnings

import numpy as np
import pytest
import scenarios
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter
from tbdiag.read.reader import load_logdir


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 10))


def _layer_grad_norm(layer: nn.Module) -> float:
    return float(torch.sqrt(sum(p.grad.detach().double().pow(2).sum() for p in layer.parameters())))


def test_gradient_accumulation_logs_optimizer_steps_and_the_accumulated_gradient(tmp_path):
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=2)
    x, y = scenarios.teacher_data(64, (20,))
    expected = {}
    for step in range(6):
        opt.zero_grad()
        for micro in range(4):  # four forward/backward passes per optimizer step
            idx = torch.arange(micro * 4, micro * 4 + 4) + step * 16
            (F.cross_entropy(model(x[idx % 64]), y[idx % 64]) / 4).backward()
        expected[step] = _layer_grad_norm(model[2])
        opt.step()
    assert handle.step == 6
    writer.close()
    run = load_logdir(str(tmp_path))[0]
    assert list(run.steps) == [0, 2, 4]
    col = run.column("grad_norm")[:, run.layer_names.index("2")]
    np.testing.assert_allclose(col, [expected[0], expected[2], expected[4]], rtol=1e-5)


def test_grad_scaler_with_an_optimizer_logs_unscaled_gradients(tmp_path):
    model = _mlp()
    twin = copy.deepcopy(model)
    x, y = scenarios.teacher_data(16, (20,))

    def train(m, writer=None):
        opt = torch.optim.SGD(m.parameters(), lr=0.05)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 16)
        if writer is not None:
            writer.watch(m, opt, log_every=1)
        unscaled = []
        for _ in range(3):
            opt.zero_grad()
            scaler.scale(F.cross_entropy(m(x), y)).backward()
            unscaled.append(_layer_grad_norm(m[0]) / scaler.get_scale())
            scaler.step(opt)  # unscales, then steps: the optimizer hooks see true gradients
            scaler.update()
        return unscaled

    writer = DiagnosticWriter(str(tmp_path))
    expected = train(model, writer)
    writer.close()
    assert train(twin) == pytest.approx(expected)  # the unwatched twin: same gradients, same weights
    run = load_logdir(str(tmp_path))[0]
    col = run.column("grad_norm")[:, run.layer_names.index("0")]
    np.testing.assert_allclose(col, expected, rtol=1e-4)
    assert np.all(col < 100), "not multiplied by the 65536 scale"
    for a, b in zip(model.state_dict().values(), twin.state_dict().values()):
        assert torch.equal(a, b)


def test_bfloat16_weights_give_float32_statistics(tmp_path):
    model = _mlp().to(torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(16, (20,))
    for _ in range(2):
        loss = F.cross_entropy(model(x.to(torch.bfloat16)).float(), y)
        opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    run = load_logdir(str(tmp_path))[0]
    exact = float(torch.sqrt(sum(p.detach().double().pow(2).sum() for p in model[0].parameters())))
    # float32 accumulation: far tighter than bfloat16's 3 significant digits
    assert run.column("weight_norm")[-1, run.layer_names.index("0")] == pytest.approx(exact, rel=1e-5)
    assert np.isfinite(run.column("act_std")[:, run.layer_names.index("0")]).all()


def test_lbfgs_closure_steps_are_counted_and_the_update_measured(tmp_path):
    """With a closure the forward and backward run inside optimizer.step(), after its pre-hook."""
    model = _mlp()
    opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=3)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(32, (20,))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    writer.close()
    assert handle.step == 3
    run = load_logdir(str(tmp_path))[0]
    assert list(run.steps) == [0, 1, 2]
    assert np.isfinite(run.column("update_ratio")[:, run.layer_names.index("0")]).all()


class _RelativeStep(torch.optim.Optimizer):
    """Keeps ``lr=None`` in its param groups and sizes steps itself, as Adafactor(relative_step=True) does."""

    def __init__(self, params):
        super().__init__(params, {"lr": None})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-0.05)


@pytest.mark.parametrize("lr", ["none", "tensor"])
def test_learning_rates_that_are_not_numbers_are_recorded_as_unknown(tmp_path, lr):
    """A param group's lr of None (relative-step Adafactor) or a tensor (capturable optimizers) stops nothing."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    if lr == "none":
        opt = _RelativeStep(model.parameters())
    else:
        opt = torch.optim.SGD(model.parameters(), lr=torch.tensor(0.05))
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(6):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    assert [str(w.message) for w in caught if "tbdiag" in str(w.message)] == []
    run = load_logdir(str(tmp_path))[0]
    assert list(run.steps) == [0, 2, 4]
    assert np.isfinite(run.column("update_ratio")[:, [0, 2]]).all(), "every step of both linears measured"
    steps, values = run.model_series("lr_max")
    assert (len(values) == 3 and np.allclose(values, 0.05)) if lr == "tensor" else len(values) == 0
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    lr_tags = [t for t in acc.Tags()["scalars"] if t.startswith("train/lr/")]
    assert lr_tags == (["train/lr/group0"] if lr == "tensor" else []), "no chart of NaN learning rates"
