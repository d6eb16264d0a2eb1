"""The Lightning and Hugging Face integrations, driving the real trainers and reading the event files back."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from tbdiag import cli
from tbdiag.read.reader import load_logdir

# before Lightning or transformers can import the Hugging Face libraries that read them
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _scalars(run_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of a run directory (all its event files), as TensorBoard reads it."""
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _report_exit_code(logdir: str, capsys) -> tuple[int, list[dict]]:
    capsys.readouterr()
    code = cli.main(["report", logdir, "--format", "json"])
    return code, json.loads(capsys.readouterr().out)["findings"]


def _assert_no_tbdiag_fault(caught: list[warnings.WarningMessage]) -> None:
    """tbdiag shields training from its own faults with a warning: here, any such warning is a failure."""
    faults = [str(w.message) for w in caught
              if "tbdiag stopped watching" in str(w.message) or "tbdiag could not write" in str(w.message)]
    assert not faults, faults


def _check_run(run, model: nn.Module, expected_steps: list[int]) -> None:
    """Logged steps, the model's own layer names, and finite statistics."""
    assert run.steps.tolist() == expected_steps
    own = dict(model.named_modules())
    assert run.layer_names and all(name in own for name in run.layer_names), run.layer_names
    assert not any(name.startswith(WRAPPER_PREFIXES) for name in run.layer_names)
    assert not np.isinf(run.stats).any()
    with_params = [i for i, layer in enumerate(run.table.layers) if layer.params > 0]
    for column in ("weight_norm", "grad_norm", "grad_rms", "act_std"):
        values = run.column(column)[:, with_params]
        if column == "act_std":  # not measured on layers whose output is not floating point
            values = values[:, ~np.isnan(values).all(axis=0)]
        assert values.size and np.isfinite(values).all(), column


def test_importing_tbdiag_imports_no_framework():
    """Importing tbdiag (or the integrations package) must not pull in Lightning or transformers."""
    frameworks = ("lightning", "pytorch_lightning", "transformers", "accelerate")
    code = f"import sys, tbdiag, tbdiag.integrations; print(sorted(m for m in {frameworks!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ---------------------------------------------------------------- Lightning

pl = pytest.importorskip("lightning.pytorch")
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from tbdiag.integrations.lightning import DiagnosticsMonitor  # noqa: E402

PL_STEPS = 30
PL_LOG_EVERY = 10


class Regressor(pl.LightningModule):
    """A small MLP with dropout; ``training_step`` calls the child (``self.net(x)``) or ``self(x)``."""

    def __init__(self, call: str = "net", fail_at: int | None = None):
        super().__init__()
        self.call = call
        self.fail_at = fail_at
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 16), nn.ReLU(),
                                 nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise RuntimeError("boom")
        x, y = batch
        out = self.net(x) if self.call == "net" else self(x)
        loss = nn.functional.mse_loss(out, y)
        self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer) -> None:
        # Lightning's own record of the gradient norm, at Lightning's step: the reference for tbdiag's
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in self.parameters() if p.grad is not None]))
        self.log("pl_grad_norm", norm)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _lightning_fit(root, call: str = "net", callback: DiagnosticsMonitor | None = None, max_steps: int = PL_STEPS,
                   ckpt_path: str | None = None, **module_kwargs):
    pl.seed_everything(0, verbose=False)
    model = Regressor(call, **module_kwargs)
    x = torch.randn(256, 8)
    data = TensorDataset(x, x[:, :1] * 2 - x[:, 1:2] + 0.1 * torch.randn(256, 1))
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, log_every_n_steps=1,
        logger=TensorBoardLogger(str(root), name="lightning", version=0),
        callbacks=[callback] if callback is not None else [],
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trainer.fit(model, DataLoader(data, batch_size=8, shuffle=True), ckpt_path=ckpt_path)
        finally:
            _assert_no_tbdiag_fault(caught)
    return trainer, model


@pytest.fixture(scope="module")
def lightning_runs(tmp_path_factory):
    """One fit per way of calling the network, with the monitor, and one fit without it."""
    runs = {}
    for call in ("net", "self"):
        root = tmp_path_factory.mktemp(f"pl_{call}")
        monitor = DiagnosticsMonitor(log_every=PL_LOG_EVERY)
        trainer, model = _lightning_fit(root, call, monitor)
        runs[call] = (str(root), trainer, model, monitor)
    _, plain = _lightning_fit(tmp_path_factory.mktemp("pl_plain"), "net")
    runs["plain"] = plain
    return runs


