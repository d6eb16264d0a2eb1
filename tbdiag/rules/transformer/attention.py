"""The attention rules: logits growing out of range, and attention entropy collapsing.

Both read an attention module's row (`tbdiag.contract.statistics`: ``attn_*``,
NaN on every other row) over the logged steps and return one finding per
attention module with a persistent streak, naming the head that shows it
worst.  Pure numpy: hand-made arrays in, findings out.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from ...contract.rundata import RunData
from ..series import persistent
from ..table import Finding, Rule

#: The logged values a layer's early entropy is read from (the highest of them: a first logged step can fall
#: inside a warm-up where the attention is already sharpening).
EARLY_STEPS = 3


def _head(value: float) -> str:
    return f"head {int(value)}" if np.isfinite(value) else "some head"


def _findings(run: RunData, rule: Rule, stat: np.ndarray, mask: np.ndarray,
              describe: Callable[[int, int, int], str]) -> list[Finding]:
    """One finding per layer whose ``mask`` holds for `Rule.persistence` logged steps in a row.

    ``describe(layer, last index, first index)`` words the message.
    """
    out = []
    valid = np.isfinite(stat)
    for i in range(stat.shape[1]):
        spans = persistent(mask[:, i], valid[:, i], rule.persistence)
        if not spans:
            continue
        first, last = spans[0][0], spans[-1][1] - 1
        out.append(Finding(
            run=run.name, layer=run.table.layers[i].name, issue=rule.name, severity=rule.severity,
            first_step=int(run.steps[first]), last_step=int(run.steps[last]), value=float(stat[last, i]),
            message=describe(i, last, first), threshold=rule.threshold, statistic=rule.statistic,
            advice=rule.advice, ongoing=last == len(run.steps) - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in spans),
        ))
    return out


def attention_logit_growth(run: RunData, rule: Rule) -> list[Finding]:
    """Max attention logit above the threshold (QK-Clip's tau) for `persistence` logged steps."""
    logits = run.column("attn_logit_max").astype(np.float64)
    heads = run.column("attn_logit_head")
    with np.errstate(invalid="ignore"):
        mask = logits > rule.threshold  # (an infinite logit too: a half-precision product overflowed)

    def describe(i: int, last: int, first: int) -> str:
        name = run.table.layers[i].name
        return (f"{name}: max attention logit {logits[last, i]:.3g} ({_head(heads[last, i])}) since step "
                f"{int(run.steps[first])}, above {rule.threshold:g}: its attention is near one-hot and the logits "
                f"keep growing (at step {int(run.steps[first])}: {logits[first, i]:.3g}, {_head(heads[first, i])})")

    return _findings(run, rule, logits, mask, describe)


def early_level(values: np.ndarray, steps: int = EARLY_STEPS) -> np.ndarray:
    """Per layer: the highest of its first ``steps`` finite values (NaN for a layer never measured)."""
    out = np.full(values.shape[1], np.nan)
    for i in range(values.shape[1]):
        finite = values[np.isfinite(values[:, i]), i]
        if finite.size:
            out[i] = finite[:steps].max()
    return out


def attention_entropy_collapse(run: RunData, rule: Rule) -> list[Finding]:
    """A layer's mean normalised attention entropy below the threshold and below `relative` x its early level."""
    entropy = run.column("attn_entropy").astype(np.float64)
    low, low_head = run.column("attn_entropy_min"), run.column("attn_entropy_head")
    early = early_level(entropy)
    with np.errstate(invalid="ignore"):
        mask = (np.isfinite(entropy) & (entropy < rule.threshold)
                & (entropy < rule.params["relative"] * early[None, :]))

    def describe(i: int, last: int, first: int) -> str:
        name = run.table.layers[i].name
        return (f"{name}: attention entropy {entropy[last, i]:.2g} of its maximum (mean over heads; lowest "
                f"{_head(low_head[last, i])} at {low[last, i]:.2g}) since step {int(run.steps[first])}, down from "
                f"{early[i]:.2g} early on (threshold {rule.threshold:g}): its heads attend to single keys")

    return _findings(run, rule, entropy, mask, describe)


__all__ = ["attention_logit_growth", "attention_entropy_collapse", "early_level", "EARLY_STEPS"]
