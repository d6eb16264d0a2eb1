"""Evaluation diagnostics: `DiagnosticWriter.add_evaluation`, its metrics, its rules, the report.

Metric arithmetic is checked on hand-made confusion matrices; everything else
goes through real event files read back with TensorBoard's loader, and the
three cases that define the rules are real classifiers: a model that always
answers one class, one that never recognises a class, and a good balanced one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tbdiag import DiagnosticWriter, report
from tbdiag.contract import evaluation
from tbdiag.read.reader import load_logdir
from tbdiag.rules import RULES_BY_NAME, evaluator
from tbdiag.summary.evaluation_inputs import prepare

CLASSES = ["cat", "dog", "bird", "fish"]


def _ev(counts, names=None, step=0) -> evaluation.Evaluation:
    counts = np.asarray(counts, dtype=np.int64)
    return evaluation.Evaluation("val", step, counts, tuple(names or evaluation.default_class_names(len(counts))))


# ------------------------------------------------------------------ metrics


def test_metrics_from_a_confusion_matrix():
    ev = _ev([[8, 2, 0], [1, 9, 0], [0, 0, 0]])
    np.testing.assert_allclose(ev.support, [10, 10, 0])
    np.testing.assert_allclose(ev.recall[:2], [0.8, 0.9])
    assert np.isnan(ev.recall[2])  # no samples: nothing to measure, not 0
    np.testing.assert_allclose(ev.precision[:2], [8 / 9, 9 / 11])
    assert np.isnan(ev.precision[2])  # never predicted
    p, r = 8 / 9, 0.8
    assert ev.f1[0] == pytest.approx(2 * p * r / (p + r))
    assert ev.accuracy == pytest.approx(17 / 20)
    js = json.loads(json.dumps(ev.to_json(), allow_nan=False))  # strict JSON
    assert js["recall"][2] is None and js["counts"][0] == [8, 2, 0] and js["total"] == 20


def test_never_predicted_class_has_f1_zero():
    ev = _ev([[5, 5], [0, 10]])  # class 0 predicted 5 times, fine; now a class never predicted:
    ev = _ev([[10, 0], [10, 0]])
    assert ev.f1[1] == 0.0 and np.isnan(ev.precision[1]) and ev.recall[1] == 0.0


def test_confusion_counts_and_encoding_round_trip():
    counts = evaluation.confusion_counts(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 1]), 3)
    assert counts.tolist() == [[1, 0, 0], [0, 0, 1], [0, 1, 1]]
    summary = evaluation.encode("val/a", 7, counts, ["x", "y", "z"])
    value = summary.value[0]
    assert value.tag == "tbdiag/eval/val/a/0000000007" and evaluation.is_eval_tag(value.tag)
    from tensorboard.util import tensor_util

    ev = evaluation.decode(value.tag, value.metadata.plugin_data.content, 7, tensor_util.make_ndarray(value.tensor))
    assert ev.tag == "val/a" and ev.class_names == ("x", "y", "z") and ev.counts.tolist() == counts.tolist()
    # damaged names fall back to indices; the counts are never lost
    ev = evaluation.decode(value.tag, b"not json", 7, counts)
    assert ev.tag == "val/a" and ev.class_names == ("0", "1", "2")
    with pytest.raises(ValueError, match="square"):
        evaluation.decode(value.tag, b"", 7, np.zeros((2, 3)))


def test_rule_measures_on_hand_made_matrices():
    collapse = RULES_BY_NAME["prediction_collapse"]
    neglect = RULES_BY_NAME["neglected_class"]
    one_class = _ev([[0, 30, 0], [0, 30, 0], [0, 30, 0]])
    assert evaluation.collapsed(one_class, collapse.threshold, collapse.params["other_recall"])
    # 95% of the data is one class and the model answers it 96% of the time but still finds the rest: no collapse
    imbalanced = _ev([[940, 10], [20, 30]])
    assert not evaluation.collapsed(imbalanced, collapse.threshold, collapse.params["other_recall"])
    ignored = _ev([[50, 0, 0], [0, 48, 2], [0, 40, 0]])
    assert evaluation.neglected(ignored, neglect.threshold, neglect.params["min_support"]) == [2]
    imperfect = _ev([[40, 5, 5], [5, 40, 5], [10, 10, 30]])  # the hardest class at 60%: not neglected
    assert evaluation.neglected(imperfect, neglect.threshold, neglect.params["min_support"]) == []
    tiny = _ev([[50, 0, 0], [0, 50, 0], [0, 3, 0]])  # three samples are too few to judge
    assert evaluation.neglected(tiny, neglect.threshold, neglect.params["min_support"]) == []


# --------------------------------------------------------------- inputs


def test_prepare_accepts_labels_logits_probabilities_and_binary_scores():
    t = torch.tensor([0, 1, 2, 1])
    logits = torch.tensor([[3.0, 0, 0], [0, 2.0, 0], [0, 0, 1.0], [5.0, 0, 0]])
    p = prepare(t, logits)
    assert p.predictions.tolist() == [0, 1, 2, 0] and p.n_classes == 3
    np.testing.assert_allclose(p.probabilities.sum(axis=1), 1.0)
    assert p.probabilities[0, 0] == pytest.approx(float(torch.softmax(logits[0], 0)[0]))
    probs = torch.softmax(logits, 1)
    np.testing.assert_allclose(prepare(t, probs).probabilities, probs.numpy(), rtol=1e-6)  # kept as they are
    labels = prepare([0, 1, 1], np.array([0, 1, 0]))
    assert labels.probabilities is None and labels.predictions.tolist() == [0, 1, 0]
    binary = prepare([0, 1, 1], torch.tensor([-2.0, 0.5, 3.0]))  # one logit per sample
    assert binary.predictions.tolist() == [0, 1, 1] and binary.n_classes == 2
    assert prepare(t.to(torch.int32), logits.to(torch.bfloat16)).predictions.tolist() == [0, 1, 2, 0]


@pytest.mark.parametrize("targets, outputs, message", [
    ([0, 1, 2], [0, 1], "3 targets but 2 outputs"),
    ([[1, 0], [0, 1]], [0, 1], "one-hot targets: pass targets.argmax"),
    ([0, 1], np.zeros((2, 3, 4)), "labels \\[N\\] or class scores \\[N, C\\]"),
    ([0, 5], np.zeros((2, 3)), "targets hold label 5 but outputs score only 3 classes"),
    ([0, -100], [0, 1], "negative label -100"),
    ([0.5, 1], [0, 1], "whole class indices"),
    ([], [], "no samples"),
    (["a", "b"], [0, 1], "must hold numbers"),
])
def test_bad_inputs_say_what_to_pass(tmp_path, targets, outputs, message):
    writer = DiagnosticWriter(str(tmp_path))
    with pytest.raises(ValueError, match=message):
        writer.add_evaluation("val", targets, outputs)
    writer.close()


def test_class_names_of_the_wrong_length(tmp_path):
    writer = DiagnosticWriter(str(tmp_path))
    with pytest.raises(ValueError, match="2 class_names but outputs score 3 classes"):
        writer.add_evaluation("val", [0, 1], np.zeros((2, 3)), class_names=["a", "b"])
    with pytest.raises(ValueError, match="2 class_names but the labels need 4 classes"):
        writer.add_evaluation("val", [0, 3], [0, 1], class_names=["a", "b"])
    writer.add_evaluation("val", [0, 1, 2], [0, 1, 2], class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="never shrink"):
        writer.add_evaluation("val", [0, 1], [0, 1], class_names=["a", "b"])
    with pytest.raises(ValueError, match="non-empty string"):
        writer.add_evaluation("", [0], [0])
    writer.close()


# ----------------------------------------------- written, read back, reported


def test_every_call_survives_both_readers_and_the_class_count_grows(tmp_path):
    """12 calls: more than the 10 samples per tag TensorBoard's Python loader keeps for a plugin it does not know."""
    run = tmp_path / "grow"
    writer = DiagnosticWriter(str(run))
    rng = np.random.default_rng(0)
    for call in range(12):
        n = 3 if call < 6 else 4  # a class appears in the data half-way
        t = rng.integers(0, n, 200)
        writer.add_evaluation("val", t, t, class_names=None if call else ["a", "b", "c"])  # numpy labels
    writer.close()
    (data,) = load_logdir(str(tmp_path))
    evs = data.evaluations["val"]
    assert [e.step for e in evs] == list(range(12))  # global_step None: the call's index
    assert evs[0].class_names == ("a", "b", "c") and evs[11].class_names == ("a", "b", "c", "3")
    assert all(e.accuracy == 1.0 for e in evs) and evs[11].n_classes == 4
    assert report(str(tmp_path)) == []  # a perfect model; and an evaluation-only run is read and reported

    # the same data through TensorBoard's own data provider, as the plugin's /evaluation route serves it
    from werkzeug.test import Client

    sys.path.insert(0, os.path.dirname(__file__))
    import plugin_helpers as h

    client = Client(h.wsgi_app(str(tmp_path))[0])
    runs = json.loads(client.get("/data/plugin/tbdiag/runs").get_data(as_text=True))["runs"]
    assert [(r["run"], r["evaluations"], r["chunks"]) for r in runs] == [("grow", 12, 0)]
    body = json.loads(client.get("/data/plugin/tbdiag/evaluation?run=grow").get_data(as_text=True))
    (tag,) = body["tags"]
    assert [e["step"] for e in tag["evaluations"]] == list(range(12)) and tag["findings"] == []
    assert tag["evaluations"][11]["class_names"] == ["a", "b", "c", "3"]


