"""Dead units of every rectifier-like activation, and gradients that are exactly zero.

``dead_relu`` covers ReLU, ReLU6, LeakyReLU(0), ``clamp(min=0)``, GELU (exact,
tanh-approximated, Hugging Face's), SiLU and the rest of the family, applied
as modules or functionally: a unit is dead when its output and derivative stay
~0 for every sample, judged on the pre-activation against one cutoff per kind
(`tbdiag.measure.layers.DEAD_BELOW`).  ``no_gradient`` also names trainable
layers whose gradients are all exactly zero, and a dead layer explains its own
and its feeding layers' zero gradients.  Each model trains for real and is read
back from its event files.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter, report
from tbdiag.contract import schema
from tbdiag.contract.rundata import RunData
from tbdiag.measure import stats
from tbdiag.measure.layers import ACTIVATION_KINDS, DEAD_BELOW, call_kind, module_kind
from tbdiag.read.reader import load_logdir
from tbdiag.rules import evaluator

C = schema.COLUMN_INDEX


pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------- the cutoff table

EPS = 1e-2  # |f| and |f'| below 1e-2 of their scale for x > 0 (f(x) ~ x, f'(x) ~ 1)


def _tail_bound(f, lo: float = -40.0, hi: float = 5.0, step: float = 1e-3) -> float:
    """The largest t on the grid such that |f(x)| <= EPS and |f'(x)| <= EPS for every grid x <= t."""
    x = (torch.arange(round(lo / step), round(hi / step), dtype=torch.float64) * step).requires_grad_()  # 0 on it
    y = f(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    bad = ((y.abs() > EPS) | (g.abs() > EPS)).nonzero()
    assert len(bad) and int(bad[0]) > 0, "f is not negligible on the far left"
    return float(x.detach()[int(bad[0]) - 1])


FUNCTIONS = {
    "relu": [F.relu], "relu6": [F.relu6], "leaky_relu": [lambda x: F.leaky_relu(x, 0.0)],
    "clamp": [lambda x: x.clamp(min=0)], "relu2": [lambda x: F.relu(x) ** 2],
    "gelu": [F.gelu, lambda x: F.gelu(x, approximate="tanh")],
    "silu": [F.silu], "mish": [F.mish], "quick_gelu": [lambda x: x * torch.sigmoid(1.702 * x)],
    "hardswish": [F.hardswish], "sqrt_softplus": [lambda x: F.softplus(x).sqrt()],
}


def test_every_dead_kind_has_a_derived_cutoff_and_a_name():
    assert set(FUNCTIONS) == set(DEAD_BELOW)
    for kind, fns in FUNCTIONS.items():
        bound = min(_tail_bound(f) for f in fns)
        # at or below the derived bound, and tight: rounded down to a tenth at most (one grid step of slack: at a
        # kink the derivative is a convention, torch's clamp passes the gradient at x = min, its relu does not)
        assert bound - 0.1 - 1e-9 <= DEAD_BELOW[kind] <= bound + 1e-3 + 1e-9, (kind, bound, DEAD_BELOW[kind])
        assert kind in schema.ACTIVATION_NAMES
    assert DEAD_BELOW["gelu"] == pytest.approx(-3.1) and DEAD_BELOW["silu"] == pytest.approx(-6.5)


def test_every_rectifier_like_entry_of_transformers_act2fn_is_recognised():
    activations = pytest.importorskip("transformers.activations")
    import warnings

    recognised = []
    for key in activations.ACT2CLS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module = activations.ACT2FN[key]
        f = module.to(torch.float64)
        x = torch.linspace(-40, -10, 3001, dtype=torch.float64, requires_grad=True)
        y = f(x)
        (g,) = torch.autograd.grad(y.sum(), x)
        with torch.no_grad():
            far_right = float(f(torch.tensor([20.0], dtype=torch.float64)))
        rectifier = bool((y.abs() <= EPS).all() and (g.abs() <= EPS).all()) and far_right > 2
        kind = module_kind(module)
        if rectifier:
            assert kind in DEAD_BELOW, (key, type(module).__name__, kind)
            # the criterion holds at every point at or below the kind's cutoff
            assert _tail_bound(f) >= DEAD_BELOW[kind] - 1e-9, (key, kind)
            recognised.append(key)
        else:
            assert kind not in DEAD_BELOW, (key, kind)
    assert {"gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "quick_gelu", "silu", "swish", "relu",
            "relu6"} <= set(recognised)


def test_kinds_of_modules_and_calls():
    assert module_kind(nn.ReLU()) == "relu" and module_kind(nn.ReLU6()) == "relu6"
    assert module_kind(nn.LeakyReLU(0.0)) == "leaky_relu" and module_kind(nn.LeakyReLU()) is None
    assert module_kind(nn.GELU()) == "gelu" and module_kind(nn.GELU(approximate="tanh")) == "gelu"
    assert module_kind(nn.SiLU()) == "silu" and module_kind(nn.Sigmoid()) == "sigmoid"
    assert module_kind(nn.Hardtanh(0.0, 1.0)) == "clamp" and module_kind(nn.Hardtanh()) is None
    assert module_kind(nn.Linear(2, 2)) is None and module_kind(nn.ELU()) is None

    def kind(func, *args, **kwargs):
        return call_kind(ACTIVATION_KINDS[func], func, args, kwargs)

    x = torch.zeros(2)
    assert kind(torch.clamp, x, min=0) == "clamp" and kind(torch.Tensor.clamp, x, 0) == "clamp"
    assert kind(torch.Tensor.clamp_min, x, 0.0) == "clamp"
    assert kind(torch.clamp, x, min=1e-6) is None and kind(torch.clamp, x, 0, 1) is None
    assert kind(torch.clamp, x, max=0) is None
    assert kind(F.leaky_relu, x, 0.0) == "leaky_relu" and kind(F.leaky_relu, x) is None
    assert kind(F.leaky_relu, x, negative_slope=0.2) is None
    assert kind(F.hardtanh, x, min_val=0.0, max_val=6.0) == "relu6" and kind(F.hardtanh, x) is None
    assert kind(F.gelu, x, approximate="tanh") == "gelu" and kind(F.silu, x) == "silu"


def test_a_smooth_unit_is_judged_on_its_pre_activation_not_on_a_near_zero_output():
    torch.manual_seed(0)
    x = torch.randn(64, 32) * 1e-3  # GELU(x) ~ 0, GELU'(x) ~ 0.5: alive
    x[:, :8] -= 3.5  # below -3.1 for every sample: dead
    dead = stats.dead_units(x, 1, DEAD_BELOW["gelu"])
    assert dead[:8].all() and not dead[8:].any()
    y = F.gelu(x)
    assert y[:, 8:].abs().max() < 1e-2  # the outputs of the live units are ~0 too
    rows = stats.dead_units_rows(torch.stack([x, x + 1]), 1, DEAD_BELOW["gelu"])
    assert torch.equal(rows[0], dead) and not rows[1].any()


# ----------------------------------------------------------------- MLPs trained for real

WIDTH = 64


class Functional(nn.Module):
    """fc1 -> act -> fc2 -> act -> head, the activation called functionally in forward."""

    def __init__(self, act):
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(20, WIDTH), nn.Linear(WIDTH, WIDTH), nn.Linear(WIDTH, 10)
        self.act = act

    def forward(self, x):
        return self.head(self.act(self.fc2(self.act(self.fc1(x)))))


MODULES = {
    "GELU": nn.GELU, "GELU-tanh": lambda: nn.GELU(approximate="tanh"), "SiLU": nn.SiLU,
    "SiLU-inplace": lambda: nn.SiLU(inplace=True), "ReLU6": nn.ReLU6, "LeakyReLU(0)": lambda: nn.LeakyReLU(0.0),
}
FUNCTIONAL = {
    "GELU": F.gelu, "SiLU": F.silu, "SiLU-inplace": lambda x: F.silu(x, inplace=True),
    "clamp(min=0)": lambda x: torch.clamp(x, min=0),
}
NAMES = {"GELU": "GELU", "GELU-tanh": "GELU", "SiLU": "SiLU", "SiLU-inplace": "SiLU", "ReLU6": "ReLU6",
         "LeakyReLU(0)": "LeakyReLU(0)", "clamp(min=0)": "clamp(min=0)"}


def _model(style: str, act: str) -> tuple[nn.Module, str]:
    """The MLP and the name of its second Linear (the one made dead)."""
    if style == "module":
        make = MODULES[act]
        return nn.Sequential(nn.Linear(20, WIDTH), make(), nn.Linear(WIDTH, WIDTH), make(), nn.Linear(WIDTH, 10)), "2"
    return Functional(FUNCTIONAL[act]), "fc2"


def _train(logdir: str, model: nn.Module, steps: int = 24, log_every: int = 2, hooks=None) -> str:
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=log_every, log_graph=False)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 10, generator=g)
    for _ in range(steps):
        x = torch.randn(64, 20, generator=g)
        loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    return logdir


