// A run's "Loss" strip: the loss curves the loss rules read, with the findings marked at their steps.
//
// Fed by the /losses route: training curves (blue) and validation curves
// (orange), and marks built from the findings list alone -- a model-level
// finding (a loss spike, a divergence) shades the steps where it holds; each
// kind of layer finding above the least severity (NaN/Inf born in a layer, a
// layer that died) is a dashed line at the first step a layer shows it.  Every
// mark carries its flag word on the chart and as a chip under it (hover a chip
// for the message and what to try), so the loss and what happened to the
// model are read together.  The y axis is logarithmic when a positive loss
// spans more than two decades (a blow-up would flatten a linear one); NaN and
// Inf are magenta ticks at the top edge, as in every chart of the tab.
// A link opens TensorBoard's own Time Series with the curves pinned at the top.
// `RunPanel.addStrip` puts the strip under the panel's banner and ties it to
// the panel's load and dispose.

import {chartAxis} from './chart.js';
import {severityColour} from './colour.js';
import {el} from './dom.js';
import {flagTooltip, fmt, fmtInt, measured, num} from './format.js';
import {Requests} from './requests.js';
import {severityRank} from './state.js';

const ROLE_COLOURS = {training: '#1565c0', validation: '#ef6c00'};
const NAN_COLOUR = '#ff00ff';  // style.css's .swatch.inf
const HEIGHT = 150;            // CSS px
const LABEL_FONT = 'bold 10px sans-serif';

function roleColour(role) { return ROLE_COLOURS[role] || '#455a64'; }

/**
 * TensorBoard's Time Series tab with these loss tags pinned: its `pinnedCards` URL parameter puts them in
 * the Pinned section at the top, above the groups of cards it sorts by tag name (a GPT-2 sweep's thousands of
 * activations/, grads/ and params/ histogram cards come before train/).  Null outside TensorBoard's page.
 */
export function timeSeriesURL(tags) {
  let top;
  if (window.parent === window) return null;  // opened on its own, not in TensorBoard's page
  try { top = window.parent.location; } catch (err) { return null; }  // another origin's page
  const pins = JSON.stringify(tags.map((tag) => ({plugin: 'scalars', tag})));
  return `${top.origin}${top.pathname}?pinnedCards=${encodeURIComponent(pins)}#timeseries`;
}

/** The y scale of the curves: log when every finite value is positive and they span more than two decades. */
function lossScale(series) {
  const finite = series.flatMap((s) => s.values.map(num)).filter(Number.isFinite);
  if (!finite.length) return 'linear';
  const lo = Math.min(...finite); const hi = Math.max(...finite);
  return lo > 0 && hi / lo > 100 ? 'log' : 'linear';
}

