"""The health rules: stored statistics in, findings out.

`table` declares every rule once (what it reads, threshold, persistence,
source, advice); `evaluator` runs them; one module per rule family says how
its rules read a run (the transformer families in `transformer/`).  Pure numpy over a `tbdiag.contract.rundata.RunData`: this folder
imports only `tbdiag.contract`, never torch, the training side or the readers.
The names below are the public face (``tbdiag.rules.RULES``, ``tbdiag.rules.evaluate``).
"""

from .evaluator import evaluate, worst
from .table import (
    DIRECTIONS,
    ISSUES,
    RULES,
    RULES_BY_NAME,
    SEVERITIES,
    SEVERITY_RANK,
    Finding,
    Rule,
    ThresholdLine,
    parse_threshold_args,
    resolve,
    rules_json,
    word_of,
)

__all__ = [
    "DIRECTIONS", "ISSUES", "RULES", "RULES_BY_NAME", "SEVERITIES", "SEVERITY_RANK", "Finding", "Rule",
    "ThresholdLine", "evaluate", "parse_threshold_args", "resolve", "rules_json", "word_of", "worst",
]
