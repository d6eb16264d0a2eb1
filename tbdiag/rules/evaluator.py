"""The evaluator: every rule of the table (`tbdiag.rules.table`) checked against a run, consequences explained.

Each rule family has its own module (`layer`, `nonfinite`, `loop`, `loss`,
`update`, `evaluation`, `throughput`, `inputs`, `schedule`, `optimizer_state`,
`spikes`, and under `transformer/` `attention`, `logits`, `massive`, `experts`); this one maps each rule name to its
checker, runs them, lets each family demote the findings that follow from
another one, and orders the result.  Pure: a `RunData` in, findings out.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from ..contract.rundata import RunData
from . import evaluation, inputs, layer, loop, loss, nonfinite, optimizer_state, schedule, spikes, throughput, update
from .transformer import attention, experts, logits, massive
from .table import RULES_BY_NAME, SEVERITY_RANK, Finding, resolve

#: rule name -> its checker, ``(run, resolved rule) -> findings``
_EVALUATORS = {
    "dead_relu": layer.dead_relu,
    "vanishing_gradient": layer.vanishing_gradient,
    "exploding_gradient": layer.exploding_gradient,
    "saturated_activation": layer.saturated_activation,
    "activation_growth": layer.activation_growth,
    "nonfinite": nonfinite.check_nonfinite,
    "frozen_layer": layer.frozen_layer,
    "no_gradient": loop.no_gradient,
    "eval_mode_training": loop.eval_mode_training,
    "stale_gradients": loop.stale_gradients,
    "softmax_output": loop.softmax_output,
    "loss_divergence": loss.loss_divergence,
    "loss_plateau": loss.loss_plateau,
    "loss_spike": loss.loss_spike,
    "loss_oscillation": loss.loss_oscillation,
    "overfitting": loss.overfitting,
    "update_too_large": update.update_too_large,
    "update_too_small": update.update_too_small,
    "prediction_collapse": evaluation.prediction_collapse,
    "neglected_class": evaluation.neglected_class,
    "input_bound": throughput.input_bound,
    "padding_in_loss": inputs.padding_in_loss,
    "lr_schedule": schedule.lr_schedule,
    "input_scale": inputs.input_scale,
    "epsilon_dominated": optimizer_state.epsilon_dominated,
    "logit_divergence": logits.logit_divergence,
    "gradient_spike": spikes.gradient_spike,
    "massive_activations": massive.massive_activations,
    "expert_collapse": experts.expert_collapse,
    "attention_logit_growth": attention.attention_logit_growth,
    "attention_entropy_collapse": attention.attention_entropy_collapse,
}
assert set(_EVALUATORS) == set(RULES_BY_NAME), "every rule in the table needs an evaluator"


def evaluate(
    run: RunData,
    thresholds: Mapping[str, float] | None = None,
    rules: Sequence[str] | None = None,
) -> list[Finding]:
    """All findings for one run, most severe first, then by step and model order."""
    table = resolve(thresholds)
    findings: list[Finding] = []
    for name, rule in table.items():
        if rules is not None and name not in rules:
            continue
        findings.extend(_EVALUATORS[name](run, rule))
    schedule.explain(findings, run)  # root causes first: what they bring about is not a second illness
    inputs.explain(findings, run)
    layer.explain(findings, run)
    update.explain(findings, run)
    optimizer_state.explain(findings, run)
    loss.explain(findings, run)
    evaluation.explain(findings, run)
    order = {name: i for i, name in enumerate(run.layer_names)}
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.first_step, order.get(f.layer or "", -1), f.issue))
    return findings


def worst(findings: Sequence[Finding]) -> str | None:
    """Highest severity among findings, or None."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__)