/** Draw the curves and marks on `canvas`; returns what hovering needs (the step and value mappings). */
export function drawLoss(canvas, series, marks) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth; const H = HEIGHT;
  if (!W || !series.length) return null;
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = `${H}px`;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, W, H);
  const scale = lossScale(series);
  const axis = chartAxis(series.flatMap((s) => s.values), scale, []);
  const labelRows = 2;
  const pad = {l: 44, r: 8, t: 4 + 13 * labelRows, b: 18};
  const pw = W - pad.l - pad.r; const ph = H - pad.t - pad.b;
  const steps = series.flatMap((s) => s.steps).concat(marks.flatMap((m) => m.spans.flat()));
  const s0 = Math.min(...steps); const s1 = Math.max(s0 + 1, ...steps);
  const X = (s) => pad.l + ((s - s0) / (s1 - s0)) * pw;
  const log = scale === 'log';
  const tlo = axis.tlo === null ? 0 : axis.tlo; const thi = axis.thi === null ? 1 : axis.thi;
  const Y = (v) => {
    const t = log ? Math.log10(Math.max(v, 1e-300)) : v;
    return pad.t + ph - ((t - tlo) / (thi - tlo || 1)) * ph;
  };
  // the stretches where a model-level finding holds, shaded in its severity's colour
  ctx.save();
  ctx.globalAlpha = 0.13;
  for (const m of marks) {
    if (m.where !== 'model' || severityRank(m.severity) <= 0) continue;  // the least severe: line and word only
    ctx.fillStyle = severityColour(m.severity);
    for (const [a, b] of m.spans) ctx.fillRect(X(a), pad.t, Math.max(3, X(b) - X(a)), ph);
  }
  ctx.restore();
  // frame and axis labels
  ctx.strokeStyle = '#bbb'; ctx.lineWidth = 1;
  ctx.strokeRect(pad.l + 0.5, pad.t + 0.5, pw, ph);
  ctx.fillStyle = '#555'; ctx.font = '10px sans-serif'; ctx.textAlign = 'right'; ctx.textBaseline = 'middle';
  if (axis.lo !== null) {
    ctx.fillText(fmt(axis.hi, scale), pad.l - 4, pad.t + 4);
    ctx.fillText(fmt(axis.lo, scale), pad.l - 4, pad.t + ph - 4);
  }
  ctx.textBaseline = 'top';
  ctx.fillText(`step ${fmtInt(s1)}`, pad.l + pw, pad.t + ph + 4);
  ctx.textAlign = 'left'; ctx.fillText(fmtInt(s0), pad.l, pad.t + ph + 4);
  // the curves
  ctx.save();
  ctx.beginPath(); ctx.rect(pad.l, pad.t - 1, pw, ph + 2); ctx.clip();
  for (const s of series) {
    ctx.strokeStyle = roleColour(s.role); ctx.lineWidth = s.role === 'training' ? 1.4 : 1.8;
    ctx.beginPath();
    let pen = false;
    s.values.forEach((raw, i) => {
      const v = num(raw);
      if (!Number.isFinite(v) || (log && v <= 0)) { pen = false; return; }
      if (pen) ctx.lineTo(X(s.steps[i]), Y(v)); else ctx.moveTo(X(s.steps[i]), Y(v));
      pen = true;
    });
    ctx.stroke();
    ctx.fillStyle = NAN_COLOUR;
    s.values.forEach((raw, i) => {
      const v = num(raw);
      if (measured(raw) && !Number.isFinite(v)) ctx.fillRect(X(s.steps[i]) - 1.5, v === -Infinity ? pad.t + ph - 7 : pad.t, 3, 7);
    });
  }
  ctx.restore();
  // marks: a dashed line at each mark's first step, its word above the frame (two rows, so neighbours do not collide)
  const taken = Array.from({length: labelRows}, () => []);
  const drawn = [];
  ctx.font = LABEL_FONT; ctx.textBaseline = 'middle';
  for (const m of marks) {
    const colour = severityColour(m.severity);
    const x = Math.round(X(m.first_step)) + 0.5;
    ctx.save();
    ctx.strokeStyle = colour; ctx.lineWidth = 1.2; ctx.setLineDash([4, 3]);
    ctx.beginPath(); ctx.moveTo(x, pad.t); ctx.lineTo(x, pad.t + ph); ctx.stroke();
    ctx.restore();
    const w = ctx.measureText(m.word).width + 8;
    const left = Math.min(Math.max(pad.l, x - w / 2), pad.l + pw - w);
    let row = taken.findIndex((spans) => spans.every(([a, b]) => left + w + 2 <= a || left >= b + 2));
    if (row < 0) row = labelRows - 1;
    taken[row].push([left, left + w]);
    const y = 3 + row * 13;
    ctx.fillStyle = colour; ctx.fillRect(left, y, w, 12);
    ctx.fillStyle = '#fff'; ctx.textAlign = 'center'; ctx.fillText(m.word, left + w / 2, y + 6.5);
    drawn.push({issue: m.issue, step: m.first_step, x, row});
  }
  canvas.dataset.scale = scale;
  canvas.dataset.marks = JSON.stringify(drawn);
  canvas.dataset.series = JSON.stringify(series.map((s) => s.tag));
  canvas.dataset.yMin = axis.lo === null ? '' : String(axis.lo);
  canvas.dataset.yMax = axis.hi === null ? '' : String(axis.hi);
  return {X, pad, pw, s0, s1};
}