CASES = [("module", a) for a in MODULES] + [("functional", a) for a in FUNCTIONAL]


@pytest.mark.parametrize("style,act", CASES, ids=[f"{s}-{a}" for s, a in CASES])
def test_a_dead_layer_is_named_for_each_activation_and_its_healthy_twin_is_not(tmp_path, style, act):
    torch.manual_seed(0)
    healthy, layer = _model(style, act)
    sick, _ = _model(style, act)
    sick.load_state_dict(healthy.state_dict())
    with torch.no_grad():
        dict(sick.named_modules())[layer].bias.fill_(-50.0)
    found = report(_train(os.path.join(str(tmp_path), "sick"), sick))
    dead = [f for f in found if f.issue == "dead_relu"]
    assert [(f.layer, f.severity) for f in dead] == [(layer, "warning")], [(f.layer, f.message) for f in found]
    assert f"100% of its {NAMES[act]} units never fire" in dead[0].message and dead[0].first_step == 0
    (run,) = load_logdir(os.path.join(str(tmp_path), "sick"))
    assert (run.column("dead_frac")[:, run.layer_names.index(layer)] == 1).all(), "dead at every logged step"
    assert not [f for f in report(_train(os.path.join(str(tmp_path), "healthy"), healthy)) if f.issue == "dead_relu"]


