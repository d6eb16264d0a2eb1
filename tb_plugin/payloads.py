"""JSON bodies of the plugin's routes, built from a `RunData` and its findings.

Pure functions (no TensorBoard, no HTTP), so each response shape is easy to
test and to read next to ``http_api.md``.  Floats go through `json_values`,
which keeps responses strict JSON when a statistic is NaN or Inf: those become
the strings ``"NaN"``, ``"Infinity"``, ``"-Infinity"`` (as `tbdiag report
--format json` and TensorBoard's own ``json_util`` encode them).

The health tensors store NaN for "not measured" and for a measured NaN alike;
`nan_values` tells them apart (a NaN where the layer counted NaN/Inf in what
the statistic is computed from is a value), and `json_cells` sends the first
as ``null`` and the second as ``"NaN"``.
"""

from __future__ import annotations

import base64
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tbdiag import rules
from tbdiag.contract import schema, statistics
from tbdiag.contract.rundata import RunData, json_number
from tbdiag.rules import evaluator

from .query import BadRequest
from .run_source import RunView
from .threshold_lines import threshold_lines


def json_values(values: np.ndarray) -> list[Any]:
    """A float array as a JSON-safe list (non-finite values as strings).

    Vectorised: only the (usually few) non-finite entries go through Python.
    """
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    out = arr.tolist()
    bad = np.flatnonzero(~np.isfinite(arr))
    if bad.size:
        for i in bad.tolist():
            out[i] = json_number(out[i])
    return out


#: (statistic column, column of the NaN/Inf count of what it is computed from), per `Statistic.nonfinite_count`.
_COUNTED_BY: tuple[tuple[int, int], ...] = tuple(
    (schema.COLUMN_INDEX[s.name], schema.COLUMN_INDEX[s.nonfinite_count])
    for s in statistics.STATISTICS if s.nonfinite_count is not None
)


def nan_values(stats: np.ndarray, applies: np.ndarray | None = None) -> np.ndarray:
    """Which NaN cells of ``stats`` (``[..., columns]``, columns in schema order) are measured NaN values.

    A NaN where the layer counted NaN/Inf in what the statistic is computed
    from (its output for the activation statistics, its gradients, its
    weights) is the value NaN; every other NaN means "not measured".
    ``applies`` (`applicable`, broadcast against ``stats``) leaves out layers a
    statistic is never measured on: a LayerNorm's NaN output has no dead units.
    """
    mask = np.zeros(stats.shape, dtype=bool)
    with np.errstate(invalid="ignore"):
        for c, k in _COUNTED_BY:
            mask[..., c] = np.isnan(stats[..., c]) & (stats[..., k] > 0)
    return mask if applies is None else mask & applies


def applicable(data: RunData) -> np.ndarray:
    """``[layers, columns]``: whether each statistic is measured on each layer at all (`statistics.applies_to`)."""
    out = np.ones((len(data.table.layers), len(schema.COLUMNS)), dtype=bool)
    for c, name in enumerate(schema.COLUMNS):
        st = statistics.statistic(name)
        if st.consumed_by:
            out[:, c] = [statistics.applies_to(st, info.activation) for info in data.table.layers]
    return out


