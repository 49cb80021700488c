// Uploads now: sessions with progress, rate and ETA; pause, resume, abort; and a form to
// send an upload command to a device. Every change of a session (progress, rate, state)
// arrives on the live feed (GET /v1/live) and is merged in place: no reload, no polling.

import { get, post, q } from './api.js';
import { debounce, merge } from './feed.js';
import { replaceKeepingFocus, el, field, pill, progressBar, rate, eta, say, table, when, select } from './ui.js';

export const ACTIVE = ['created', 'uploading', 'paused', 'completing'];

async function steer(id, verb) {
  try { await post(`/v1/sessions/${id}/${verb}`); say(`Session ${id.slice(0, 8)}: ${verb} sent.`); }
  catch (e) { say(`${verb} refused: ${e.message}`); }
}

export function steerButtons(s, after) {
  const b = (verb, label, cls) => el('button', {
    type: 'button', class: cls, 'data-need': 'operate', 'data-action': verb,
    'aria-label': `${label} ${s.file_name}`,
    onclick: async () => { await steer(s.session_id, verb); after(); },
  }, label);
  if (!ACTIVE.includes(s.state)) return [];
  return [
    s.state === 'paused' ? b('resume', 'Resume', 'secondary') : b('pause', 'Pause', 'secondary'),
    b('abort', 'Abort', 'danger'),
  ];
}

function commandForm(ctx, after) {
  const [devField, devSelect] = select('Device', [], { id: 'cmd-device', required: true });
  const [pathField, pathInput] = field('Path on the device', { type: 'text', id: 'cmd-path', required: true, placeholder: '/data/rec/run-042.mcap' });
  const [prioField, prioInput] = field('Priority (0-255)', { type: 'number', id: 'cmd-priority', min: 0, max: 255, value: 0 });
  const form = el('form', { class: 'card', 'data-need': 'operate', id: 'command' },
    el('h2', {}, 'Ask a device to upload a file'),
    el('div', { class: 'row' }, devField, pathField, prioField),
    el('p', {}, el('button', { type: 'submit' }, 'Send upload command')));
  get(`/v1/devices${q({ project_id: ctx.me.project_id })}`).then((devices) => {
    devSelect.replaceChildren(...devices.map((d) => el('option', { value: d.device_id }, `${d.device_id}${d.online ? '' : ' (offline)'}`)));
  }).catch(() => {});
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const c = await post(`/v1/devices/${encodeURIComponent(devSelect.value)}/commands`,
        { type: 'upload', path: pathInput.value.trim(), priority: Number(prioInput.value) || 0 });
      say(`Upload command ${c.command_id.slice(0, 8)} sent to ${devSelect.value}.`);
      after();
    } catch (e) { say(`Command refused: ${e.message}`); }
  });
  return form;
}

// Newest first, at most 50 (as GET /v1/sessions?limit=50 answers).
const SHOWN = 50;
const newestFirst = (a, b) => (a.created_at < b.created_at ? 1 : a.created_at > b.created_at ? -1 : 0);

export function render(root, ctx) {
  const list = el('div', { id: 'sessions' });
  let sessions = [];

  // One row per session, kept across updates: a change rewrites its cells in place (the
  // link and, unless the state changed, the buttons stay the same elements, so a click or
  // keyboard focus is never lost to a progress report).
  const rows = new Map();

  function row(s) {
    let r = rows.get(s.session_id);
    if (!r) {
      const cell = (cls) => el('td', cls ? { class: cls } : {});
      r = { state: null, cells: {
        state: cell(), progress: cell(), rate: cell('num'), eta: cell('num'),
        updated: cell('hide-narrow'), error: cell('error'), actions: cell('actions'),
      } };
      const c = r.cells;
      r.tr = el('tr', { dataset: { session: s.session_id } },
        el('th', { scope: 'row' }, el('a', { href: `#/session/${s.session_id}` }, s.file_name),
          el('div', { class: 'muted mono' }, s.device_id || s.owner || '')),
        c.state, c.progress, c.rate, c.eta, c.updated, c.error, c.actions);
      rows.set(s.session_id, r);
    }
    const live = ACTIVE.includes(s.state);
    const c = r.cells;
    r.tr.dataset.state = s.state;
    c.state.replaceChildren(pill(s.state), s.digest_check ? el('div', {}, pill(s.digest_check)) : '');
    c.progress.replaceChildren(progressBar(s.bytes_done, s.size, `Progress of ${s.file_name}`));
    c.rate.textContent = live ? rate(s.rate_bps) : '—';
    c.eta.textContent = live ? eta(s.size - s.bytes_done, s.rate_bps) : '—';
    c.updated.textContent = when(s.updated_at);
    c.error.textContent = s.error || '';
    if (r.state !== s.state) c.actions.replaceChildren(...steerButtons(s, refresh));
    r.state = s.state;
    return r.tr;
  }

  function show() {
    const trs = sessions.map(row);
    const ids = new Set(sessions.map((s) => s.session_id));
    for (const id of rows.keys()) if (!ids.has(id)) rows.delete(id);
    const body = list.querySelector('tbody');
    const same = body && body.children.length === trs.length && trs.every((tr, i) => body.children[i] === tr);
    if (same) return;
    replaceKeepingFocus(list, trs.length
      ? table(['File', 'State', 'Progress', 'Rate', 'ETA', 'Updated', 'Error', 'Actions'], trs)
      : el('p', { class: 'muted' }, 'No sessions yet.'));
  }

  async function refresh() {
    try {
      sessions = await get(`/v1/sessions${q({ limit: SHOWN, project_id: ctx.me.project_id })}`);
      show();
    } catch (e) { list.replaceChildren(el('p', { class: 'error' }, `Could not list sessions: ${e.message}`)); }
  }

  root.append(el('h1', {}, 'Uploads'), list, commandForm(ctx, refresh));
  refresh();
  // Progress, rate and new sessions arrive on the live feed; a command's refusal on the
  // event feed.
  const unlive = ctx.live.subscribe((page) => {
    if (!page.sessions.length) return;
    sessions = merge(sessions, page.sessions, 'session_id').sort(newestFirst).slice(0, SHOWN);
    show();
  });
  const soon = debounce(refresh);
  const unsub = ctx.feed.subscribe((e) => { if (e.action.startsWith('command.')) soon(); });
  return () => { unlive(); unsub(); };
}