export class LossStrip {
  constructor(run) {
    this.run = run;
    this.requests = new Requests();
    this.body = null;
    this.geom = null;
    this.root = el('div', {class: 'loss-strip', hidden: ''});
    this.root.dataset.run = run;
    this.canvas = el('canvas', {class: 'chart loss-chart'});
    this.tip = el('div', {class: 'tip', hidden: ''});
    this.canvas.addEventListener('mousemove', (e) => this.hover(e));
    this.canvas.addEventListener('mouseleave', () => { this.tip.hidden = true; });
    this.resizing = new ResizeObserver(() => this.draw());
    this.resizing.observe(this.root);
  }

  async load() {
    let body;
    try {
      body = await this.requests.get('losses', 'losses', {run: this.run});
    } catch (err) {
      this.root.hidden = true;  // the panel's banner already says what went wrong with the run
      return;
    }
    if (!body) return;  // a newer load is on its way
    this.body = body;
    this.root.hidden = false;
    const title = el('div', {class: 'section-title'}, 'Loss');
    if (!body.series.length) {
      title.append(el('span', {class: 'muted', text:
        ' · no loss scalar in this run (the loss rules read scalar tags with “loss” in their name, or loss_tags=)'}));
      this.root.replaceChildren(title);
      return;
    }
    const key = el('span', {class: 'loss-key'});
    for (const s of body.series) {
      key.append(el('span', {class: 'series-key'}, el('span', {class: 'swatch line', style: `background:${roleColour(s.role)}`}),
          ` ${s.tag}${s.role === 'validation' ? ' (validation)' : ''}`));
    }
    title.append(key);
    const url = timeSeriesURL(body.series.map((s) => s.tag));
    if (url) {
      title.append(el('a', {class: 'timeseries-link', href: url, target: '_top',
        title: 'TensorBoard\'s Time Series with these curves pinned at the top, above the histogram cards',
        text: 'pinned in Time Series ↗'}));
    }
    const chips = el('div', {class: 'loss-marks'});
    for (const m of body.marks) {
      const where = m.where === 'layers' ? ` in ${m.layers.length === 1 ? m.layers[0] : `${m.layers.length} layers`}` : '';
      const chip = el('span', {class: `flag sev-${m.severity}`, title: flagTooltip(m),
        text: `${m.word}${where} · step ${fmtInt(m.first_step)}`});
      chip.dataset.issue = m.issue;
      chips.append(chip);
    }
    if (!body.marks.length) chips.append(el('span', {class: 'muted', text: 'no finding to mark'}));
    this.root.replaceChildren(title, el('div', {class: 'loss-wrap'}, this.canvas, this.tip), chips);
    this.draw();
  }

  draw() {
    if (this.body && this.body.series.length && !this.root.hidden) {
      this.geom = drawLoss(this.canvas, this.body.series, this.body.marks);
    }
  }

  /** The step under the pointer: each curve's value there, and the marks that hold at it. */
  hover(e) {
    const g = this.geom;
    if (!g) return;
    const rect = this.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left;
    const step = g.s0 + ((x - g.pad.l) / g.pw) * (g.s1 - g.s0);
    if (x < g.pad.l || x > g.pad.l + g.pw) { this.tip.hidden = true; return; }
    const parts = [];
    let at = null;
    for (const s of this.body.series) {
      let best = 0;
      s.steps.forEach((st, i) => { if (Math.abs(st - step) < Math.abs(s.steps[best] - step)) best = i; });
      at = at === null ? s.steps[best] : at;
      parts.push(`${s.tag} ${fmt(s.values[best])}`);
    }
    const near = (g.s1 - g.s0) * 6 / g.pw;  // a few pixels either side of a mark's line
    const holding = this.body.marks.filter((m) => m.spans.some(([a, b]) => step >= a - near && step <= b + near));
    const lines = [`step ${fmtInt(at)} · ${parts.join(' · ')}`, ...holding.map((m) => `${m.word}: ${m.message}`)];
    this.tip.textContent = lines.join('\n');
    this.tip.hidden = false;
    const room = this.canvas.clientWidth - this.tip.offsetWidth;
    this.tip.style.left = `${Math.max(0, Math.min(x + 12, room))}px`;
    this.tip.style.top = `${e.clientY - rect.top + 14}px`;
  }

  dispose() {
    this.requests.abandon();
    this.resizing.disconnect();
  }
}
