"""How the rules about mistakes in the training loop (`tbdiag.rules`) are checked: pure numpy.

``no_gradient`` reads the per-layer ``grad_params`` and ``grad_norm`` with the layer
table's ``trainable_params`` and ``in_optimizer``; the other three read model-level
series that `tbdiag.watch.loop_watch` measures (``eval_mode_steps``,
``stale_gradients``, ``softmax_output``).
"""

from __future__ import annotations

import numpy as np

from ..contract.rundata import RunData
from .series import persistent
from .table import Finding, Rule


def no_gradient(run: RunData, rule: Rule) -> list[Finding]:
    """Trainable parameters in the optimizer that get no gradient signal, logging step after logging step.

    No signal is either no gradient at all (``.grad`` None: ``grad_params``
    at or below the threshold) or gradients that are all exactly zero
    (``grad_norm`` 0: a dead layer, a fully masked attention, a product with
    zero), whatever the optimizer.  Only layers the optimizer holds
    (``in_optimizer`` True): a layer left out of it (a teacher or EMA copy
    used under ``no_grad``) is not meant to train, and without an optimizer
    nothing says which layers are.  A layer that ran in the training forward
    (its output was measured) was cut off the graph, or its gradient is
    zeroed on the way back: a warning (`tbdiag.rules.layer.explain` makes
    the zero gradients of a dead layer and of the layers feeding it info).
    One that never ran (a pooler the task head does not use, a branch skipped
    in training) is reported as info.
    """
    grads = run.column("grad_params").astype(np.float64)
    norms = run.column("grad_norm").astype(np.float64)
    ran = np.isfinite(run.column("act_mean"))
    out = []
    for i, info in enumerate(run.table.layers):
        if info.trainable_params <= 0 or info.in_optimizer is not True:
            continue
        valid = np.isfinite(grads[:, i])
        none = valid & (grads[:, i] <= rule.threshold)
        zero = valid & ~none & (norms[:, i] == 0)  # (NaN norms compare unequal)
        spans = persistent(none | zero, valid, rule.persistence)
        if not spans:
            continue
        first, last = spans[0][0], spans[-1][1] - 1
        since = int(run.steps[first])
        in_forward = any(ran[a:b, i].any() for a, b in spans)
        if in_forward and zero[last]:
            message = (f"{info.name}: trainable and in the optimizer, and its parameters get gradients, but they "
                       f"have all been exactly zero since step {since}: no gradient signal reaches it (a layer "
                       "whose units never fire after it, a fully masked attention, a product with zero, or a "
                       "graph cut behind zero_grad(set_to_none=False))")
        elif in_forward:
            message = (f"{info.name}: trainable and in the optimizer, but none of its parameters has received a "
                       f"gradient since step {since}, although it runs in the forward: the graph is cut between it "
                       "and the loss (torch.no_grad(), .detach(), .data, a round trip through numpy or .item())")
        else:
            message = (f"{info.name}: trainable and in the optimizer, but it never ran in a training forward since "
                       f"step {since}, so it gets no gradient (an unused module, e.g. a pooler the task head does "
                       "not use, or a branch only evaluation takes)")
        out.append(Finding(
            run=run.name, layer=info.name, issue=rule.name, severity=rule.severity if in_forward else "info",
            first_step=since, last_step=int(run.steps[last]),
            value=float(norms[last, i] if zero[last] else grads[last, i]), message=message,
            threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
            ongoing=last == len(run.steps) - 1,
            spans=tuple((int(run.steps[a]), int(run.steps[b - 1])) for a, b in spans),
        ))
    return out


def model_finding(run: RunData, rule: Rule, name: str, fires: np.ndarray, value: float | None,
                   describe) -> list[Finding]:
    """One model-level finding from a model series and where it fires (persistent streaks only)."""
    steps, values = run.model_series(name)
    if steps.size == 0:
        return []
    spans = persistent(fires, np.isfinite(values), rule.persistence)
    if not spans:
        return []
    first, last = spans[0][0], spans[-1][1] - 1
    last_logged = int(run.steps[-1]) if len(run.steps) else int(steps[-1])
    return [Finding(
        run=run.name, layer=None, issue=rule.name, severity=rule.severity,
        first_step=int(steps[first]), last_step=int(steps[last]),
        value=float(values[last]) if value is None else value,
        message=describe(int(steps[first]), int(steps[last])),
        threshold=rule.threshold, statistic=rule.statistic, advice=rule.advice,
        ongoing=int(steps[last]) >= last_logged,
        spans=tuple((int(steps[a]), int(steps[b - 1])) for a, b in spans),
    )]


def eval_mode_training(run: RunData, rule: Rule) -> list[Finding]:
    """Optimizer steps taken while the model was in eval() mode (counted between logging steps)."""
    _, values = run.model_series("eval_mode_steps")
    fires = values > rule.threshold
    total = float(values[fires].sum())
    return model_finding(
        run, rule, "eval_mode_steps", fires, total,
        lambda since, until: f"{total:.0f} optimizer steps were taken with the model in eval() mode, from step "
        f"{since} to step {until}: dropout is off and BatchNorm uses (and no longer updates) its running "
        "statistics, and tbdiag measures nothing in those steps")


def stale_gradients(run: RunData, rule: Rule) -> list[Finding]:
    """Gradients left in place from one optimizer step to the next (zero_grad missing)."""
    _, values = run.model_series("stale_gradients")
    fires = values >= rule.threshold
    return model_finding(
        run, rule, "stale_gradients", fires, None,
        lambda since, until: f"the gradients of one optimizer step were still there when the next backward "
        f"began (checked at logging steps {since} to {until}): each step adds to the sum of all earlier "
        "gradients; zero_grad() is missing or in the wrong place")


def softmax_output(run: RunData, rule: Rule) -> list[Finding]:
    """The model outputs probabilities (rows summing to 1) where a classification loss expects logits."""
    _, values = run.model_series("softmax_output")
    fires = values >= rule.threshold
    return model_finding(
        run, rule, "softmax_output", fires, None,
        lambda since, until: f"the model's output rows are non-negative and sum to 1 (a softmax) at logging "
        f"steps {since} to {until}: CrossEntropyLoss applies log_softmax itself, so a softmax before it squashes "
        "the logits twice and the loss stalls above its floor")


def zero_gradient(run: RunData, finding: Finding) -> bool:
    """Whether a ``no_gradient`` finding is of gradients that are exactly zero (at its last step), not absent."""
    if finding.layer not in run.layer_names:
        return False
    at = int(np.searchsorted(run.steps, finding.last_step))
    grads = run.column("grad_params")[:, run.layer_names.index(finding.layer)]
    return at < len(grads) and bool(grads[at] > 0)


__all__ = ["no_gradient", "zero_gradient", "model_finding", "eval_mode_training", "stale_gradients",
           "softmax_output"]
