// Numbers and findings as text.
//
// The API sends non-finite statistics as the strings "NaN", "Infinity" and
// "-Infinity" (strict JSON), and a statistic never measured as null; `num`
// turns them back into numbers (null too becomes NaN: ask `measured` first
// where the two differ).  `fmt` prints "–" for "not measured" and "NaN" for NaN.

export function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'NaN') return NaN;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return NaN;
}

/** Whether an API value is a measurement (a number, or "NaN"/"Infinity"/"-Infinity"), not null. */
export function measured(v) { return v !== null && v !== undefined; }

/**
 * A statistic's value for people: fractions as percentages, others in 3 significant digits (`digits` more
 * or fewer, for axis labels that must differ).  "–" when not measured, "NaN" for NaN.
 */
export function fmt(v, scale, digits = 3) {
  if (!measured(v)) return '–';
  v = num(v);
  if (Number.isNaN(v)) return 'NaN';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  if (scale === 'fraction') {
    const places = Math.max(v > 0 && v < 0.01 ? 1 : 0, digits - 3);
    return `${(100 * v).toFixed(places)}%`;
  }
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(Math.max(1, digits - 2));
  if (a >= 1e3 && digits <= 4) return Math.round(v).toLocaleString('en-US');  // 1,010 rather than 1.01e+3
  return v.toPrecision(digits);
}

export function fmtInt(n) { return Number(n).toLocaleString('en-US'); }

/** "1 layer", "88 layers": a count with its noun, plural unless it is exactly one. */
export function count(n, noun) { return `${fmtInt(n)} ${noun}${Number(n) === 1 ? '' : 's'}`; }

/** Everything a flag's tooltip says: the rule's message, what it measured, the threshold, since when, what to try. */
export function flagTooltip(f) {
  return [
    `${f.issue} (${f.severity})${f.explained_by ? ` — a consequence of ${f.explained_by}` : ''}`,
    f.message,
    `Measured: ${f.statistic || '?'}`,
    `Threshold: ${fmt(f.threshold)} · since step ${fmtInt(f.first_step)}` +
        (f.ongoing ? ' (still true at the last logged step)' : ` until step ${fmtInt(f.last_step)}`),
    `What to try: ${f.advice}`,
  ].join('\n');
}
