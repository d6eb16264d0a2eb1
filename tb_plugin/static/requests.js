// Requests to the plugin's JSON routes, and dropping answers nobody waits for.
//
// Routes are relative URLs: the iframe's <base> is /data/plugin/tbdiag/.  Every
// request carries the user's threshold overrides, so every view is evaluated
// with the same rules.
//
// Answers arrive in any order.  A panel asks through `Requests`, naming what
// it asks for (its table, its heatmap, a layer's series): when a newer request
// for the same thing has been made, or the panel was closed, the older answer
// is stale and `get` resolves to null instead of drawing over newer data.

import {state} from './state.js';

function thresholdQuery(thresholds) {
  return Object.entries(thresholds)
      .map(([k, v]) => `&threshold=${encodeURIComponent(`${k}=${v}`)}`).join('');
}

/** A route's JSON answer, asked with the user's overrides (or `thresholds`: settings not applied yet). */
export async function getJSON(route, params = {}, thresholds = state.thresholds) {
  const query = Object.entries(params)
      .map(([k, v]) => `${encodeURIComponent(k)}=${encodeURIComponent(v)}`).join('&');
  const response = await fetch(`${route}?${query}${thresholdQuery(thresholds)}`);
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `${route}: HTTP ${response.status}`);
  return body;
}

export class Requests {
  constructor() {
    this.latest = new Map();  // slot -> the ticket of its newest request
    this.generation = 0;
  }

  /** The answer for `slot`, or null when it went stale while on its way (errors of stale requests too). */
  async get(slot, route, params = {}) {
    const ticket = {};
    this.latest.set(slot, ticket);
    const generation = this.generation;
    const current = () => this.latest.get(slot) === ticket && generation === this.generation;
    try {
      const body = await getJSON(route, params);
      return current() ? body : null;
    } catch (err) {
      if (current()) throw err;
      return null;
    }
  }

  /** The answer on its way for `slot`, if any, is stale (the user closed what it was for). */
  forget(slot) { this.latest.set(slot, {}); }

  /** Every answer still on its way is stale (the panel is gone). */
  abandon() { this.generation += 1; }
}
