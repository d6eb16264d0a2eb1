// A run's Evaluation section: what `writer.add_evaluation` recorded, one block per evaluation tag.
//
// The confusion matrix is an HTML grid (rows: true class, columns: predicted),
// in counts or row-normalised shares, a step slider moving across the
// evaluations; next to it the per-class metrics with the classes the
// neglected_class rule counts as neglected marked, and the accuracy over
// steps.  Everything comes from the /evaluation route (../http_api.md); class
// names are set as text, never parsed as HTML.  Hidden when the run has no
// evaluations.

import {drawChart} from './chart.js';
import {el} from './dom.js';
import {flagTooltip, fmt, fmtInt} from './format.js';
import {ruleOf, wordOf} from './state.js';

/** Up to this many classes, grid cells carry their number; beyond, colour alone (hover says the rest). */
const MAX_CELL_TEXT = 20;

const pct = (v) => (v === null || v === undefined ? '–' : fmt(v, 'fraction'));

function cellColour(share) {
  // white to the tab's blue, as the Images tab's confusion-matrix picture
  const mix = (a, b) => Math.round(a + (b - a) * share);
  return `rgb(${mix(255, 21)}, ${mix(255, 101)}, ${mix(255, 192)})`;
}

class TagView {
  constructor(panel, tag) {
    this.panel = panel;
    this.tag = tag;
    this.normalised = false;
    this.index = tag.evaluations.length - 1;
    this.info = el('div', {class: 'eval-hover muted', text: 'hover a cell'});
    this.stepLabel = el('span', {class: 'step-label'});
    this.slider = el('input', {type: 'range', min: 0, max: tag.evaluations.length - 1, value: this.index,
      class: 'eval-slider', 'aria-label': `evaluation step of ${tag.tag}`});
    this.slider.addEventListener('input', () => { this.index = Number(this.slider.value); this.render(); });
    const toggle = el('label', {class: 'eval-toggle'});
    this.normBox = el('input', {type: 'checkbox', class: 'eval-normalise'});
    this.normBox.addEventListener('change', () => { this.normalised = this.normBox.checked; this.render(); });
    toggle.append(this.normBox, ' row-normalised');
    this.grid = el('div', {class: 'eval-grid-host'});
    this.metrics = el('div', {class: 'eval-metrics-host'});
    this.canvas = el('canvas', {class: 'chart eval-accuracy'});
    const notes = el('ul', {class: 'drill-findings'});
    for (const f of tag.findings) {
      const chip = el('span', {class: `flag sev-${f.severity}`, title: flagTooltip(f), text: wordOf(f.issue)});
      chip.dataset.issue = f.issue;
      notes.append(el('li', {}, chip, ' ', f.message));
    }
    this.root = el('div', {class: 'eval-tag'},
        el('div', {class: 'section-title'}, `Evaluation '${tag.tag}' at `, this.stepLabel, this.slider, toggle),
        notes,
        el('div', {class: 'eval-body'},
            el('div', {class: 'eval-matrix'}, this.grid, this.info),
            el('div', {class: 'eval-side'}, this.metrics,
                el('div', {class: 'chart-title', text: 'Accuracy over evaluation steps'}), this.canvas)));
    this.root.dataset.tag = tag.tag;
  }

  get ev() { return this.tag.evaluations[this.index]; }

  render() {
    const ev = this.ev;
    this.stepLabel.textContent = `step ${fmtInt(ev.step)}`;
    this.root.dataset.step = String(ev.step);
    this.renderGrid(ev);
    this.renderMetrics(ev);
  }