@pytest.mark.parametrize("call", ["net", "self"], ids=["self.net(x)", "self(x)"])
def test_lightning_diagnostics_land_in_the_logger_run(lightning_runs, call, capsys):
    root, trainer, model, _ = lightning_runs[call]
    runs = load_logdir(root)
    assert len(runs) == 1  # one run: the diagnostics and Lightning's scalars share it
    run = runs[0]
    assert os.path.join(root, run.name) == trainer.logger.log_dir
    assert "train_loss" in run.losses
    _check_run(run, model, list(range(0, PL_STEPS, PL_LOG_EVERY)))

    code, findings = _report_exit_code(root, capsys)
    assert code == 0
    assert all(f["layer"] is None or f["layer"] in dict(model.named_modules()) for f in findings)


@pytest.mark.parametrize("call", ["net", "self"], ids=["self.net(x)", "self(x)"])
def test_lightning_steps_line_up_with_lightnings_own(lightning_runs, call):
    """The same gradient norm, measured by tbdiag and logged by the module, carries the same step."""
    root, trainer, model, _ = lightning_runs[call]
    scalars = _scalars(trainer.logger.log_dir)
    ours = dict(scalars["train/grad_norm"])
    theirs = dict(scalars["pl_grad_norm"])
    assert sorted(ours) == list(range(0, PL_STEPS, PL_LOG_EVERY))
    assert sorted(theirs) == list(range(PL_STEPS))
    for step, value in ours.items():
        assert value == pytest.approx(theirs[step], rel=1e-5), step


def test_lightning_training_is_bit_identical_with_the_monitor(lightning_runs):
    plain = lightning_runs["plain"].state_dict()
    for call in ("net", "self"):
        watched = lightning_runs[call][2].state_dict()
        assert plain.keys() == watched.keys()
        for key in plain:
            assert torch.equal(plain[key], watched[key]), (call, key)


def test_lightning_monitor_closes_and_unhooks_after_fit(lightning_runs):
    _, _, model, monitor = lightning_runs["net"]
    assert monitor.writer is None
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_lightning_update_ratio_is_measured(lightning_runs):
    root = lightning_runs["net"][0]
    run = load_logdir(root)[0]
    with_params = [i for i, layer in enumerate(run.table.layers) if layer.params > 0]
    assert np.isfinite(run.column("update_ratio")[:, with_params]).all()


def test_lightning_monitor_writes_what_it_measured_when_training_fails(tmp_path):
    monitor = DiagnosticsMonitor(log_every=PL_LOG_EVERY)
    with pytest.raises(RuntimeError, match="boom"):
        _lightning_fit(tmp_path, "net", monitor, fail_at=15)
    assert monitor.writer is None
    assert load_logdir(str(tmp_path))[0].steps.tolist() == [0, 10]


def test_lightning_resumed_fit_goes_on_from_the_checkpoints_step(tmp_path):
    trainer, _ = _lightning_fit(tmp_path, "net", DiagnosticsMonitor(log_every=PL_LOG_EVERY), max_steps=15)
    ckpt = str(tmp_path / "at15.ckpt")
    trainer.save_checkpoint(ckpt)
    _lightning_fit(tmp_path, "net", DiagnosticsMonitor(log_every=PL_LOG_EVERY), ckpt_path=ckpt)
    run = load_logdir(str(tmp_path))[0]
    assert run.steps.tolist() == [0, 10, 20]  # 20 from the resumed fit, at Lightning's global step
    ours = dict(_scalars(trainer.logger.log_dir)["train/grad_norm"])
    theirs = dict(_scalars(trainer.logger.log_dir)["pl_grad_norm"])
    assert ours[20] == pytest.approx(theirs[20], rel=1e-5)


def test_lightning_monitor_without_a_tensorboard_logger_says_what_to_add(tmp_path):
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, callbacks=[DiagnosticsMonitor()],
                         enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                         default_root_dir=str(tmp_path))
    with pytest.raises(MisconfigurationException, match=r"TensorBoardLogger\("):
        trainer.fit(Regressor(), DataLoader(TensorDataset(torch.randn(8, 8), torch.randn(8, 1)), batch_size=4))


