// A run's "Throughput" strip: step time, input wait share and samples/s over the logged steps.
//
// Fed by the /throughput route (tbdiag's perf/* scalars, the input_bound
// findings and the rule's two limits).  Hidden when the run has no throughput
// data.  `RunPanel.addStrip` puts the strip under the panel's banner and ties it
// to the panel's load and dispose.

import {drawChart} from './chart.js';
import {el} from './dom.js';
import {fmt, num} from './format.js';
import {Requests} from './requests.js';
import {wordOf} from './state.js';

const CHARTS = [
  {tag: 'perf/step_time_ms', title: 'Step time', unit: ' ms', scale: 'quantity'},
  {tag: 'perf/input_wait_frac', title: 'Input wait', unit: '', scale: 'fraction'},
  {tag: 'perf/samples_per_sec', title: 'Samples/s', unit: '', scale: 'quantity'},
];

export class ThroughputStrip {
  constructor(run) {
    this.run = run;
    this.requests = new Requests();
    this.charts = [];
    this.root = el('div', {class: 'throughput', hidden: ''});
    this.root.dataset.run = run;
    this.resizing = new ResizeObserver(() => this.draw());
    this.resizing.observe(this.root);
  }

  async load() {
    let body;
    try {
      body = await this.requests.get('throughput', 'throughput', {run: this.run});
    } catch (err) {
      this.root.hidden = true;  // the panel's banner already says what went wrong with the run
      return;
    }
    if (!body) return;  // a newer load is on its way
    const series = new Map(body.series.map((s) => [s.tag, s]));
    if (!series.size) { this.root.hidden = true; return; }
    this.root.hidden = false;
    const flagged = body.findings.length ? body.findings[0] : null;
    const title = el('div', {class: 'section-title'}, 'Throughput',
        el('span', {class: 'muted', text: ' · each point: the mean over the steps since the previous logged step'}));
    if (flagged) title.append(' ', el('span', {class: `flag sev-${flagged.severity}`, title: flagged.message,
      text: wordOf(flagged.issue)}));
    const row = el('div', {class: 'throughput-charts'});
    this.charts = [];
    for (const spec of CHARTS) {
      const s = series.get(spec.tag);
      if (!s) continue;
      const last = num(s.values[s.values.length - 1]);
      const value = spec.scale === 'fraction' ? fmt(last, 'fraction') : `${fmt(last)}${spec.unit}`;
      const canvas = el('canvas', {class: 'chart'});
      canvas.dataset.tag = spec.tag;
      const lines = body.lines[spec.tag] || [];
      const findings = spec.tag === 'perf/input_wait_frac' ? body.findings : [];
      row.append(el('div', {class: 'throughput-chart'},
          el('div', {class: 'chart-title'}, el('strong', {text: spec.title}), ` · last ${value}`), canvas));
      this.charts.push(() => drawChart(canvas, s.steps, s.values, spec.scale, lines, findings, {height: 84, left: 40}));
    }
    this.root.replaceChildren(title, row);
    this.draw();
  }

  draw() { for (const chart of this.charts) chart(); }

  dispose() {
    this.requests.abandon();
    this.resizing.disconnect();
  }
}