  renderGrid(ev) {
    const names = ev.class_names;
    const weak = new Set(ev.weak);
    const showText = names.length <= MAX_CELL_TEXT;
    const head = el('tr', {}, el('th', {class: 'eval-corner', text: 'true \\ predicted'}),
        ...names.map((n, j) => el('th', {class: `eval-col${weak.has(j) ? ' weak' : ''}`, title: n,
          text: showText ? n : ''})));
    const rows = [head];
    ev.counts.forEach((row, i) => {
      const support = ev.support[i];
      const tr = el('tr', {}, el('th', {class: `eval-row${weak.has(i) ? ' weak' : ''}`, title: rowTitle(i), text: names[i]}));
      row.forEach((count, j) => {
        const share = support ? count / support : 0;
        const text = !showText ? '' : (this.normalised ? (support ? pct(share) : '–') : fmtInt(count));
        const td = el('td', {class: `eval-cell${i === j ? ' diag' : ''}`, text});
        td.style.background = cellColour(share);
        if (share > 0.5) td.classList.add('dark');
        td.dataset.row = String(i); td.dataset.col = String(j); td.dataset.count = String(count);
        const describe = `true ${names[i]} → predicted ${names[j]}: ${fmtInt(count)}` +
            (support ? ` (${pct(share)} of ${fmtInt(support)} ${names[i]} samples)` : '');
        td.title = describe;
        td.addEventListener('mouseenter', () => { this.info.textContent = describe; });
        tr.append(td);
      });
      rows.push(tr);
    });
    function rowTitle(i) { return `${names[i]}: ${fmtInt(ev.support[i])} samples, recall ${pct(ev.recall[i])}`; }
    const note = `${fmtInt(ev.total)} samples · accuracy ${pct(ev.accuracy)} · colour: share of the true class` +
        (ev.collapsed ? ' · collapsed onto one class' : '');
    this.grid.replaceChildren(el('table', {class: `eval-grid${showText ? '' : ' dense'}`}, ...rows),
        el('div', {class: 'muted', text: note}));
  }

  renderMetrics(ev) {
    const weak = new Set(ev.weak);
    const head = el('tr', {}, el('th', {text: 'Class'}), el('th', {class: 'num', text: 'Precision'}),
        el('th', {class: 'num', text: 'Recall'}), el('th', {class: 'num', text: 'F1'}),
        el('th', {class: 'num', text: 'Support'}), el('th', {text: ''}));
    const rows = ev.class_names.map((name, i) => {
      const rule = ruleOf(this.tag.weak_rule);
      const flag = weak.has(i) && rule ? el('span', {class: `flag sev-${rule.severity}`,
        text: wordOf(rule.name), title: `${rule.name}: ${rule.statistic}`}) : null;
      const tr = el('tr', {class: `eval-class${weak.has(i) ? ' weak row-warning' : ''}`},
          el('td', {class: 'name', text: name, title: name}), el('td', {class: 'num', text: pct(ev.precision[i])}),
          el('td', {class: `num${weak.has(i) ? ' bad-warning' : ''}`, text: pct(ev.recall[i])}),
          el('td', {class: 'num', text: pct(ev.f1[i])}), el('td', {class: 'num', text: fmtInt(ev.support[i])}),
          el('td', {class: 'flags'}, flag));
      tr.dataset.class = name;
      return tr;
    });
    this.metrics.replaceChildren(el('table', {class: 'layers eval-metrics'}, el('thead', {}, head),
        el('tbody', {}, ...rows)));
  }

  drawAccuracy() {
    const evs = this.tag.evaluations;
    drawChart(this.canvas, evs.map((e) => e.step), evs.map((e) => e.accuracy),
        'fraction', [], this.tag.findings);
  }
}

export class EvaluationSection {
  /** Appends itself to the run's panel, loads, and follows the panel's reloads and width. */
  constructor(panel) {
    this.panel = panel;
    this.views = [];
    this.root = el('div', {class: 'evaluation', hidden: ''});
    panel.root.append(this.root);
    this.resizing = new ResizeObserver(() => { for (const v of this.views) v.drawAccuracy(); });
    this.resizing.observe(this.root);
    this.load();
  }

  async load() {
    let body;
    try {
      body = await this.panel.requests.get('evaluation', 'evaluation', {run: this.panel.run.run});
    } catch (err) {
      this.root.hidden = false;
      this.root.replaceChildren(el('div', {class: 'load-error', text: `Evaluation: ${err.message}`}));
      return;
    }
    if (!body) return;  // a newer load is on its way, or the panel is closed
    const keep = new Map(this.views.map((v) => [v.tag.tag, v]));
    this.views = body.tags.map((tag) => {
      const view = new TagView(this.panel, tag);
      const old = keep.get(tag.tag);
      if (old) {  // a reload keeps what the user chose, and follows new evaluations when at the latest
        view.normalised = old.normalised; view.normBox.checked = old.normalised;
        const atLatest = old.index === old.tag.evaluations.length - 1;
        const i = tag.evaluations.findIndex((e) => e.step === old.ev.step);
        if (!atLatest && i >= 0) { view.index = i; view.slider.value = i; }
      }
      return view;
    });
    this.root.hidden = !this.views.length;
    this.root.replaceChildren(el('h3', {class: 'eval-title', text: 'Evaluation'}), ...this.views.map((v) => v.root));
    for (const v of this.views) v.render();
    requestAnimationFrame(() => { for (const v of this.views) v.drawAccuracy(); });
  }
}