def json_cells(values: np.ndarray, nan_is_value: np.ndarray) -> list[Any]:
    """Statistics as a JSON-safe list: ``null`` where not measured, ``"NaN"`` where measured as NaN."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    out = json_values(arr)
    for i in np.flatnonzero(np.isnan(arr) & ~np.asarray(nan_is_value, dtype=bool).reshape(-1)).tolist():
        out[i] = None
    return out


def step_index(data: RunData, step: int | None) -> int:
    """Index of the latest logged step at or before ``step`` (the last one when None)."""
    if len(data.steps) == 0:
        raise BadRequest(f"run {data.name!r} has no logged steps yet")
    if step is None:
        return len(data.steps) - 1
    i = int(np.searchsorted(data.steps, step, side="right")) - 1
    if i < 0:
        raise BadRequest(f"step {step} is before the run's first logged step {int(data.steps[0])}")
    return i


def layer_index(data: RunData, layer: str) -> int:
    for i, info in enumerate(data.table.layers):
        if info.name == layer:
            return i
    raise BadRequest(f"run {data.name!r} has no layer {layer!r}")


# ---------------------------------------------------------------------- routes


def runs_payload(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    return {"runs": [{"run": name, **info} for name, info in sorted(runs.items())]}


def summary(findings: Sequence[rules.Finding]) -> list[dict[str, Any]]:
    """One entry per finding kind, worst first: what the banner shows.

    A kind's severity is the worst among its findings, counting only findings
    not explained by another (a vanishing gradient caused by a dead layer is
    listed, but ranks as the info it was demoted to).
    """
    by_issue: dict[str, list[rules.Finding]] = {}
    for f in findings:
        by_issue.setdefault(f.issue, []).append(f)
    out = []
    for issue, group in by_issue.items():
        severity = evaluator.worst(group) or "info"
        layers = [f.layer for f in group if f.layer is not None]
        out.append({
            "issue": issue,
            "word": rules.word_of(issue),
            "severity": severity,
            "count": len(group),
            "explained": sum(1 for f in group if f.explained_by),
            "layers": layers,
            "first_step": min(f.first_step for f in group),
        })
    out.sort(key=lambda e: (-rules.SEVERITY_RANK[e["severity"]], -e["count"], e["first_step"], e["issue"]))
    return out


def findings_payload(view: RunView) -> dict[str, Any]:
    data, findings = view.data, view.findings
    counts = Counter(f.severity for f in findings)
    return {
        "run": data.name,
        "findings": [f.to_json() for f in findings],
        "summary": summary(findings),
        "severity_counts": {s: counts.get(s, 0) for s in reversed(rules.SEVERITIES)},
        "worst": evaluator.worst(findings),
        "steps": _steps_info(data),
        "layer_count": len(data.table.layers),
    }


def _steps_info(data: RunData) -> dict[str, Any]:
    n = len(data.steps)
    return {
        "count": n,
        "first": int(data.steps[0]) if n else None,
        "last": int(data.steps[-1]) if n else None,
    }


def _flags_by_layer(findings: Sequence[rules.Finding]) -> dict[str, list[rules.Finding]]:
    out: dict[str, list[rules.Finding]] = {}
    for f in findings:
        if f.layer is not None:
            out.setdefault(f.layer, []).append(f)
    return out


def _flag_json(f: rules.Finding, at_step: int) -> dict[str, Any]:
    out = f.to_json()
    out["word"] = rules.word_of(f.issue)
    out["active"] = f.holds_at(at_step)  # a finding that ended, or has not begun, is no flag at this step
    return out


def _finding_with_spans(f: rules.Finding) -> dict[str, Any]:
    """A finding plus the stretches of logged steps where it holds (what a chart shades)."""
    out = f.to_json()
    out["spans"] = [list(span) for span in (f.spans or ((f.first_step, f.last_step),))]
    return out


def _measured(view: RunView) -> np.ndarray:
    """Which columns hold any measured value in the run (memoised: a full scan of a big run is ~50 MB)."""
    if "measured" not in view.memo:
        stats = view.data.stats
        counted = {c: k for c, k in _COUNTED_BY}
        applies = applicable(view.data)
        measured = []
        for c in range(len(schema.COLUMNS)):
            column = stats[:, :, c]
            seen = bool((~np.isnan(column)).any())
            if not seen and c in counted:
                with np.errstate(invalid="ignore"):
                    seen = bool((stats[:, applies[:, c], counted[c]] > 0).any())
            measured.append(seen)
        view.memo["measured"] = np.array(measured, dtype=bool)
    return view.memo["measured"]


def layers_payload(view: RunView, step: int | None) -> dict[str, Any]:
    """The per-layer health table at one logged step, in model order."""
    data, findings = view.data, view.findings
    t = step_index(data, step)
    at = int(data.steps[t])
    flags = _flags_by_layer(findings)
    stats_now = data.stats[t]  # [layers, columns]
    nan_now = nan_values(stats_now, applicable(data))  # NaN cells that are values, not "not measured"
    has_data = _measured(view)  # columns measured at all in this run
    rows = []
    row_names = {info.name for info in data.table.layers}
    for i, info in enumerate(data.table.layers):
        own = flags.get(info.name, [])
        row_stats = json_cells(stats_now[i], nan_now[i])
        rows.append({
            "index": i,
            "name": info.name,
            "type": info.type,
            "params": info.params,
            "trainable_params": info.trainable_params,
            "activation": info.activation,
            "output_shape": info.output_shape,
            "stats": dict(zip(schema.COLUMNS, row_stats)),
            "flags": [_flag_json(f, at) for f in own],
            "worst": evaluator.worst([f for f in own if f.holds_at(at)]),
        })
    return {
        "run": data.name,
        "step": at,
        "step_index": t,
        "steps": _steps_info(data),
        "key_stats": [c for c in statistics.KEY_STATS if has_data[schema.COLUMN_INDEX[c]]],
        "layers": rows,
        # (a finding on a module that is no row, a transformer block, shows with the model's)
        "model_findings": [f.to_json() for f in findings if f.layer is None or f.layer not in row_names],
    }


def series_payload(
    view: RunView, layer: str, resolved: dict[str, rules.Rule], stats: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Every statistic of one layer over all logged steps, with the threshold lines to draw."""
    data, findings = view.data, view.findings
    i = layer_index(data, layer)
    info = data.table.layers[i]
    names = list(stats) if stats else list(schema.COLUMNS)
    own = data.stats[:, i, :]  # [steps, columns]
    nan = nan_values(own, applicable(data)[i])
    series = {c: json_cells(own[:, schema.COLUMN_INDEX[c]], nan[:, schema.COLUMN_INDEX[c]]) for c in names}
    return {
        "run": data.name,
        "layer": info.name,
        "index": i,
        "type": info.type,
        "steps": data.steps.tolist(),
        "series": series,
        "thresholds": {
            c: [{**line, "values": json_values(line["values"])} if "values" in line else line for line in lines]
            for c, lines in threshold_lines(data, resolved).items() if c in series
        },
        "findings": [_finding_with_spans(f) for f in findings if f.layer == info.name],
    }


