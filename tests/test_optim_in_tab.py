"""The new statistics in the Diagnostics tab's routes: eps_dominated_frac as a per-layer statistic (heatmap,
drill-down with its threshold line, flags), the log Z drift as a model-level finding."""

from __future__ import annotations

import base64

import numpy as np
import plugin_helpers as h
import pytest
import torch
from werkzeug.test import Client

import tbdiag

pytestmark = pytest.mark.usefixtures("one_thread")
P = "/data/plugin/tbdiag"


def _eps_run(logdir: str) -> None:
    """An MLP under Adam whose loss is scaled by 1e-9: every layer eps-dominated from the first step."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    writer = tbdiag.DiagnosticWriter(logdir)
    writer.watch(model, opt, log_every=2)
    for step in range(20):
        x, y = torch.randn(16, 8), torch.randint(0, 4, (16,))
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        (loss * 1e-9).backward()
        opt.step()
        writer.add_scalar("train/loss", loss.item(), step)
    writer.close()


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    pytest.importorskip("transformers")
    import test_logit_divergence

    root = tmp_path_factory.mktemp("optim_tab")
    _eps_run(str(root / "eps"))
    test_logit_divergence._train(str(root / "logits"), lr=0.1)
    app, _ = h.wsgi_app(str(root))
    return Client(app)


def get(client: Client, url: str):
    r = client.get(url)
    assert r.status_code == 200, (url, r.get_data(as_text=True)[:300])
    return h.strict_json(r.get_data(as_text=True))


def test_eps_dominated_frac_is_a_statistic_of_the_tab_with_its_heatmap_and_chart(client):
    stats = {s["name"]: s for s in get(client, P + "/rules")["statistics"]}
    assert stats["eps_dominated_frac"]["scale"] == "fraction" and stats["eps_dominated_frac"]["chart"] == "nonzero"
    heat = get(client, P + "/heatmap?run=eps&stat=eps_dominated_frac")
    matrix = np.frombuffer(base64.b64decode(heat["values"]), dtype="<f4").reshape(heat["shape"])
    assert np.nanmin(matrix) == 1.0
    assert "epsilon_dominated" in heat["flagged"]["0"]["issues"]
    series = get(client, P + "/series?run=eps&layer=0&stat=eps_dominated_frac")
    assert series["series"]["eps_dominated_frac"] == [1.0] * 10
    assert series["thresholds"]["eps_dominated_frac"][0]["value"] == 0.5
    layers = {row["name"]: row for row in get(client, P + "/layers?run=eps")["layers"]}
    assert "epsilon_dominated" in [f["issue"] for f in layers["2"]["flags"]]


def test_log_z_drift_reaches_the_tab_as_a_model_finding(client):
    body = get(client, P + "/findings?run=logits")
    (f,) = [f for f in body["findings"] if f["issue"] == "logit_divergence"]
    assert f["layer"] is None and f["value"] is not None and "log Z" in f["message"]