def _separable(n: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    centres = torch.randn(classes, 8, generator=torch.Generator().manual_seed(0)) * 4  # the same for every split
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    return centres[y] + torch.randn(n, 8, generator=g), y


def _train(model: nn.Module, x, y, epochs: int, writer: DiagnosticWriter, x_val, y_val, *, sabotage=None) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    writer.watch(model, opt, log_every=5)
    for epoch in range(epochs):
        for idx in torch.arange(len(x)).split(64):
            loss = F.cross_entropy(model(x[idx]), y[idx] if sabotage is None else sabotage(y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            writer.add_scalar("train/loss", loss.item(), epoch)
        model.eval()
        with torch.no_grad():
            writer.add_evaluation("val", y_val, model(x_val), epoch, class_names=CLASSES)
        model.train()
    writer.close()


@pytest.fixture(scope="module")
def trained_logdir(tmp_path_factory):
    """Three real classifiers of the same 4-class data, trained for 4 epochs each."""
    root = tmp_path_factory.mktemp("eval-runs")
    x, y = _separable(512, 4, seed=0)
    x_val, y_val = _separable(400, 4, seed=1)
    for name, sabotage in (
        ("collapsed", lambda t: torch.full_like(t, 1)),  # labels all "dog": it learns to answer "dog"
        ("neglects_fish", lambda t: torch.where(t == 3, torch.full_like(t, 2), t)),  # fish labelled as bird
        ("good", None),
    ):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 4))
        _train(model, x, y, 4, DiagnosticWriter(str(root / name)), x_val, y_val, sabotage=sabotage)
    return str(root)


def _by_run(findings):
    out = {}
    for f in findings:
        out.setdefault(f.run, []).append(f)
    return out


def test_the_three_defining_cases(trained_logdir):
    found = _by_run(report(trained_logdir))
    collapse = [f for f in found["collapsed"] if f.issue == "prediction_collapse"]
    assert len(collapse) == 1 and collapse[0].layer is None and collapse[0].severity == "error"
    assert "'dog'" in collapse[0].message and collapse[0].value == pytest.approx(1.0)
    assert collapse[0].first_step == 0 and collapse[0].last_step == 3 and collapse[0].ongoing
    # with a collapse every other class is neglected too: none of those is reported on top of it
    assert not any(f.issue == "neglected_class" and f.severity != "info" for f in found["collapsed"])

    neglected = [f for f in found["neglects_fish"] if f.issue == "neglected_class"]
    assert len(neglected) == 1 and "class 'fish'" in neglected[0].message and "never predicted" in neglected[0].message
    assert neglected[0].value == 0.0 and neglected[0].layer is None
    assert not any(f.issue == "prediction_collapse" for f in found["neglects_fish"])

    assert not any(f.issue in ("prediction_collapse", "neglected_class") for f in found.get("good", []))


def test_report_json_and_fail_on(trained_logdir):
    proc = subprocess.run([sys.executable, "-m", "tbdiag", "report", trained_logdir, "--format", "json"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    issues = {(f["run"], f["issue"]) for f in json.loads(proc.stdout)["findings"]}
    assert ("collapsed", "prediction_collapse") in issues and ("neglects_fish", "neglected_class") in issues
    fail = subprocess.run([sys.executable, "-m", "tbdiag", "report", trained_logdir, "--fail-on", "error"],
                          capture_output=True, text=True, check=False)
    assert fail.returncode == 1 and "prediction_collapse" in fail.stdout


def test_images_and_pr_curves_are_written(trained_logdir):
    from tensorboard.backend.event_processing import event_accumulator as ea

    acc = ea.EventAccumulator(os.path.join(trained_logdir, "good"), size_guidance={ea.IMAGES: 0, ea.TENSORS: 0})
    acc.Reload()
    images = acc.Images("val/confusion_matrix")
    assert [i.step for i in images] == [0, 1, 2, 3] and images[0].width > 100
    pr = [t for t in acc.Tags()["tensors"] if t.startswith("val/pr_curve/")]
    assert sorted(pr) == sorted(f"val/pr_curve/{c}" for c in CLASSES)


def test_a_class_learned_late_is_no_finding():
    """The rules judge the latest evaluations: a class recognised from the third evaluation on is fine."""
    from tbdiag.contract.rundata import RunData

    bad = _ev([[50, 0, 0], [0, 50, 0], [0, 50, 0]])
    good = _ev([[50, 0, 0], [0, 48, 2], [0, 5, 45]])
    evs = [evaluation.Evaluation("val", s, e.counts, e.class_names) for s, e in enumerate([bad, bad, good, good])]
    run = RunData.from_samples("r", None, [])
    run.evaluations = {"val": evs}
    assert [f for f in evaluator.evaluate(run) if f.issue == "neglected_class"] == []
    run.evaluations = {"val": evs[:2]}
    (f,) = [f for f in evaluator.evaluate(run) if f.issue == "neglected_class"]
    assert f.first_step == 0 and f.last_step == 1 and "class '2'" in f.message and "taken for '1'" in f.message
    # persistence: the latest evaluation alone is not enough once there are more
    run.evaluations = {"val": [evs[2], evs[3], evs[0]]}
    assert [f for f in evaluator.evaluate(run) if f.issue == "neglected_class"] == []
    assert [f for f in evaluator.evaluate(run, {"neglected_class.persistence": 1}) if f.issue == "neglected_class"]