def heatmap_payload(view: RunView, stat: str) -> dict[str, Any]:
    """One statistic for every layer x every logged step, as packed float32.

    500 layers x 2,000 steps is a million numbers: as a JSON list that is
    ~20 MB and seconds to encode and parse; packed little-endian float32 in
    base64 it is 5 MB, encoded in milliseconds, and the tab reads it straight
    into a Float32Array.  NaN stays NaN in the array; ``nan_values`` (one
    byte per cell, same shape, ``null`` when there is none) marks the NaN
    cells that are measured NaN values rather than "not measured".
    """
    data, findings = view.data, view.findings
    c = schema.COLUMN_INDEX[stat]
    matrix = np.ascontiguousarray(data.stats[:, :, c].T, dtype="<f4")  # [layers, steps]
    count = dict(_COUNTED_BY).get(c)
    with np.errstate(invalid="ignore"):
        nan_cells = (np.isnan(matrix) & (data.stats[:, :, count].T > 0) & applicable(data)[:, c, None]) \
            if count is not None else np.zeros(matrix.shape, dtype=bool)
    finite = matrix[np.isfinite(matrix)]
    described = statistics.statistic(stat)
    if described.scale == "log":
        finite = finite[finite > 0]
    packed = {
        "shape": list(matrix.shape),
        "values": base64.b64encode(matrix.tobytes()).decode("ascii"),
        "min": json_number(float(finite.min())) if finite.size else None,
        "max": json_number(float(finite.max())) if finite.size else None,
    }
    flags = _flags_by_layer(findings)
    return {
        "run": data.name,
        "stat": stat,
        "label": described.label,
        "scale": described.scale,
        "layers": data.layer_names,
        "steps": data.steps.tolist(),
        "shape": packed["shape"],
        "encoding": "float32-le-base64",
        "values": packed["values"],
        "min": packed["min"],
        "max": packed["max"],
        "nan_values": base64.b64encode(nan_cells.astype(np.uint8).tobytes()).decode("ascii")
        if nan_cells.any() else None,
        "flagged": {name: _heatmap_flag(fs) for name, fs in flags.items()},
    }


def _heatmap_flag(fs: Sequence[rules.Finding]) -> dict[str, Any]:
    """What the heatmap's gutter shows for a flagged layer: its worst finding first (the earliest among equals)."""
    worst = min(fs, key=lambda f: (-rules.SEVERITY_RANK[f.severity], f.first_step))
    return {"worst": worst.severity, "worst_issue": worst.issue, "issues": sorted({f.issue for f in fs}),
            "first_step": min(f.first_step for f in fs)}


def rules_payload(resolved_json: list[dict[str, Any]]) -> dict[str, Any]:
    """The rule table (with overrides applied) and the statistic table: every fact the tab shows about either."""
    return {
        "rules": resolved_json,
        "severities": list(rules.SEVERITIES),
        "statistics": statistics.statistics_json(),
        "key_stats": list(statistics.KEY_STATS),
        "heatmap_default": statistics.DEFAULT_HEATMAP,
    }
