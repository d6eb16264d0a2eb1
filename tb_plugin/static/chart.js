// A drill-down line chart: one statistic of one layer over every logged step.
//
// Drawn on a canvas as wide as its box (CSS width 100%; the panel draws again
// when that changes), with the rules' threshold lines dashed and the steps
// where a finding holds shaded.  Log-scale statistics get a log axis unless
// nothing is positive; zeros sit on its floor.  A `quantity` (a duration, a
// rate) is drawn from zero, so noise around a steady value looks small.

import {severityColour} from './colour.js';
import {fmt, fmtInt, num} from './format.js';

/** `lines`: the /series route's threshold lines of this statistic; `findings`: those whose rule reads it. */
export function drawChart(canvas, steps, values, scale, lines, findings) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth; const H = 130;
  if (!W) return;  // not laid out yet: the panel draws again once it has a width
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = `${H}px`;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const pad = {l: 52, r: 8, t: 8, b: 18};
  const pw = W - pad.l - pad.r; const ph = H - pad.t - pad.b;
  const vals = values.map(num);
  const lineVals = [];
  for (const line of lines) {
    if ('value' in line) lineVals.push(num(line.value));
    else for (const v of line.values) lineVals.push(num(v));
  }
  // a log axis needs something positive; zeros (a dead layer's gradient) sit on its floor
  const positive = (v) => Number.isFinite(v) && v > 0;
  const log = scale === 'log' && (vals.some(positive) || lineVals.some(positive));
  if (scale === 'log' && !log) scale = 'linear';
  const finite = vals.filter((v) => Number.isFinite(v) && (!log || v > 0));
  const all = finite.concat(lineVals.filter((v) => Number.isFinite(v) && (!log || v > 0)));
  let lo = all.length ? Math.min(...all) : 0; let hi = all.length ? Math.max(...all) : 1;
  if (scale === 'fraction') { lo = 0; hi = Math.max(1.08, hi); }
  if (scale === 'quantity') { lo = Math.min(0, lo); hi = Math.max(hi * 1.08, lo + 1e-12); }  // from zero
  const tr = log ? (v) => Math.log10(v) : (v) => v;
  let tlo = tr(lo); let thi = tr(hi);
  if (log && vals.some((v) => v === 0)) tlo -= 1;  // room for the zero row
  if (!log && thi - tlo < 1e-12 && tlo === 0) thi = 1;  // an all-zero series: show 0..1
  if (thi - tlo < 1e-12) { tlo -= log ? 1 : Math.abs(tlo) * 0.1 + 1; thi += log ? 1 : Math.abs(thi) * 0.1 + 1; }
  const s0 = steps[0]; const s1 = steps[steps.length - 1] === s0 ? s0 + 1 : steps[steps.length - 1];
  const X = (s) => pad.l + ((s - s0) / (s1 - s0)) * pw;
  const Y = (v) => {
    const t = log ? (v <= 0 ? tlo : Math.log10(v)) : v;
    return pad.t + ph - ((t - tlo) / (thi - tlo)) * ph;
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
  ctx.fillStyle = '#555'; ctx.font = '10px sans-serif'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  const hasZero = log && vals.some((v) => v === 0);
  const yLabel = (t) => (t === tlo && hasZero ? `0 (≤${fmt(10 ** t)})` : fmt(log ? 10 ** t : t, scale));
  if (scale === 'fraction') {
    ctx.fillText('100%', pad.l - 4, Y(1)); ctx.fillText('0%', pad.l - 4, Y(0));
    ctx.strokeStyle = '#eee'; ctx.beginPath(); ctx.moveTo(pad.l, Y(1)); ctx.lineTo(pad.l + pw, Y(1)); ctx.stroke();
  } else {
    ctx.fillText(yLabel(thi), pad.l - 4, pad.t + 4);
    ctx.fillText(yLabel(tlo), pad.l - 4, pad.t + ph - 4);
  }
  ctx.textBaseline = 'top'; ctx.textAlign = 'left'; ctx.fillText(`${fmtInt(steps[0])}`, pad.l, pad.t + ph + 4);
  ctx.textAlign = 'right'; ctx.fillText(`step ${fmtInt(steps[steps.length - 1])}`, pad.l + pw, pad.t + ph + 4);
  // threshold lines
  ctx.save();
  ctx.setLineDash([5, 4]); ctx.lineWidth = 1.5;
  for (const line of lines) {
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
  if (vals.length === 1 && Number.isFinite(vals[0])) {
    ctx.fillStyle = '#1565c0'; ctx.fillRect(X(steps[0]) - 2, Y(vals[0]) - 2, 4, 4);
  }
}
