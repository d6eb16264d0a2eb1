"""Bad input gets a 4xx and a reason, never a 500 or a traceback, on every route and every CLI option.

Every route of the Diagnostics plugin and every ``tbdiag report`` option is
fed out-of-range, non-finite, huge, empty and markup values.  The answer is a
2xx (a harmless value) or a 4xx with ``{"error": reason}``; error bodies never
carry raw markup from the request; the command exits 2 with one line on stderr.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.parse

import plugin_helpers as h
import pytest
from werkzeug.test import Client

from tbdiag import report as tbdiag_report

P = "/data/plugin/tbdiag"
MARKUP = "<script>alert(1)</script>"
BAD_NUMBERS = ["1e309", "-1e309", "inf", "-inf", "nan", "NaN", "1e308", "-1", "0", "1" + "0" * 400, "0x10",
               "", " ", "abc", MARKUP, "1_000", "9" * 5000]
THRESHOLD_KEYS = ["dead_relu", "dead_relu.persistence", "loss_spike.history", "update_too_small.lr_floor",
                  "no_such_rule", "dead_relu.no_such_param", MARKUP, ""]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    logdir = h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir)
    app, _ingester = h.wsgi_app(logdir)
    return Client(app)


def _check(client: Client, url: str) -> int:
    r = client.get(url)
    body = r.get_data(as_text=True)
    assert r.status_code < 500, (url, r.status_code, body[:300])
    assert r.headers["Content-Type"].startswith("application/json"), (url, r.headers["Content-Type"])
    decoded = h.strict_json(body)
    if r.status_code >= 400:
        assert isinstance(decoded.get("error"), str) and decoded["error"], (url, body[:300])
        assert "<" not in body and ">" not in body, f"raw markup echoed by {url}: {body[:300]}"
    return r.status_code


def _url(route: str, **params) -> str:
    return f"{P}/{route}?" + urllib.parse.urlencode(params)


ROUTES = {
    "rules": {},
    "findings": {"run": "sick"},
    "layers": {"run": "sick"},
    "series": {"run": "sick", "layer": "conv2"},
    "heatmap": {"run": "sick", "stat": "dead_frac"},
    "throughput": {"run": "sick"},
    "evaluation": {"run": "sick"},
}


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_threshold_override_is_a_4xx_or_fine(client, route):
    codes = set()
    for key in THRESHOLD_KEYS:
        for value in BAD_NUMBERS:
            codes.add(_check(client, _url(route, threshold=f"{key}={value}", **ROUTES[route])))
        codes.add(_check(client, _url(route, threshold=key, **ROUTES[route])))  # no '='
    assert 400 in codes


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_every_parameter_of_every_route_is_a_4xx_or_fine(client, route):
    params = dict(ROUTES[route])
    names = set(params) | {"run", "layer", "stat", "step"}
    for name in sorted(names):
        for value in BAD_NUMBERS + ["sick", "conv2", "dead_frac", "../../etc/passwd", "%00", "\x00", "é" * 3]:
            _check(client, _url(route, **{**params, name: value}))
    # a missing required parameter
    for name in params:
        _check(client, _url(route, **{k: v for k, v in params.items() if k != name}))


def test_steps_far_outside_the_run(client):
    for step in ["-9223372036854775809", "9223372036854775808", "1" + "0" * 30, "-1" + "0" * 30]:
        _check(client, _url("layers", run="sick", step=step))


@pytest.mark.parametrize("value", ["1e309", "nan", "-inf", MARKUP, "1" + "0" * 400])
def test_report_threshold_option_exits_2_with_one_line(tmp_path_factory, value):
    logdir = h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir)
    for key in ("dead_relu", "dead_relu.persistence", "loss_spike.history"):
        proc = subprocess.run([sys.executable, "-m", "tbdiag", "report", logdir, "--threshold", f"{key}={value}"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, (key, value, proc.returncode, proc.stderr[-500:])
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_python_api_says_what_to_do(tmp_path_factory):
    logdir = h.session_logdir(tmp_path_factory, "trained", h.build_trained_logdir)
    with pytest.raises(ValueError, match="finite"):
        tbdiag_report(logdir, thresholds={"dead_relu.persistence": float("inf")})
    with pytest.raises(ValueError, match="finite"):
        tbdiag_report(logdir, thresholds={"dead_relu": float("nan")})


def test_json_bodies_escape_markup_from_names(client):
    body = client.get(_url("findings", run=MARKUP)).get_data(as_text=True)
    assert "<" not in body and json.loads(body)["error"]
