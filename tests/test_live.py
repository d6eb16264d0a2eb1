"""Live alerts: ``watch(..., on_finding=, stop_on=)`` and `tbdiag.TrainingHealthError`, on real training runs."""

from __future__ import annotations

import pickle
import warnings

import pytest
import torch
from test_nan_sentinel import BAD_STEP, Net, train

import tbdiag
from tbdiag import DiagnosticWriter, Finding, TrainingHealthError


def test_stop_on_nonfinite_raises_at_the_step_it_is_born(tmp_path):
    seen = []
    with pytest.raises(TrainingHealthError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(tmp_path, sick="forward", log_every=100, stop_on=("nonfinite",), on_finding=seen.append, steps=60)
    err = caught.value
    assert (err.issue, err.layer, err.step) == ("nonfinite", "b", BAD_STEP)
    assert err.finding.issue == "nonfinite" and err.advice == err.finding.advice
    assert "nonfinite, layer b, step 23" in str(err) and "What to try:" in str(err)
    assert pickle.loads(pickle.dumps(err)).finding == err.finding
    assert [f.issue for f in seen].count("nonfinite") == 1
    # what was logged up to the stop is on disk and names the same layer and step
    (f,) = [f for f in tbdiag.report(str(tmp_path)) if f.issue == "nonfinite"]
    assert (f.layer, f.first_step) == ("b", BAD_STEP)


def test_stop_on_nonfinite_without_an_optimizer_raises_out_of_backward(tmp_path):
    with pytest.raises(TrainingHealthError) as caught, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train(tmp_path, sick="forward", optimizer=False, stop_on="nonfinite")
    assert (caught.value.layer, caught.value.step) == ("b", BAD_STEP)


def test_on_finding_is_called_once_per_finding_with_findings(tmp_path):
    seen: list[Finding] = []
    with pytest.warns(RuntimeWarning, match="tbdiag: b: first NaN/Inf at step 23"):
        train(tmp_path, sick="forward", log_every=5, on_finding=seen.append)
    assert all(isinstance(f, Finding) for f in seen)
    keys = [(f.issue, f.layer) for f in seen]
    assert len(keys) == len(set(keys)), keys
    (nan,) = [f for f in seen if f.issue == "nonfinite"]
    assert (nan.layer, nan.first_step) == ("b", BAD_STEP)


def test_healthy_run_calls_nothing(tmp_path):
    seen = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        train(tmp_path, log_every=5, on_finding=seen.append, stop_on=("nonfinite",))
    assert [f for f in seen if f.severity == "error"] == []


def test_a_raising_callback_warns_and_training_goes_on(tmp_path):
    calls = []

    def broken(finding):
        calls.append(finding)
        raise KeyError("oops")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = train(tmp_path, sick="forward", log_every=5, on_finding=broken, steps=40)
    assert calls, "the callback was called"
    assert any("on_finding callback raised KeyError" in str(w.message) for w in caught)
    assert not any("stopped watching" in str(w.message) for w in caught), "the watcher stays attached"
    assert isinstance(model, Net)


def test_bad_arguments_are_refused_clearly(tmp_path):
    model = Net()
    writer = DiagnosticWriter(str(tmp_path))
    with pytest.raises(ValueError, match="stop_on names unknown rule.*'nan'.*valid names.*nonfinite"):
        writer.watch(model, stop_on=("nan",))
    with pytest.raises(TypeError, match="on_finding must be a callable"):
        writer.watch(model, on_finding="print")
    with pytest.raises(TypeError, match="stop_on must be a sequence"):
        writer.watch(model, stop_on=3)
    handle = writer.watch(model, stop_on=["nonfinite"])  # a refused watch left nothing behind
    handle.remove()
    writer.close()
    assert not torch.nn.Module.__dict__.get("_forward_hooks")
