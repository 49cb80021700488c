// Fleet: devices with presence, agent version, queue depth, free disk, last seen;
// register, disable, enable, rotate key. Changes arrive on the live feed (GET /v1/live).

import { get, post, patch, q } from './api.js';
import { merge } from './feed.js';
import { replaceKeepingFocus, el, field, pill, say, table, when, bytes } from './ui.js';

export function render(root, ctx) {
  let project = ctx.me.project_id || '';
  const [projectField, projectInput] = field('Project', { type: 'text', placeholder: 'every project', value: project, id: 'fleet-project' });
  if (ctx.me.project_id) projectInput.disabled = true;
  const list = el('div', { id: 'devices' });

  const [idField, idInput] = field('Device id', { type: 'text', required: true, id: 'reg-id', pattern: '[A-Za-z0-9_\\-][A-Za-z0-9._\\-]{0,63}' });
  const [keyField, keyInput] = field('Public key (base64, from uplink-agent keygen)', { type: 'text', required: true, id: 'reg-key' });
  const [projField, projInput] = field('Project', { type: 'text', id: 'reg-project', value: ctx.me.project_id || 'default' });
  const register = el('form', { class: 'card', 'data-need': 'operate', id: 'register' },
    el('h2', {}, 'Register a device'),
    el('div', { class: 'row' }, idField, projField), keyField,
    el('p', {}, el('button', { type: 'submit' }, 'Register')));
  register.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      await post('/v1/devices', { device_id: idInput.value.trim(), public_key: keyInput.value.trim(), project_id: projInput.value.trim() || 'default' });
      say(`Device ${idInput.value} registered.`);
      idInput.value = ''; keyInput.value = '';
      refresh();
    } catch (e) { say(`Register refused: ${e.message}`); }
  });

  async function setEnabled(d, enabled) {
    try { await patch(`/v1/devices/${encodeURIComponent(d.device_id)}`, { enabled }); refresh(); }
    catch (e) { say(`${enabled ? 'Enable' : 'Disable'} refused: ${e.message}`); }
  }

  function rotateForm(d, cell) {
    const [f, input] = field(`New public key of ${d.device_id}`, { type: 'text', required: true });
    const form = el('form', {}, f, el('div', { class: 'actions' },
      el('button', { type: 'submit' }, 'Rotate'),
      el('button', { type: 'button', class: 'secondary', onclick: () => refresh() }, 'Cancel')));
    form.addEventListener('submit', async (ev) => {
      ev.preventDefault();
      try {
        await patch(`/v1/devices/${encodeURIComponent(d.device_id)}`, { public_key: input.value.trim() });
        say(`Key of ${d.device_id} rotated.`);
        refresh();
      } catch (e) { say(`Rotate refused: ${e.message}`); }
    });
    cell.replaceChildren(form);
    input.focus();
  }

  let editing = false;
  let devices = [];

  function show() {
    const rows = devices.map((d) => {
      const actions = el('td', { class: 'actions' },
        d.enabled
          ? el('button', { type: 'button', class: 'secondary', 'data-need': 'operate', onclick: () => setEnabled(d, false) }, 'Disable')
          : el('button', { type: 'button', class: 'secondary', 'data-need': 'operate', onclick: () => setEnabled(d, true) }, 'Enable'),
        el('button', { type: 'button', class: 'secondary', 'data-need': 'operate', onclick: () => { editing = true; rotateForm(d, actions); } }, 'Rotate key'));
      return el('tr', { dataset: { device: d.device_id } },
        el('th', { scope: 'row', class: 'mono' }, d.device_id),
        el('td', {}, d.project_id),
        el('td', { class: 'presence' }, pill(d.online ? 'online' : 'offline'), d.enabled ? '' : el('span', {}, ' ', pill('disabled', 'error'))),
        el('td', {}, d.agent_version || '—'),
        el('td', { class: 'num' }, d.queue_depth ?? '—'),
        el('td', { class: 'num free-disk' }, bytes(d.free_disk_bytes)),
        el('td', {}, when(d.last_seen_at)),
        el('td', { class: 'num hide-narrow' }, d.clock_offset_secs ?? '—'),
        actions);
    });
    replaceKeepingFocus(list, rows.length
      ? table(['Device', 'Project', 'Presence', 'Agent', 'Queue', 'Free disk', 'Last seen', 'Clock offset (s)', 'Actions'], rows)
      : el('p', { class: 'muted' }, 'No devices yet.'));
  }

  async function refresh() {
    editing = false;
    try {
      devices = await get(`/v1/devices${q({ project_id: project })}`);
      show();
    } catch (e) { list.replaceChildren(el('p', { class: 'error' }, `Could not list devices: ${e.message}`)); }
  }

  projectInput.addEventListener('change', () => { project = projectInput.value.trim(); refresh(); });
  root.append(el('h1', {}, 'Fleet'), el('div', { class: 'row' }, projectField), list, register);
  refresh();
  // Presence, queue depth and free disk arrive on the live feed and are merged in place
  // (not while a key is being rotated: the form would be lost).
  const unlive = ctx.live.subscribe((page) => {
    const mine = page.devices.filter((d) => !project || d.project_id === project);
    if (!mine.length) return;
    devices = merge(devices, mine, 'device_id').sort((a, b) => (a.device_id < b.device_id ? -1 : 1));
    if (!editing) show();
  });
  const unsub = ctx.feed.subscribe((e) => { if (e.action.startsWith('device.') && !editing) refresh(); });
  return () => { unlive(); unsub(); };
}
