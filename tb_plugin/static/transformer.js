// The Transformer section of a run's panel: attention modules (and MoE routers) × logged steps.
//
// /transformer says which of its heatmaps the run has (none: the section stays hidden, as for a CNN), the
// threshold each rule applies to them, and the head each finding names.  The heatmaps are the panel's own
// `Heatmap` over the /heatmap route: every row that is not an attention module (or a router) is never
// measured for these statistics and is left out, so each row is one module, labelled by its block.  A click
// on a row opens the module's drill-down, where `headNotes` says in words which head its findings name; the
// flagged modules are also listed above the heatmaps with their findings and heads.

import {el} from './dom.js';
import {fmtInt} from './format.js';
import {Heatmap} from './heatmap.js';
import {severityRank} from './state.js';

const KIND_TITLE = {attention: 'attention modules', router: 'MoE routers'};

export class TransformerSection {
  /** `panel`: the run's `RunPanel` (it opens a module's charts and asks the routes for this run). */
  constructor(panel) {
    this.panel = panel;
    this.info = null;  // the /transformer answer
    this.heatmaps = [];
    this.root = el('div', {class: 'transformer', hidden: ''});
    this.title = el('div', {class: 'section-title transformer-title'});
    this.flagged = el('ul', {class: 'transformer-flags'});
    this.host = el('div', {class: 'transformer-maps'});
    this.root.append(this.title, this.flagged, this.host);
  }

  /** Ask for the run's attention modules and routers, then their heatmaps; hide the section when it has none. */
  async load() {
    const {panel} = this;
    let info;
    try {
      info = await panel.requests.get('transformer', 'transformer', {run: panel.run.run});
    } catch (err) {
      this.root.hidden = false;
      this.title.textContent = `Transformer: ${err.message}`;
      return;
    }
    if (!info) return;  // a newer load is on its way
    this.info = info;
    if (!info.heatmaps.length) {
      this.root.hidden = true;
      this.setHeatmaps([]);
      return;
    }
    this.root.hidden = false;
    const kinds = new Map();
    for (const m of info.modules) kinds.set(m.kind, (kinds.get(m.kind) || 0) + 1);
    const sick = info.modules.filter((m) => m.findings.some((f) => severityRank(f.severity) > 0));  // above the least severe
    this.title.replaceChildren(el('span', {text: 'Transformer'}), el('span', {class: 'muted', text:
      [...kinds].map(([kind, n]) => `${n} ${KIND_TITLE[kind] || kind}`).join(', ') +
      (sick.length ? ` · ${sick.length} flagged, listed below` : ' · none flagged')}));
    // each flagged module in words: its findings, since when, and the head they name
    this.flagged.replaceChildren(...sick.map((m) => {
      const li = el('li', {title: 'open its charts', onclick: () => this.panel.openLayer(m.layer)},
          el('strong', {text: m.layer}));
      li.dataset.layer = m.layer;
      for (const f of m.findings) {
        const chip = el('span', {class: `flag sev-${f.severity}`, text: f.word,
          title: f.head ? f.head.text : ''});
        chip.dataset.issue = f.issue;
        li.append(' ', chip, ` since step ${fmtInt(f.first_step)}${f.head ? `, head ${f.head.head}` : ''}`);
      }
      return li;
    }));
    const maps = info.heatmaps.map(() => new Heatmap(panel, {section: true}));
    this.setHeatmaps(maps);
    await Promise.all(info.heatmaps.map(async (spec, i) => {
      const box = maps[i].root;
      box.dataset.stat = spec.stat;
      try {
        const heat = await panel.requests.get(`transformer-heatmap:${spec.stat}`, 'heatmap',
            {run: panel.run.run, stat: spec.stat});
        if (heat) maps[i].set(heat, spec.lines);
      } catch (err) {
        maps[i].title.textContent = err.message;
      }
    }));
  }

  setHeatmaps(maps) {
    for (const h of this.heatmaps) this.panel.resizing.unobserve(h.wrap);
    this.heatmaps = maps;
    this.host.replaceChildren(...maps.map((h) => h.root));
    for (const h of maps) this.panel.resizing.observe(h.wrap);
  }

  draw() { for (const h of this.heatmaps) h.draw(); }

  /** Sentences naming the head each finding on `layer` is about ([] when the layer is no attention module). */
  headNotes(layer) {
    const module = this.info && this.info.modules.find((m) => m.layer === layer);
    if (!module) return [];
    return module.findings.filter((f) => f.head).map((f) => ({issue: f.issue, word: f.word, head: f.head}));
  }
}
