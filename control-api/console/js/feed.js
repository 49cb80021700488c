// The event feed (GET /v1/events, long-poll): views subscribe and refresh what an event
// touches. It first skips to the newest event, then waits for new ones.

import { get, q } from './api.js';

export class Feed {
  constructor() { this.subs = new Set(); this.stopped = false; this.next = 0; }

  subscribe(fn) { this.subs.add(fn); return () => this.subs.delete(fn); }

  async start() {
    // Skip history: the views read current state themselves.
    for (;;) {
      const page = await get(`/v1/events${q({ after: this.next, limit: 1000 })}`);
      this.next = page.next;
      if (page.events.length < 1000) break;
    }
    while (!this.stopped) {
      try {
        this.controller = new AbortController();
        const page = await get(`/v1/events${q({ after: this.next, wait: 25, limit: 500 })}`, { signal: this.controller.signal });
        this.next = page.next;
        for (const e of page.events) for (const fn of this.subs) fn(e);
      } catch (e) {
        if (this.stopped) return;
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
  }

  stop() { this.stopped = true; this.controller?.abort(); }
}

// Live changes (GET /v1/live, long-poll): sessions and devices whose progress, rate,
// presence or free disk changed; views merge them into what they show. `init` takes the
// current cursor before the views read their lists, so nothing between is missed.
export class Live {
  constructor() { this.subs = new Set(); this.stopped = false; this.next = 0; }

  subscribe(fn) { this.subs.add(fn); return () => this.subs.delete(fn); }

  async init() { this.next = (await get('/v1/live')).next; }

  async start() {
    while (!this.stopped) {
      try {
        this.controller = new AbortController();
        const page = await get(`/v1/live${q({ after: this.next, wait: 25 })}`, { signal: this.controller.signal });
        this.next = page.next;
        if (page.sessions.length || page.devices.length) for (const fn of this.subs) fn(page);
      } catch (e) {
        if (this.stopped) return;
        await new Promise((r) => setTimeout(r, 2000));
      }
    }
  }

  stop() { this.stopped = true; this.controller?.abort(); }
}

// Replaces the rows of `list` that `changed` holds (by `key`) and adds the new ones.
export function merge(list, changed, key) {
  const byKey = new Map(list.map((x) => [x[key], x]));
  for (const x of changed) byKey.set(x[key], x);
  return [...byKey.values()];
}

// Calls fn at most once per `ms` (trailing), for refreshes triggered by bursts of events.
export function debounce(fn, ms = 300) {
  let t;
  return () => { clearTimeout(t); t = setTimeout(fn, ms); };
}