@pytest.mark.parametrize("style,act", [("module", "GELU"), ("module", "SiLU-inplace"), ("functional", "GELU"),
                                       ("functional", "SiLU-inplace")])
def test_dead_fractions_are_exactly_what_the_pre_activations_show(tmp_path, style, act):
    """Part of a layer dead: every logged fraction equals the test's own count from the pre-activations, whether
    measured through the activation spy, the module's hooks, or the untapped module's feeding layer."""
    torch.manual_seed(0)
    model, layer = _model(style, act)
    fc = dict(model.named_modules())[layer]
    with torch.no_grad():
        fc.bias[:20] = -50.0
    kind = "gelu" if act.startswith("GELU") else "silu"
    expected = []
    fc.register_forward_hook(
        lambda m, a, y: expected.append(float((y.detach().amax(0) <= DEAD_BELOW[kind]).float().mean())))
    _train(str(tmp_path), model, steps=12, log_every=1)
    (run,) = load_logdir(str(tmp_path))
    got = run.column("dead_frac")[:, run.layer_names.index(layer)]
    np.testing.assert_array_equal(got, np.array(expected, dtype=np.float32))
    assert (got >= 20 / WIDTH).all() and run.table.layers[run.layer_names.index(layer)].activation == kind


def test_layers_of_one_shape_measured_together_each_use_their_activations_cutoff(tmp_path):
    """Outputs of one shape are stacked and reduced together (`StepProbe.flush_outputs`): a GELU, a ReLU and a
    SiLU layer in one stack, each judged against its own cutoff."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, WIDTH), nn.GELU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(),
                          nn.Linear(WIDTH, WIDTH), nn.SiLU(), nn.Linear(WIDTH, 10))
    expected: dict[str, list[float]] = {}
    for index, kind in ((0, "gelu"), (2, "relu"), (4, "silu")):
        with torch.no_grad():
            model[index].bias[:16] = -50.0
            model[index].bias[16:24] = -6.0  # well below GELU's cutoff, above SiLU's: dead for GELU only
        model[index].register_forward_hook(
            lambda m, a, y, name=str(index), kind=kind: expected.setdefault(name, []).append(
                float((y.detach().amax(0) <= DEAD_BELOW[kind]).float().mean())))
    _train(str(tmp_path), model, steps=12, log_every=1)
    (run,) = load_logdir(str(tmp_path))
    for name, fractions in expected.items():
        got = run.column("dead_frac")[:, run.layer_names.index(name)]
        np.testing.assert_array_equal(got, np.array(fractions, dtype=np.float32), err_msg=name)
    dead = run.column("dead_frac")
    assert (dead[:, run.layer_names.index("0")] >= 24 / WIDTH).all(), "GELU: the -6 units are dead too"
    assert (dead[:, run.layer_names.index("4")] < 24 / WIDTH).all(), "SiLU: the -6 units are alive"


def test_a_healthy_gelu_layer_with_pre_activations_near_zero_is_not_dead(tmp_path):
    """Outputs ~0 but derivative 0.5: alive.  An output-based test (<= 0, or |y| < 1e-2) would call it dead."""
    torch.manual_seed(0)
    model, layer = _model("module", "GELU")
    with torch.no_grad():
        model[2].weight.mul_(1e-3)
        model[2].bias.zero_()
    outputs = []
    model[3].register_forward_hook(lambda m, a, y: outputs.append(float(y.detach().abs().max())))
    _train(str(tmp_path), model, steps=12, log_every=2)
    assert outputs[0] < 1e-2, "the layer's GELU outputs start near 0"
    (run,) = load_logdir(str(tmp_path))
    dead = run.column("dead_frac")[:, run.layer_names.index(layer)]
    assert np.isfinite(dead).all() and (dead == 0).all()
    assert not [f for f in report(str(tmp_path)) if f.issue == "dead_relu"]


# ----------------------------------------------------------------- a Hugging Face GPT-2


def _gpt2(logdir: str, dead: bool, steps: int = 60) -> str:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=4, vocab_size=32, n_positions=64,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config)
    if dead:
        with torch.no_grad():
            model.transformer.h[2].mlp.c_fc.bias.fill_(-20.0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=5)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):  # counting sequences: each token is the previous one plus 1 (mod 32)
        x = (torch.randint(0, 32, (16, 1), generator=g) + torch.arange(32)) % 32
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()
    return logdir


@pytest.fixture(scope="module")
def gpt2_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    return _gpt2(str(root / "dead"), dead=True), _gpt2(str(root / "healthy"), dead=False)


def test_gpt2_dead_mlp_block_is_named_on_the_layer_its_gelu_consumes(gpt2_runs):
    dead_dir, _ = gpt2_runs
    found = report(dead_dir)
    (dead,) = [f for f in found if f.issue == "dead_relu"]
    # NewGELUActivation is a module: the finding names the layer that feeds it, c_fc
    assert (dead.layer, dead.severity, dead.first_step) == ("transformer.h.2.mlp.c_fc", "warning", 0)
    assert "100% of its GELU units never fire" in dead.message
    assert any(f.severity == "warning" and (f.layer or "").startswith("transformer.h.2.") for f in found)
    (run,) = load_logdir(dead_dir)
    row = run.layer_names.index("transformer.h.2.mlp.c_fc")
    assert run.table.layers[row].activation == "gelu"
    others = [run.layer_names.index(f"transformer.h.{b}.mlp.c_fc") for b in (0, 1, 3)]
    assert (run.column("dead_frac")[:, others] < 0.5).all()


def test_gpt2_dead_block_zero_gradients_are_no_gradient_explained_by_it(gpt2_runs):
    dead_dir, _ = gpt2_runs
    (run,) = load_logdir(dead_dir)
    for name in ("transformer.h.2.mlp.c_fc", "transformer.h.2.ln_2"):  # the dead layer, and the norm that feeds it
        i = run.layer_names.index(name)
        assert (run.column("grad_params")[:, i] == 2).all() and (run.column("grad_norm")[:, i] == 0).all(), name
    zero = {f.layer: f for f in report(dead_dir) if f.issue == "no_gradient"}
    assert set(zero) == {"transformer.h.2.mlp.c_fc", "transformer.h.2.ln_2"}, zero
    for f in zero.values():
        assert f.severity == "info" and f.explained_by == "dead_relu:transformer.h.2.mlp.c_fc"
        assert "exactly zero" in f.message and "explained by the dead layer" in f.message


def test_gpt2_healthy_twin_has_no_dead_units_and_no_gradient_findings(gpt2_runs):
    _, healthy_dir = gpt2_runs
    found = report(healthy_dir)
    assert not [f for f in found if f.issue in ("dead_relu", "no_gradient")], [(f.issue, f.layer) for f in found]
    (run,) = load_logdir(healthy_dir)
    c_fc = [run.layer_names.index(f"transformer.h.{b}.mlp.c_fc") for b in range(4)]
    assert np.isfinite(run.column("dead_frac")[:, c_fc]).all(), "GELU units measured in every block"


# ----------------------------------------------------------------- no_gradient on hand-made runs


def make_run(n_steps=10, n_layers=3, **cols):
    """Healthy statistics of ``n_layers`` trainable layers in the optimizer; ``cols`` override [steps, layers]."""
    s = np.full((n_steps, n_layers, len(schema.COLUMNS)), np.nan, np.float32)
    base = {"act_mean": 0.1, "act_std": 1.0, "act_nonfinite": 0, "dead_frac": 0.05, "dead_persist_frac": 0.0,
            "grad_norm": 0.1, "grad_rms": 1e-3, "grad_nonfinite": 0, "weight_norm": 5, "weight_nonfinite": 0,
            "update_ratio": 1e-3, "changed": 1, "grad_params": 2}
    for name, value in {**base, **cols}.items():
        s[..., C[name]] = value
    layers = [schema.LayerInfo(name=f"l{i}", type="Linear", params=10, trainable_params=10, in_optimizer=True)
              for i in range(n_layers)]
    return RunData("run", schema.LayerTable(layers=layers, has_optimizer=True), np.arange(n_steps) * 10, s)


def _zero(layers, n_steps=10, n_layers=3, since=0):
    norm = np.full((n_steps, n_layers), 0.1)
    rms = np.full((n_steps, n_layers), 1e-3)
    norm[since:, layers] = 0.0
    rms[since:, layers] = 0.0
    return {"grad_norm": norm, "grad_rms": rms}


def _dead(layer, n_steps=10, n_layers=3):
    dead = np.full((n_steps, n_layers), 0.05)
    dead[:, layer] = 1.0
    return {"dead_frac": dead, "dead_persist_frac": dead}


def _found(run, issues=("no_gradient", "dead_relu")):
    return {(f.issue, f.layer): f for f in evaluator.evaluate(run) if f.issue in issues}


def test_exactly_zero_gradients_are_no_gradient_with_their_own_message():
    (f,) = _found(make_run(**_zero([1], since=3))).values()
    assert (f.issue, f.layer, f.severity, f.first_step, f.value) == ("no_gradient", "l1", "warning", 30, 0.0)
    assert "exactly zero" in f.message and "graph is cut" not in f.message
    cut = np.full((10, 3), 2.0)
    cut[:, 0] = 0  # .grad None
    (g,) = _found(make_run(grad_params=cut)).values()
    assert (g.layer, g.severity) == ("l0", "warning") and "graph is cut" in g.message
    assert "exactly zero" not in g.message


def test_zero_gradients_need_persistence_and_a_healthy_run_has_none():
    assert _found(make_run()) == {}
    short = _zero([1])
    short["grad_norm"][2:, 1] = 0.1  # exactly zero at two logged steps only
    short["grad_rms"][2:, 1] = 1e-3
    assert _found(make_run(**short)) == {}
    outside = make_run(**_zero([1]))
    outside.table.layers[1].in_optimizer = False  # not meant to train
    assert _found(outside) == {}


def test_a_dead_layer_explains_its_own_and_its_feeding_layers_zero_gradients():
    run = make_run(**_zero([0, 1]), **_dead(1))
    found = _found(run)
    assert found[("dead_relu", "l1")].severity == "warning"
    for name in ("l0", "l1"):
        f = found[("no_gradient", name)]
        assert f.severity == "info" and f.explained_by == "dead_relu:l1", f
        assert "explained by the dead layer l1" in f.message


def test_zero_gradients_not_behind_the_dead_layer_stay_warnings():
    # l0's zero gradients do not come from the dead l2: l1, between them, gets gradients
    found = _found(make_run(**_zero([0, 2]), **_dead(2)))
    assert found[("no_gradient", "l0")].severity == "warning" and found[("no_gradient", "l0")].explained_by is None
    assert found[("no_gradient", "l2")].severity == "info"
    # a layer after the dead one: not explained either
    found = _found(make_run(**_zero([0, 2]), **_dead(0)))
    assert found[("no_gradient", "l0")].severity == "info"
    assert found[("no_gradient", "l2")].severity == "warning"
    # absent gradients (a cut graph) are never explained by a dead layer
    cut = np.full((10, 3), 2.0)
    cut[:, 0] = 0
    found = _found(make_run(grad_params=cut, **_dead(1)))
    assert found[("no_gradient", "l0")].severity == "warning"


def test_dead_relu_message_names_the_activation():
    run = make_run(**_dead(1))
    run.table.layers[1].activation = "gelu"
    assert "100% of its GELU units never fire" in _found(run, ("dead_relu",))[("dead_relu", "l1")].message
    run.table.layers[1].activation = ""  # runs written before the kind was recorded
    assert "of its ReLU units" in _found(run, ("dead_relu",))[("dead_relu", "l1")].message
    run.table.layers[1].activation = "newkind"  # a kind this version does not know: shown as it is
    assert "of its newkind units" in _found(run, ("dead_relu",))[("dead_relu", "l1")].message



# ----------------------------------------------------------------- after a NaN blow-up


def test_a_nan_output_is_not_a_unit_that_fired():
    x = torch.tensor([[float("nan"), -1.0, 2.0], [float("nan"), -2.0, -1.0]])
    assert stats.dead_units(x, 1).tolist() == [True, True, False]
    assert stats.dead_units_rows(torch.stack([x, x.nan_to_num()]), 1).tolist() == [[True, True, False],
                                                                                   [True, True, False]]


def test_dead_fractions_after_a_nan_blow_up_are_nan_not_zero(tmp_path):
    """A real run: one weight of the middle Linear turns NaN at step 10, and from there every output is NaN.

    Before, a NaN output counted as firing and the dead fraction read 0% on a
    run that was lost; now it is the value NaN (the output's NaN count says
    so, and the tab prints "NaN", not "not measured"), no dead_relu comes out
    of it, and the nonfinite finding names where it began.
    """
    from tb_plugin import payloads

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, WIDTH), nn.ReLU(), nn.Linear(WIDTH, WIDTH), nn.ReLU(), nn.Linear(WIDTH, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2, log_graph=False)
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 10, generator=g)
    for step in range(20):
        if step == 10:
            with torch.no_grad():
                model[2].weight[0, 0] = float("nan")
        x = torch.randn(64, 20, generator=g)
        loss = F.cross_entropy(model(x), (x @ teacher).argmax(1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()
    (run,) = load_logdir(str(tmp_path))
    layer = run.layer_names.index("2")
    dead = run.column("dead_frac")[:, layer]
    blown = run.steps >= 10
    assert np.isfinite(dead[~blown]).all() and (dead[~blown] < 0.5).all(), dead
    assert np.isnan(dead[blown]).all(), f"a NaN output read as {dead[blown]} dead"
    assert np.isnan(run.column("dead_persist_frac")[blown, layer]).all()
    assert (run.column("act_nonfinite")[blown, layer] > 0).all()
    # the tab's cells: the value NaN, not "not measured"
    nan = payloads.nan_values(run.stats[:, layer, :])
    cells = payloads.json_cells(run.stats[:, layer, C["dead_frac"]], nan[:, C["dead_frac"]])
    assert [c for c, b in zip(cells, blown) if b] == ["NaN"] * int(blown.sum())
    found = report(str(tmp_path))
    assert not [f for f in found if f.issue == "dead_relu"], [f.message for f in found]
    # (written between step 9's update and step 10's forward: the sentinel names step 9's weights)
    assert any(f.issue == "nonfinite" and f.first_step in (9, 10) for f in found), [f.message for f in found]
