"""JSON body of the ``/evaluation`` route: a run's `add_evaluation` calls, per tag, with the weak classes marked.

Pure, like `tb_plugin.payloads`: every number comes from `tbdiag.contract.evaluation`
(the metrics) and `tbdiag.rules.evaluation` (which classes the
``neglected_class`` rule counts as neglected, whether ``prediction_collapse``
holds), so the tab marks exactly what the report finds.
"""

from __future__ import annotations

from typing import Any, Mapping

from tbdiag import rules
from tbdiag.contract import evaluation
from tbdiag.rules import evaluation as evaluation_rules

from .run_source import RunView

#: The rules whose findings the Evaluation section shows.
EVALUATION_RULES = ("prediction_collapse", "neglected_class")


def evaluation_payload(view: RunView, resolved: Mapping[str, rules.Rule]) -> dict[str, Any]:
    """Every evaluation of the run, by tag in step order, with the rules' marks and findings."""
    neglected, collapse = resolved["neglected_class"], resolved["prediction_collapse"]
    tags = []
    for tag, evals in view.data.evaluations.items():
        rows = []
        for ev in evals:
            row = ev.to_json()
            row["weak"] = evaluation_rules.weak_classes(ev, neglected)
            row["collapsed"] = evaluation.collapsed(ev, collapse.threshold, collapse.params["other_recall"])
            rows.append(row)
        prefix = evaluation_rules.subject(tag)
        findings = [f.to_json() for f in view.findings if f.issue in EVALUATION_RULES
                    and (f.message.startswith(prefix + ": ") or f.message.startswith(prefix + ", class "))]
        # weak_rule: the rule behind the "weak" marks (the tab looks its word, severity and text up in /rules)
        tags.append({"tag": tag, "evaluations": rows, "findings": findings, "weak_rule": neglected.name})
    return {"run": view.data.name, "tags": tags}
