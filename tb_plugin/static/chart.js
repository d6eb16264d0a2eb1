// A drill-down line chart: one statistic of one layer over every logged step.
//
// Drawn on a canvas as wide as its box (CSS width 100%; the panel draws again
// when that changes), with the rules' threshold lines dashed and the steps
// where a finding holds shaded.
//
// The y axis follows the data.  A threshold line is drawn when it lies inside
// the data's range or near it (the axis then stretches to include it); one far
// away is left out and reported by `chartAxis` so the legend can say "above
// the range" -- an exploding-gradient limit of 10 must not flatten gradients of
// 1e-3 into a line on the floor.  A range never spans less than a tenth of the
// values' size (a fifth of a decade on a log axis): a drift of 0.3% is drawn
// as the near-flat line it is, and the axis labels carry enough digits to
// differ.  Log-scale statistics get a log axis; exact zeros (a dead layer's
// gradient) lie on a band at its bottom edge labelled "0".  A `quantity`
// (a duration, a rate) is drawn from zero; a `fraction` from 0% to 100%.
// NaN and Inf values are magenta ticks at the top edge (-Inf at the bottom).

import {severityColour} from './colour.js';
import {fmt, fmtInt, measured, num} from './format.js';

const NAN_COLOUR = '#ff00ff';  // style.css's .swatch.inf
const NEAR = 0.5;              // a line within half the data's span of it is drawn
const MIN_SPAN_LOG = 0.2;      // decades
const MIN_SPAN_LINEAR = 0.1;   // of the largest absolute value

function lineValues(line) {
  return 'value' in line ? [num(line.value)] : line.values.map(num);
}

/**
 * The y axis of a chart of `values` (API values: numbers, "NaN"/"Infinity" strings, null when not measured)
 * on `scale`, with the threshold `lines` near enough to draw: `{log, lo, hi, zeroBand, lines: [{line, drawn,
 * where}], notFinite, allZero}`.  `lo`/`hi` are in data units (the log axis's floor and top when `log`).
 */
export function chartAxis(values, scale, lines) {
  const vals = values.map(num);
  const finite = vals.filter((v) => Number.isFinite(v));
  const notFinite = values.filter((v, i) => measured(v) && !Number.isFinite(vals[i])).length;
  const log = scale === 'log';
  const tr = log ? Math.log10 : (v) => v;
  const inDomain = (v) => Number.isFinite(v) && (!log || v > 0);
  const data = finite.filter(inDomain);
  const zeroBand = log && finite.some((v) => v <= 0);
  const allZero = log && !data.length && finite.length > 0;
  let a; let b;
  if (scale === 'fraction') { a = 0; b = Math.max(1.08, ...data); }
  else if (data.length) { a = tr(Math.min(...data)); b = tr(Math.max(...data)); }
  else { a = null; b = null; }
  if (scale === 'quantity' && a !== null) { a = Math.min(0, a); b = Math.max(b * 1.08, a + 1e-12); }
  // the smallest span: a drift much smaller than the values themselves stays a drift
  if (a !== null && scale !== 'fraction' && scale !== 'quantity') {
    const least = log ? MIN_SPAN_LOG : MIN_SPAN_LINEAR * Math.max(Math.abs(a), Math.abs(b));
    if (b - a < least || b === a) {
      const mid = (a + b) / 2;
      const half = (least > 0 ? least : 1) / 2;  // all exactly 0 on a linear axis: 0 to 1
      [a, b] = a === 0 && b === 0 && !log ? [0, 2 * half] : [mid - half, mid + half];
    }
  }
  // threshold lines: inside or near the data's range are drawn (and stretch it), the others only noted
  const out = [];
  const [da, db] = [a, b];
  for (const line of lines) {
    const tv = lineValues(line).filter(inDomain).map(tr);
    if (!tv.length || da === null) {  // nothing to place it against, or no value it could take on this axis
      out.push({line, drawn: false, where: allZero && tv.length ? 'above' : 'off the scale'});
      continue;
    }
    const reach = NEAR * (db - da);
    const near = tv.filter((t) => t >= da - reach && t <= db + reach);
    if (near.length) {
      a = Math.min(a, ...near); b = Math.max(b, ...near);
      out.push({line, drawn: true, where: 'inside'});
    } else {
      out.push({line, drawn: false, where: Math.min(...tv) > db ? 'above' : 'below'});
    }
  }
  if (a !== null && scale !== 'fraction') {  // a little room above and below the data
    const pad = 0.04 * (b - a);
    if (!(scale === 'quantity' && a === 0)) a -= pad;
    b += pad;
    // a count or a norm that is never negative gets no negative axis
    const drawnValues = out.filter((l) => l.drawn).flatMap((l) => lineValues(l.line)).filter(Number.isFinite);
    if (!log && a < 0 && data.every((v) => v >= 0) && drawnValues.every((v) => v >= 0)) a = 0;
  }
  const back = log ? (t) => 10 ** t : (t) => t;
  return {log, scale, lo: a === null ? null : back(a), hi: b === null ? null : back(b), tlo: a, thi: b,
    zeroBand, allZero, lines: out, notFinite};
}

