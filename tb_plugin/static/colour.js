// Colour scales of the heatmap and severity colours for canvas drawing.
//
// Severity colours are declared once, in style.css (--<severity>); canvas code
// reads them from there so chips, banners and canvases always agree.

import {num} from './format.js';

// Viridis, sampled: for statistics spanning decades (log scale) and linear ones.
const VIRIDIS = [[68, 1, 84], [72, 40, 120], [62, 74, 137], [49, 104, 142], [38, 130, 142], [31, 158, 137],
  [53, 183, 121], [109, 205, 89], [180, 222, 44], [253, 231, 37]];
// Fractions: pale for 0, deep red for 1 -- a dead layer is a red stripe.
const REDS = [[255, 247, 236], [253, 212, 158], [252, 141, 89], [215, 48, 31], [127, 0, 0]];

export function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  const a = stops[i]; const b = stops[i + 1];
  return [a[0] + f * (b[0] - a[0]), a[1] + f * (b[1] - a[1]), a[2] + f * (b[2] - a[2])];
}

/**
 * Map values of a heatmap payload ({scale, min, max}) to [0, 1] along a ramp.  `lowIsBad`: a fraction
 * whose low end is the alarming one (attention entropy) runs the ramp from 1 (pale) to 0 (deep red).
 */
export function colourScale(heat, lowIsBad = false) {
  const scale = heat.scale;
  if (scale === 'fraction') return lowIsBad ? {stops: REDS, map: (v) => 1 - v, lo: 1, hi: 0} : {stops: REDS, map: (v) => v, lo: 0, hi: 1};
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

/** The CSS colour of a severity (style.css's --<severity>), for canvas drawing. */
export function severityColour(severity) {
  const value = severity ? getComputedStyle(document.documentElement).getPropertyValue(`--${severity}`).trim() : '';
  return value || '#c62828';
}
