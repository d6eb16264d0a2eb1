"""Health rules: stored statistics in, findings out.

One table (`RULES`) says for each rule what it measures and which statistics
(`tbdiag.statistics`) it reads, its default threshold, how many consecutive
logging steps must agree before it fires (one bad logging step is noise;
NaN/Inf and blow-ups are not), where the threshold comes from, what to try,
the word its flag shows and the threshold lines a chart draws.  Every reader — `tbdiag report`, the TensorBoard
tab — evaluates the same table with `evaluate`, so a threshold changed after
training changes every view alike.

All functions here are pure (numpy in, dataclasses out) so they are tested on
hand-made arrays without training anything.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from .rundata import RunData, json_number

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
    threshold: float  # default; override with evaluate(thresholds={name: x})
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


# ---------------------------------------------------------------------------
# helpers


def streaks(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open index ranges ``[start, end)`` of consecutive True values."""
    mask = np.asarray(mask, dtype=bool)
    if mask.size == 0:
        return []
    padded = np.concatenate([[False], mask, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def persistent(mask: np.ndarray, valid: np.ndarray, persistence: int) -> list[tuple[int, int]]:
    """Streaks long enough to count.

    A run shorter than the persistence counts when every valid step agrees,
    so a short run that is sick from start to end is still diagnosed.
    """
    need = max(1, min(persistence, int(np.count_nonzero(valid))))
    return [(a, b) for a, b in streaks(mask) if b - a >= need]


def rolling_median(values: np.ndarray, window: int = 5) -> np.ndarray:
    """Trailing rolling median that ignores NaN (robust to single noisy batches)."""
    values = np.asarray(values, dtype=np.float64)
    out = np.empty_like(values)
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        out[i] = np.median(chunk) if chunk.size else np.nan
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%" if x == 0 or abs(x) >= 0.01 else f"{100 * x:.1g}%"


def _layer_finding(
    run: RunData,
    rule: Rule,
    layer: int,
    spans: list[tuple[int, int]],
    values: np.ndarray,
    message: str,
    threshold: float,
) -> Finding:
    first, last = spans[0][0], spans[-1][1] - 1
    steps = run.steps
    return Finding(
        run=run.name,
        layer=run.table.layers[layer].name,
        issue=rule.name,
        severity=rule.severity,
        first_step=int(run.steps[first]),
        last_step=int(run.steps[last]),
        value=float(values[last]),
        message=message,
        threshold=threshold,
        statistic=rule.statistic,
        advice=rule.advice,
        ongoing=last == len(run.steps) - 1,
        spans=tuple((int(steps[a]), int(steps[b - 1])) for a, b in spans),
    )


def _per_layer(
    run: RunData,
    rule: Rule,
    stat: np.ndarray,
    mask: np.ndarray,
    describe,
    threshold: float,
) -> list[Finding]:
    """Apply a per-layer mask ``[steps, layers]``; one finding per layer with a persistent streak."""
    out = []
    valid = np.isfinite(stat)
    for i in range(mask.shape[1]):
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if spans:
            last = spans[-1][1] - 1
            since = int(run.steps[spans[0][0]])
            msg = describe(run.table.layers[i].name, float(stat[last, i]), since)
            out.append(_layer_finding(run, rule, i, spans, stat[:, i], msg, threshold))
    return out


# ---------------------------------------------------------------------------
# the rules


def _dead_relu(run: RunData, rule: Rule) -> list[Finding]:
    dead = run.column("dead_frac")
    persist = run.column("dead_persist_frac")
    with np.errstate(invalid="ignore"):
        raw = dead >= rule.threshold
        # the same units dead over the logged batches of the streak (falls back to the raw fraction
        # where the writer did not record it)
        confirmed = np.where(np.isfinite(persist), persist >= rule.threshold, raw)
    valid = np.isfinite(dead)
    out = []
    for i in range(dead.shape[1]):
        need = max(1, min(rule.persistence, int(np.count_nonzero(valid[:, i]))))
        spans = [(a, b) for a, b in persistent(raw[:, i], valid[:, i], rule.persistence)
                 if confirmed[a + need - 1 : b, i].any()]
        if not spans:
            continue
        last = spans[-1][1] - 1
        name = run.table.layers[i].name
        msg = (f"{name}: {_pct(float(dead[last, i]))} of its ReLU units never fire over a batch, since step "
               f"{int(run.steps[spans[0][0]])} (threshold {_pct(rule.threshold)})")
        out.append(_layer_finding(run, rule, i, spans, dead[:, i], msg, rule.threshold))
    return out


def _vanishing(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms").astype(np.float64)
    finite = np.where(np.isfinite(rms), rms, np.nan)
    with np.errstate(invalid="ignore", divide="ignore"), _all_nan_ok():
        top = np.nanmax(finite, axis=1, keepdims=True)
        ratio = finite / top
        mask = (ratio < rule.threshold) | (finite < rule.params["absolute"])
    mask &= np.isfinite(finite)
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.2e} is below {rule.threshold:g}x the largest layer's "
        f"(or below {rule.params['absolute']:g}) since step {since}; this layer barely learns",
        rule.threshold,
    )


def _exploding(run: RunData, rule: Rule) -> list[Finding]:
    rms = run.column("grad_rms")
    with np.errstate(invalid="ignore"):
        mask = np.isfinite(rms) & (rms > rule.threshold)
    return _per_layer(
        run, rule, rms, mask,
        lambda name, v, since: f"{name}: gradient RMS {v:.3g} exceeds {rule.threshold:g} from step {since}; "
        "gradients are exploding",
        rule.threshold,
    )


def _saturated(run: RunData, rule: Rule) -> list[Finding]:
    sat = run.column("saturated_frac")
    with np.errstate(invalid="ignore"):
        mask = sat >= rule.threshold
    def describe(name: str, v: float, since: int) -> str:
        act = next((x.activation for x in run.table.layers if x.name == name), "") or "sigmoid/tanh"
        return (f"{name}: {_pct(v)} of its {act} outputs are saturated (within 1% of the bounds) since step "
                f"{since} (threshold {_pct(rule.threshold)})")
    return _per_layer(run, rule, sat, mask, describe, rule.threshold)


def _nonfinite(run: RunData, rule: Rule) -> list[Finding]:
    counts = {
        "activations": run.column("act_nonfinite"),
        "weights": run.column("weight_nonfinite"),
        "gradients": run.column("grad_nonfinite"),
    }
    with np.errstate(invalid="ignore"):
        bad = {k: np.nan_to_num(v, nan=0.0) > rule.threshold for k, v in counts.items()}
    anybad = bad["activations"] | bad["weights"] | bad["gradients"]
    steps_bad = np.flatnonzero(anybad.any(axis=1))
    if steps_bad.size == 0:
        return []
    t0 = int(steps_bad[0])
    # Localise: in the forward pass the first layer (model order) with NaN/Inf
    # output is where it appeared; failing that, the first NaN weights; NaN
    # gradients spread backwards from the loss, so the *last* such layer is
    # closest to the origin.
    where, layer = None, None
    for kind in ("activations", "weights"):
        idx = np.flatnonzero(bad[kind][t0])
        if idx.size:
            where, layer = kind, int(idx[0])
            break
    if layer is None:
        idx = np.flatnonzero(bad["gradients"][t0])
        where, layer = "gradients", int(idx[-1])
    n_layers = int(np.count_nonzero(anybad[t0]))
    count = float(counts[where][t0, layer])
    name = run.table.layers[layer].name
    last = int(steps_bad[-1])
    return [
        Finding(
            run=run.name, layer=name, issue=rule.name, severity=rule.severity,
            first_step=int(run.steps[t0]), last_step=int(run.steps[last]), value=count,
            message=f"{name}: first NaN/Inf at step {int(run.steps[t0])}, in its {where} ({int(count)} elements); "
                    f"{n_layers} layer(s) affected at that step",
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
            ongoing=last == len(run.steps) - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in streaks(anybad.any(axis=1))),
        )
    ]


