"""DiagnosticWriter end to end: real training, event files read back with TensorBoard's own loader."""

import copy
import gc
import warnings
import weakref

import numpy as np
import pytest
import scenarios
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.backend.event_processing import plugin_event_accumulator as pea
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.tensorboard import SummaryWriter

from tbdiag import DiagnosticWriter
from tbdiag.contract import schema
from tbdiag.read.reader import load_logdir


def _train(model, writer=None, steps=12, log_every=5, optimizer=True, seed=0, batch=16, x_shape=(3, 32, 32)):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    if writer is not None:
        writer.watch(model, opt if optimizer else None, log_every=log_every, images_every=log_every,
                     histograms_every=log_every)
    x_all, y_all = scenarios.teacher_data(64, x_shape)
    for step in range(steps):
        idx = torch.arange(step * batch, (step + 1) * batch) % len(x_all)
        loss = F.cross_entropy(model(x_all[idx]), y_all[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
    return model


class DropoutCNN(scenarios.SeedCNN):
    """The seed CNN with dropout and BatchNorm: consumes random numbers and updates buffers in training."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        x = self.pool(F.relu(self.bn(self.conv1(x))))
        x = self.pool(F.relu(self.conv2(x)))
        x = self.drop(torch.flatten(x, 1))
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.mark.parametrize("optimizer", [True, False], ids=["optimizer", "backward-count"])
def test_training_is_bit_identical_with_and_without_watch(tmp_path, optimizer):
    torch.manual_seed(0)
    plain = DropoutCNN()
    watched = copy.deepcopy(plain)
    _train(plain, None, optimizer=optimizer)
    writer = DiagnosticWriter(str(tmp_path))
    _train(watched, writer, optimizer=optimizer)
    writer.close()
    for (name, a), (_, b) in zip(plain.state_dict().items(), watched.state_dict().items()):
        assert torch.equal(a, b), f"{name} differs"
    assert len(load_logdir(str(tmp_path))[0].steps) == 3  # steps 0, 5, 10 were really logged


def test_event_files_hold_every_kind_of_summary(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    _train(scenarios.SeedCNN(), writer, steps=11)
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.HISTOGRAMS: 0, ea.IMAGES: 0, ea.SCALARS: 0,
                                                            ea.TENSORS: 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"params/conv1.weight", "params/fc3.bias", "grads/conv2.weight", "activations/conv1",
            "activations/fc2"} <= set(tags["histograms"])
    assert [e.step for e in acc.Histograms("grads/conv1.weight")] == [0, 5, 10]
    assert {"images/conv1", "images/conv2"} <= set(tags["images"])
    assert {"train/lr/group0", "train/grad_norm", "train/loss"} <= set(tags["scalars"])
    assert acc.Scalars("train/lr/group0")[0].value == pytest.approx(0.05)
    assert tags["graph"], "the model graph was logged"
    assert "tbdiag/model_summary/text_summary" in tags["tensors"]
    # histogram counts add up to the tensor's size
    h = acc.Histograms("params/conv1.weight")[0].histogram_value
    assert sum(h.bucket) == pytest.approx(6 * 3 * 5 * 5)
    # the global gradient norm is the norm over all parameters' gradients
    assert acc.Scalars("train/grad_norm")[0].value > 0


def test_histograms_and_images_keep_their_own_cadence_and_the_health_table_every_logging_step(tmp_path):
    """By default histograms and images come every 10th logging step; the health statistics at every one."""
    torch.manual_seed(0)
    model = scenarios.SeedCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=2)
    x_all, y_all = scenarios.teacher_data(16, (3, 32, 32))
    for _ in range(41):
        loss = F.cross_entropy(model(x_all), y_all)
        opt.zero_grad()
        loss.backward()
        opt.step()
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path), size_guidance={ea.HISTOGRAMS: 0, ea.IMAGES: 0})
    acc.Reload()
    assert [e.step for e in acc.Histograms("grads/conv1.weight")] == [0, 20, 40]
    assert [e.step for e in acc.Histograms("activations/conv1")] == [0, 20, 40]
    assert [e.step for e in acc.Images("images/conv1")] == [0, 20, 40]
    assert load_logdir(str(tmp_path))[0].steps.tolist() == list(range(0, 41, 2))


def test_health_statistics_round_trip_through_tensorboard_loader(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    model = _train(scenarios.SeedCNN(), writer, steps=6)
    writer.close()
    acc = pea.EventAccumulator(str(tmp_path), size_guidance={pea.TENSORS: 0})
    acc.Reload()
    content = acc.PluginTagToContent(schema.PLUGIN_NAME)
    assert schema.LAYERS_TAG in content and any(schema.is_health_tag(t) for t in content)
    meta = acc.SummaryMetadata(schema.LAYERS_TAG)
    assert meta.data_class == 2  # DATA_CLASS_TENSOR, so TensorBoard's data provider lists it
    run = load_logdir(str(tmp_path))[0]
    assert run.layer_names[:2] == ["conv1", "pool"]  # model (first forward) order
    info = {l.name: l for l in run.table.layers}
    assert info["conv1"].output_shape == [16, 6, 28, 28]
    assert info["conv1"].macs == 16 * 6 * 28 * 28 * 3 * 25
    assert info["fc1"].params == 400 * 120 + 120 and info["conv2"].activation == "relu"
    i = run.layer_names.index("fc3")
    w = float(run.column("weight_norm")[-1, i])
    expected = torch.sqrt(model.fc3.weight.detach().pow(2).sum() + model.fc3.bias.detach().pow(2).sum())
    assert w == pytest.approx(float(expected), rel=1e-5)
    assert np.isfinite(run.column("update_ratio")[:, i]).all()
    assert (run.column("grad_params")[:, i] == 2).all()


def test_bytes_per_layer_of_health_data_are_compact(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    _train(scenarios.SeedCNN(), writer, steps=6)
    writer.close()
    # every logging step after a tag's first carries no metadata (the column names): the per-step cost, 4 bytes
    # per statistic and layer and a few of framing
    summary = schema.encode_health(0, np.zeros((100, len(schema.COLUMNS)), np.float32), with_metadata=False)
    assert len(summary.SerializeToString()) / 100 < 4 * len(schema.COLUMNS) + 10
    first = schema.encode_health(0, np.zeros((100, len(schema.COLUMNS)), np.float32))
    assert len(first.SerializeToString()) - len(summary.SerializeToString()) < 40 * len(schema.COLUMNS)


def test_eval_and_no_grad_forwards_are_not_training_steps(tmp_path):
    model = scenarios.SeedCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, opt, log_every=2)
    x, y = scenarios.teacher_data(8, (3, 32, 32))
    for _ in range(5):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(); loss.backward(); opt.step()
        model.eval()
        model(x)
        model.train()
        with torch.no_grad():
            model(x)
    assert handle.step == 5
    writer.close()
    assert list(load_logdir(str(tmp_path))[0].steps) == [0, 2, 4]


def test_without_optimizer_steps_count_backward_passes(tmp_path):
    model = scenarios.MLP(16, 2, nn.ReLU)
    writer = DiagnosticWriter(str(tmp_path))
    handle = writer.watch(model, log_every=3)
    x, y = scenarios.teacher_data(8, (20,))
    for _ in range(7):
        F.cross_entropy(model(x), y).backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= 0.01 * p.grad
                p.grad = None
    assert handle.step == 7
    writer.close()
    run = load_logdir(str(tmp_path))[0]
    assert list(run.steps) == [0, 3, 6]
    assert np.isnan(run.column("update_ratio")).all()  # needs optimizer=
    assert (run.column("changed")[1:, 0] == 1).all()  # but changes are still seen


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        return _Boxed(self.fc(x))  # the tracer cannot return an object of the user's class


class _Boxed:
    def __init__(self, value):
        self.value = value


def _three_watched_steps(tmp_path, model, logits) -> list:
    """Train ``model`` three logged steps (``logits(output)`` feeds the loss); the warnings it raised."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(8, (20,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            loss = F.cross_entropy(logits(model(x)), y)
            opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    return caught


def test_untraceable_model_warns_and_training_goes_on(tmp_path):
    caught = _three_watched_steps(tmp_path, DictOut(), lambda out: out.value)
    assert any("tbdiag" in str(w.message) and "module tree" in str(w.message) for w in caught)
    run = load_logdir(str(tmp_path))[0]
    assert list(run.steps) == [0, 1, 2] and run.layer_names == ["fc"]


class Zoo(nn.Module):
    """Modules returning tuples (MultiheadAttention), PackedSequence (LSTM) and a GRU's tuple."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 16, padding_idx=0)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.lstm = nn.LSTM(16, 16, batch_first=True)
        self.gru = nn.GRU(16, 16, batch_first=True)
        self.head = nn.Linear(16, 4)

    def forward(self, x, lengths):
        e = self.embed(x)
        a, _ = self.attn(e, e, e, need_weights=False)
        packed = pack_padded_sequence(a, lengths, batch_first=True, enforce_sorted=False)
        out, _ = self.lstm(packed)
        _, h = self.gru(a)
        return self.head(h[-1])


def test_tuple_dict_and_packed_outputs(tmp_path):
    model = Zoo()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    x, y, lengths = scenarios.token_data(16, ragged=True)
    for _ in range(3):
        loss = F.cross_entropy(model(x, lengths), y)
        opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    run = load_logdir(str(tmp_path))[0]
    assert set(run.layer_names) >= {"embed", "attn", "attn.out_proj", "lstm", "gru", "head"}
    i = run.layer_names.index("lstm")
    assert np.isfinite(run.column("act_mean")[:, i]).all()  # from PackedSequence.data
    assert np.isfinite(run.column("grad_norm")[:, run.layer_names.index("attn")]).all()  # in_proj_weight


def test_inplace_relu_reads_the_pre_activation_output(tmp_path):
    model = scenarios.MLP(32, 1, lambda: nn.ReLU(inplace=True))
    with torch.no_grad():
        model.net[0].bias.fill_(-0.5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(64, (20,))
    expected = model.net[0](x)
    loss = F.cross_entropy(model(x), y)
    opt.zero_grad(); loss.backward(); opt.step()
    writer.close()
    run = load_logdir(str(tmp_path))[0]
    i = run.layer_names.index("net.0")
    assert run.column("act_mean")[0, i] == pytest.approx(float(expected.detach().mean()), abs=1e-5)  # negative: before ReLU
    assert run.column("act_mean")[0, i] < 0
    assert run.table.layers[i].activation == "relu"


def test_watch_rejects_bad_arguments_with_a_clear_message(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        writer.watch("model")
    with pytest.raises(ValueError, match="log_every must be a positive integer"):
        writer.watch(nn.Linear(2, 2), log_every=0)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        writer.watch(nn.Linear(2, 2), optimizer=0.1)
    with pytest.raises(ValueError, match="images_every must be"):
        writer.watch(nn.Linear(2, 2), images_every=-1)
    with pytest.raises(ValueError, match=r"histograms_every must be None, 0 \(no histograms\)"):
        writer.watch(nn.Linear(2, 2), histograms_every=2.5)
    with pytest.raises(TypeError, match="grad_scaler must be a torch.amp.GradScaler"):
        writer.watch(nn.Linear(2, 2), grad_scaler=1024.0)
    model = nn.Linear(2, 2)
    for _ in range(2):  # a rejected watch leaves nothing on the model, and does not count as watching it
        with pytest.raises(TypeError):
            writer.watch(model, grad_scaler="scaler")
    assert not model._forward_hooks and not model._forward_pre_hooks
    writer.watch(nn.Linear(2, 2))
    with pytest.raises(RuntimeError, match="one DiagnosticWriter"):
        writer.watch(nn.Linear(2, 2))
    writer.close()


def test_close_removes_every_hook_and_keeps_no_graph_alive(tmp_path):
    model = scenarios.SeedCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    writer = DiagnosticWriter(str(tmp_path))
    writer.watch(model, opt, log_every=1)
    x, y = scenarios.teacher_data(8, (3, 32, 32))
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    out = model(x)  # a logging-step forward whose graph is dropped without a backward
    probe = weakref.ref(out)
    del out, loss
    gc.collect()
    assert probe() is None, "the watcher kept the output and its autograd graph alive"
    writer.close()
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_every_summary_writer_method_still_works(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    assert isinstance(writer, SummaryWriter)
    writer.add_scalar("a", 1.0, 0)
    writer.add_histogram("h", np.arange(10), 0)
    writer.add_text("t", "hello", 0)
    writer.add_image("i", np.zeros((3, 4, 4)), 0)
    writer.close()
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "a" in acc.Tags()["scalars"] and "h" in acc.Tags()["histograms"]


class Branchy(nn.Module):
    """Traceable, with data-dependent control flow (as every Hugging Face model has): the tracer takes one path."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(20, 10)

    def forward(self, x):
        if x.sum() > 0:  # a TracerWarning when traced
            return self.fc(x)
        return -self.fc(x)


def test_a_graph_traced_along_one_path_prints_nothing(tmp_path):
    caught = _three_watched_steps(tmp_path, Branchy(), lambda out: out)
    assert [str(w.message) for w in caught] == []
    acc = ea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert acc.Tags()["graph"], "the traced graph was still logged"
