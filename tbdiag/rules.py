"""Health rules: stored statistics in, findings out.

One table (`RULES`) says for each rule what it measures and which statistics
(`tbdiag.statistics`) it reads, its default threshold, how many consecutive
logging steps must agree before it fires (one bad logging step is noise;
NaN/Inf and blow-ups are not), where the threshold comes from, what to try,
the word its flag shows and the threshold lines a chart draws.  Every reader
— `tbdiag report`, the TensorBoard tab — evaluates the same table with
`tbdiag.checks.evaluate`, so a threshold changed after training changes every
view alike.  This module is the table; `tbdiag.checks` says how each rule is
checked against a run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping

from .rundata import json_number

SEVERITIES = ("info", "warning", "error")
SEVERITY_RANK = {name: i for i, name in enumerate(SEVERITIES)}


#: Which side of a threshold line a rule fires on.
DIRECTIONS = ("above", "below")


@dataclass(frozen=True)
class ThresholdLine:
    """A rule's limit as a line on one statistic's chart.

    Declared with the rule, so the chart draws exactly the limits the rule
    applies, with the user's overrides, and a new rule brings its own lines.
    """

    statistic: str  # the chart it belongs on
    direction: str  # "above" or "below": the side on which the rule fires
    label: str  # "{value}" (format spec allowed) stands for the limit's setting
    setting: str = ""  # "" for the rule's threshold, else one of its params
    relative_to_largest: bool = False  # the limit is setting x the largest layer's value at each step

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Rule:
    """One row of the rule table."""

    name: str
    statistic: str  # what is measured, in words
    threshold: float  # default; override with checks.evaluate(run, thresholds={name: x})
    persistence: int  # consecutive logging steps (or loss samples) that must agree
    severity: str
    source: str  # where the threshold comes from
    why: str
    advice: str  # what to try
    params: Mapping[str, float] = field(default_factory=dict)  # secondary thresholds, "name.param" to override
    word: str = ""  # the short flag a layer shows (the tooltip carries the rest)
    reads: tuple[str, ...] = ()  # the statistics it reads (`tbdiag.statistics`), the one that shows it best first
    lines: tuple[ThresholdLine, ...] = ()  # its limits, drawn on the charts of the statistics they apply to

    def setting(self, name: str) -> float:
        """The value of a setting a threshold line names ("" is the main threshold)."""
        return self.threshold if not name else self.params[name]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["params"] = dict(self.params)
        out["reads"] = list(self.reads)
        out["lines"] = [line.to_json() for line in self.lines]
        return out


# fmt: off
RULES: tuple[Rule, ...] = (
    Rule(
        name="dead_relu",
        statistic="dead_frac: fraction of a layer's units (conv channels, linear features) whose ReLU output is 0 "
                  "for every sample of the batch",
        threshold=0.5, persistence=3, severity="warning",
        source="SageMaker Debugger DeadRelu rule (flags a layer when over 50% of its ReLUs are inactive); "
               "AUTOTRAINER's dying-ReLU check",
        why="A unit that never fires passes no gradient, so it cannot learn its way back: the layer has lost "
            "that capacity for good.",
        advice="Lower the learning rate; use He/Kaiming initialisation and zero or small positive biases; "
               "try LeakyReLU/GELU; add BatchNorm before the activation.",
        word="dead", reads=("dead_frac", "dead_persist_frac"),
        lines=(ThresholdLine("dead_frac", "above", "dead_relu"),),
    ),
    Rule(
        name="vanishing_gradient",
        statistic="grad_rms: a layer's gradient RMS, against the largest layer's at the same step (ratio) and "
                  "in absolute terms",
        threshold=1e-4, persistence=3, severity="warning",
        params={"absolute": 1e-7},
        source="SageMaker Debugger VanishingGradient rule (absolute threshold 1e-7); Glorot & Bengio (2010) and "
               "AUTOTRAINER compare gradients across layers: a 1e-4 ratio means the layer learns 10,000x slower",
        why="Layers far from the loss get gradients too small to move their weights; the network trains as if "
            "they were frozen at their initial values.",
        advice="Replace sigmoid/tanh hidden activations with ReLU-family ones; use Kaiming/Xavier initialisation; "
               "add residual connections or normalisation layers.",
        word="vanishing", reads=("grad_rms",),
        lines=(ThresholdLine("grad_rms", "below", "vanishing_gradient (absolute)", setting="absolute"),
               ThresholdLine("grad_rms", "below", "vanishing: {value:g} x largest layer's",
                             relative_to_largest=True)),
    ),
    Rule(
        name="exploding_gradient",
        statistic="grad_rms: a layer's gradient RMS (per element)",
        threshold=10.0, persistence=1, severity="error",
        source="cs231n 'Neural Networks Part 3': healthy updates are ~1e-3 of the weights, so a per-element "
               "gradient above 10 overshoots any usual weight scale at any usual learning rate; "
               "DeepDiagnosis/AUTOTRAINER flag gradients growing past a fixed bound",
        why="Huge gradients throw the weights far away in one step; the loss jumps and soon turns NaN. It fires "
            "on the first logging step because the NaN usually follows within a few steps.",
        advice="Lower the learning rate; check the initialisation scale; clip gradients "
               "(torch.nn.utils.clip_grad_norm_); normalise inputs and regression targets.",
        word="exploding", reads=("grad_rms",),
        lines=(ThresholdLine("grad_rms", "above", "exploding_gradient"),),
    ),
    Rule(
        name="saturated_activation",
        statistic="saturated_frac: fraction of sigmoid/tanh outputs within 1% of their bounds",
        threshold=0.5, persistence=3, severity="warning",
        source="SageMaker Debugger SaturatedActivation rule (flags a layer when over 50% of tanh/sigmoid units "
               "saturate); Glorot & Bengio (2010) on saturated sigmoid layers",
        why="A saturated unit has a near-zero derivative: it stops passing gradient, like a dead ReLU.",
        advice="Scale down the initialisation (Xavier); normalise the inputs; add LayerNorm/BatchNorm before the "
               "activation; lower the learning rate.",
        word="saturated", reads=("saturated_frac",),
        lines=(ThresholdLine("saturated_frac", "above", "saturated_activation"),),
    ),
    Rule(
        name="nonfinite",
        statistic="act_nonfinite, grad_nonfinite, weight_nonfinite: counts of NaN/Inf",
        threshold=0.0, persistence=1, severity="error",
        source="SageMaker Debugger ExplodingTensor rule: any NaN/Inf is fatal",
        why="One NaN spreads through every later update; the run is lost from this step on.",
        advice="Check the inputs of the named layer at that step for NaN/Inf; use torch.autograd.detect_anomaly "
               "around that step; lower the learning rate; guard log/sqrt/division against zero.",
        word="NaN/Inf", reads=("grad_nonfinite", "act_nonfinite", "weight_nonfinite"),
        lines=tuple(ThresholdLine(stat, "above", "nonfinite")
                    for stat in ("act_nonfinite", "grad_nonfinite", "weight_nonfinite")),
    ),
    Rule(
        name="frozen_layer",
        statistic="changed: whether a layer's parameters changed between logging steps while they received "
                  "non-zero gradients",
        threshold=0.0, persistence=3, severity="warning",
        source="cs231n update/weight ratio (~1e-3 is healthy, exactly 0 means no update at all)",
        why="The layer gets gradients but its weights never move: it is missing from the optimizer's parameter "
            "groups (or its learning rate is 0). Layers frozen with requires_grad=False get no gradients and are "
            "not flagged.",
        advice="Pass all parameters to the optimizer (build it after the model is complete, or add a param group); "
               "if the freeze is intended, set requires_grad=False.",
        word="frozen", reads=("changed", "grad_params", "grad_norm"),
        lines=(ThresholdLine("changed", "below", "frozen_layer"),),
    ),
    Rule(
        name="loss_divergence",
        statistic="a loss scalar (smoothed by a rolling median of 5): NaN/Inf, or rising above "
                  "(1 + threshold) x its starting value",
        threshold=0.5, persistence=3, severity="error",
        source="SageMaker Debugger ExplodingTensor/LossNotDecreasing practice: a loss above where it started is "
               "diverging, not learning",
        why="The optimiser is climbing instead of descending: steps are too large for the loss surface.",
        advice="Lower the learning rate or add warm-up; clip gradients; check the loss for a sign error.",
        word="diverging",
    ),
    Rule(
        name="loss_plateau",
        statistic="a loss scalar (smoothed by a rolling median of 5): best improvement over its starting value",
        threshold=0.005, persistence=20, severity="warning",
        source="SageMaker Debugger LossNotDecreasing rule (minimum relative decrease over a window of steps)",
        why="A loss that has not moved by half a percent over the whole run means nothing is being learned; "
            "a slow but healthy run moves more than that.",
        advice="Check that the optimizer holds the model's parameters and the learning rate is not ~0; look for "
               "dead or frozen layers above; overfit one batch to test the pipeline.",
        word="plateau",
    ),
)
# fmt: on

RULES_BY_NAME: dict[str, Rule] = {rule.name: rule for rule in RULES}
ISSUES: tuple[str, ...] = tuple(RULES_BY_NAME) + ("input_bound",)


def word_of(issue: str) -> str:
    """The flag word of a finding kind (the kind's own name when no rule declares one)."""
    rule = RULES_BY_NAME.get(issue)
    return rule.word if rule is not None and rule.word else issue


@dataclass
class Finding:
    """One diagnosis, the unit of `tbdiag report --format json` and the tab."""

    run: str
    layer: str | None
    issue: str
    severity: str
    first_step: int
    last_step: int
    value: float | None
    message: str
    threshold: float | None = None
    statistic: str | None = None
    advice: str = ""
    ongoing: bool = False  # still true at the last logged step
    explained_by: str | None = None  # another finding this one follows from
    # (first, last) logged steps of each stretch where it holds; empty: first_step..last_step.
    # A reader's view, not part of the report's JSON.
    spans: tuple[tuple[int, int], ...] = ()

    def holds_at(self, step: int) -> bool:
        """Whether the finding holds at a logged step (not merely started before it)."""
        spans = self.spans or ((self.first_step, self.last_step),)
        return any(a <= step <= b for a, b in spans)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        del out["spans"]
        out["value"] = json_number(self.value)
        out["threshold"] = json_number(self.threshold)
        return out


def resolve(thresholds: Mapping[str, float] | None = None) -> dict[str, Rule]:
    """The rule table with user overrides applied.

    Keys: ``"rule"`` (main threshold), ``"rule.persistence"``, ``"rule.<param>"``.
    Unknown keys raise ValueError naming the valid ones, so a typo never
    silently keeps the default.
    """
    rules = dict(RULES_BY_NAME)
    for key, value in (thresholds or {}).items():
        name, _, part = key.partition(".")
        if name not in rules:
            raise ValueError(f"unknown rule {name!r} in threshold {key!r}; rules are: {', '.join(RULES_BY_NAME)}")
        rule = rules[name]
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"threshold {key!r} must be a number, got {value!r}") from None
        if not part:
            rules[name] = replace(rule, threshold=value)
        elif part == "persistence":
            if value < 1 or value != int(value):
                raise ValueError(f"{key} must be a whole number >= 1, got {value!r}")
            rules[name] = replace(rule, persistence=int(value))
        elif part in rule.params:
            rules[name] = replace(rule, params={**rule.params, part: value})
        else:
            valid = ", ".join([name, f"{name}.persistence"] + [f"{name}.{p}" for p in rule.params])
            raise ValueError(f"unknown setting {key!r}; {name} takes: {valid}")
    return rules


def parse_threshold_args(items: Iterable[str]) -> dict[str, float]:
    """``["dead_relu=0.7", "vanishing_gradient.absolute=1e-8"]`` -> dict, with clear errors."""
    out: dict[str, float] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"threshold {item!r} must look like RULE=NUMBER, e.g. dead_relu=0.7")
        out[key.strip()] = value.strip()  # type: ignore[assignment]
    resolve(out)  # validate now
    return {k: float(v) for k, v in out.items()}


def rules_json(thresholds: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The resolved rule table as JSON-ready dicts (for the tab's tooltips and the docs)."""
    return [rule.to_json() for rule in resolve(thresholds).values()]


__all__ = [
    "Finding", "Rule", "ThresholdLine", "RULES", "RULES_BY_NAME", "ISSUES", "SEVERITIES", "SEVERITY_RANK",
    "DIRECTIONS", "resolve", "parse_threshold_args", "rules_json", "word_of",
]
