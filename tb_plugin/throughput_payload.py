"""The ``/throughput`` route's answer: a run's ``perf/*`` series, its ``input_bound`` findings and limits.

The tab's "Throughput" strip (``static/throughput.js``) draws step time,
input wait share and samples per second over the logged steps from it, with
the rule's two limits on the wait chart.  A run without throughput data
answers empty series (the strip stays hidden).
"""

from __future__ import annotations

from typing import Any, Mapping

from tbdiag import rules
from tbdiag.contract.rundata import json_number
from tbdiag.rules.throughput import INPUT_WAIT_TAG, PERF_TAGS

from .run_source import RunView


def throughput_payload(view: RunView, table: Mapping[str, rules.Rule]) -> dict[str, Any]:
    """``table``: the rule table with the request's threshold overrides (`tbdiag.rules.resolve`)."""
    perf = view.data.perf
    rule = table["input_bound"]
    return {
        "run": view.data.name,
        "series": [
            {"tag": tag, "steps": [int(s) for s in perf[tag][0]], "values": [json_number(v) for v in perf[tag][1]]}
            for tag in PERF_TAGS if tag in perf and len(perf[tag][0])
        ],
        "lines": {INPUT_WAIT_TAG: [{"value": rule.threshold, "severity": "info", "label": "input_bound (info)"},
                                   {"value": rule.params["warning"], "severity": "warning",
                                    "label": "input_bound (warning)"}]},
        "findings": [{**f.to_json(), "spans": [list(s) for s in f.spans]}
                     for f in view.findings if f.issue == rule.name],
    }
