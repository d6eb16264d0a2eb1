// One run's panel: banner, per-layer table at a chosen step, heatmap, drill-down.
//
// Several panels sit side by side; each sizes its canvases to the room it
// gets and draws them again whenever that changes (a run ticked or unticked,
// the window resized).  Its requests go through its own `Requests`, so an
// answer for a step, statistic or layer the user has moved on from is dropped.
//
// The table lists flagged layers first ("worst first", the default for a run
// with a finding above the least severity) or in model order; its Flags column
// keeps its room in the narrowest panel, the other columns shrink and cut
// their text instead.

import {chartAxis, drawChart} from './chart.js';
import {el} from './dom.js';
import {count, flagTooltip, fmt, fmtInt, measured, num} from './format.js';
import {Heatmap} from './heatmap.js';
import {layerLabels} from './names.js';
import {Requests} from './requests.js';
import {TransformerSection} from './transformer.js';
import {primaryStat, readsOf, ruleOf, severityRank, state, statisticOf, wordOf, worstOf} from './state.js';

const ORDERS = [['worst', 'worst first'], ['model', 'model order']];

function flagChip(f) {
  const chip = el('span', {class: `flag sev-${f.severity}`, title: flagTooltip(f), text: wordOf(f.issue)});
  chip.dataset.issue = f.issue;
  return chip;
}

/** A dotted name as text nodes with a line-break opportunity after each dot (a narrow column wraps it there). */
function breakable(name) {
  const out = [];
  name.split('.').forEach((part, i, all) => {
    out.push(i < all.length - 1 ? `${part}.` : part);
    if (i < all.length - 1) out.push(el('wbr'));
  });
  return out;
}

/** The statistics worth a chart for this layer, those a finding's rule reads first. */
function chartedStats(series) {
  const read = new Set(series.findings.flatMap((f) => readsOf(f.issue)));
  const wanted = state.meta.statistics.filter((st) => {
    const vals = (series.series[st.name] || []).filter(measured).map(num);  // NaN values count, gaps do not
    if (!vals.length) return false;  // never measured for this layer
    if (st.chart === 'nonzero') return vals.some((v) => v !== 0);
    if (st.chart === 'with_finding') return read.has(st.name);
    return st.chart === 'always';
  }).map((st) => st.name);
  return wanted.sort((a, b) => Number(read.has(b)) - Number(read.has(a)));
}

export class RunPanel {
  constructor(run) {
    this.run = run;
    this.openName = null;
    this.requests = new Requests();
    this.charts = [];  // [{canvas, draw}] of the open drill-down
    this.root = el('section', {class: 'panel'});
    this.root.dataset.run = run.run;
    this.banner = el('div', {class: 'banner'});
    this.heatmap = new Heatmap(this);
    this.transformer = new TransformerSection(this);  // hidden unless the run has attention modules or routers
    this.stepLabel = el('span', {class: 'step-label'});
    this.slider = el('input', {type: 'range', min: 0, max: 0, value: 0, class: 'step-slider',
      'aria-label': 'step shown in the table'});
    this.slider.addEventListener('input', () => {
      this.stepLabel.textContent = `step ${fmtInt(this.steps ? this.steps[this.slider.value] : 0)}`;
      clearTimeout(this.sliderTimer);
      this.sliderTimer = setTimeout(() => this.loadTable(this.steps[this.slider.value]), 150);
    });
    this.order = null;  // 'worst' or 'model'; null until the user picks one (then the run's findings decide)
    this.orderSelect = el('select', {class: 'order-select', 'aria-label': 'table order'},
        ...ORDERS.map(([value, text]) => el('option', {value, text})));
    this.orderSelect.addEventListener('change', () => { this.order = this.orderSelect.value; this.renderTable(); });
    this.tableHost = el('div', {class: 'table-host'});
    this.drill = el('div', {class: 'drill', hidden: ''});
    this.root.append(
        el('h2', {class: 'run-name', text: run.run}), this.banner,
        el('div', {class: 'panel-body'},
            el('div', {class: 'col-table'},
                el('div', {class: 'section-title'}, 'Per-layer health at ', this.stepLabel, this.slider,
                    el('label', {class: 'order'}, 'sort ', this.orderSelect)),
                this.tableHost),
            el('div', {class: 'col-heat'}, this.heatmap.root, this.transformer.root, this.drill)));
    // canvases follow the room the panel gets: another run ticked, the window resized
    this.widths = new WeakMap();
    this.resizing = new ResizeObserver((entries) => {
      const changed = entries.some((e) => this.widths.get(e.target) !== e.contentRect.width);
      for (const e of entries) this.widths.set(e.target, e.contentRect.width);
      if (changed) this.redraw();
    });
    this.resizing.observe(this.heatmap.wrap);
    this.resizing.observe(this.drill);
  }