def _frozen(run: RunData, rule: Rule) -> list[Finding]:
    changed = run.column("changed")
    grads = run.column("grad_params")
    gnorm = run.column("grad_norm")
    with np.errstate(invalid="ignore"):
        receives = (grads > 0) & np.isfinite(gnorm) & (gnorm > 0)
        mask = receives & (changed <= rule.threshold)
    valid = receives & np.isfinite(changed)
    out = []
    for i in range(mask.shape[1]):
        # "never changes": every comparable step agrees, for long enough
        if valid[:, i].sum() == 0 or (mask[:, i] != valid[:, i]).any():
            continue
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if not spans:
            continue
        info = run.table.layers[i]
        note = " (its parameters are in no optimizer param group)" if info.in_optimizer is False else ""
        msg = (f"{info.name}: receives gradients but its parameters have not changed since step "
               f"{int(run.steps[spans[0][0]])}{note}")
        out.append(_layer_finding(run, rule, i, spans, changed[:, i], msg, rule.threshold))
    return out


def _loss_series(run: RunData) -> Iterable[tuple[str, np.ndarray, np.ndarray]]:
    for tag, (steps, values) in sorted(run.losses.items()):
        if len(values):
            yield tag, steps, values


def _loss_divergence(run: RunData, rule: Rule) -> list[Finding]:
    out = []
    for tag, steps, values in _loss_series(run):
        nonfinite = np.flatnonzero(~np.isfinite(values))
        if nonfinite.size:
            i = int(nonfinite[0])
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[i]), last_step=int(steps[-1]), value=float(values[i]),
                message=f"loss '{tag}' became {values[i]} at step {int(steps[i])}",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=True,
            ))
            continue
        smooth = rolling_median(values)
        start = smooth[min(len(smooth) - 1, 4)]  # the first full window
        if not np.isfinite(start):
            continue
        limit = start + rule.threshold * abs(start)
        mask = smooth > limit
        spans = persistent(mask, np.isfinite(smooth), rule.persistence) if len(values) >= rule.persistence else []
        if spans:
            a, b = spans[0][0], spans[-1][1] - 1
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[a]), last_step=int(steps[b]), value=float(smooth[b]),
                message=f"loss '{tag}' rose to {smooth[b]:.4g}, above its starting {start:.4g} by more than "
                        f"{_pct(rule.threshold)}, from step {int(steps[a])}",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
                ongoing=b == len(values) - 1,
            ))
    return out


