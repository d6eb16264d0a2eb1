"""A fault inside tbdiag, injected into each entry point it runs inside training: one warning, clean detach,
training finishes bit-identical to an unwatched run."""

import copy
import warnings

import pytest
import scenarios
import torch
import torch.nn.functional as F
from test_writer import DropoutCNN

from tbdiag import DiagnosticWriter
from tbdiag.measure import stats
from tbdiag.measure.probe import StepProbe
from tbdiag.watch import watcher
from tbdiag.watch.forward_tap import ForwardTap
from tbdiag.watch.watcher import Watcher

STEPS = 8


def _faulty(original, after_calls: int):
    """``original`` that raises from its (after_calls + 1)-th call on, as a bug in tbdiag would."""
    calls = {"n": 0}

    def method(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise RuntimeError("injected fault")
        return original(*args, **kwargs)

    return method


def _train(model, writer=None, optimizer=True, **watch_kwargs):
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if writer is not None:
        writer.watch(model, opt if optimizer else None, log_every=2, images_every=2, histograms_every=2, **watch_kwargs)
    x_all, y_all = scenarios.teacher_data(64, (3, 32, 32))
    for step in range(STEPS):
        idx = torch.arange(step * 8, (step + 1) * 8) % len(x_all)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, opt


def _no_hooks_left(model, opt):
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hook left on {name or 'the model'}"
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    assert torch._C._len_torch_function_stack() == 0, "activation spy left pushed"


# (entry point as the warning names it, where to inject, calls that succeed first, optimizer?)
ENTRIES = [
    ("forward pre-hook", (Watcher, "_entry_pre"), 3, True),
    ("forward hook", (Watcher, "_entry_post"), 3, True),
    ("layer hook", (stats, "activation_stats"), 9, True),
    ("activation spy", (ForwardTap, "on_activation"), 4, True),
    ("optimizer step pre-hook", (Watcher, "_opt_pre"), 2, True),
    ("optimizer step hook", (Watcher, "_opt_post"), 2, True),
    ("gradient hook", (Watcher, "_on_output_grad"), 2, False),
    ("backward callback", (Watcher, "_after_backward"), 2, False),
    ("graph", (Watcher, "_log_graph"), 0, True),
    ("optimizer step hook", (stats, "norms"), 1, True),  # deep inside the parameter collection
    ("forward hook", (StepProbe, "flush_outputs"), 2, True),  # the batch of small outputs, at the forward's end
]


@pytest.mark.parametrize("entry,target,after,optimizer", ENTRIES,
                         ids=[f"{e}-{t[1]}" for e, t, _, _ in ENTRIES])
def test_a_fault_in_each_entry_point_detaches_and_training_is_untouched(tmp_path, monkeypatch, entry, target, after,
                                                                       optimizer):
    torch.manual_seed(0)
    plain = DropoutCNN()
    watched = copy.deepcopy(plain)
    _train(plain, optimizer=optimizer)
    owner, name = target
    monkeypatch.setattr(owner, name, _faulty(getattr(owner, name), after))
    writer = DiagnosticWriter(str(tmp_path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt = _train(watched, writer, optimizer=optimizer)
    stopped = [w for w in caught if "tbdiag stopped watching" in str(w.message)]
    assert len(stopped) == 1, [str(w.message) for w in caught]
    message = str(stopped[0].message)
    assert f"internal error in its {entry}" in message and "injected fault" in message
    assert "Training goes on unaffected" in message
    _no_hooks_left(model, opt)  # detached during training, not only at close()
    writer.close()
    for (key, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), f"{key} differs"


def test_a_fault_while_the_users_forward_raises_leaves_the_users_exception(tmp_path, monkeypatch):
    """The always-called forward hook runs on the user's exception path too; its fault must not mask the error."""

    class Broken(scenarios.SeedCNN):
        def forward(self, x):
            if getattr(self, "explode", False):
                raise ValueError("the user's own bug")
            return super().forward(x)

    model = Broken()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    monkeypatch.setattr(ForwardTap, "close", _faulty(ForwardTap.close, 0))
    x, y = scenarios.teacher_data(8, (3, 32, 32))
    model.explode = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="the user's own bug"):
            model(x)
    assert any("tbdiag stopped watching" in str(w.message) for w in caught)
    model.explode = False
    loss = F.cross_entropy(model(x), y)  # the next forward sweeps what the exception path could not remove
    opt.zero_grad(); loss.backward(); opt.step()
    _no_hooks_left(model, opt)
    writer.close()


def test_remove_and_close_leave_nothing_behind_even_mid_logging_step(tmp_path):
    model = scenarios.SeedCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(8, (3, 32, 32))
    loss = F.cross_entropy(model(x), y)  # a logging step begun, not finished
    handle.remove()
    _no_hooks_left(model, opt)
    opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    assert watcher._WATCHED.get(model) is None