def test_monitor_rejects_unknown_watch_arguments():
    with pytest.raises(TypeError, match="histogram"):
        DiagnosticsMonitor(histogram=False)
    with pytest.raises(TypeError, match="optimizer"):
        DiagnosticsMonitor(optimizer=None)
    with pytest.raises(ValueError, match="log_every"):
        DiagnosticsMonitor(log_every=0)
    DiagnosticsMonitor(log_every=5, histograms=False, images_every=0)


# ------------------------------------------------------------- transformers

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments  # noqa: E402

from tbdiag.integrations.transformers import DiagnosticsCallback  # noqa: E402

HF_STEPS = 20
HF_LOG_EVERY = 5


class TokenIds(Dataset):
    """Random token ids and labels: enough for a tiny BERT to take optimizer steps."""

    def __init__(self, n: int = 64, length: int = 12):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, length), generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.labels[i]}


def _hf_train(output_dir: str, report_to: str):
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                        vocab_size=100, max_position_embeddings=32)
    model = BertForSequenceClassification(config)
    args = TrainingArguments(
        output_dir=output_dir, report_to=report_to, max_steps=HF_STEPS, logging_steps=HF_LOG_EVERY,
        per_device_train_batch_size=8, use_cpu=True, save_strategy="no", disable_tqdm=True, seed=0,
        dataloader_num_workers=0,
    )
    callback = DiagnosticsCallback(log_every=HF_LOG_EVERY)
    trainer = Trainer(model=model, args=args, train_dataset=TokenIds(), callbacks=[callback])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    _assert_no_tbdiag_fault(caught)
    return model, callback


@pytest.fixture(scope="module", params=["tensorboard", "none"])
def hf_run(request, tmp_path_factory):
    out = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    model, callback = _hf_train(out, request.param)
    return request.param, out, model, callback


def test_transformers_diagnostics_land_in_the_tensorboard_run(hf_run, capsys):
    report_to, out, model, callback = hf_run
    run_dirs = os.listdir(os.path.join(out, "runs"))
    assert len(run_dirs) == 1  # HF's scalars (or ours) and the diagnostics in one run
    runs = load_logdir(out)
    assert len(runs) == 1
    run = runs[0]
    assert run.name == os.path.join("runs", run_dirs[0])
    _check_run(run, model, list(range(0, HF_STEPS, HF_LOG_EVERY)))
    assert "bert.encoder.layer.1.attention.self.query" in run.layer_names and "classifier" in run.layer_names
    # measured through accelerate's optimizer wrapper: the step hooks reached the real optimizer
    with_params = [i for i, layer in enumerate(run.table.layers) if layer.params > 0]
    assert np.isfinite(run.column("update_ratio")[:, with_params]).all()
    assert callback.writer is None

    code, findings = _report_exit_code(out, capsys)
    assert code == 0
    assert all(f["layer"] is None or f["layer"] in dict(model.named_modules()) for f in findings)


def test_transformers_loss_is_written_once(hf_run):
    """HF's TensorBoard callback writes train/loss when active; the callback writes it when not, never twice."""
    report_to, out, _, _ = hf_run
    run_dir = os.path.join(out, "runs", os.listdir(os.path.join(out, "runs"))[0])
    scalars = _scalars(run_dir)
    loss_steps = [step for step, _ in scalars["train/loss"]]
    assert loss_steps == list(range(HF_LOG_EVERY, HF_STEPS + 1, HF_LOG_EVERY))
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])
    # HF's own callback also writes the rest of the logs (learning rate, epoch); without it, only losses
    assert ("train/learning_rate" in scalars) == (report_to == "tensorboard")


def test_transformers_grad_norm_has_one_value_per_step(hf_run):
    """One series per tag: a step of ``train/grad_norm`` must not carry two different values (HF's and ours)."""
    report_to, out, _, _ = hf_run
    run_dir = os.path.join(out, "runs", os.listdir(os.path.join(out, "runs"))[0])
    steps = [step for step, _ in _scalars(run_dir)["train/grad_norm"]]
    assert len(steps) == len(set(steps)), sorted(steps)


def test_transformers_callback_rejects_unknown_watch_arguments():
    with pytest.raises(TypeError, match="histogram"):
        DiagnosticsCallback(histogram=False)
