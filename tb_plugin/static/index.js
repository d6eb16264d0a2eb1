// The Diagnostics tab: per-layer training health for tbdiag runs.
//
// A plain ES module that TensorBoard loads into the plugin's iframe and calls
// `render()` on.  It fetches the JSON routes documented in ../http_api.md
// (relative URLs: the iframe's <base> is /data/plugin/tbdiag/), and draws the
// heatmap and the drill-down charts on <canvas> itself -- no framework, no
// build step, no CDN (TensorBoard's CSP allows only same-origin scripts).
//
// Every name that comes from a run (run names, layer names) is set with
// textContent, a title attribute, or canvas fillText: never parsed as HTML.

const SEVERITY_RANK = {info: 0, warning: 1, error: 2};
const SEVERITY_COLOR = {error: '#b71c1c', warning: '#e53935', info: '#607d8b'};
// Which statistic shows a finding kind best, for the heatmap's default.
const ISSUE_STAT = {
  dead_relu: 'dead_frac', saturated_activation: 'saturated_frac', vanishing_gradient: 'grad_rms',
  exploding_gradient: 'grad_rms', nonfinite: 'grad_nonfinite', frozen_layer: 'changed',
};
// Table headers: short, with the full label as the tooltip.
const SHORT_HEADERS = {grad_rms: 'grad RMS', update_ratio: 'update / weight', dead_frac: 'dead units',
  saturated_frac: 'saturated', act_std: 'act std', act_mean: 'act mean', grad_norm: 'grad norm',
  weight_norm: 'weight norm'};
const CHART_STATS = ['dead_frac', 'saturated_frac', 'grad_rms', 'update_ratio', 'act_std', 'act_mean',
  'weight_norm', 'act_nonfinite', 'grad_nonfinite', 'weight_nonfinite', 'changed'];

const state = {
  meta: null,          // /rules payload: rules, words, columns
  runs: [],            // [{run, last_step, ..., findings}]
  selected: [],        // run names shown side by side
  stat: null,          // heatmap statistic
  onlyFlagged: false,
  thresholds: {},      // rule name -> overridden threshold
  panels: new Map(),   // run -> panel object
};

// ---------------------------------------------------------------- helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else if (key === 'title') node.title = value;
    else if (key.startsWith('on')) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function num(v) {  // JSON numbers plus the strings the API uses for non-finite values
  if (typeof v === 'number') return v;
  if (v === 'NaN') return NaN;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return NaN;
}

function fmt(v, scale) {
  v = num(v);
  if (Number.isNaN(v)) return '–';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  if (scale === 'fraction') return `${(100 * v).toFixed(v > 0 && v < 0.01 ? 1 : 0)}%`;
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(1);
  return v.toPrecision(3);
}

function fmtInt(n) { return Number(n).toLocaleString('en-US'); }

function thresholdQuery() {
  return Object.entries(state.thresholds)
      .map(([k, v]) => `&threshold=${encodeURIComponent(`${k}=${v}`)}`).join('');
}

