// Numbers and findings as text.
//
// The API sends non-finite statistics as the strings "NaN", "Infinity" and
// "-Infinity" (strict JSON); `num` turns them back into numbers.

export function num(v) {
  if (typeof v === 'number') return v;
  if (v === 'NaN') return NaN;
  if (v === 'Infinity') return Infinity;
  if (v === '-Infinity') return -Infinity;
  return NaN;
}

/** A statistic's value for people: fractions as percentages, others in 3 significant digits. */
export function fmt(v, scale) {
  v = num(v);
  if (Number.isNaN(v)) return '–';
  if (!Number.isFinite(v)) return v > 0 ? '+Inf' : '-Inf';
  if (scale === 'fraction') return `${(100 * v).toFixed(v > 0 && v < 0.01 ? 1 : 0)}%`;
  if (v === 0) return '0';
  const a = Math.abs(v);
  if (a >= 1e6 || a < 1e-3) return v.toExponential(1);
  if (a >= 1e3) return Math.round(v).toLocaleString('en-US');  // 1,010 rather than 1.01e+3
  return v.toPrecision(3);
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
