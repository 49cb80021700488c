// Small DOM helpers shared by the views: no framework, text is always set as text.

// el('button', {class: 'x', onclick: f}, 'label', child, ...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on') && typeof v === 'function') node.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    // Through the CSSOM: the Content-Security-Policy refuses inline style attributes.
    else if (k === 'style') Object.assign(node.style, v);
    else node.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

export function bytes(n) {
  if (n === null || n === undefined) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = Number(n), i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export function rate(bps) { return bps ? `${bytes(bps)}/s` : '—'; }

export function eta(remaining, bps) {
  if (!bps || remaining <= 0) return '—';
  const s = Math.ceil(remaining / bps);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

export function when(t) {
  if (!t) return '—';
  const d = new Date(t);
  return d.toLocaleString(undefined, { dateStyle: 'short', timeStyle: 'medium' });
}

export function pill(text, cls = text) {
  return el('span', { class: `pill ${cls || ''}` }, text ?? '—');
}

export function percent(done, total) {
  if (!total) return 100;
  return Math.min(100, Math.floor((done * 100) / total));
}

// A labelled progress bar with its percentage as text.
export function progressBar(done, total, label) {
  const p = percent(done, total);
  return el('div', {},
    el('progress', { max: 100, value: p, 'aria-label': label }),
    el('span', { class: 'muted', dataset: { percent: String(p) } }, ` ${p}%`));
}

// A quota bar: used and reserved out of the quota (or of used+reserved without one).
export function quotaBar(used, reserved, quota, label) {
  const total = quota || used + reserved || 1;
  const w = (n) => `${Math.min(100, (n * 100) / total).toFixed(1)}%`;
  const free = quota === null || quota === undefined ? null : Math.max(0, quota - used - reserved);
  return el('div', {},
    el('div', { class: 'bar', role: 'img', 'aria-label': `${label}: ${bytes(used)} used, ${bytes(reserved)} reserved, ${free === null ? 'no quota' : `${bytes(free)} free`}` },
      el('span', { class: 'used', style: { width: w(used) } }),
      el('span', { class: 'reserved', style: { width: w(reserved) } })),
    el('span', { class: 'muted' }, `${bytes(used)} used · ${bytes(reserved)} reserved · ${free === null ? 'no quota' : `${bytes(free)} free of ${bytes(quota)}`}`));
}

export function table(headers, rows, caption) {
  return el('div', { class: 'table-wrap' },
    el('table', {},
      caption ? el('caption', { class: 'muted' }, caption) : null,
      el('thead', {}, el('tr', {}, headers.map((h) => el('th', { scope: 'col' }, h)))),
      el('tbody', {}, rows)));
}

// Replaces `container`'s content with `node`, keeping keyboard focus on the same button
// of the same row (rows carry a data-session or data-device) when it is still there.
export function replaceKeepingFocus(container, node) {
  const f = document.activeElement;
  const row = f && container.contains(f) ? f.closest('tr') : null;
  const key = row && (row.dataset.session || row.dataset.device);
  const label = f?.textContent;
  container.replaceChildren(node);
  if (!key) return;
  for (const b of container.querySelectorAll('tr button')) {
    const r = b.closest('tr');
    if ((r.dataset.session || r.dataset.device) === key && b.textContent === label) { b.focus(); return; }
  }
}

let statusTimer;
export function say(text, sticky = false) {
  const s = document.getElementById('status');
  s.textContent = text;
  clearTimeout(statusTimer);
  if (!sticky) statusTimer = setTimeout(() => { s.textContent = ''; }, 6000);
}

// A labelled input: returns [wrapper, input].
export function field(label, attrs) {
  const id = attrs.id || `f-${Math.random().toString(36).slice(2)}`;
  const input = el(attrs.tag || 'input', { ...attrs, tag: undefined, id });
  return [el('div', {}, el('label', { for: id }, label), input), input];
}

export function select(label, options, attrs = {}) {
  const id = attrs.id || `f-${Math.random().toString(36).slice(2)}`;
  const s = el('select', { ...attrs, id }, options.map(([v, t]) => el('option', { value: v }, t)));
  return [el('div', {}, el('label', { for: id }, label), s), s];
}