async function getJSON(route, params = {}) {
  const query = Object.entries(params)
      .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&');
  const url = `${route}?${query}${thresholdQuery()}`;
  const response = await fetch(url);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${route}: HTTP ${response.status}`);
  return body;
}

function scaleOf(stat) {
  const col = state.meta.columns.find((c) => c.name === stat);
  return col ? col.scale : 'linear';
}
function labelOf(stat) {
  const col = state.meta.columns.find((c) => c.name === stat);
  return col ? col.label : stat;
}
function ruleOf(name) { return state.meta.rules.find((r) => r.name === name); }
function worstOf(items) {
  let worst = null;
  for (const s of items) if (s && (worst === null || SEVERITY_RANK[s] > SEVERITY_RANK[worst])) worst = s;
  return worst;
}

function flagTooltip(f) {
  const lines = [
    `${f.issue} (${f.severity})${f.explained_by ? ` — a consequence of ${f.explained_by}` : ''}`,
    f.message,
    `Measured: ${f.statistic || '?'}`,
    `Threshold: ${fmt(f.threshold)} · since step ${fmtInt(f.first_step)}` +
        (f.ongoing ? ' (still true at the last logged step)' : ` until step ${fmtInt(f.last_step)}`),
    `What to try: ${f.advice}`,
  ];
  return lines.join('\n');
}

function flagChip(f) {
  const chip = el('span', {class: `flag sev-${f.severity}${f.active === false ? ' later' : ''}`,
    title: flagTooltip(f), text: f.word || f.issue});
  chip.dataset.issue = f.issue;
  return chip;
}

// ---------------------------------------------------------------- colours

// Viridis, sampled: for statistics spanning decades (log scale).
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
  [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
// Fractions: pale for 0, deep red for 1 -- a dead layer is a red stripe.
const REDS = [[255, 247, 236], [253, 212, 158], [252, 141, 89], [215, 48, 31], [127, 0, 0]];

function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const a = stops[i]; const b = stops[i + 1];
  return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
}

function colourScale(heat) {
  const scale = heat.scale;
  if (scale === 'fraction') return {stops: REDS, map: (v) => v, lo: 0, hi: 1};
  let lo = num(heat.min); let hi = num(heat.max);
  if (!Number.isFinite(lo)) lo = 0;
  if (!Number.isFinite(hi)) hi = 1;
  if (scale === 'log') {
    const llo = Math.log10(Math.max(lo, 1e-30)); const lhi = Math.log10(Math.max(hi, 1e-30));
    const span = lhi - llo || 1;
    return {stops: VIRIDIS, map: (v) => (v <= 0 ? 0 : (Math.log10(v) - llo) / span), lo, hi, log: true};
  }
  const span = hi - lo || 1;
  return {stops: VIRIDIS, map: (v) => (v - lo) / span, lo, hi};
}

// ---------------------------------------------------------------- heatmap

function decodeMatrix(heat) {
  const bin = atob(heat.values);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Float32Array(bytes.buffer);
}

class Heatmap {
  constructor(panel) {
    this.panel = panel;
    this.root = el('div', {class: 'heatmap'});
    this.title = el('div', {class: 'section-title'});
    this.canvas = el('canvas', {class: 'heat-canvas'});
    this.legend = el('div', {class: 'legend'});
    this.tip = el('div', {class: 'tip', hidden: ''});
    this.root.append(this.title, el('div', {class: 'heat-wrap'}, this.canvas, this.tip), this.legend);
    this.canvas.addEventListener('mousemove', (e) => this.hover(e));
    this.canvas.addEventListener('mouseleave', () => { this.tip.hidden = true; });
    this.canvas.addEventListener('click', (e) => {
      const hit = this.hit(e);
      if (hit) this.panel.openLayer(hit.layer);
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
        `${heat.label} — ${fmtInt(rows.length)} layers × ${fmtInt(nSteps)} logged steps` +
        (heat.scale === 'log' ? ' (log scale)' : '');
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(320, this.root.clientWidth || 600);
    const rowH = rows.length ? Math.max(1, Math.min(16, Math.floor(420 / rows.length))) : 16;
    const gutter = rowH >= 9 ? 150 : 14;
    const plotW = Math.max(50, width - gutter - 4);
    const height = Math.max(rowH * rows.length, 16) + 18;
    this.geom = {gutter, plotW, rowH, rows, top: 0};
    const c = this.canvas;
    // geometry for tests and for anyone reading pixels: row r spans [r*rowH, (r+1)*rowH) CSS px
    c.dataset.rowHeight = String(rowH); c.dataset.gutter = String(gutter);
    c.dataset.layers = String(rows.length);
    c.width = Math.round(width * dpr); c.height = Math.round(height * dpr);
    c.style.width = `${width}px`; c.style.height = `${height}px`;
    const ctx = c.getContext('2d');
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    if (!rows.length) {
      ctx.fillStyle = '#666'; ctx.font = '12px sans-serif';
      ctx.fillText('No flagged layers.', 4, 12);
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
    for (let r = 0; r < rows.length; r++) {
      const name = heat.layers[rows[r]];
      const flag = heat.flagged[name];
      if (flag) {
        ctx.fillStyle = SEVERITY_COLOR[flag.worst];
        ctx.fillRect(gutter - 8, r * rowH, 6, Math.max(1, rowH - 1));
      }
      if (gutter > 20) {
        ctx.fillStyle = flag && flag.worst !== 'info' ? SEVERITY_COLOR[flag.worst] : '#333';
        ctx.textAlign = 'right';
        ctx.fillText(name.length > 22 ? `${name.slice(0, 21)}…` : name, gutter - 12, r * rowH + rowH / 2);
      }
      if (this.panel.openName === name) {
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
        el('span', {class: 'swatch inf'}), el('span', {text: 'NaN/Inf'}),
        el('span', {class: 'muted', text: perPixel > 1 ?
          `each pixel column: ${scale === 'log' ? 'geometric mean' : 'max'} of ${perPixel} steps` : ''}),
        el('span', {class: 'muted', text: 'click a row for its charts'}));
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
    this.tip.style.left = `${Math.min(hit.x + 12, this.canvas.clientWidth - 260)}px`;
    this.tip.style.top = `${hit.y + 14}px`;
    this.tip.hidden = false;
  }
}

// ---------------------------------------------------------------- line charts

function drawChart(canvas, steps, values, scale, lines, findings) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth || 360; const H = 130;
  canvas.width = W * dpr; canvas.height = H * dpr; canvas.style.height = `${H}px`;
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  const pad = {l: 52, r: 8, t: 8, b: 18};
  const pw = W - pad.l - pad.r; const ph = H - pad.t - pad.b;
  const vals = values.map(num);
  // a log axis needs positive values: a series that is all zero (a dead layer's gradient) is drawn linear
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
  // finding spans, shaded
  for (const f of findings) {
    ctx.fillStyle = f.severity === 'error' ? 'rgba(183,28,28,0.12)' :
      f.severity === 'warning' ? 'rgba(229,57,53,0.09)' : 'rgba(96,125,139,0.06)';
    const a = X(Math.max(s0, f.first_step)); const b = X(Math.min(s1, f.last_step));
    ctx.fillRect(a, pad.t, Math.max(2, b - a), ph);
  }
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
    ctx.strokeStyle = SEVERITY_COLOR[line.severity] || '#c62828';
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

// ---------------------------------------------------------------- a run's panel

class RunPanel {
  constructor(run) {
    this.run = run;
    this.openName = null;
    this.root = el('section', {class: 'panel'});
    this.root.dataset.run = run.run;
    this.banner = el('div', {class: 'banner'});
    this.heatmap = new Heatmap(this);
    this.stepLabel = el('span', {class: 'step-label'});
    this.slider = el('input', {type: 'range', min: 0, max: 0, value: 0, class: 'step-slider',
      'aria-label': 'step shown in the table'});
    this.slider.addEventListener('input', () => {
      this.stepLabel.textContent = `step ${fmtInt(this.steps ? this.steps[this.slider.value] : 0)}`;
      clearTimeout(this.sliderTimer);
      this.sliderTimer = setTimeout(() => this.loadTable(this.steps[this.slider.value]), 150);
    });
    this.tableHost = el('div', {class: 'table-host'});
    this.drill = el('div', {class: 'drill', hidden: ''});
    const name = el('h2', {class: 'run-name', text: run.run});
    this.root.append(
        name, this.banner,
        el('div', {class: 'panel-body'},
            el('div', {class: 'col-table'},
                el('div', {class: 'section-title'}, 'Per-layer health at ', this.stepLabel, this.slider),
                this.tableHost),
            el('div', {class: 'col-heat'}, this.heatmap.root, this.drill)));
  }

  async load() {
    try {
      const [findings, heat] = await Promise.all([
        getJSON('findings', {run: this.run.run}),
        getJSON('heatmap', {run: this.run.run, stat: state.stat}),
      ]);
      this.findings = findings;
      this.steps = heat.steps;
      this.slider.max = Math.max(0, heat.steps.length - 1);
      this.slider.value = this.slider.max;
      this.stepLabel.textContent = `step ${fmtInt(heat.steps[heat.steps.length - 1])}`;
      this.renderBanner();
      this.heatmap.set(heat);
      await this.loadTable(null);
      if (this.openName) await this.openLayer(this.openName);
    } catch (err) {
      this.banner.className = 'banner sev-error';
      this.banner.textContent = `Could not load run ${this.run.run}: ${err.message}`;
    }
  }

  async reloadHeatmap() {
    try {
      this.heatmap.set(await getJSON('heatmap', {run: this.run.run, stat: state.stat}));
    } catch (err) {
      this.heatmap.title.textContent = err.message;
    }
  }

  renderBanner() {
    const f = this.findings;
    const banner = this.banner;
    banner.replaceChildren();
    const worst = f.worst;
    banner.className = `banner ${worst ? `sev-${worst}` : 'ok'}`;
    const n = f.steps.count;
    if (!f.findings.length) {
      banner.append(el('div', {class: 'headline', text:
        `Healthy: no rule fired across ${this.heatmap.heat ? fmtInt(this.heatmap.heat.layers.length) : ''} ` +
        `layers × ${fmtInt(n)} logged steps (steps ${fmtInt(f.steps.first)}–${fmtInt(f.steps.last)}).`}));
      return;
    }
    const top = f.findings[0];
    const word = state.meta.words[top.issue] || top.issue;
    banner.append(el('div', {class: 'headline'},
        el('span', {class: `badge sev-${top.severity}`, text: top.severity.toUpperCase()}),
        el('strong', {text: top.layer ? `${top.layer}: ${word}` : word}), ' — ',
        top.layer && top.message.startsWith(`${top.layer}: `) ? top.message.slice(top.layer.length + 2) : top.message));
    const list = el('ul', {class: 'kinds'});
    for (const k of f.summary) {
      const rule = ruleOf(k.issue);
      const who = k.layers.length ? ` in ${k.layers.slice(0, 4).join(', ')}${k.layers.length > 4 ? ', …' : ''}` : '';
      const explained = k.explained ? ` (${k.explained} explained by another finding)` : '';
      list.append(el('li', {class: `kind sev-${k.severity}`, title: rule ? `${rule.why}\nWhat to try: ${rule.advice}` : ''},
          el('span', {class: `dot sev-${k.severity}`}),
          el('strong', {text: `${k.count} × ${k.word}`}),
          `${who} · since step ${fmtInt(k.first_step)}${explained}`));
    }
    banner.append(list);
  }

  async loadTable(step) {
    const params = {run: this.run.run};
    if (step !== null && step !== undefined) params.step = step;
    this.table = await getJSON('layers', params);
    this.renderTable();
  }

  renderTable() {
    const t = this.table;
    if (!t) return;
    const stats = t.key_stats;
    const head = el('tr', {},
        el('th', {text: 'Layer'}), el('th', {text: 'Type'}), el('th', {class: 'num', text: 'Params'}),
        ...stats.map((s) => el('th', {class: 'num', title: `${labelOf(s)} (${s})`, text: SHORT_HEADERS[s] || s})),
        el('th', {text: 'Flags'}));
    const body = el('tbody');
    const rows = [];
    for (const layer of t.layers) {
      const active = layer.flags.filter((f) => f.active);
      if (state.onlyFlagged && !active.length) continue;
      const worst = worstOf(active.map((f) => f.severity));
      const tr = el('tr', {class: `layer-row${worst ? ` row-${worst}` : ''}${layer.name === this.openName ? ' open' : ''}`,
        onclick: () => this.openLayer(layer.name)});
      tr.dataset.layer = layer.name;
      const flags = el('td', {class: 'flags'});
      for (const f of active) flags.append(flagChip(f));
      const flaggedStats = new Set(active.filter((f) => f.severity !== 'info').map((f) => ISSUE_STAT[f.issue]));
      tr.append(
          el('td', {class: 'name', text: layer.name, title: layer.name}),
          el('td', {class: 'type', text: layer.type + (layer.activation ? ` → ${layer.activation}` : '')}),
          el('td', {class: 'num', text: fmtInt(layer.params)}),
          ...stats.map((s) => el('td', {class: `num${flaggedStats.has(s) && worst !== 'info' ? ` bad-${worst}` : ''}`,
            text: fmt(layer.stats[s], scaleOf(s))})),
          flags);
      rows.push(tr);
    }
    body.append(...rows);
    const table = el('table', {class: 'layers'}, el('thead', {}, head), body);
    const note = el('div', {class: 'muted', text:
      `${fmtInt(rows.length)} of ${fmtInt(t.layers.length)} layers, model order · statistics at step ${fmtInt(t.step)}` +
      ' · hover a flag for what was measured, the threshold, since when and what to try'});
    this.tableHost.replaceChildren(table, note);
  }

  async openLayer(name) {
    this.openName = name;
    for (const tr of this.tableHost.querySelectorAll('tr.layer-row')) {
      tr.classList.toggle('open', tr.dataset.layer === name);
    }
    this.heatmap.draw();
    let series;
    try {
      series = await getJSON('series', {run: this.run.run, layer: name});
    } catch (err) {
      this.drill.hidden = false;
      this.drill.replaceChildren(el('div', {class: 'error', text: err.message}));
      return;
    }
    const close = el('button', {class: 'close', text: '×', title: 'close', onclick: () => {
      this.openName = null; this.drill.hidden = true; this.heatmap.draw(); this.renderTable();
    }});
    const header = el('div', {class: 'drill-head'},
        el('strong', {text: series.layer}), el('span', {class: 'muted', text: ` ${series.type} · over ${fmtInt(series.steps.length)} logged steps`}),
        close);
    const charts = el('div', {class: 'charts'});
    const findingStats = new Set(series.findings.map((f) => ISSUE_STAT[f.issue]));
    const wanted = CHART_STATS.filter((s) => {
      const vals = (series.series[s] || []).map(num);
      if (!vals.some((v) => !Number.isNaN(v))) return false;
      if (s.endsWith('nonfinite')) return vals.some((v) => v !== 0);
      if (s === 'changed' || s === 'act_mean' || s === 'weight_norm') return findingStats.has(s);
      return true;
    });
    wanted.sort((a, b) => (findingStats.has(b) ? 1 : 0) - (findingStats.has(a) ? 1 : 0));
    for (const s of wanted) {
      const lines = series.thresholds[s] || [];
      const findings = series.findings.filter((f) => ISSUE_STAT[f.issue] === s);
      const canvas = el('canvas', {class: 'chart'});
      canvas.dataset.stat = s;
      canvas.dataset.thresholdLines = String(lines.length);
      const legend = el('div', {class: 'chart-legend'});
      for (const line of lines) {
        legend.append(el('span', {class: `thr sev-${line.severity}`,
          text: `- - ${line.label}${'value' in line ? ` = ${fmt(line.value, scaleOf(s))}` : ''}`}));
      }
      const box = el('div', {class: `chart-box${findings.length ? ' flagged' : ''}`},
          el('div', {class: 'chart-title', text: `${labelOf(s)} (${s})${scaleOf(s) === 'log' ? ', log scale' : ''}`}),
          canvas, legend);
      charts.append(box);
      requestAnimationFrame(() => drawChart(canvas, series.steps, series.series[s], scaleOf(s), lines, findings));
    }
    const notes = el('ul', {class: 'drill-findings'});
    for (const f of series.findings) {
      notes.append(el('li', {}, flagChip(f), ' ', f.message, el('div', {class: 'advice', text: `What to try: ${f.advice}`})));
    }
    this.drill.replaceChildren(header, notes, charts);
    this.drill.hidden = false;
  }
}

// ---------------------------------------------------------------- the page

function renderRunSelector(host) {
  host.replaceChildren(el('span', {class: 'label', text: 'Runs:'}));
  for (const run of state.runs) {
    const worst = run.findings ? run.findings.worst : null;
    const input = el('input', {type: 'checkbox'});
    input.checked = state.selected.includes(run.run);
    input.addEventListener('change', () => {
      state.selected = input.checked ? [...state.selected, run.run] : state.selected.filter((r) => r !== run.run);
      renderPanels();
    });
    const label = el('label', {class: `run-chip${worst ? ` sev-${worst}` : ' ok'}`,
      title: worst ? `${run.findings.findings.length} finding(s), worst: ${worst}` : 'no findings'},
    input, el('span', {class: `dot ${worst ? `sev-${worst}` : 'ok'}`}), el('span', {text: run.run}));
    label.dataset.run = run.run;
    host.append(label);
  }
}

function renderThresholds(host) {
  const table = el('table', {class: 'rules'});
  table.append(el('tr', {}, el('th', {text: 'Rule'}), el('th', {text: 'Threshold'}), el('th', {text: 'Steps'}),
      el('th', {text: 'Severity'}), el('th', {text: 'Measures'}), el('th', {text: 'Source'})));
  for (const rule of state.meta.rules) {
    const input = el('input', {type: 'number', step: 'any', value: rule.threshold, class: 'thr-input'});
    input.dataset.rule = rule.name;
    input.addEventListener('change', async () => {
      const v = input.value.trim();
      if (v === '' || Number(v) === rule.default) delete state.thresholds[rule.name];
      else state.thresholds[rule.name] = v;
      await reloadAll();
    });
    rule.default = rule.default ?? rule.threshold;
    table.append(el('tr', {title: `${rule.why}\nWhat to try: ${rule.advice}`},
        el('td', {text: rule.name}), el('td', {}, input), el('td', {text: rule.persistence}),
        el('td', {text: rule.severity}), el('td', {class: 'small', text: rule.statistic}),
        el('td', {class: 'small', text: rule.source})));
  }
  host.replaceChildren(table);
}

function renderPanels() {
  const host = document.getElementById('panels');
  const keep = new Set(state.selected);
  for (const [name, panel] of state.panels) {
    if (!keep.has(name)) { panel.root.remove(); state.panels.delete(name); }
  }
  host.classList.toggle('multi', state.selected.length > 1);
  for (const name of state.selected) {
    let panel = state.panels.get(name);
    if (!panel) {
      panel = new RunPanel(state.runs.find((r) => r.run === name));
      state.panels.set(name, panel);
      panel.load();
    }
    host.append(panel.root);
  }
  if (!state.selected.length) host.replaceChildren(el('p', {class: 'muted', text: 'Select a run above.'}));
}

async function reloadAll() {
  // new runs may have appeared, and every run may have new steps (the server re-reads what changed)
  const known = new Map(state.runs.map((r) => [r.run, r]));
  state.runs = (await getJSON('runs')).runs.map((r) => Object.assign(known.get(r.run) || {}, r));
  await Promise.all(state.runs.map(async (run) => {
    try { run.findings = await getJSON('findings', {run: run.run}); } catch (err) { run.findings = null; }
  }));
  renderRunSelector(document.getElementById('run-selector'));
  await Promise.all([...state.panels.values()].map((p) => p.load()));
}

function defaultStat() {
  for (const name of state.selected) {
    const run = state.runs.find((r) => r.run === name);
    const top = run && run.findings && run.findings.findings.find((f) => f.layer !== null && ISSUE_STAT[f.issue]);
    if (top) return ISSUE_STAT[top.issue];
  }
  return 'grad_norm';
}

export async function render() {
  const link = el('link', {rel: 'stylesheet', href: 'style.css'});
  document.head.append(link);
  const selector = el('div', {id: 'run-selector', class: 'run-selector'});
  const statSelect = el('select', {id: 'stat-select', 'aria-label': 'heatmap statistic'});
  const only = el('input', {type: 'checkbox', id: 'only-flagged'});
  const rulesHost = el('div', {class: 'rules-host'});
  const toolbar = el('div', {class: 'toolbar'},
      el('label', {}, 'Heatmap: ', statSelect),
      el('label', {}, only, ' only flagged layers'),
      el('button', {class: 'reload', title: 'read new steps and runs', onclick: () => reloadAll(), text: 'Reload'}),
      el('details', {class: 'thresholds'}, el('summary', {text: 'Rules & thresholds'}), rulesHost));
  const main = el('main', {},
      el('header', {}, el('h1', {text: 'Training diagnostics'}), selector), toolbar,
      el('div', {id: 'panels', class: 'panels'}));
  document.body.replaceChildren(main);

  try {
    state.meta = await getJSON('rules');
    const runs = (await getJSON('runs')).runs;
    state.runs = runs;
    await Promise.all(runs.map(async (run) => {
      try { run.findings = await getJSON('findings', {run: run.run}); } catch (err) { run.findings = null; }
    }));
  } catch (err) {
    document.getElementById('panels').replaceChildren(el('p', {class: 'error', text: `Could not load: ${err.message}`}));
    return;
  }
  if (!state.runs.length) {
    document.getElementById('panels').replaceChildren(el('p', {class: 'muted',
      text: 'No tbdiag data yet. Wrap your SummaryWriter with tbdiag.DiagnosticWriter and call writer.watch(model, optimizer).'}));
    return;
  }
  // Open on what is wrong: the worst run first.
  const ranked = [...state.runs].sort((a, b) => {
    const sa = a.findings && a.findings.worst ? SEVERITY_RANK[a.findings.worst] : -1;
    const sb = b.findings && b.findings.worst ? SEVERITY_RANK[b.findings.worst] : -1;
    return sb - sa || a.run.localeCompare(b.run);
  });
  state.selected = [ranked[0].run];
  state.stat = defaultStat();
  for (const col of state.meta.columns) {
    const option = el('option', {value: col.name, text: `${col.label} (${col.name})`});
    if (col.name === state.stat) option.selected = true;
    statSelect.append(option);
  }
  statSelect.addEventListener('change', () => {
    state.stat = statSelect.value;
    for (const panel of state.panels.values()) panel.reloadHeatmap();
  });
  only.addEventListener('change', () => {
    state.onlyFlagged = only.checked;
    for (const panel of state.panels.values()) { panel.heatmap.draw(); panel.renderTable(); }
  });
  renderRunSelector(selector);
  renderThresholds(rulesHost);
  renderPanels();
  let resizeTimer;
  window.addEventListener('resize', () => {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { for (const p of state.panels.values()) p.heatmap.draw(); }, 150);
  });
}
