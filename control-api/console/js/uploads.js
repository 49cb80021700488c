// Uploads now: sessions with progress, rate and ETA; pause, resume, abort; and a form to
// send an upload command to a device. Transitions arrive on the event feed; progress is
// not an event (it is not audited), so while a session is active the list is re-read
// every 1.5 s.

import { get, post, q } from './api.js';
import { debounce } from './feed.js';
import { el, field, pill, progressBar, rate, eta, say, table, when, select } from './ui.js';

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

export function render(root, ctx) {
  const list = el('div', { id: 'sessions' });
  let timer = null;
  let stopped = false;

  async function refresh() {
    if (stopped) return;
    clearTimeout(timer);
    let active = false;
    try {
      const sessions = await get(`/v1/sessions${q({ limit: 50, project_id: ctx.me.project_id })}`);
      const rows = sessions.map((s) => {
        const live = ACTIVE.includes(s.state);
        active ||= live;
        return el('tr', { dataset: { session: s.session_id, state: s.state } },
          el('th', { scope: 'row' }, el('a', { href: `#/session/${s.session_id}` }, s.file_name),
            el('div', { class: 'muted mono' }, s.device_id || s.owner || '')),
          el('td', {}, pill(s.state), s.digest_check ? el('div', {}, pill(s.digest_check)) : null),
          el('td', {}, progressBar(s.bytes_done, s.size, `Progress of ${s.file_name}`)),
          el('td', { class: 'num' }, live ? rate(s.rate_bps) : '—'),
          el('td', { class: 'num' }, live ? eta(s.size - s.bytes_done, s.rate_bps) : '—'),
          el('td', { class: 'hide-narrow' }, when(s.updated_at)),
          el('td', { class: 'error' }, s.error || ''),
          el('td', { class: 'actions' }, steerButtons(s, refresh)));
      });
      list.replaceChildren(rows.length
        ? table(['File', 'State', 'Progress', 'Rate', 'ETA', 'Updated', 'Error', 'Actions'], rows)
        : el('p', { class: 'muted' }, 'No sessions yet.'));
    } catch (e) { list.replaceChildren(el('p', { class: 'error' }, `Could not list sessions: ${e.message}`)); }
    if (!stopped) timer = setTimeout(refresh, active ? 1500 : 5000);
  }

  root.append(el('h1', {}, 'Uploads'), list, commandForm(ctx, refresh));
  refresh();
  const soon = debounce(refresh);
  const unsub = ctx.feed.subscribe((e) => { if (e.action.startsWith('session.') || e.action.startsWith('command.')) soon(); });
  return () => { stopped = true; clearTimeout(timer); unsub(); };
}
