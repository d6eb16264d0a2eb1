"""Mistakes in the training loop: each one trained for real, diagnosed, and silent once fixed.

no_gradient (a layer cut off the graph), eval_mode_training (model.eval()
left on), stale_gradients (zero_grad() missing) and softmax_output (softmax
before CrossEntropyLoss); each run is read back from its event files with
`tbdiag.report`, and its fixed twin (and the legitimate look-alikes: gradient
accumulation, validation in eval mode, a frozen BatchNorm backbone,
log_softmax with NLLLoss, multi-label sigmoid) must stay silent.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from scenarios import teacher_data
from torch import nn

from tbdiag import DiagnosticWriter, report
from tbdiag.read.reader import load_logdir

LOG_EVERY = 4
STEPS = 24
LOOP_ISSUES = {"no_gradient", "eval_mode_training", "stale_gradients", "softmax_output"}


class Net(nn.Module):
    """body (two Linear + ReLU) -> head; ``cut`` runs the body under no_grad or detaches it; ``out`` is what
    forward returns: "logits", "softmax", "log_softmax" or "sigmoid"."""

    def __init__(self, cut: str | None = None, out: str = "logits", bn: bool = False):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(20, 32), nn.Linear(32, 32), nn.Linear(32, 10)
        self.bn = nn.BatchNorm1d(32) if bn else None
        self.cut, self.out = cut, out

    def body(self, x):
        h = F.relu(self.fc1(x))
        if self.bn is not None:
            h = self.bn(h)
        return F.relu(self.fc2(h))

    def forward(self, x):
        if self.cut == "no_grad":
            with torch.no_grad():
                h = self.body(x)
        else:
            h = self.body(x)
            if self.cut == "detach":
                h = h.detach()
        z = self.head(h)
        if self.out == "softmax":
            return torch.softmax(z, dim=1)
        if self.out == "log_softmax":
            return F.log_softmax(z, dim=1)
        if self.out == "sigmoid":
            return torch.sigmoid(z)
        return z


def run(tmp_path, name: str, model: nn.Module | None = None, *, zero_grad: str = "before", micro: int = 1,
        eval_after: int | None = None, validate: bool = False, loss: str = "ce", optimizer=None,
        scaler: bool = False, freeze_bn: bool = False) -> str:
    """Train ``model`` for STEPS optimizer steps with one of the loop's variants; the run's directory."""
    torch.manual_seed(0)
    model = model or Net()
    x_all, y_all = teacher_data(STEPS * micro * 16, (20,))
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    grad_scaler = torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None
    logdir = os.path.join(str(tmp_path), name)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=LOG_EVERY)
    model.train()
    if freeze_bn:
        model.bn.eval()  # a submodule in eval() on purpose: the model itself stays in train mode
    for step in range(STEPS):
        if eval_after is not None and step == eval_after:
            model.eval()  # the bug: never back to train()
        if zero_grad == "before":
            opt.zero_grad()
        for k in range(micro):
            i = (step * micro + k) * 16
            x, y = x_all[i:i + 16], y_all[i:i + 16]
            out = model(x)
            if loss == "ce":
                value = F.cross_entropy(out, y)
            elif loss == "nll":
                value = F.nll_loss(out, y)
            else:  # multi-label
                value = F.binary_cross_entropy(out, F.one_hot(y, 10).float())
            value = value / micro
            (grad_scaler.scale(value) if grad_scaler else value).backward()
        if grad_scaler:
            grad_scaler.step(opt)
            grad_scaler.update()
        else:
            opt.step()
        if zero_grad == "after":
            opt.zero_grad()
        elif zero_grad == "after_keep":
            opt.zero_grad(set_to_none=False)
        elif zero_grad == "model_after":
            model.zero_grad()
        writer.add_scalar("train/loss", value.item() * micro, step)
        if validate:
            model.eval()
            with torch.no_grad():
                model(x_all[:16])
            model.train()
    writer.close()
    return logdir


def loop_findings(logdir: str) -> list:
    return [f for f in report(logdir) if f.issue in LOOP_ISSUES]


# ----------------------------------------------------------------- no_gradient


@pytest.mark.parametrize("cut", ["no_grad", "detach"])
def test_layer_cut_off_the_graph_is_found_by_name(tmp_path, cut):
    found = loop_findings(run(tmp_path, cut, Net(cut=cut)))
    assert {(f.issue, f.layer, f.severity) for f in found} == {
        ("no_gradient", "fc1", "warning"), ("no_gradient", "fc2", "warning")}, found
    assert found[0].first_step == 0 and "graph is cut" in found[0].message


def test_layer_with_its_gradient_path_restored_is_silent(tmp_path):
    assert loop_findings(run(tmp_path, "fixed", Net())) == []


def test_unused_module_is_info_and_a_module_outside_the_optimizer_is_not_flagged(tmp_path):
    model = Net()
    model.pooler = nn.Linear(32, 32)  # never called, like a pooler the task head does not use
    model.teacher = nn.Linear(32, 32)  # trainable but in no optimizer: not meant to train
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("teacher")], lr=0.05)
    (found,) = loop_findings(run(tmp_path, "unused", model, optimizer=opt))
    assert (found.issue, found.layer, found.severity) == ("no_gradient", "pooler", "info")
    assert "never ran" in found.message


def test_layer_frozen_with_requires_grad_false_is_silent(tmp_path):
    model = Net()
    model.fc1.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    assert loop_findings(run(tmp_path, "frozen", model, optimizer=opt)) == []


# ----------------------------------------------------------------- eval_mode_training


def test_eval_left_on_is_found_even_when_nothing_else_is_recorded(tmp_path):
    logdir = run(tmp_path, "eval", eval_after=6)
    (found,) = loop_findings(logdir)
    assert found.issue == "eval_mode_training" and found.layer is None and found.severity == "warning"
    assert found.first_step == 8 and found.last_step == STEPS - LOG_EVERY and found.ongoing
    assert found.value == 3 + 4 + 4 + 4  # steps 6..20, reported at logging steps (21..23 are not logged yet)
    (data,) = load_logdir(logdir)
    steps, values = data.model_series("eval_mode_steps")
    assert steps.tolist() == list(range(0, STEPS, LOG_EVERY)) and values.tolist() == [0, 0, 3, 4, 4, 4]
    assert data.table.layers[0].name == "fc1", "the run keeps its layer table"


def test_model_in_eval_mode_for_the_whole_run_is_found(tmp_path):
    model = Net()
    model.eval()
    logdir = os.path.join(str(tmp_path), "always_eval")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = teacher_data(64, (20,))
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=LOG_EVERY)
    with pytest.warns(RuntimeWarning, match="no training forward"):
        for step in range(12):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    writer.close()
    (found,) = loop_findings(logdir)
    assert found.issue == "eval_mode_training" and found.first_step == 0 and found.value == 1 + 4 + 4
    (data,) = load_logdir(logdir)
    assert [layer.name for layer in data.table.layers] == ["fc1", "fc2", "head"]


@pytest.mark.parametrize("variant", ["validate", "frozen_bn"])
def test_validation_in_eval_mode_and_a_frozen_batchnorm_are_silent(tmp_path, variant):
    frozen = variant == "frozen_bn"
    assert loop_findings(run(tmp_path, variant, Net(bn=frozen), validate=not frozen, freeze_bn=frozen)) == []


# ----------------------------------------------------------------- stale_gradients


def test_missing_zero_grad_is_found(tmp_path):
    (found,) = loop_findings(run(tmp_path, "stale", zero_grad="never"))
    assert found.issue == "stale_gradients" and found.severity == "error" and found.layer is None
    assert found.first_step == LOG_EVERY and found.ongoing


@pytest.mark.parametrize("zero_grad,micro", [("before", 1), ("after", 4), ("after_keep", 4), ("model_after", 1)])
def test_cleared_gradients_and_accumulation_over_micro_batches_are_silent(tmp_path, zero_grad, micro):
    logdir = run(tmp_path, f"{zero_grad}{micro}", zero_grad=zero_grad, micro=micro)
    assert loop_findings(logdir) == []
    (data,) = load_logdir(logdir)
    steps, values = data.model_series("stale_gradients")
    assert steps.tolist() == list(range(LOG_EVERY, STEPS, LOG_EVERY)) and set(values.tolist()) == {0.0}


def test_stale_gradient_check_is_scale_invariant_under_a_grad_scaler(tmp_path):
    assert loop_findings(run(tmp_path, "scaled_ok", scaler=True)) == []
    (found,) = loop_findings(run(tmp_path, "scaled_stale", scaler=True, zero_grad="never"))
    assert found.issue == "stale_gradients"


def test_watched_training_stays_bit_identical_through_the_stale_gradient_check(tmp_path):
    def train(watch: bool, zero_grad: str) -> nn.Module:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        x, y = teacher_data(16 * 12, (20,))
        writer = DiagnosticWriter(os.path.join(str(tmp_path), f"{watch}{zero_grad}")) if watch else None
        if writer:
            writer.watch(model, opt, log_every=2)
        for step in range(12):
            if zero_grad == "before":
                opt.zero_grad()
            F.cross_entropy(model(x[step * 16:(step + 1) * 16]), y[step * 16:(step + 1) * 16]).backward()
            opt.step()
        if writer:
            writer.close()
        return model

    for zero_grad in ("before", "never"):
        plain, watched = train(False, zero_grad), train(True, zero_grad)
        for (name, a), b in zip(plain.named_parameters(), watched.parameters()):
            assert torch.equal(a, b), name
            assert torch.equal(a.grad, b.grad), name


# ----------------------------------------------------------------- softmax_output


def test_softmax_before_cross_entropy_is_found(tmp_path):
    (found,) = loop_findings(run(tmp_path, "softmax", Net(out="softmax")))
    assert found.issue == "softmax_output" and found.severity == "warning" and found.first_step == 0
    assert "CrossEntropyLoss" in found.advice or "CrossEntropyLoss" in found.message


@pytest.mark.parametrize("out,loss", [("logits", "ce"), ("log_softmax", "nll"), ("sigmoid", "bce")])
def test_logits_log_softmax_and_multi_label_sigmoid_outputs_are_silent(tmp_path, out, loss):
    logdir = run(tmp_path, out, Net(out=out), loss=loss)
    assert loop_findings(logdir) == []
    (data,) = load_logdir(logdir)
    assert set(data.model_series("softmax_output")[1].tolist()) == {0.0}, "measured at every logging step"


# ----------------------------------------------------------------- the healthy scenarios


def test_healthy_scenarios_have_no_loop_finding(scenario_report):
    import scenarios

    healthy = {case.name for case in scenarios.HEALTHY}
    found = [f for f in scenario_report if f["run"] in healthy and f["issue"] in LOOP_ISSUES]
    assert found == [], found


def test_close_takes_the_armed_tensor_hook_off(tmp_path):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(os.path.join(str(tmp_path), "hooks"))
    writer.watch(model, opt, log_every=1)
    x, y = teacher_data(16, (20,))
    F.cross_entropy(model(x), y).backward()
    opt.step()  # arms the check of the next step: a tensor hook sits on the smallest parameter
    assert any(p._backward_hooks for p in model.parameters())
    writer.close()
    assert not any(p._backward_hooks for p in model.parameters())


# ----------------------------------------------------------------- faults inside the loop checks


@pytest.mark.parametrize("entry,method", [("stale-gradient check", "_check_left_gradient"),
                                          ("optimizer step hook", "arm_stale_check"),
                                          ("forward hook", "on_model_output")])
def test_a_fault_in_a_loop_check_detaches_and_training_is_untouched(tmp_path, monkeypatch, entry, method):
    from tbdiag.watch.loop_watch import LoopWatch

    def train(watch: bool) -> nn.Module:
        torch.manual_seed(0)
        model = Net()
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        x, y = teacher_data(16 * 8, (20,))
        writer = DiagnosticWriter(os.path.join(str(tmp_path), "faulty")) if watch else None
        if writer:
            writer.watch(model, opt, log_every=2)
        for step in range(8):
            opt.zero_grad()
            F.cross_entropy(model(x[step * 16:(step + 1) * 16]), y[step * 16:(step + 1) * 16]).backward()
            opt.step()
        assert not any(p._backward_hooks for p in model.parameters())
        assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks, "detached mid-training"
        if writer:
            writer.close()
        return model

    plain = train(False)

    def fault(*args, **kwargs):
        raise RuntimeError("injected fault")

    monkeypatch.setattr(LoopWatch, method, fault)
    with pytest.warns(RuntimeWarning, match=f"internal error in its {entry}.*injected fault"):
        watched = train(True)
    for a, b in zip(plain.parameters(), watched.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------- the tab


def test_the_tab_flags_the_cut_layer_and_lists_model_level_mistakes_in_the_banner(tmp_path):
    import plugin_helpers as h
    from werkzeug.test import Client

    run(tmp_path, "cut", Net(cut="detach"), eval_after=10)
    app, _ = h.wsgi_app(str(tmp_path))
    client = Client(app)

    def get(url: str):
        r = client.get("/data/plugin/tbdiag" + url)
        assert r.status_code == 200, r.get_data(as_text=True)[:300]
        return h.strict_json(r.get_data(as_text=True))

    banner = {e["issue"]: e for e in get("/findings?run=cut")["summary"]}
    assert banner["eval_mode_training"]["word"] == "eval mode" and banner["eval_mode_training"]["layers"] == []
    assert banner["no_gradient"]["layers"] == ["fc1", "fc2"] and banner["no_gradient"]["word"] == "no grad"
    rows = {row["name"]: row for row in get("/layers?run=cut&step=4")["layers"]}
    (flag,) = rows["fc1"]["flags"]
    assert flag["word"] == "no grad" and flag["active"] and "detach" in flag["advice"]
    assert rows["head"]["flags"] == []
    series = get("/series?run=cut&layer=fc1&stat=grad_params")
    assert series["series"]["grad_params"][:3] == [0.0, 0.0, 0.0]
    assert series["thresholds"]["grad_params"][0]["label"] == "no_gradient"
    rules = {r["name"]: r for r in get("/rules")["rules"]}
    assert LOOP_ISSUES <= set(rules) and "47175" in rules["stale_gradients"]["source"]
