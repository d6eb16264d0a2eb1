// What the page knows: the user's choices, and the tables the plugin serves.
//
// Facts about statistics (labels, scales, which ones to chart), rules (flag
// words, what each reads) and severities (their order) come from the /rules
// route; this module only looks them up, so nothing here needs to change when
// a statistic or a rule is added.

export const state = {
  meta: null,          // /rules payload: rules, severities, statistics, key_stats, heatmap_default
  runs: [],            // [{run, last_step, ..., findings}]
  selected: [],        // run names shown side by side
  stat: null,          // heatmap statistic
  onlyFlagged: false,
  sharedScale: true,   // panels showing the same heatmap statistic share one colour scale
  thresholds: {},      // 'rule' or 'rule.setting' -> overridden value (text, as the user typed it)
  panels: new Map(),   // run -> RunPanel
};

/** A statistic's row; one the plugin did not describe gets a plain row so it can still be shown. */
export function statisticOf(name) {
  const known = state.meta.statistics.find((s) => s.name === name);
  return known || {name, label: name, short: name, meaning: '', scale: 'linear', chart: 'always', key_column: null};
}

export function ruleOf(name) { return state.meta.rules.find((r) => r.name === name) || null; }

/** The statistics a finding kind's rule reads, the one that shows it best first. */
export function readsOf(issue) {
  const rule = ruleOf(issue);
  return rule ? rule.reads : [];
}

/** The statistic that shows a finding kind best, or null (loss rules read no per-layer statistic). */
export function primaryStat(issue) { return readsOf(issue)[0] || null; }

export function wordOf(issue) {
  const rule = ruleOf(issue);
  return (rule && rule.word) || issue;
}

/** Position in the served severity order (least severe first); -1 for none. */
export function severityRank(severity) { return severity ? state.meta.severities.indexOf(severity) : -1; }

export function worstOf(severities) {
  let worst = null;
  for (const s of severities) if (s && severityRank(s) > severityRank(worst)) worst = s;
  return worst;
}