  /** Put ``strip`` (a section with ``root``, ``load()`` and ``dispose()``: Loss, Throughput) right under the
   * banner, loaded and disposed with the panel. */
  addStrip(strip) {
    this.banner.after(strip.root);
    const load = this.load.bind(this);
    const dispose = this.dispose.bind(this);
    this.load = () => Promise.all([load(), strip.load()]);
    this.dispose = () => { dispose(); strip.dispose(); };
  }

  /** The panel is closed: answers still on their way are dropped, resizing is no longer followed. */
  dispose() {
    this.requests.abandon();
    this.resizing.disconnect();
    clearTimeout(this.sliderTimer);
    for (const h of this.heatmaps()) h.heat = null;  // their colour ranges are no longer shared
  }

  /** The table's order: the user's choice, else worst first when a finding on a layer is more than the least severe. */
  tableOrder() {
    if (this.order) return this.order;
    const f = this.findings;
    const sick = f && f.findings.some((x) => x.layer !== null && severityRank(x.severity) > 0);
    return sick ? 'worst' : 'model';
  }

  /** The panel's heatmaps: the main one and the Transformer section's (they share colour scales across runs). */
  heatmaps() { return [this.heatmap, ...this.transformer.heatmaps]; }

  drawHeatmaps() {
    this.heatmap.draw();
    this.transformer.draw();
  }

  redraw() {
    this.drawHeatmaps();
    for (const chart of this.charts) chart.draw();
  }

  /** Everything again: findings, heatmap, the table at the last step, the open drill-down. */
  async load() {
    const heatmap = this.reloadHeatmap();
    this.transformerLoad = this.transformer.load();
    let findings;
    try {
      findings = await this.requests.get('findings', 'findings', {run: this.run.run});
    } catch (err) {
      this.banner.className = 'banner sev-error';
      this.banner.textContent = `Could not load run ${this.run.run}: ${err.message}`;
      return;
    }
    await heatmap;  // (the Transformer section draws when its own answers come: the table does not wait for it)
    if (!findings) return;  // a newer load is on its way
    this.findings = findings;
    this.renderBanner();
    this.slider.value = this.slider.max;
    if (this.steps) this.stepLabel.textContent = `step ${fmtInt(this.steps[this.steps.length - 1])}`;
    await this.loadTable(null);
    if (this.openName) await this.openLayer(this.openName);
  }

  async reloadHeatmap() {
    try {
      const heat = await this.requests.get('heatmap', 'heatmap', {run: this.run.run, stat: state.stat});
      if (!heat) return;  // another statistic was chosen meanwhile
      this.steps = heat.steps;  // every logged step: what the slider moves over
      this.slider.max = Math.max(0, heat.steps.length - 1);
      this.heatmap.set(heat);
    } catch (err) {
      this.heatmap.title.textContent = err.message;
    }
  }

  renderBanner() {
    const f = this.findings;
    const banner = this.banner;
    banner.replaceChildren();
    banner.className = `banner ${f.worst ? `sev-${f.worst}` : 'ok'}`;
    if (!f.findings.length) {
      banner.append(el('div', {class: 'headline', text:
        `Healthy: no rule fired across ${count(f.layer_count, 'layer')} × ${count(f.steps.count, 'logged step')} ` +
        `(steps ${fmtInt(f.steps.first)}–${fmtInt(f.steps.last)}).`}));
      return;
    }
    const top = f.findings[0];
    const word = wordOf(top.issue);
    banner.append(el('div', {class: 'headline'},
        el('span', {class: `badge sev-${top.severity}`, text: top.severity.toUpperCase()}),
        el('strong', {text: top.layer ? `${top.layer}: ${word}` : word}), ' — ',
        top.layer && top.message.startsWith(`${top.layer}: `) ? top.message.slice(top.layer.length + 2) : top.message));
    const list = el('ul', {class: 'kinds'});
    for (const k of f.summary) {
      const rule = ruleOf(k.issue);
      const who = k.layers.length ? ` in ${k.layers.slice(0, 4).join(', ')}${k.layers.length > 4 ? ', …' : ''}` : '';
      const explained = k.explained ? ` (${k.explained} explained by another finding)` : '';
      const title = rule ? `${rule.why}\nWhat to try: ${rule.advice}` : '';
      list.append(el('li', {class: `kind sev-${k.severity}`, title},
          el('span', {class: `dot sev-${k.severity}`}),
          el('span', {}, el('strong', {text: `${k.count} × ${k.word}`}),
              `${who} · since step ${fmtInt(k.first_step)}${explained}`)));
    }
    banner.append(list);
  }

