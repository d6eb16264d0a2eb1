// The heatmap: one statistic, layers x every logged step, on a canvas.
//
// The /heatmap route sends the matrix as packed little-endian float32 (NaN
// where there is no number) and a byte mask of the NaN cells that are NaN
// values rather than "not measured"; it is drawn one image pixel per row and
// per bucket of steps, then scaled to the canvas, which is always exactly as
// wide as its panel leaves room for (the panel calls `draw` again when that
// width changes).
//
// On a log scale an exact 0 (a layer with no gradient) is painted black, its own legend entry, and
// the tooltip prints "0": the ramp's minimum would read as "the smallest positive value".
//
// Rows never measured for the statistic (a LayerNorm's dead units) are left
// out and counted in a note.  Every row is tall enough for a label: its name
// inside its block, the block ("h.6") once at the top of the block, and the
// word of its worst flag in a chip of that flag's colour.  Panels showing the
// same statistic share one colour scale unless the user turns that off.
//
// A heatmap given a rule's threshold (`lines`, the Transformer section's) keeps that threshold inside its
// colour range, marks it on the legend bar, and underlines, in the rule's severity colour, every cell past
// it: where a module crossed the limit shows without hovering.

import {colourScale, ramp, severityColour} from './colour.js';
import {el} from './dom.js';
import {count, fmt, fmtInt, num} from './format.js';
import {layerLabels} from './names.js';
import {readsOf, severityRank, state, wordOf} from './state.js';

const ROW_MIN = 11;        // CSS px: the smallest row that still carries a readable label
const ROW_MAX = 16;
const MAX_HEIGHT = 6000;   // CSS px; more rows than fit at ROW_MIN get thinner rows and no labels
const LABEL_FONT = '11px sans-serif';
const GROUP_FONT = 'bold 11px sans-serif';
const CHIP_FONT = 'bold 9px sans-serif';
const NAN_RGB = [255, 0, 255];     // style.css's .swatch.inf: NaN and Inf values
const UNMEASURED_RGB = [225, 225, 225];  // style.css's .swatch.nan: not measured
// style.css's .swatch.zero: exactly 0 on a log scale (a layer with no gradient), which has no place on the
// ramp; black, outside viridis, instead of the ramp's minimum that would pass for "smallest positive"
const ZERO_RGB = [0, 0, 0];

function decodeBytes(text) {
  const bin = atob(text);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return bytes;
}

/** Every heatmap of every ticked panel (its main one, and its Transformer section's). */
function allHeatmaps() {
  return [...state.panels.values()].flatMap((panel) => (panel.heatmaps ? panel.heatmaps() : [panel.heatmap]));
}

/** The colour range every ticked panel showing `heat`'s statistic shares: the widest of theirs. */
export function sharedRange(heat) {
  let lo = num(heat.min); let hi = num(heat.max); let runs = 0;
  const panels = new Set();
  for (const h of allHeatmaps()) {
    const other = h && h.heat;
    if (!other || other.stat !== heat.stat) continue;
    if (!panels.has(other.run)) { panels.add(other.run); runs += 1; }
    const a = num(other.min); const b = num(other.max);
    if (Number.isFinite(a) && !(a >= lo)) lo = a;
    if (Number.isFinite(b) && !(b <= hi)) hi = b;
  }
  return {min: lo, max: hi, runs: Math.max(runs, 1)};
}

let refreshing = false;

/** Draw again, in the next frame, every heatmap whose colour range is no longer the one it was drawn with. */
export function refreshScales() {
  if (refreshing) return;  // six heatmaps arriving one after another: one pass after the last of the frame
  refreshing = true;
  requestAnimationFrame(() => {
    refreshing = false;
    for (const h of allHeatmaps()) {
      if (h && h.heat && h.rangeKey() !== h.drawnRange) h.draw();
    }
  });
}

/** `text` cut with an ellipsis to fit `room` px in the context's current font. */
function fit(ctx, text, room) {
  if (ctx.measureText(text).width <= room) return text;
  let n = text.length;
  while (n > 1 && ctx.measureText(`${text.slice(0, n - 1)}…`).width > room) n -= 1;
  return `${text.slice(0, Math.max(1, n - 1))}…`;
}