/** Enough significant digits for the labels of `values` to differ from each other (3 to 7). */
function labelDigits(values, scale) {
  for (let d = 3; d < 7; d++) {
    const texts = values.map((v) => fmt(v, scale, d));
    if (new Set(texts).size === texts.length) return d;
  }
  return 7;
}

/**
 * `lines`: the threshold lines of this statistic; `findings`: those whose rule reads it; `size`: `{height,
 * left}` in CSS px (the chart's height, the room for the y labels).  Returns `chartAxis`.
 */
export function drawChart(canvas, steps, values, scale, lines, findings, size = {}) {
  const axis = chartAxis(values, scale, lines);
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth; const H = size.height || 130;
  if (!W) return axis;  // not laid out yet: the panel draws again once it has a width
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = `${H}px`;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const pad = {l: size.left || 52, r: 8, t: 8, b: 18};
  const pw = W - pad.l - pad.r; const ph = H - pad.t - pad.b;
  const vals = values.map(num);
  const band = axis.zeroBand ? 12 : 0;  // px at the bottom for exact zeros on a log axis
  const {log} = axis;
  let tlo = axis.tlo; let thi = axis.thi;
  if (tlo === null) { tlo = 0; thi = 1; }
  const s0 = steps[0]; const s1 = steps[steps.length - 1] === s0 ? s0 + 1 : steps[steps.length - 1];
  const X = (s) => pad.l + ((s - s0) / (s1 - s0)) * pw;
  const top = pad.t; const floor = pad.t + ph - band;  // the range [tlo, thi] spans top..floor
  const Y = (v) => {
    if (log && v <= 0) return pad.t + ph;  // the zero band's line: the bottom edge
    if (axis.allZero) return pad.t + ph;
    const t = log ? Math.log10(v) : v;
    return floor - ((t - tlo) / (thi - tlo)) * (floor - top);
  };
  ctx.clearRect(0, 0, W, H);
  // the steps where a finding holds, shaded in its severity's colour
  ctx.save();
  ctx.globalAlpha = 0.1;
  for (const f of findings) {
    ctx.fillStyle = severityColour(f.severity);
    for (const [first, last] of f.spans || [[f.first_step, f.last_step]]) {
      const a = X(Math.max(s0, first)); const b = X(Math.min(s1, last));
      ctx.fillRect(a, pad.t, Math.max(2, b - a), ph);
    }
  }
  ctx.restore();
  // axes
  ctx.strokeStyle = '#bbb'; ctx.lineWidth = 1;
  ctx.strokeRect(pad.l + 0.5, pad.t + 0.5, pw, ph);
  if (band && !axis.allZero) {
    ctx.save(); ctx.setLineDash([2, 3]); ctx.strokeStyle = '#ccc';
    ctx.beginPath(); ctx.moveTo(pad.l, floor + 0.5); ctx.lineTo(pad.l + pw, floor + 0.5); ctx.stroke();
    ctx.restore();
  }
  ctx.fillStyle = '#555'; ctx.font = '10px sans-serif'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  const labels = [];
  if (axis.scale === 'fraction') {
    labels.push(['100%', Y(1)], ['0%', Y(0)]);
    ctx.strokeStyle = '#eee'; ctx.beginPath(); ctx.moveTo(pad.l, Y(1)); ctx.lineTo(pad.l + pw, Y(1)); ctx.stroke();
  } else if (axis.allZero) {
    labels.push(['0', pad.t + ph - 3]);
  } else if (axis.tlo !== null) {
    const ends = [axis.hi, axis.lo];
    const digits = labelDigits(ends, axis.scale);
    labels.push([fmt(axis.hi, axis.scale, digits), top + 4], [fmt(axis.lo, axis.scale, digits), floor - (band ? 0 : 4)]);
    if (band) labels.push(['0', pad.t + ph - 3]);
  }
  for (const [text, y] of labels) ctx.fillText(text, pad.l - 4, y);
  canvas.dataset.yLabels = JSON.stringify(labels.map(([text]) => text));
  const first = `${fmtInt(steps[0])}`; const last = `step ${fmtInt(steps[steps.length - 1])}`;
  ctx.textBaseline = 'top'; ctx.textAlign = 'right'; ctx.fillText(last, pad.l + pw, pad.t + ph + 4);
  if (ctx.measureText(first).width + ctx.measureText(last).width + 6 <= pw) {  // a narrow chart keeps only the last
    ctx.textAlign = 'left'; ctx.fillText(first, pad.l, pad.t + ph + 4);
  }
  // threshold lines near the data (a line moving with the data may leave the range: cut at the frame)
  ctx.save();
  ctx.beginPath(); ctx.rect(pad.l, pad.t - 1, pw, ph + 2); ctx.clip();
  ctx.setLineDash([5, 4]); ctx.lineWidth = 1.5;
  for (const {line, drawn} of axis.lines) {
    if (!drawn || axis.allZero) continue;
    ctx.strokeStyle = severityColour(line.severity);
    ctx.beginPath();
    if ('value' in line) {
      const y = Y(num(line.value));
      ctx.moveTo(pad.l, y); ctx.lineTo(pad.l + pw, y);
    } else {
      let pen = false;
      line.values.forEach((v, i) => {
        v = num(v);
        if (!Number.isFinite(v) || (log && v <= 0)) { pen = false; return; }
        if (pen) ctx.lineTo(X(steps[i]), Y(v)); else ctx.moveTo(X(steps[i]), Y(v));
        pen = true;
      });
    }
    ctx.stroke();
  }
  ctx.restore();
  // the series
  ctx.save();
  ctx.beginPath(); ctx.rect(pad.l, pad.t - 1, pw, ph + 2); ctx.clip();
  ctx.strokeStyle = '#1565c0'; ctx.lineWidth = 1.6; ctx.beginPath();
  let pen = false;
  const stride = Math.max(1, Math.floor(vals.length / (pw * 2)));
  for (let i = 0; i < vals.length; i += stride) {
    const v = vals[i];
    if (!Number.isFinite(v)) { pen = false; continue; }
    if (pen) ctx.lineTo(X(steps[i]), Y(v)); else ctx.moveTo(X(steps[i]), Y(v));
    pen = true;
  }
  ctx.stroke();
  const lone = vals.filter((v) => Number.isFinite(v)).length === 1;
  ctx.fillStyle = '#1565c0';
  vals.forEach((v, i) => { if (lone && Number.isFinite(v)) ctx.fillRect(X(steps[i]) - 2, Y(v) - 2, 4, 4); });
  // NaN and Inf: magenta ticks at the edge they went over
  ctx.fillStyle = NAN_COLOUR;
  values.forEach((raw, i) => {
    const v = vals[i];
    if (!measured(raw) || Number.isFinite(v)) return;
    const x = X(steps[i]);
    if (v === -Infinity) ctx.fillRect(x - 1.5, pad.t + ph - 7, 3, 7);
    else ctx.fillRect(x - 1.5, pad.t, 3, 7);
  });
  ctx.restore();
  // for tests and for anyone reading pixels: the axis in data units, and what was drawn
  canvas.dataset.yMin = axis.lo === null ? '' : String(axis.lo);
  canvas.dataset.yMax = axis.hi === null ? '' : String(axis.hi);
  canvas.dataset.thresholdLines = String(axis.lines.filter((l) => l.drawn && !axis.allZero).length);
  canvas.dataset.thresholdsOffScale = String(axis.lines.filter((l) => !l.drawn || axis.allZero).length);
  canvas.dataset.zeroBand = String(axis.zeroBand);
  canvas.dataset.notFinite = String(axis.notFinite);
  return axis;
}
