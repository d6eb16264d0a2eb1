// "Rules & thresholds": every setting of every rule, editable.
//
// A rule has a main threshold, a persistence (how many logged values in a row
// must agree) and named params (`vanishing_gradient.absolute`,
// `loss_spike.history`, ...): each gets an input, keyed as the plugin's
// `threshold=RULE[.SETTING]=NUMBER` parameter.  An edit is first sent to the
// /rules route with every other override: the server validates it exactly as
// `tbdiag report --threshold` does (`tbdiag.rules.resolve`), and a 400 is shown
// next to the input with the server's reason, the edit not applied.  Accepted,
// it becomes part of every request (findings, charts, threshold lines) and
// every panel loads again.  Inputs are text, not type=number: a browser turns
// "abc" or "1e" into "" for a number input, which would silently mean "default".

import {el} from './dom.js';
import {getJSON} from './requests.js';
import {state} from './state.js';

/** `[key, label, value]` of every setting of a rule: threshold, persistence, then its params in table order. */
function settingsOf(rule) {
  return [[rule.name, 'threshold', rule.threshold], [`${rule.name}.persistence`, 'persistence', rule.persistence],
    ...Object.entries(rule.params).map(([p, v]) => [`${rule.name}.${p}`, p, v])];
}

export class RulesPanel {
  /** `reload()` loads every panel again once an edit is accepted. */
  constructor(host, reload) {
    this.host = host;
    this.reload = reload;
    this.defaults = new Map();  // setting key -> default value, from the table served without overrides
    for (const rule of state.meta.rules) for (const [key, , value] of settingsOf(rule)) this.defaults.set(key, value);
  }

  render() {
    const table = el('table', {class: 'rules'});
    table.append(el('tr', {}, el('th', {text: 'Rule'}), el('th', {text: 'Threshold'}),
        el('th', {text: 'Steps', title: 'persistence: consecutive logged values that must agree before it fires'}),
        el('th', {text: 'Other settings'}), el('th', {text: 'Severity'}), el('th', {text: 'Measures'}),
        el('th', {text: 'Source'})));
    for (const rule of state.meta.rules) {
      const [main, persistence, ...params] = settingsOf(rule).map((s) => this.input(...s));
      table.append(el('tr', {title: `${rule.why}\nWhat to try: ${rule.advice}`},
          el('td', {text: rule.name}), el('td', {}, main), el('td', {}, persistence),
          el('td', {class: 'params'}, ...params), el('td', {text: rule.severity}),
          el('td', {class: 'small', text: rule.statistic}), el('td', {class: 'small', text: rule.source})));
    }
    const edited = Object.keys(state.thresholds).length;
    const reset = el('button', {class: 'reset', text: 'All defaults', disabled: edited ? null : '',
      onclick: () => this.apply({})});
    this.host.replaceChildren(el('div', {class: 'rules-head muted'},
        `${edited ? `${edited} setting(s) differ from the defaults · ` : ''}` +
        'every view is evaluated with these settings; hover a rule for why and what to try ', reset), table);
  }

  /** One setting's input (with its label when it is a param), and the place its error appears. */
  input(key, label, value) {
    const input = el('input', {type: 'text', inputmode: 'decimal', value: String(value),
      class: `thr-input${key in state.thresholds ? ' edited' : ''}`, 'aria-label': key,
      title: `${key} (default ${this.defaults.get(key)})`});
    input.dataset.setting = key;
    const error = el('div', {class: 'thr-error', hidden: ''});
    input.addEventListener('change', () => this.edit(key, input.value.trim(), input, error));
    const isParam = label !== 'threshold' && label !== 'persistence';
    return el('span', {class: `setting${isParam ? ' param' : ''}`}, isParam ? el('span', {class: 'muted', text: `${label} `}) : null,
        input, error);
  }

  async edit(key, text, input, error) {
    const next = {...state.thresholds};
    if (text === '' || (Number.isFinite(Number(text)) && Number(text) === this.defaults.get(key))) delete next[key];
    else next[key] = text;
    const problem = await this.apply(next);
    if (problem) {
      input.classList.add('invalid');
      error.textContent = problem;
      error.hidden = false;
    }
  }

  /** Validate `thresholds` with the server; apply them and reload when accepted, else return the reason. */
  async apply(thresholds) {
    let meta;
    try {
      meta = await getJSON('rules', {}, thresholds);
    } catch (err) {
      return err.message;
    }
    state.thresholds = thresholds;
    state.meta.rules = meta.rules;  // resolved values: what the inputs and the charts' labels show
    this.render();
    await this.reload();
    return null;
  }
}
