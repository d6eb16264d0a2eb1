"""The README's rule table says what `tbdiag.rules.RULES` does: names, flag words, severities, thresholds.

The table is written for people (percentages, a secondary setting after a
semicolon), so it is parsed the way a person reads it; a rule added, renamed
or re-tuned in code without the README (or the other way round) fails here.
"""

from __future__ import annotations

import math
import os
import re

import pytest

from tbdiag import rules

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
HEADING = "## The rules and what each flag means"
COLUMNS = ["flag", "finding", "severity", "threshold", "in a row", "fires when", "what to try"]


def _number(text: str) -> float:
    """``50%`` -> 0.5, ``1e-7`` -> 1e-7, ``10`` -> 10."""
    text = text.strip()
    return float(text[:-1]) / 100 if text.endswith("%") else float(text)


def _plain(cell: str) -> str:
    return cell.strip().replace("**", "").replace("`", "")


def readme_rules() -> dict[str, dict]:
    """The rule table under HEADING, one dict per row, keyed by finding name."""
    with open(README, encoding="utf-8") as f:
        text = f.read()
    section = text[text.index(HEADING):].splitlines()
    start = next(i for i, line in enumerate(section) if line.startswith("|"))
    lines = []
    for line in section[start:]:  # the first table under the heading, up to its last row
        if not line.startswith("|"):
            break
        lines.append(line)
    header = [_plain(c) for c in lines[0].strip("|").split("|")]
    assert header == COLUMNS, header
    rows = {}
    for line in lines[2:]:
        cells = dict(zip(COLUMNS, (c.strip() for c in line.strip().strip("|").split("|"))))
        main, *extra = cells["threshold"].split(";")
        params = {}
        for part in extra:
            m = re.fullmatch(r"\s*`(\w+)`\s+(\S+)\s*", part)
            assert m, f"a setting after ';' reads `name` value, got {part!r}"
            params[m.group(1)] = _number(m.group(2))
        rows[_plain(cells["finding"])] = {
            "word": _plain(cells["flag"]), "severity": _plain(cells["severity"]), "threshold": _number(main),
            "params": params, "persistence": int(cells["in a row"]),
        }
    return rows


def test_readme_lists_every_rule_and_no_other():
    assert list(readme_rules()) == [rule.name for rule in rules.RULES]


@pytest.mark.parametrize("rule", rules.RULES, ids=lambda r: r.name)
def test_readme_row_matches_the_rule(rule):
    row = readme_rules()[rule.name]
    assert row["word"] == rule.word
    assert row["severity"] == rule.severity
    assert math.isclose(row["threshold"], rule.threshold, rel_tol=1e-9, abs_tol=0.0), (row, rule.threshold)
    assert row["params"].keys() == rule.params.keys()
    for key, value in rule.params.items():
        assert math.isclose(row["params"][key], value, rel_tol=1e-9), (key, row["params"][key], value)
    assert row["persistence"] == rule.persistence