export class Heatmap {
  /**
   * `owner` opens a layer's charts (`openLayer(name)`) and knows which one is open (`openName`).
   * `section`: one of a section's heatmaps (the Transformer section's), not the panel's own: classes of its
   * own (`section-heatmap`, `section-heat-canvas`, `section-heat-note`), and no notes on the rows never measured or the shortened
   * names (it shows only attention modules, named in full above it).
   */
  constructor(owner, {section = false} = {}) {
    this.owner = owner;
    this.quiet = section;
    this.lines = [];  // constant threshold lines of the statistic: [{rule, severity, direction, label, value}]
    this.root = el('div', {class: section ? 'section-heatmap' : 'heatmap'});
    this.title = el('div', {class: 'section-title'});
    this.note = el('div', {class: `${section ? 'section-heat-note' : 'heat-note'} muted`, hidden: ''});
    this.canvas = el('canvas', {class: section ? 'section-heat-canvas' : 'heat-canvas'});
    this.legend = el('div', {class: 'legend'});
    this.tip = el('div', {class: 'tip', hidden: ''});
    this.wrap = el('div', {class: 'heat-wrap'}, this.canvas, this.tip);
    this.root.append(this.title, this.note, this.wrap, this.legend);
    this.canvas.addEventListener('mousemove', (e) => this.hover(e));
    this.canvas.addEventListener('mouseleave', () => { this.tip.hidden = true; });
    this.canvas.addEventListener('click', (e) => {
      const hit = this.hit(e);
      if (hit) this.owner.openLayer(hit.layer);
    });
  }

  /** Draw `heat` (a /heatmap answer); `lines`, the rule thresholds to mark (a /transformer heatmap's `lines`). */
  set(heat, lines = []) {
    this.heat = heat;
    this.lines = lines.filter((l) => Number.isFinite(num(l.value)));
    this.matrix = new Float32Array(decodeBytes(heat.values).buffer);
    this.nanValues = heat.nan_values ? decodeBytes(heat.nan_values) : null;
    const [nLayers, nSteps] = heat.shape;
    // a row is measured when some step holds a number or a NaN value; the others are never drawn
    this.measured = new Uint8Array(nLayers);
    for (let r = 0; r < nLayers; r++) {
      for (let s = r * nSteps; s < (r + 1) * nSteps; s++) {
        if (!Number.isNaN(this.matrix[s]) || (this.nanValues && this.nanValues[s])) { this.measured[r] = 1; break; }
      }
    }
    this.labels = layerLabels(heat.layers);
    this.draw();
    refreshScales();  // the other panels' shared colour range may have grown or shrunk
  }

  rows() {
    const heat = this.heat;
    const idx = [];
    for (let i = 0; i < heat.layers.length; i++) {
      if (!this.measured[i]) continue;
      if (!state.onlyFlagged || heat.flagged[heat.layers[i]]) idx.push(i);
    }
    return idx;
  }

  /**
   * The finding a flagged row's chip names: its worst, or, on a heatmap marking a rule's threshold, the
   * finding of a rule that reads this statistic (the max-logit map says "attn logits", not "attn collapse").
   */
  /** A fraction whose rule fires below its threshold (attention entropy): its low end gets the alarming colour. */
  lowIsBad() { return this.heat.scale === 'fraction' && this.lines.some((l) => l.direction === 'below'); }

  chipIssue(flag) {
    if (this.lines.length) {
      const own = flag.issues.find((issue) => readsOf(issue).includes(this.heat.stat));
      if (own) return own;
    }
    return flag.worst_issue || flag.issues[0];
  }

  /** The colour range this heatmap is drawn with now: its own, or the one it shares with the other panels. */
  range() {
    const r = state.sharedScale ? sharedRange(this.heat) : {min: num(this.heat.min), max: num(this.heat.max), runs: 1};
    // a threshold stays on the scale: a healthy run far under it reads as far under it, not as the hottest colour
    for (const l of this.lines) {
      const v = num(l.value);
      if (this.heat.scale === 'log' && !(v > 0)) continue;
      if (!(v >= r.min)) r.min = v;
      if (!(v <= r.max)) r.max = v;
    }
    return r;
  }

  rangeKey() {
    const r = this.range();
    return `${this.heat.stat}:${r.min}:${r.max}:${r.runs}`;
  }