  async loadTable(step) {
    const params = {run: this.run.run};
    if (step !== null && step !== undefined) params.step = step;
    const table = await this.requests.get('table', 'layers', params);
    if (!table) return;  // the user moved the slider on, or reloaded
    this.table = table;
    this.renderTable();
  }

  renderTable() {
    const t = this.table;
    if (!t) return;
    const stats = t.key_stats.map(statisticOf);
    const order = this.tableOrder();
    this.orderSelect.value = order;
    const labels = layerLabels(t.layers.map((l) => l.name));
    const head = el('tr', {},
        el('th', {class: 'col-name', text: 'Layer'}), el('th', {class: 'col-type', text: 'Type'}),
        el('th', {class: 'num col-params', text: 'Params'}),
        ...stats.map((s) => el('th', {class: 'num col-stat', title: `${s.label} (${s.name}): ${s.meaning}`, text: s.short})),
        el('th', {class: 'col-flags', text: 'Flags'}));
    const rows = [];
    for (const layer of t.layers) {
      const active = layer.flags.filter((f) => f.active);  // findings that hold at this step
      if (state.onlyFlagged && !active.length) continue;
      const worst = worstOf(active.map((f) => f.severity));
      const ever = worstOf(layer.flags.map((f) => f.severity));
      const first = active.length ? Math.min(...active.map((f) => f.first_step)) : 0;
      const tr = el('tr', {class: `layer-row${worst ? ` row-${worst}` : ''}${layer.name === this.openName ? ' open' : ''}`,
        onclick: () => this.openLayer(layer.name)});
      tr.dataset.layer = layer.name;
      const flags = el('td', {class: 'flags col-flags'});
      // the worst flag first: in a narrow column it is the one that shows
      const chips = [...active].sort((a, b) => severityRank(b.severity) - severityRank(a.severity));
      for (const f of chips) flags.append(flagChip(f));
      // a key statistic a flag here is about takes that flag's colour (style.css colours the alarming ones)
      const cellClass = (stat) => {
        const sev = worstOf(active.filter((f) => primaryStat(f.issue) === stat).map((f) => f.severity));
        const v = layer.stats[stat];
        const bad = measured(v) && !Number.isFinite(num(v)) ? ' not-finite' : '';
        return `num col-stat${sev ? ` bad-${sev}` : ''}${bad}`;
      };
      const type = layer.type + (layer.activation ? ` → ${layer.activation}` : '');
      tr.append(
          el('td', {class: 'name col-name', title: `${layer.name}\n${type} · ${fmtInt(layer.params)} parameters`},
              ...breakable(labels.rows[layer.index].short)),
          el('td', {class: 'type col-type', text: type, title: type}),
          el('td', {class: 'num col-params', text: fmtInt(layer.params)}),
          ...stats.map((s) => el('td', {class: cellClass(s.name), text: fmt(layer.stats[s.name], s.scale)})),
          flags);
      rows.push({tr, key: [severityRank(worst), severityRank(ever), -first, -layer.index]});
    }
    if (order === 'worst') {
      // flagged at this step first (worst, then earliest), then flagged at other steps, then model order
      rows.sort((a, b) => {
        for (let i = 0; i < a.key.length; i++) if (a.key[i] !== b.key[i]) return b.key[i] - a.key[i];
        return 0;
      });
    }
    const table = el('table', {class: 'layers health'}, el('thead', {}, head), el('tbody', {}, ...rows.map((r) => r.tr)));
    const renamed = labels.prefix ? ` · names without “${labels.prefix}”` : '';
    const note = el('div', {class: 'muted', text:
      `${fmtInt(rows.length)} of ${count(t.layers.length, 'layer')}, ${order === 'worst' ? 'worst first' : 'model order'}` +
      ` · statistics at step ${fmtInt(t.step)} · – not measured${renamed}` +
      ' · hover a flag for what was measured, the threshold, since when and what to try'});
    this.tableHost.replaceChildren(table, note);
  }

