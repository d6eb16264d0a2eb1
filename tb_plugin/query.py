"""Query-string parsing for the plugin's routes.

Every route validates its parameters here and raises `BadRequest` with a
sentence a person can act on; the plugin turns it into a 400 response with a
JSON body ``{"error": ...}``.  Nothing a client sends can turn into a 500.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from tbdiag import rules
from tbdiag.contract import schema

#: Query parameter that overrides a rule's threshold: ``threshold=dead_relu=0.7``
#: (repeatable), the same ``RULE[.param]=NUMBER`` syntax as ``tbdiag report --threshold``.
THRESHOLD_PARAM = "threshold"


class BadRequest(ValueError):
    """A request parameter is missing or invalid (HTTP 400)."""


def required(args: Mapping[str, str], name: str) -> str:
    value = args.get(name)
    if value is None or value == "":
        raise BadRequest(f"missing required query parameter {name!r}")
    return value


def optional_int(args: Mapping[str, str], name: str) -> int | None:
    value = args.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise BadRequest(f"query parameter {name!r} must be an integer, got {value!r}") from None


def statistic(args: Mapping[str, str], name: str = "stat") -> str:
    value = required(args, name)
    if value not in schema.COLUMN_INDEX:
        raise BadRequest(f"unknown statistic {value!r}; statistics are: {', '.join(schema.COLUMNS)}")
    return value


def thresholds(args) -> dict[str, float]:
    """Threshold overrides from repeated ``threshold=RULE[.param]=NUMBER`` parameters.

    ``args`` is a werkzeug ``MultiDict`` (``getlist``) or a plain mapping.
    Validated by `tbdiag.rules.resolve`, so a typo is a 400 naming the valid
    settings instead of a silently ignored override.
    """
    if hasattr(args, "getlist"):
        items = args.getlist(THRESHOLD_PARAM)
    else:
        items = [args[THRESHOLD_PARAM]] if THRESHOLD_PARAM in args else []
    try:
        parsed = rules.parse_threshold_args(items)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    for key, value in parsed.items():
        if not math.isfinite(value):
            raise BadRequest(f"threshold {key!r} must be a finite number, got {value!r}")
    return parsed
