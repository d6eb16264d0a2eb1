"""Compatibility matrix: models, wrappers and training setups tbdiag must watch without changing training.

Every test trains for real (a few steps of a tiny model), reads the event
files back, and checks that training ran to the end, the expected steps were
logged with finite statistics (equal to a hand computation where one is
easy), and, where watching must not change training, that the parameters are
bit-identical to those of an unwatched twin trained from the same seed.
"""

import contextlib
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator as ea
from torch import nn

import tbdiag
import tbdiag.watch.shield
from tbdiag import DiagnosticWriter, cli
from tbdiag.read.reader import load_logdir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------ helpers


@contextlib.contextmanager
def _recording():
    """Every warning raised inside, from any thread, each one kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield caught


def _messages(caught, pattern: str) -> list[str]:
    return [str(w.message) for w in caught if re.search(pattern, str(w.message))]


def _assert_no_tbdiag_fault(caught) -> None:
    """tbdiag shields training from its own faults with a warning: here, any such warning is a failure."""
    faults = _messages(caught, "tbdiag stopped watching|tbdiag could not write")
    assert not faults, faults


def _assert_same_params(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for name in sa:
        assert torch.equal(sa[name], sb[name]), f"{name} differs from the unwatched twin"


def _assert_no_hooks(model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    for name, m in model.named_modules():
        assert not m._forward_hooks and not m._forward_pre_hooks, f"hooks left on {name or 'the model'}"
    if optimizer is not None:
        assert not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks


def _train_watched_and_twin(tmp_path, model: nn.Module, twin: nn.Module, fit) -> list:
    """``fit(twin)`` unwatched, then ``fit(model, writer)`` watched: no tbdiag fault, the same parameters."""
    fit(twin)
    writer = DiagnosticWriter(str(tmp_path))
    with _recording() as caught:
        fit(model, writer)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    _assert_same_params(model, twin)
    return caught


def _run(logdir) -> "tbdiag.contract.rundata.RunData":
    (run,) = load_logdir(str(logdir))
    return run


def _accumulator(logdir) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(logdir), size_guidance={ea.SCALARS: 0, ea.GRAPH: 1})
    acc.Reload()
    return acc


def _param_rows(run) -> list[int]:
    return [i for i, layer in enumerate(run.table.layers) if layer.params > 0]


def _assert_finite(run, columns=("weight_norm", "grad_norm", "act_mean", "act_std"), rows=None) -> None:
    """The named statistics are finite on every logged step for ``rows`` (default: layers with parameters)."""
    rows = _param_rows(run) if rows is None else rows
    assert rows
    for column in columns:
        values = run.column(column)[:, rows]
        assert values.size and np.isfinite(values).all(), (column, values)


def _layer_norm(*tensors: torch.Tensor) -> float:
    return float(torch.sqrt(sum(t.detach().double().pow(2).sum() for t in tensors)))


def _data(n: int = 16, d_in: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g), torch.randint(0, classes, (n,), generator=g)


def _mlp(seed: int = 0, d_in: int = 6, width: int = 16, classes: int = 3) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.Tanh(),
                         nn.Linear(width, classes))


def _fit(model, opt, x, y, steps: int, call=None, autocast_dtype=None, writer=None) -> None:
    """Plain training: cross-entropy, zero_grad / backward / step; the loss logged when a writer is given."""
    call = call or model
    for step in range(steps):
        with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            loss = F.cross_entropy(call(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)


# ------------------------------------------------------ keyword-only models


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config)


def test_hugging_face_model_called_with_keyword_arguments(tmp_path):
    pytest.importorskip("transformers")
    model = _tiny_bert()
    twin = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (8, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[:, 7:] = 0
    labels = torch.randint(0, 3, (8,), generator=g)

    def fit(m, writer=None):
        torch.manual_seed(1)  # dropout draws the same numbers in both runs
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        if writer is not None:
            writer.watch(m, opt, log_every=2)
        for _ in range(3):
            out = m(input_ids=ids, attention_mask=mask, labels=labels)
            opt.zero_grad()
            out.loss.backward()
            opt.step()

    _train_watched_and_twin(tmp_path, model, twin, fit)
    acc = _accumulator(tmp_path)
    assert acc.Tags()["graph"], "the traced graph was logged"
    from tensorboard.compat.proto import graph_pb2

    graph = graph_pb2.GraphDef.FromString(acc.Graph().SerializeToString())
    scopes = {node.name.split("/")[0] for node in graph.node}
    assert scopes == {"input", "output", "BertForSequenceClassification"}, "the model's own name at the root"
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2]
    own = dict(model.named_modules())
    assert "bert.encoder.layer.0.attention.self.query" in run.layer_names
    assert {"bert.embeddings.word_embeddings", "classifier"} <= set(run.layer_names)
    assert all(name in own for name in run.layer_names), run.layer_names
    _assert_finite(run)
    i = run.layer_names.index("classifier")  # logged after the last step: the final weights
    expected = _layer_norm(model.classifier.weight, model.classifier.bias)
    assert run.column("weight_norm")[-1, i] == pytest.approx(expected, rel=1e-5)


class Prediction:
    """What some codebases return from forward: a plain object holding the logits."""

    def __init__(self, logits: torch.Tensor):
        self.logits = logits


class OpaqueOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return Prediction(self.head(self.body(x)))


def test_untraceable_model_logs_the_module_tree(tmp_path):
    torch.manual_seed(0)
    model = OpaqueOutput()
    twin = copy.deepcopy(model)
    x, y = _data()
    call = lambda m: (lambda inp: m(inp).logits)  # noqa: E731
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.1), x, y, steps=4, call=call(twin))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=4, call=call(model))
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert any(issubclass(w.category, RuntimeWarning) and "module tree" in str(w.message) for w in caught), \
        [str(w.message) for w in caught]
    _assert_same_params(model, twin)
    acc = _accumulator(tmp_path)
    assert acc.Tags()["graph"]
    nodes = {node.name.replace("/", ".") for node in acc.Graph().node}
    assert {name for name, _ in model.named_modules() if name} <= nodes, nodes
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2]
    _assert_finite(run)


# ---------------------------------------------------------------- autocast


def test_cpu_bfloat16_autocast(tmp_path):
    model = _mlp()
    twin = copy.deepcopy(model)
    x, y = _data()
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9), x, y, steps=5,
         autocast_dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=5, autocast_dtype=torch.bfloat16)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    _assert_same_params(model, twin)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    _assert_finite(run, ("weight_norm", "grad_norm", "act_mean", "act_std", "update_ratio"))
    assert np.isfinite(run.column("dead_frac")[:, run.layer_names.index("0")]).all()
    assert np.isfinite(run.column("saturated_frac")[:, run.layer_names.index("2")]).all()
    i = run.layer_names.index("4")
    assert run.column("weight_norm")[-1, i] == pytest.approx(_layer_norm(model[4].weight, model[4].bias), rel=1e-5)


# ----------------------------------------------------------- torch.compile

COMPILE_STEPS, COMPILE_LOG_EVERY = 5, 2


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compile_run(logdir, mode: str, backend: str = "aot_eager"):
    """The MLP trained with watch: in eager mode, compiled then watched, or watched then compiled."""
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = _data()
    writer = DiagnosticWriter(str(logdir))
    call = model
    if mode == "compiled-then-watched":
        call = torch.compile(model, backend=backend)
        writer.watch(call, opt, log_every=COMPILE_LOG_EVERY)
    else:
        writer.watch(model, opt, log_every=COMPILE_LOG_EVERY)
        if mode == "watched-then-compiled":
            call = torch.compile(model, backend=backend)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=COMPILE_STEPS, call=call)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    return _run(logdir)


@pytest.fixture(scope="module")
def eager_reference(tmp_path_factory):
    return _compile_run(tmp_path_factory.mktemp("eager"), "eager")


@pytest.mark.parametrize("mode", ["compiled-then-watched", "watched-then-compiled"])
def test_torch_compile_logs_what_eager_mode_logs(tmp_path, eager_reference, fresh_dynamo, mode):
    run = _compile_run(tmp_path, mode)
    assert run.steps.tolist() == eager_reference.steps.tolist() == [0, 2, 4]
    assert not any("_orig_mod" in name for name in run.layer_names)
    assert run.layer_names == eager_reference.layer_names
    for column in ("act_mean", "grad_norm", "weight_norm"):
        np.testing.assert_allclose(run.column(column), eager_reference.column(column), rtol=1e-5, err_msg=column)
    _assert_finite(run)


@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor needs a C++ compiler on the CPU")
def test_torch_compile_default_backend_on_a_conv_model(tmp_path, fresh_dynamo):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 3, (4,), generator=g)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    compiled = torch.compile(model)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=3, call=compiled)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    assert run.layer_names == ["0", "1", "3"]
    _assert_finite(run)
    assert run.column("weight_norm")[-1, 2] == pytest.approx(_layer_norm(model[3].weight, model[3].bias), rel=1e-5)


# -------------------------------------------------------------- accelerate


def test_accelerate_prepared_model_and_optimizer(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    x, y = _data()

    def fit(m, writer=None):
        accelerator = accelerate.Accelerator(cpu=True)
        m, opt = accelerator.prepare(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
        assert isinstance(opt, AcceleratedOptimizer)  # passed to watch() as the training loop holds it
        if writer is not None:
            writer.watch(m, opt, log_every=2)
        for _ in range(5):
            loss = F.cross_entropy(m(x), y)
            opt.zero_grad()
            accelerator.backward(loss)
            opt.step()
        return m, opt

    try:
        model = _mlp()
        twin = copy.deepcopy(model)
        fit(twin)
        writer = DiagnosticWriter(str(tmp_path))
        with _recording() as caught:
            prepared, accelerated = fit(model, writer)
            writer.close()
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    _assert_no_tbdiag_fault(caught)
    _assert_same_params(model, twin)
    _assert_no_hooks(prepared, accelerated.optimizer)
    _assert_no_hooks(model)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    _assert_finite(run)
    lr = _accumulator(tmp_path).Scalars("train/lr/group0")
    assert [e.step for e in lr] == [0, 2, 4] and lr[0].value == pytest.approx(0.05)


# -------------------------------------------------------------- GradScaler


def test_grad_scaler_without_optimizer_logs_unscaled_gradients(tmp_path):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)  # stepped by the scaler, not given to watch
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, grad_scaler=scaler, log_every=1)
    by_hand = []
    with _recording() as caught:
        for _ in range(3):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scale = scaler.get_scale()
            by_hand.append([_layer_norm(model[i].weight.grad, model[i].bias.grad) / scale for i in (0, 2, 4)])
            scaler.step(opt)
            scaler.update()
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert not _messages(caught, "grad_scaler")
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2]
    rows = [run.layer_names.index(name) for name in ("0", "2", "4")]
    np.testing.assert_allclose(run.column("grad_norm")[:, rows], np.array(by_hand), rtol=1e-5)


def test_float16_autocast_without_grad_scaler_warns_once(tmp_path):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, log_every=1)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=3, autocast_dtype=torch.float16)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert len(_messages(caught, "grad_scaler")) == 1, [str(w.message) for w in caught]
    assert _run(tmp_path).steps.tolist() == [0, 1, 2]


# ------------------------------------------------------------ frozen models


def test_frozen_model_without_optimizer_feeding_a_trainable_head(tmp_path):
    backbone = _mlp().requires_grad_(False)
    torch.manual_seed(1)
    head = nn.Linear(3, 3)
    x, y = _data()
    with torch.no_grad():
        first_act = float(backbone[0](x).mean())  # the backbone never changes
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(backbone, log_every=2)
    with _recording() as caught:
        _fit(head, opt, x, y, steps=5, call=lambda inp: head(backbone(inp)))
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert not _messages(caught, "optimizer")
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    _assert_finite(run, ("weight_norm", "act_mean", "act_std"))
    assert np.isnan(run.column("grad_norm")).all()  # frozen: no gradients to measure
    assert run.column("act_mean")[:, run.layer_names.index("0")] == pytest.approx([first_act] * 3, rel=1e-5)


def test_linear_probe_watching_the_frozen_backbone_with_the_head_optimizer(tmp_path):
    backbone = _mlp().requires_grad_(False)
    torch.manual_seed(1)
    head = nn.Linear(3, 3)
    probe = nn.Sequential(backbone, head)
    twin = copy.deepcopy(probe)
    x, y = _data()
    _fit(twin, torch.optim.SGD(twin[1].parameters(), lr=0.1), x, y, steps=5)
    opt = torch.optim.SGD(head.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    with _recording() as caught:
        writer.watch(backbone, opt, log_every=2)
        _fit(probe, opt, x, y, steps=5)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert not _messages(caught, "optimizer"), [str(w.message) for w in caught]
    _assert_same_params(probe, twin)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    _assert_finite(run, ("weight_norm", "act_mean", "act_std"))
    assert all(layer.trainable_params == 0 for layer in run.table.layers)


# ------------------------------------------------------------ lazy and meta


def test_lazy_modules_watched_before_their_first_forward(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.LazyLinear(16), nn.ReLU(), nn.LazyLinear(3))
    twin = copy.deepcopy(model)
    x, y = _data()
    torch.manual_seed(1)  # the lazy layers initialise at the first forward
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.1), x, y, steps=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    writer = DiagnosticWriter(str(tmp_path))
    with _recording() as caught:
        writer.watch(model, opt, log_every=1)
        torch.manual_seed(1)
        _fit(model, opt, x, y, steps=4)
        writer.close()
    _assert_no_tbdiag_fault(caught)
    _assert_same_params(model, twin)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 1, 2, 3]
    params = {layer.name: layer.params for layer in run.table.layers}
    assert params["0"] == 6 * 16 + 16 and params["2"] == 16 * 3 + 3
    _assert_finite(run)
    assert _accumulator(tmp_path).Tags()["graph"], "the graph is traced once the shapes are known"


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "backward-count"])
def test_meta_device_model(tmp_path, optimizer):
    with torch.device("meta"):
        model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x = torch.randn(16, 6, device="meta")
    writer = DiagnosticWriter(str(tmp_path))
    with _recording() as caught:
        handle = writer.watch(model, opt if optimizer else None, log_every=1)
        for _ in range(3):
            loss = model(x).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert len(_messages(caught, "meta tensors carry no values")) == 1, [str(w.message) for w in caught]
    assert handle.step == 3
    assert model[0].weight.grad.is_meta


# ----------------------------------------------------------------- threads


def test_one_model_trained_and_run_from_two_threads(tmp_path):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=3)
    step_lock = threading.Lock()  # no optimizer step between the prober's forward and its backward
    errors: dict[str, BaseException] = {}
    stack_depth: dict[str, int] = {}
    probing, done = threading.Event(), threading.Event()
    probes = []

    def trainer():
        try:
            probing.wait(30)  # both threads run the model from here on
            for _ in range(30):
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad()
                loss.backward()
                with step_lock:
                    opt.step()
        except BaseException as e:
            errors["trainer"] = e
        finally:
            done.set()
            stack_depth["trainer"] = torch._C._len_torch_function_stack()

    def prober():
        try:
            while not done.is_set():
                with step_lock:  # gradients without touching .grad, which the trainer zeroes meanwhile
                    torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))
                probes.append(1)
                probing.set()
        except BaseException as e:
            errors["prober"] = e
            probing.set()
        finally:
            stack_depth["prober"] = torch._C._len_torch_function_stack()

    with _recording() as caught:
        threads = [threading.Thread(target=trainer), threading.Thread(target=prober)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        writer.close()
    assert not errors, errors
    assert len(probes) > 1
    assert stack_depth == {"trainer": 0, "prober": 0}
    assert torch._C._len_torch_function_stack() == 0
    _assert_no_tbdiag_fault(caught)
    assert handle.step == 30
    run = _run(tmp_path)
    assert run.steps.tolist() == list(range(0, 30, 3))
    _assert_finite(run, ("weight_norm", "grad_norm"))


# ------------------------------------------------------- watching, set-up


def test_a_model_is_watched_by_one_writer_at_a_time(tmp_path):
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    first = DiagnosticWriter(str(tmp_path / "first"))
    second = DiagnosticWriter(str(tmp_path / "second"))
    with _recording() as caught:
        first.watch(model, opt, log_every=1)
        _fit(model, opt, x, y, steps=2)
        with pytest.raises(RuntimeError, match=re.escape(first.log_dir)):
            second.watch(model, opt, log_every=1)
        _fit(model, opt, x, y, steps=2)
        first.close()
        second.close()
        third = DiagnosticWriter(str(tmp_path / "third"))
        third.watch(model, opt, log_every=1)
        _fit(model, opt, x, y, steps=2)
        third.close()
    _assert_no_tbdiag_fault(caught)
    assert _run(tmp_path / "first").steps.tolist() == [0, 1, 2, 3]
    assert _run(tmp_path / "third").steps.tolist() == [0, 1]
    _assert_no_hooks(model, opt)


def test_watch_failing_half_way_leaves_nothing_behind(tmp_path, monkeypatch):
    model = _mlp()
    twin = copy.deepcopy(model)
    x, y = _data()
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.05, momentum=0.9), x, y, steps=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    real_guard = tbdiag.watch.shield.Shield.guard
    calls = []

    def guard_failing_at_the_fourth_call(self, entry, fn):
        calls.append(entry)
        if len(calls) == 4:
            raise RuntimeError("set-up fault injected by the test")
        return real_guard(self, entry, fn)

    monkeypatch.setattr(tbdiag.watch.shield.Shield, "guard", guard_failing_at_the_fourth_call)
    writer = DiagnosticWriter(str(tmp_path / "failed"))
    with _recording() as caught:
        writer.watch(model, opt, log_every=1)
    assert len(calls) == 4
    assert len(_messages(caught, "tbdiag stopped watching.*set-up fault injected")) == 1, \
        [str(w.message) for w in caught]
    _assert_no_hooks(model, opt)
    with _recording() as caught:
        _fit(model, opt, x, y, steps=3)
        writer.close()
    assert not _messages(caught, "tbdiag")
    _assert_same_params(model, twin)
    monkeypatch.undo()
    again = DiagnosticWriter(str(tmp_path / "again"))
    again.watch(model, opt, log_every=1)
    _fit(model, opt, x, y, steps=1)
    again.close()
    assert _run(tmp_path / "again").steps.tolist() == [0]


# ---------------------------------------------------------- report on URLs


def _write_small_run(logdir: str) -> None:
    model = _mlp()
    x, y = _data()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=1)
    _fit(model, opt, x, y, steps=3, writer=writer)
    writer.close()


def test_report_on_a_file_url(tmp_path):
    _write_small_run(str(tmp_path / "run"))
    url = "file://" + str(tmp_path.resolve())
    proc = subprocess.run([sys.executable, "-m", "tbdiag", "report", url, "--format", "json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout)["findings"], list)


def test_report_on_an_in_memory_file_system():
    fsspec = pytest.importorskip("fsspec", reason="memory:// logdirs are read through fsspec")
    fs = fsspec.filesystem("memory")
    if fs.exists("/runs"):
        fs.rm("/runs", recursive=True)
    try:
        _write_small_run("memory://runs/x")
        findings = tbdiag.report("memory://runs")
        assert isinstance(findings, list)
        (run,) = load_logdir("memory://runs")
        assert run.name == "x" and run.steps.tolist() == [0, 1, 2]
        _assert_finite(run)
    finally:
        fs.rm("/runs", recursive=True)


def test_report_on_an_unknown_url_scheme(capsys):
    capsys.readouterr()
    assert cli.main(["report", "nosuch://x", "--format", "json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nosuch://" in err, err


# ----------------------------------------------- modules called more than once


class TiedLM(nn.Module):
    """Input embedding and output projection share one weight; the projection is called on two positions."""

    def __init__(self, vocab: int = 20, d: int = 8):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.out = nn.Linear(d, vocab, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids):
        h = torch.tanh(self.mix(self.embed(ids)))
        return self.out(h[:, 0]) + self.out(h[:, -1])


class Siamese(nn.Module):
    """One encoder applied to two inputs."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8))
        self.head = nn.Linear(16, 3)

    def forward(self, a, b):
        ea_, eb = self.enc(a), self.enc(b)
        return self.head(torch.cat([(ea_ - eb).abs(), ea_ * eb], 1))


