"""The ``tbdiag`` command: ``tbdiag report LOGDIR`` and ``tbdiag rules``."""

from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from . import rules
from .read.reader import NoDataError, load_logdir
from .read.report import findings_for, render_json, render_text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tbdiag", description="Training diagnostics for PyTorch on TensorBoard.")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="apply the health rules to every run under LOGDIR")
    rep.add_argument("logdir", metavar="LOGDIR")
    rep.add_argument("--format", choices=("text", "json"), default="text")
    rep.add_argument("--fail-on", choices=("warning", "error"), default=None,
                     help="exit 1 when a finding at or above this severity exists")
    rep.add_argument("--threshold", action="append", default=[], metavar="RULE[.PARAM]=VALUE",
                     help="override a rule threshold, e.g. dead_relu=0.7 (repeatable; see `tbdiag rules`)")
    rep.add_argument("--loss-tag", action="append", default=None, metavar="TAG",
                     help="scalar tag to read as a loss (repeatable; default: tags containing 'loss')")
    sub.add_parser("rules", help="print the rule table: statistic, threshold, persistence, source, advice")
    return parser


def _print_rules() -> None:
    for rule in rules.RULES:
        print(f"{rule.name}  [{rule.severity}]  threshold {rule.threshold:g}, {rule.persistence} logging step(s)")
        for key, value in rule.params.items():
            print(f"    {rule.name}.{key} = {value:g}")
        print(f"    flag:     {rule.word}")
        print(f"    measures: {rule.statistic}")
        if rule.reads:
            print(f"    reads:    {', '.join(rule.reads)}")
        for line in rule.lines:
            setting = rule.setting(line.setting)
            limit = f"{setting:g} x the largest layer's" if line.relative_to_largest else f"{setting:g}"
            print(f"    line:     {line.statistic} {line.direction} {limit}  ({line.label.format(value=setting)})")
        print(f"    why:      {rule.why}")
        print(f"    source:   {rule.source}")
        print(f"    try:      {rule.advice}")
        print()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "rules":
        _print_rules()
        return 0
    try:
        thresholds = rules.parse_threshold_args(args.threshold)
    except ValueError as e:
        print(f"tbdiag report: {e}", file=sys.stderr)
        return 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            runs = load_logdir(args.logdir, loss_tags=args.loss_tag)
        except NoDataError as e:
            print(f"tbdiag report: {e}", file=sys.stderr)
            return 2
    for w in caught:
        print(f"warning: {w.message}", file=sys.stderr)
    findings = findings_for(runs, thresholds)
    print(render_json(findings) if args.format == "json" else render_text(findings, runs_checked=len(runs)))
    if args.fail_on is not None:
        floor = rules.SEVERITY_RANK[args.fail_on]
        if any(rules.SEVERITY_RANK[f.severity] >= floor for f in findings):
            return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