  closeLayer() {
    this.openName = null;
    this.requests.forget('series');  // an answer still on its way would reopen it
    this.charts = [];
    this.drill.hidden = true;
    this.drill.replaceChildren();
    this.drawHeatmaps();
    this.renderTable();
  }

  async openLayer(name) {
    this.openName = name;
    for (const tr of this.tableHost.querySelectorAll('tr.layer-row')) {
      tr.classList.toggle('open', tr.dataset.layer === name);
    }
    this.drawHeatmaps();
    let series;
    try {
      series = await this.requests.get('series', 'series', {run: this.run.run, layer: name});
    } catch (err) {
      this.drill.hidden = false;
      this.drill.replaceChildren(el('div', {class: 'load-error', text: err.message}));
      return;
    }
    if (!series) return;  // another layer was opened meanwhile
    const close = el('button', {class: 'close', text: '×', title: 'close', onclick: () => this.closeLayer()});
    const header = el('div', {class: 'drill-head'},
        el('strong', {text: series.layer}),
        el('span', {class: 'muted', text: ` ${series.type} · over ${fmtInt(series.steps.length)} logged steps`}),
        close);
    const charts = el('div', {class: 'charts'});
    this.charts = [];
    for (const name of chartedStats(series)) {
      const st = statisticOf(name);
      const lines = series.thresholds[name] || [];
      const findings = series.findings.filter((f) => readsOf(f.issue).includes(name));
      const canvas = el('canvas', {class: 'chart'});
      canvas.dataset.stat = name;
      const axis = chartAxis(series.series[name], st.scale, lines);
      const legend = el('div', {class: 'chart-legend'});
      for (const {line, drawn, where} of axis.lines) {
        const value = 'value' in line ? ` = ${fmt(line.value, st.scale)}` : '';
        // a line far from the data is not drawn (it would squash the series flat): say where it is instead
        const off = drawn && !axis.allZero ? '' : `: ${where === 'off the scale' ? 'off the scale' : `${where} the range`}`;
        const item = el('span', {class: `thr sev-${line.severity}${off ? ' off' : ''}`,
          text: `${off ? '' : '- - '}${line.label}${value}${off}`});
        item.dataset.where = off ? where : 'drawn';
        legend.append(item);
      }
      if (axis.allZero) legend.append(el('span', {class: 'muted', text: 'every value exactly 0'}));
      if (axis.notFinite) {
        legend.append(el('span', {class: 'nan-note'}, el('span', {class: 'swatch inf'}),
            ` NaN/Inf at ${count(axis.notFinite, 'logged step')}`));
      }
      charts.append(el('div', {class: `chart-box${findings.length ? ' flagged' : ''}`},
          el('div', {class: 'chart-title', title: st.meaning,
            text: `${st.label} (${name})${st.scale === 'log' ? ', log scale' : ''}`}),
          canvas, legend));
      this.charts.push({canvas, draw: () => drawChart(canvas, series.steps, series.series[name], st.scale, lines, findings)});
    }
    await this.transformerLoad;  // the heads the findings name come with the Transformer section
    if (this.openName !== name) return;  // another layer was opened meanwhile
    const heads = this.transformer.headNotes(name);
    const notes = el('ul', {class: 'drill-findings'});
    for (const f of series.findings) {
      const head = heads.find((h) => h.issue === f.issue);
      const said = head ? el('div', {class: 'head-note'}, el('strong', {text: `head ${head.head.head}`}),
          ` — ${head.head.text}`) : null;
      if (said) said.dataset.head = String(head.head.head);
      notes.append(el('li', {}, flagChip(f), ' ', f.message, ...(said ? [said] : []),
          el('div', {class: 'advice', text: `What to try: ${f.advice}`})));
    }
    this.drill.replaceChildren(header, notes, charts);
    this.drill.hidden = false;
    requestAnimationFrame(() => { for (const chart of this.charts) chart.draw(); });
  }
}