def _shared_case(name: str):
    """(model, inputs, labels, forward) of each model that calls one module twice per step."""
    g = torch.Generator().manual_seed(0)
    if name == "tied-embedding":
        torch.manual_seed(0)
        ids = torch.randint(0, 20, (16, 5), generator=g)
        return TiedLM(), (ids,), torch.randint(0, 20, (16,), generator=g), lambda m, inp, y: F.cross_entropy(m(*inp), y)
    x, y = _data()
    if name == "siamese":
        torch.manual_seed(0)
        b = torch.randn(16, 6, generator=g)
        return Siamese(), (x, b), y, lambda m, inp, y: F.cross_entropy(m(*inp), y)
    half = len(x) // 2  # the whole model called twice per optimizer step, one backward
    return _mlp(), (x,), y, lambda m, inp, y: (F.cross_entropy(m(inp[0][:half]), y[:half])
                                               + F.cross_entropy(m(inp[0][half:]), y[half:]))


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "backward-count"])
@pytest.mark.parametrize("case", ["tied-embedding", "siamese", "called-twice"])
def test_modules_called_more_than_once_per_step(tmp_path, case, optimizer):
    model, inputs, y, loss_of = _shared_case(case)
    twin = copy.deepcopy(model)

    def fit(m, writer=None):
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        if writer is not None:
            writer.watch(m, opt if optimizer else None, log_every=2)
        for _ in range(5):
            loss = loss_of(m, inputs, y)
            opt.zero_grad()
            loss.backward()
            if case == "tied-embedding" and writer is not None:
                before_step.append(_layer_norm(m.embed.weight))
            opt.step()

    before_step = []

    first_call = None
    if case == "siamese":
        with torch.no_grad():
            first_call = float(model.enc[0](inputs[0]).mean())
    _train_watched_and_twin(tmp_path, model, twin, fit)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    _assert_finite(run)
    if first_call is not None:  # the first of the two calls is the one measured
        assert run.column("act_mean")[0, run.layer_names.index("enc.0")] == pytest.approx(first_call, rel=1e-5)
    if case == "tied-embedding":
        embed, out = run.layer_names.index("embed"), run.layer_names.index("out")
        np.testing.assert_array_equal(run.column("weight_norm")[:, embed], run.column("weight_norm")[:, out])
        # measured after the optimizer step, or at the backward pass (before the step) without one
        expected = _layer_norm(model.embed.weight) if optimizer else before_step[4]
        assert run.column("weight_norm")[-1, embed] == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------ no parameters of its own


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "backward-count"])
def test_model_without_parameters(tmp_path, optimizer):
    torch.manual_seed(0)
    stem, act, head = nn.Linear(6, 16), nn.Sequential(nn.ReLU()), nn.Linear(16, 3)
    trained = nn.ModuleList([stem, head])
    twin = copy.deepcopy(trained)
    x, y = _data()
    _fit(twin, torch.optim.SGD(twin.parameters(), lr=0.05), x, y, steps=5,
         call=lambda inp: twin[1](torch.relu(twin[0](inp))))
    opt = torch.optim.SGD(trained.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    with _recording() as caught:
        writer.watch(act, opt if optimizer else None, log_every=2)
        _fit(trained, opt, x, y, steps=5, call=lambda inp: head(act(stem(inp))))
        writer.close()
    _assert_no_tbdiag_fault(caught)
    assert not _messages(caught, "optimizer"), [str(w.message) for w in caught]
    _assert_same_params(trained, twin)
    run = _run(tmp_path)
    assert run.steps.tolist() == [0, 2, 4]
    assert run.layer_names == ["0"] and run.table.layers[0].params == 0
    assert not np.isinf(run.stats).any()