def _loss_plateau(run: RunData, rule: Rule) -> list[Finding]:
    out = []
    for tag, steps, values in _loss_series(run):
        if len(values) < rule.persistence or not np.isfinite(values).all():
            continue
        smooth = rolling_median(values)
        start = smooth[min(len(smooth) - 1, 4)]
        best = float(np.min(smooth[5:])) if len(smooth) > 5 else float(np.min(smooth))
        scale = abs(start) if start != 0 else 1.0
        improvement = (start - best) / scale
        if improvement < rule.threshold:
            out.append(Finding(
                run=run.name, layer=None, issue=rule.name, severity=rule.severity,
                first_step=int(steps[0]), last_step=int(steps[-1]), value=float(improvement),
                message=f"loss '{tag}' has not improved by {_pct(rule.threshold)} over {len(values)} values "
                        f"(best {best:.4g} vs starting {start:.4g})",
                threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice, ongoing=True,
            ))
    return out


_EVALUATORS = {
    "dead_relu": _dead_relu,
    "vanishing_gradient": _vanishing,
    "exploding_gradient": _exploding,
    "saturated_activation": _saturated,
    "nonfinite": _nonfinite,
    "frozen_layer": _frozen,
    "loss_divergence": _loss_divergence,
    "loss_plateau": _loss_plateau,
}
assert set(_EVALUATORS) == set(RULES_BY_NAME), "every rule in the table needs an evaluator"


class _all_nan_ok:
    """Silence numpy's 'All-NaN slice' warning inside a block (expected for layers without gradients)."""

    def __enter__(self):
        import warnings

        self._ctx = warnings.catch_warnings()
        self._ctx.__enter__()
        warnings.simplefilter("ignore", RuntimeWarning)

    def __exit__(self, *exc):
        return self._ctx.__exit__(*exc)


def _explain(findings: list[Finding], run: RunData) -> None:
    """Demote consequences to ``info`` when their cause is also found.

    - A (nearly) fully dead layer passes no gradient, so vanishing gradients in
      the layers up to and including it follow from it; and it feeds a constant
      to the layers after it, so their ReLUs die with it.
    - A layer whose gradients vanish gets updates below float precision: its
      weights stop changing although it is in the optimizer.
    """
    order = {name: i for i, name in enumerate(run.layer_names)}
    dead = [f for f in findings if f.issue == "dead_relu" and (f.value or 0) >= 0.9]
    vanishing = {f.layer for f in findings if f.issue == "vanishing_gradient"}

    def demote(f: Finding, cause: Finding | None, why: str) -> None:
        f.severity = "info"
        f.explained_by = f"{cause.issue}:{cause.layer}" if cause is not None else None
        f.message += f" ({why})"

    for f in findings:
        if f.layer is None or f.explained_by is not None:
            continue
        pos = order.get(f.layer, -1)
        if f.issue in ("vanishing_gradient", "dead_relu"):
            for d in dead:
                dpos = order.get(d.layer or "", -1)
                upstream = f.issue == "vanishing_gradient" and pos <= dpos
                downstream = f.issue == "dead_relu" and pos > dpos
                if (upstream or downstream) and f.first_step >= d.first_step and f is not d:
                    demote(f, d, f"explained by the dead layer {d.layer}")
                    break
        elif f.issue == "frozen_layer" and f.layer in vanishing:
            info = run.table.layers[pos] if pos >= 0 else None
            if info is None or info.in_optimizer is not False:
                cause = next(v for v in findings if v.issue == "vanishing_gradient" and v.layer == f.layer)
                demote(f, cause, "its gradients are too small to change the weights: see vanishing_gradient")


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
    _explain(findings, run)
    order = {name: i for i, name in enumerate(run.layer_names)}
    findings.sort(key=lambda f: (-SEVERITY_RANK[f.severity], f.first_step, order.get(f.layer or "", -1), f.issue))
    return findings


def worst(findings: Sequence[Finding]) -> str | None:
    """Highest severity among findings, or None."""
    if not findings:
        return None
    return max((f.severity for f in findings), key=SEVERITY_RANK.__getitem__)


def rules_json(thresholds: Mapping[str, float] | None = None) -> list[dict[str, Any]]:
    """The resolved rule table as JSON-ready dicts (for the tab's tooltips and the docs)."""
    return [rule.to_json() for rule in resolve(thresholds).values()]


__all__ = [
    "Finding", "Rule", "ThresholdLine", "RULES", "RULES_BY_NAME", "ISSUES", "SEVERITIES", "SEVERITY_RANK",
    "DIRECTIONS", "evaluate", "resolve", "parse_threshold_args", "rules_json", "word_of", "worst", "streaks",
    "persistent", "rolling_median",
]
