"""How the output-logit rule (`tbdiag.rules`) reads a run: the output's log Z drifting away from where it began.

``logit_divergence`` reads the model-level series ``logz_mean`` and ``logz_max``
(`tbdiag.measure.logits`): log Z = logsumexp of the logits over the classes,
at every logging step.  Cross-entropy is blind to a shift of all logits, so
log Z is held only by what the recipe adds (z-loss, weight decay, a final
normalisation): a drift far from its value at the first logged step (at
initialisation, about ln C) means the logits run away.  Pure numpy.
"""

from __future__ import annotations

import numpy as np

from ...contract.rundata import RunData
from ..series import persistent
from ..table import Finding, Rule


def logit_divergence(run: RunData, rule: Rule) -> list[Finding]:
    """The mean log Z more than ``threshold`` nats from its first logged value, or the largest row's more than
    ``max`` nats from its own, logging step after logging step."""
    steps, mean = run.model_series("logz_mean")
    if steps.size < 2:
        return []
    max_steps, largest = run.model_series("logz_max")
    top = np.full(mean.shape, np.nan)
    at = {int(s): v for s, v in zip(max_steps.tolist(), largest.tolist())}
    top[:] = [at.get(int(s), np.nan) for s in steps]
    drift = np.abs(mean - mean[0])
    with np.errstate(invalid="ignore"):
        top_drift = np.abs(top - top[0]) if np.isfinite(top[0]) else np.full(mean.shape, np.nan)
        fires = np.isfinite(drift) & ((drift > rule.threshold) | (top_drift > rule.params["max"]))
    spans = persistent(fires, np.isfinite(mean), rule.persistence)
    if not spans:
        return []
    first, last = spans[0][0], spans[-1][1] - 1
    since = int(steps[first])
    limit = (f"the mean more than {rule.threshold:g} nats from where it began" if drift[first] > rule.threshold
             else f"the largest row more than {rule.params['max']:g} nats from its own start ({top[0]:.3g})")
    last_logged = int(run.steps[-1]) if len(run.steps) else int(steps[-1])
    return [Finding(
        run=run.name, layer=None, issue=rule.name, severity=rule.severity,
        first_step=since, last_step=int(steps[last]), value=float(mean[last]),
        message=f"the output's log Z (logsumexp of the logits over the classes) has drifted from {mean[0]:.3g} at "
                f"step {int(steps[0])} to {mean[last]:.3g} (mean over rows; largest row {top[last]:.3g}) by step "
                f"{int(steps[last])}, {limit} since step {since}: the logits run away while cross-entropy, blind to "
                "their common shift, does not hold them",
        threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
        ongoing=int(steps[last]) >= last_logged,
        spans=tuple((int(steps[a]), int(steps[b - 1])) for a, b in spans),
    )]


__all__ = ["logit_divergence"]