  draw() {
    const heat = this.heat;
    if (!heat) return;
    const rows = this.rows();
    const nSteps = heat.shape[1];
    const unmeasured = heat.layers.length - this.measured.reduce((a, b) => a + b, 0);
    this.title.textContent =
        `${heat.label} — ${count(rows.length, 'layer')} × ${count(nSteps, 'logged step')}` +
        (heat.scale === 'log' ? ' (log scale)' : '');
    const notes = [];
    if (unmeasured && !this.quiet) notes.push(`${fmtInt(unmeasured)} of ${count(heat.layers.length, 'layer')} not shown: never measured for this statistic`);
    if (this.labels.prefix && !this.quiet) notes.push(`names without “${this.labels.prefix}”`);
    this.note.textContent = notes.join(' · ');
    this.note.hidden = !notes.length;
    this.note.dataset.hidden = String(unmeasured);
    const width = Math.floor(this.wrap.clientWidth);
    if (width <= 0) return;  // not laid out yet: the panel draws again once it has a width
    this.drawnWidth = width;
    const dpr = window.devicePixelRatio || 1;
    const c = this.canvas;
    const ctx = c.getContext('2d');
    let rowH = rows.length ? Math.max(ROW_MIN, Math.min(ROW_MAX, Math.floor(420 / rows.length))) : ROW_MAX;
    if (rows.length * rowH > MAX_HEIGHT) rowH = Math.max(1, Math.floor(MAX_HEIGHT / rows.length));
    const labelled = rowH >= 9;
    const labelRows = rows.map((i) => this.labels.rows[i]);
    // the gutter: block names, row names, flag chips; as wide as they need, at most half the canvas
    let gutter = 14; let groupW = 0; let chipW = 0;
    const flagOf = (i) => heat.flagged[heat.layers[i]];
    if (labelled && rows.length) {
      ctx.font = CHIP_FONT;
      for (const i of rows) {
        const flag = flagOf(i);
        if (flag) chipW = Math.max(chipW, ctx.measureText(wordOf(this.chipIssue(flag))).width + 8);
      }
      ctx.font = GROUP_FONT;
      for (const r of labelRows) if (r.group && r.group !== r.label) groupW = Math.max(groupW, ctx.measureText(r.group).width + 6);
      ctx.font = LABEL_FONT;
      let labelW = 0;
      for (const r of labelRows) labelW = Math.max(labelW, ctx.measureText(r.label).width);
      gutter = Math.min(Math.round(width * 0.5), Math.ceil(groupW + labelW + chipW + 12));
    }
    const plotW = Math.max(20, width - gutter - 4);
    const height = Math.max(rowH * rows.length, 16) + 18;
    this.geom = {gutter, plotW, rowH, rows};
    // geometry for tests and for anyone reading pixels: row r spans [r*rowH, (r+1)*rowH) CSS px
    c.dataset.rowHeight = String(rowH); c.dataset.gutter = String(gutter);
    c.dataset.layers = String(rows.length);
    c.width = Math.round(width * dpr); c.height = Math.round(height * dpr);
    c.style.height = `${height}px`;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const range = this.range();
    this.drawnRange = this.rangeKey();
    if (!rows.length) {
      ctx.fillStyle = '#666'; ctx.font = '12px sans-serif'; ctx.textBaseline = 'top';
      ctx.fillText(state.onlyFlagged && unmeasured < heat.layers.length ? 'No flagged layers.'
        : 'No layer has this statistic in this run.', 4, 2);
      c.dataset.labels = '[]';
      this.legend.replaceChildren();
      return;
    }
    // One image pixel per column bucket and per row; scaled by drawImage (no smoothing).
    const cols = Math.max(1, Math.min(nSteps, Math.floor(plotW * dpr)));
    const image = new ImageData(cols, rows.length);
    const cs = colourScale({scale: heat.scale, min: range.min, max: range.max}, this.lowIsBad());
    c.dataset.scaleLo = String(cs.lo); c.dataset.scaleHi = String(cs.hi);
    const data = image.data; const m = this.matrix; const nan = this.nanValues;
    const useMax = heat.scale !== 'log';
    const paint = (o, rgb) => { data[o] = rgb[0]; data[o + 1] = rgb[1]; data[o + 2] = rgb[2]; data[o + 3] = 255; };
    const past = (v) => this.lines.find((l) => (l.direction === 'below' ? v < num(l.value) : v > num(l.value)));
    const marks = [];  // [row, column, line]: cells where some step is past a threshold
    for (let r = 0; r < rows.length; r++) {
      const base = rows[r] * nSteps;
      for (let x = 0; x < cols; x++) {
        const a = Math.floor((x * nSteps) / cols); const b = Math.max(a + 1, Math.floor(((x + 1) * nSteps) / cols));
        let agg = useMax ? -Infinity : 0; let n = 0; let zeros = 0; let nonfinite = false;
        let beyond = null;
        for (let s = a; s < b; s++) {
          const v = m[base + s];
          if (Number.isNaN(v)) { if (nan && nan[base + s]) nonfinite = true; continue; }
          if (this.lines.length && !beyond) beyond = past(v) || null;
          if (!Number.isFinite(v)) { nonfinite = true; continue; }
          if (useMax) { if (v > agg) agg = v; n++; }
          else if (v === 0) zeros++;  // painted as zero only where every value of the column is 0
          else { agg += v > 0 ? Math.log10(v) : -30; n++; }
        }
        const o = 4 * (r * cols + x);
        if (beyond) marks.push([r, x, beyond]);
        if (nonfinite) { paint(o, NAN_RGB); continue; }
        if (!n && zeros) { paint(o, ZERO_RGB); continue; }
        if (!n) { paint(o, UNMEASURED_RGB); continue; }
        paint(o, ramp(cs.stops, cs.map(useMax ? agg : 10 ** (agg / n))));
      }
    }
    const off = document.createElement('canvas');
    off.width = cols; off.height = rows.length;
    off.getContext('2d').putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, gutter, 0, plotW, rowH * rows.length);
    // the cells past a threshold: a bar along the bottom of the row, in the rule's severity colour
    const markH = Math.max(2, Math.round(rowH / 4));
    for (const [r, x, line] of marks) {  // a white hairline above it: it shows on the red end of a ramp too
      const x0 = gutter + (x * plotW) / cols; const w = Math.max(1, plotW / cols);
      ctx.fillStyle = '#fff'; ctx.fillRect(x0, (r + 1) * rowH - markH - 1, w, 1);
      ctx.fillStyle = severityColour(line.severity); ctx.fillRect(x0, (r + 1) * rowH - markH, w, markH);
    }
    c.dataset.pastThreshold = String(marks.length);
    this.drawGutter(ctx, rows, labelRows, {gutter, plotW, rowH, groupW, chipW, labelled});
    // Step axis.
    ctx.fillStyle = '#555'; ctx.font = '11px sans-serif'; ctx.textBaseline = 'top';
    const y = rowH * rows.length + 3;
    ctx.textAlign = 'left'; ctx.fillText(`step ${fmtInt(heat.steps[0])}`, gutter, y);
    ctx.textAlign = 'right'; ctx.fillText(`step ${fmtInt(heat.steps[nSteps - 1])}`, gutter + plotW, y);
    this.drawLegend(cs, cols < nSteps ? Math.ceil(nSteps / cols) : 1, range.runs);
  }

  /** Block names, row names and the worst flag of each row, left of the plot. */
  drawGutter(ctx, rows, labelRows, g) {
    const heat = this.heat;
    const {gutter, plotW, rowH, groupW, chipW, labelled} = g;
    const drawn = [];
    ctx.textBaseline = 'middle';
    for (let r = 0; r < rows.length; r++) {
      const name = heat.layers[rows[r]];
      const flag = heat.flagged[name];
      const top = r * rowH; const mid = top + rowH / 2;
      const lab = labelRows[r];
      const newGroup = lab.group && (r === 0 || labelRows[r - 1].group !== lab.group);
      if (labelled && r > 0 && (newGroup || (!lab.group && labelRows[r - 1].group))) {
        ctx.fillStyle = '#c8c8c8';  // a hairline between blocks, across the gutter
        ctx.fillRect(2, top, gutter - 4, 1);
      }
      const alarming = flag && severityRank(flag.worst) > 0;  // the least severe kind: explained by another finding
      if (!labelled) {
        if (flag) { ctx.fillStyle = severityColour(flag.worst); ctx.fillRect(gutter - 8, top, 6, Math.max(1, rowH - 1)); }
        drawn.push('');
      } else {
        let text = '';
        if (newGroup && lab.group !== lab.label) {
          ctx.font = GROUP_FONT; ctx.textAlign = 'left'; ctx.fillStyle = '#424242';
          ctx.fillText(lab.group, 2, mid);
          text = `${lab.group} `;
        }
        if (flag) {
          const word = wordOf(this.chipIssue(flag));
          const x0 = gutter - chipW; const w = chipW - 3; const h = Math.min(rowH - 2, 13);
          ctx.font = CHIP_FONT; ctx.textAlign = 'center';
          if (alarming) {
            ctx.fillStyle = severityColour(flag.worst); ctx.fillRect(x0, mid - h / 2, w, h);
            ctx.fillStyle = '#fff';
          } else {
            ctx.strokeStyle = '#b0bec5'; ctx.lineWidth = 1; ctx.strokeRect(x0 + 0.5, mid - h / 2 + 0.5, w - 1, h - 1);
            ctx.fillStyle = '#607d8b';
          }
          ctx.fillText(word, x0 + w / 2, mid + 0.5);
        }
        ctx.font = alarming ? `bold ${LABEL_FONT}` : LABEL_FONT;
        ctx.fillStyle = alarming ? severityColour(flag.worst) : '#333';
        ctx.textAlign = 'right';
        const room = gutter - groupW - chipW - 8;
        const label = fit(ctx, lab.label, room);
        ctx.fillText(label, gutter - chipW - 5, mid);
        drawn.push(text + label);
      }
      if (this.owner.openName === name) {
        ctx.strokeStyle = '#000'; ctx.lineWidth = 1.5;
        ctx.strokeRect(gutter + 0.5, top + 0.5, plotW - 1, rowH - 1);
      }
    }
    this.canvas.dataset.labels = JSON.stringify(drawn);
    this.canvas.dataset.rows = JSON.stringify(rows.map((i) => heat.layers[i]));
    this.canvas.dataset.chipWidth = String(chipW);
  }

  drawLegend(cs, perPixel, runs) {
    this.legend.replaceChildren();
    const bar = el('canvas', {class: 'legend-bar', width: 160, height: 10});
    const ctx = bar.getContext('2d');
    for (let x = 0; x < 160; x++) {
      const [R, G, B] = ramp(cs.stops, x / 159);
      ctx.fillStyle = `rgb(${R},${G},${B})`; ctx.fillRect(x, 0, 1, 10);
    }
    const scale = this.heat.scale;
    for (const l of this.lines) {  // the threshold's place on the bar: a tick in its severity colour
      const x = Math.round(Math.min(1, Math.max(0, cs.map(num(l.value)))) * 159);
      ctx.fillStyle = severityColour(l.severity); ctx.fillRect(Math.max(0, x - 1), 0, 3, 10);
    }
    this.legend.append(
        el('span', {text: fmt(cs.lo, scale)}), bar, el('span', {text: fmt(cs.hi, scale)}));
    for (const l of this.lines) {
      const item = el('span', {class: `thr-key sev-${l.severity}`},
          el('span', {class: `thr-swatch sev-${l.severity}`}),
          ` ${l.label} ${l.direction} ${fmt(num(l.value), scale)}: cells past it underlined`);
      item.dataset.rule = l.rule;
      this.legend.append(item);
    }
    if (runs > 1 && scale !== 'fraction') this.legend.append(el('span', {class: 'muted', text: `one scale for ${runs} runs`}));
    if (scale === 'log') this.legend.append(el('span', {class: 'swatch zero'}), el('span', {text: 'exactly 0'}));
    this.legend.append(
        el('span', {class: 'swatch nan'}), el('span', {text: 'not measured'}),
        el('span', {class: 'swatch inf'}), el('span', {text: 'NaN/Inf'}));
    if (perPixel > 1) {
      this.legend.append(el('span', {class: 'muted',
        text: `each pixel column: ${scale === 'log' ? 'geometric mean of the non-zero values' : 'max'} of ${perPixel} steps`}));
    }
    this.legend.append(el('span', {class: 'muted', text: 'click a row for its charts'}));
  }

  hit(e) {
    if (!this.geom || !this.heat) return null;
    const rect = this.canvas.getBoundingClientRect();
    const x = e.clientX - rect.left - this.geom.gutter; const y = e.clientY - rect.top;
    const r = Math.floor(y / this.geom.rowH);
    if (r < 0 || r >= this.geom.rows.length) return null;
    const layerIdx = this.geom.rows[r];
    const nSteps = this.heat.shape[1];
    const s = Math.min(nSteps - 1, Math.max(0, Math.floor((x / this.geom.plotW) * nSteps)));
    const cell = layerIdx * nSteps + s;
    return {layer: this.heat.layers[layerIdx], step: this.heat.steps[s], value: this.matrix[cell],
      nanValue: Boolean(this.nanValues && this.nanValues[cell]), x: e.clientX - rect.left, y};
  }

  hover(e) {
    const hit = this.hit(e);
    if (!hit) { this.tip.hidden = true; return; }
    const flag = this.heat.flagged[hit.layer];
    const value = Number.isNaN(hit.value) && !hit.nanValue ? 'not measured' : fmt(hit.value, this.heat.scale);
    this.tip.textContent = `${hit.layer} · step ${fmtInt(hit.step)} · ${this.heat.label} ${value}` +
        (flag ? ` · ${flag.issues.join(', ')} since step ${fmtInt(flag.first_step)}` : '');
    this.tip.hidden = false;
    // keep the tip inside the canvas: it must never widen the panel
    const room = this.canvas.clientWidth - this.tip.offsetWidth;
    this.tip.style.left = `${Math.max(0, Math.min(hit.x + 12, room))}px`;
    this.tip.style.top = `${hit.y + 14}px`;
  }
}
