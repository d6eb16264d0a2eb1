// The Diagnostics tab: per-layer training health for tbdiag runs.
//
// TensorBoard loads this ES module into the plugin's iframe and calls
// `render()`.  It imports its siblings by relative URL (same origin, which
// TensorBoard's CSP allows): no framework, no build step, no CDN.  The JSON
// routes it reads are documented in ../http_api.md.
//
// Every name that comes from a run (run names, layer names) is set with
// textContent, a title attribute, or canvas fillText: never parsed as HTML.

import {el} from './dom.js';
import {EvaluationSection} from './evaluation.js';
import {refreshScales} from './heatmap.js';
import {LossStrip} from './loss.js';
import {RunPanel} from './panel.js';
import {RulesPanel} from './rules_panel.js';
import {ThroughputStrip} from './throughput.js';
import {Requests, getJSON} from './requests.js';
import {primaryStat, severityRank, state} from './state.js';

const requests = new Requests();  // the page's own: the run list and each run's findings

async function loadRuns() {
  const listing = await requests.get('runs', 'runs');
  if (!listing) return false;  // a newer reload is on its way
  const known = new Map(state.runs.map((r) => [r.run, r]));
  const runs = listing.runs.map((r) => Object.assign(known.get(r.run) || {}, r));
  await Promise.all(runs.map(async (run) => {
    try {
      const findings = await requests.get(`findings:${run.run}`, 'findings', {run: run.run});
      if (findings) run.findings = findings;
    } catch (err) {
      run.findings = null;
    }
  }));
  // numbers in names in numeric order, as a person reads them: run2 before run10, seed9 before seed10
  state.runs = runs.sort((a, b) => a.run.localeCompare(b.run, 'en', {numeric: true}));
  return true;
}

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

const PANEL_MIN = 290;  // px: the narrowest a run's panel gets (six side by side in a 1920px window)
const PANEL_GAP = 14;   // px: style.css's .panels gap

/** As many panels per row as fit, spread evenly over the rows they need (six at 1440px: two rows of three). */
function layoutPanels(host) {
  const n = Math.max(1, host.children.length);
  const fit = Math.max(1, Math.floor((host.clientWidth + PANEL_GAP) / (PANEL_MIN + PANEL_GAP)));
  const rows = Math.ceil(n / fit);
  const cols = Math.min(fit, Math.ceil(n / rows));
  host.style.gridTemplateColumns = `repeat(${cols}, minmax(0, 1fr))`;
  host.dataset.columns = String(cols);
}

function renderPanels() {
  const host = document.getElementById('panels');
  const keep = new Set(state.selected);
  for (const [name, panel] of state.panels) {
    if (!keep.has(name)) { panel.dispose(); state.panels.delete(name); }
  }
  const shown = [];
  for (const name of state.selected) {
    let panel = state.panels.get(name);
    if (!panel) {
      panel = new RunPanel(state.runs.find((r) => r.run === name));
      state.panels.set(name, panel);
      panel.addStrip(new ThroughputStrip(name));  // its load() and dispose() now cover the strip too
      panel.addStrip(new LossStrip(name));  // and the Loss strip, right under the banner
      panel.load();
      panel.evaluation = new EvaluationSection(panel);
    }
    shown.push(panel.root);
  }
  host.dataset.count = String(shown.length);
  refreshScales();  // a run unticked may have held the ends of a shared colour scale
  if (shown.length) host.replaceChildren(...shown);
  else host.replaceChildren(el('p', {class: 'muted', text: 'Select a run above.'}));
  layoutPanels(host);
}

async function reloadAll() {
  // new runs may have appeared, and every run may have new steps (the server re-reads what changed)
  if (await loadRuns()) renderRunSelector(document.getElementById('run-selector'));
  await Promise.all([...state.panels.values()].flatMap((p) => [p.load(), p.evaluation.load()]));
}

function defaultStat() {
  for (const name of state.selected) {
    const run = state.runs.find((r) => r.run === name);
    const top = run && run.findings && run.findings.findings.find((f) => f.layer !== null && primaryStat(f.issue));
    if (top) return primaryStat(top.issue);
  }
  return state.meta.heatmap_default;
}

function stylesheet() {
  const link = el('link', {rel: 'stylesheet', href: 'style.css'});
  const loaded = new Promise((resolve) => { link.onload = resolve; link.onerror = resolve; });
  document.head.append(link);
  return loaded;  // canvases take their severity colours from it
}

export async function render() {
  const styled = stylesheet();
  const selector = el('div', {id: 'run-selector', class: 'run-selector'});
  const statSelect = el('select', {id: 'stat-select', 'aria-label': 'heatmap statistic'});
  const only = el('input', {type: 'checkbox', id: 'only-flagged'});
  const shared = el('input', {type: 'checkbox', id: 'shared-scale'});
  shared.checked = state.sharedScale;
  const rulesHost = el('div', {class: 'rules-host'});
  const toolbar = el('div', {class: 'toolbar'},
      el('label', {}, 'Heatmap: ', statSelect),
      el('label', {}, only, ' only flagged layers'),
      el('label', {title: 'the same colour means the same value in every run shown'}, shared,
          ' one colour scale for all runs'),
      el('button', {class: 'reload', title: 'read new steps and runs', onclick: () => reloadAll(), text: 'Reload'}),
      el('details', {class: 'thresholds'}, el('summary', {text: 'Rules & thresholds'}), rulesHost));
  const panels = el('div', {id: 'panels', class: 'panels'});
  new ResizeObserver(() => layoutPanels(panels)).observe(panels);
  document.body.replaceChildren(el('main', {},
      el('header', {}, el('h1', {text: 'Training diagnostics'}), selector), toolbar, panels));

  try {
    [state.meta] = await Promise.all([getJSON('rules'), loadRuns(), styled]);
  } catch (err) {
    panels.replaceChildren(el('p', {class: 'load-error', text: `Could not load: ${err.message}`}));
    return;
  }
  if (!state.runs.length) {
    panels.replaceChildren(el('p', {class: 'muted',
      text: 'No tbdiag data yet. Wrap your SummaryWriter with tbdiag.DiagnosticWriter and call writer.watch(model, optimizer).'}));
    return;
  }
  // Open on what is wrong: the worst run first.
  const rank = (run) => severityRank(run.findings ? run.findings.worst : null);
  const ranked = [...state.runs].sort((a, b) => rank(b) - rank(a)); // stable: name order among equals
  state.selected = [ranked[0].run];
  state.stat = defaultStat();
  for (const st of state.meta.statistics) {
    const option = el('option', {value: st.name, text: `${st.label} (${st.name})`, title: st.meaning});
    if (st.name === state.stat) option.selected = true;
    statSelect.append(option);
  }
  statSelect.addEventListener('change', () => {
    state.stat = statSelect.value;
    for (const panel of state.panels.values()) panel.reloadHeatmap();
  });
  only.addEventListener('change', () => {
    state.onlyFlagged = only.checked;
    for (const panel of state.panels.values()) { panel.drawHeatmaps(); panel.renderTable(); }
  });
  shared.addEventListener('change', () => {
    state.sharedScale = shared.checked;
    for (const panel of state.panels.values()) panel.drawHeatmaps();
  });
  renderRunSelector(selector);
  new RulesPanel(rulesHost, reloadAll).render();
  renderPanels();
}
