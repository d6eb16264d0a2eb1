// Short layer names for narrow places (the heatmap's gutter, the table's first column).
//
// A 12-block GPT-2 has ~90 layers named like "transformer.h.6.mlp.c_fc": as
// written they do not fit a panel a sixth of a screen wide.  Layers inside
// numbered blocks are labelled by block ("h.6") and by their name inside it
// ("mlp.c_fc"); the path the blocks share ("transformer.") is dropped, from
// the other layers' names too ("transformer.wte" is "wte").  Full names stay
// in tooltips, in the hover text and in every data attribute.

const isIndex = (part) => part !== '' && [...part].every((c) => c >= '0' && c <= '9');

function commonParts(lists) {
  if (!lists.length) return [];
  const out = [];
  for (let i = 0; i < lists[0].length; i++) {
    const part = lists[0][i];
    if (!lists.every((l) => l.length > i && l[i] === part)) break;
    out.push(part);
  }
  return out;
}

/**
 * For every name: `{group, label, short}`.  `group` is its block ("h.6") or null, `label` its name inside
 * the block or its name without the dropped path, `short` the two together ("h.6.mlp.c_fc").  Also
 * `prefix`: the path dropped from the names ("transformer."), or ''.
 */
export function layerLabels(names) {
  const parts = names.map((n) => n.split('.'));
  // a block: the name up to its first numeric part ("transformer.h.6" of "transformer.h.6.mlp.c_fc")
  const blockEnd = parts.map((p) => p.findIndex((x, i) => i > 0 && isIndex(x)));
  const blocks = new Set(parts.map((p, i) => (blockEnd[i] > 0 ? p.slice(0, blockEnd[i] + 1).join('.') : null))
      .filter((b) => b !== null));
  let drop = [];
  if (blocks.size >= 2) {
    // what every block's path shares, up to the list they are numbered in ("transformer" of "transformer.h.6")
    const shared = commonParts([...blocks].map((b) => b.split('.').slice(0, -2)));
    drop = shared;
  } else if (names.length > 1) {
    drop = commonParts(parts.map((p) => p.slice(0, -1)));  // never a whole name
  }
  const prefix = drop.length ? `${drop.join('.')}.` : '';
  const rows = names.map((name, i) => {
    const p = parts[i];
    const cut = drop.length && p.length > drop.length && drop.every((part, j) => p[j] === part) ? drop.length : 0;
    const rest = p.slice(cut);
    if (blocks.size >= 2 && blockEnd[i] > 0) {
      const k = blockEnd[i] - cut;  // the block's number within `rest`
      const group = rest.slice(0, k + 1).join('.');
      const label = rest.slice(k + 1).join('.');
      return {group, label: label || group, short: rest.join('.')};
    }
    const short = rest.join('.');
    return {group: null, label: short, short};
  });
  return {rows, prefix};
}
