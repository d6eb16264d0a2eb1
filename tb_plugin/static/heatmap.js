// The heatmap: one statistic, layers x every logged step, on a canvas.
//
// The /heatmap route sends the matrix as packed little-endian float32; it is
// drawn one image pixel per row and per bucket of steps, then scaled to the
// canvas, which is always exactly as wide as its panel leaves room for (the
// panel calls `draw` again when that width changes).

import {colourScale, ramp, severityColour} from './colour.js';
import {el} from './dom.js';
import {count, fmt, fmtInt} from './format.js';
import {severityRank, state} from './state.js';

function decodeMatrix(heat) {
  const bin = atob(heat.values);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

export class Heatmap {
  /** `owner` opens a layer's charts (`openLayer(name)`) and knows which one is open (`openName`). */
  constructor(owner) {
    this.owner = owner;
    this.root = el('div', {class: 'heatmap'});
    this.title = el('div', {class: 'section-title'});
    this.canvas = el('canvas', {class: 'heat-canvas'});
    this.legend = el('div', {class: 'legend'});
    this.tip = el('div', {class: 'tip', hidden: ''});
    this.wrap = el('div', {class: 'heat-wrap'}, this.canvas, this.tip);
    this.root.append(this.title, this.wrap, this.legend);
    this.canvas.addEventListener('mousemove', (e) => this.hover(e));
    this.canvas.addEventListener('mouseleave', () => { this.tip.hidden = true; });
    this.canvas.addEventListener('click', (e) => {
      const hit = this.hit(e);
      if (hit) this.owner.openLayer(hit.layer);
    });
  }

  set(heat) {
    this.heat = heat;
    this.matrix = decodeMatrix(heat);
    this.draw();
  }

  rows() {
    const heat = this.heat;
    const idx = [];
    for (let i = 0; i < heat.layers.length; i++) {
      if (!state.onlyFlagged || heat.flagged[heat.layers[i]]) idx.push(i);
    }
    return idx;
  }

  draw() {
    const heat = this.heat;
    if (!heat) return;
    const rows = this.rows();
    const nSteps = heat.shape[1];
    this.title.textContent =
        `${heat.label} — ${count(rows.length, 'layer')} × ${count(nSteps, 'logged step')}` +
        (heat.scale === 'log' ? ' (log scale)' : '');
    const width = Math.floor(this.wrap.clientWidth);
    if (width <= 0) return;  // not laid out yet: the panel draws again once it has a width
    this.drawnWidth = width;
    const dpr = window.devicePixelRatio || 1;
    const rowH = rows.length ? Math.max(1, Math.min(16, Math.floor(420 / rows.length))) : 16;
    const gutter = rowH >= 9 ? Math.min(150, Math.round(width * 0.36)) : 14;
    const plotW = Math.max(20, width - gutter - 4);
    const height = Math.max(rowH * rows.length, 16) + 18;
    this.geom = {gutter, plotW, rowH, rows};
    const c = this.canvas;
    // geometry for tests and for anyone reading pixels: row r spans [r*rowH, (r+1)*rowH) CSS px
    c.dataset.rowHeight = String(rowH); c.dataset.gutter = String(gutter);
    c.dataset.layers = String(rows.length);
    c.width = Math.round(width * dpr); c.height = Math.round(height * dpr);
    c.style.height = `${height}px`;
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    if (!rows.length) {
      ctx.fillStyle = '#666'; ctx.font = '12px sans-serif'; ctx.textBaseline = 'top';
      ctx.fillText('No flagged layers.', 4, 2);
      this.legend.replaceChildren();
      return;
    }
    // One image pixel per column bucket and per row; scaled by drawImage (no smoothing).
    const cols = Math.max(1, Math.min(nSteps, Math.floor(plotW * dpr)));
    const image = new ImageData(cols, rows.length);
    const cs = colourScale(heat);
    const data = image.data; const m = this.matrix;
    const useMax = heat.scale !== 'log';
    for (let r = 0; r < rows.length; r++) {
      const base = rows[r] * nSteps;
      for (let x = 0; x < cols; x++) {
        const a = Math.floor((x * nSteps) / cols); const b = Math.max(a + 1, Math.floor(((x + 1) * nSteps) / cols));
        let agg = useMax ? -Infinity : 0; let n = 0; let nonfinite = false;
        for (let s = a; s < b; s++) {
          const v = m[base + s];
          if (Number.isNaN(v)) continue;
          if (!Number.isFinite(v)) { nonfinite = true; continue; }
          if (useMax) { if (v > agg) agg = v; } else { agg += v > 0 ? Math.log10(v) : -30; }
          n++;
        }
        const o = 4 * (r * cols + x);
        if (nonfinite) { data[o] = 255; data[o + 1] = 0; data[o + 2] = 255; data[o + 3] = 255; continue; }
        if (!n) { data[o] = 225; data[o + 1] = 225; data[o + 2] = 225; data[o + 3] = 255; continue; }
        const v = useMax ? agg : 10 ** (agg / n);
        const [R, G, B] = ramp(cs.stops, cs.map(v));
        data[o] = R; data[o + 1] = G; data[o + 2] = B; data[o + 3] = 255;
      }
    }
    const off = document.createElement('canvas');
    off.width = cols; off.height = rows.length;
    off.getContext('2d').putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(off, gutter, 0, plotW, rowH * rows.length);
    // Gutter: a severity mark for flagged layers, and names when rows are tall enough.
    ctx.font = `${Math.min(12, rowH)}px sans-serif`;
    ctx.textBaseline = 'middle';
    const maxChars = Math.max(4, Math.floor((gutter - 14) / 6.5));
    for (let r = 0; r < rows.length; r++) {
      const name = heat.layers[rows[r]];
      const flag = heat.flagged[name];
      if (flag) {
        ctx.fillStyle = severityColour(flag.worst);
        ctx.fillRect(gutter - 8, r * rowH, 6, Math.max(1, rowH - 1));
      }
      if (gutter > 20) {
        // the least severe kind means "explained by another finding": no alarm colour for it
        ctx.fillStyle = flag && severityRank(flag.worst) > 0 ? severityColour(flag.worst) : '#333';
        ctx.textAlign = 'right';
        ctx.fillText(name.length > maxChars ? `${name.slice(0, maxChars - 1)}…` : name, gutter - 12,
            r * rowH + rowH / 2);
      }
      if (this.owner.openName === name) {
        ctx.strokeStyle = '#000'; ctx.lineWidth = 1.5;
        ctx.strokeRect(gutter + 0.5, r * rowH + 0.5, plotW - 1, rowH - 1);
      }
    }
    // Step axis.
    ctx.fillStyle = '#555'; ctx.font = '11px sans-serif'; ctx.textBaseline = 'top';
    const y = rowH * rows.length + 3;
    ctx.textAlign = 'left'; ctx.fillText(`step ${fmtInt(heat.steps[0])}`, gutter, y);
    ctx.textAlign = 'right'; ctx.fillText(`step ${fmtInt(heat.steps[nSteps - 1])}`, gutter + plotW, y);
    this.drawLegend(cs, cols < nSteps ? Math.ceil(nSteps / cols) : 1);
  }

  drawLegend(cs, perPixel) {
    this.legend.replaceChildren();
    const bar = el('canvas', {class: 'legend-bar', width: 160, height: 10});
    const ctx = bar.getContext('2d');
    for (let x = 0; x < 160; x++) {
      const [R, G, B] = ramp(cs.stops, x / 159);
      ctx.fillStyle = `rgb(${R},${G},${B})`; ctx.fillRect(x, 0, 1, 10);
    }
    const scale = this.heat.scale;
    this.legend.append(
        el('span', {text: fmt(cs.lo, scale)}), bar, el('span', {text: fmt(cs.hi, scale)}),
        el('span', {class: 'swatch nan'}), el('span', {text: 'not measured'}),
        el('span', {class: 'swatch inf'}), el('span', {text: 'NaN/Inf'}));
    if (perPixel > 1) {
      this.legend.append(el('span', {class: 'muted',
        text: `each pixel column: ${scale === 'log' ? 'geometric mean' : 'max'} of ${perPixel} steps`}));
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
    return {layer: this.heat.layers[layerIdx], step: this.heat.steps[s],
      value: this.matrix[layerIdx * nSteps + s], x: e.clientX - rect.left, y};
  }

  hover(e) {
    const hit = this.hit(e);
    if (!hit) { this.tip.hidden = true; return; }
    const flag = this.heat.flagged[hit.layer];
    this.tip.textContent = `${hit.layer} · step ${fmtInt(hit.step)} · ${this.heat.label} ${fmt(hit.value, this.heat.scale)}` +
        (flag ? ` · ${flag.issues.join(', ')} since step ${fmtInt(flag.first_step)}` : '');
    this.tip.hidden = false;
    // keep the tip inside the canvas: it must never widen the panel
    const room = this.canvas.clientWidth - this.tip.offsetWidth;
    this.tip.style.left = `${Math.max(0, Math.min(hit.x + 12, room))}px`;
    this.tip.style.top = `${hit.y + 14}px`;
  }
}
