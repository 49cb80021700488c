// Projects and datasets: quota used/reserved/free as bars, datasets with their seal and
// manifest, API keys (a new key's token is shown once) and webhooks with their last error.

import { get, post, q } from './api.js';
import { el, field, pill, quotaBar, say, select, table, when } from './ui.js';

function datasets(p, refresh) {
  const out = el('div', {});
  get(`/v1/projects/${encodeURIComponent(p.project_id)}/datasets`).then((list) => {
    out.replaceChildren(table(['Dataset', 'State', 'Validator', 'Manifest', 'Actions'], list.map((d) => el('tr', {},
      el('th', { scope: 'row' }, d.name),
      el('td', {}, pill(d.state), d.sealed_at ? el('span', { class: 'muted' }, ` ${when(d.sealed_at)}`) : ''),
      el('td', {}, d.validator || '—'),
      el('td', {}, d.manifest ? `${d.manifest.objects?.length ?? 0} objects` : '—'),
      el('td', { class: 'actions' }, d.state === 'sealed' ? '' : el('button', {
        type: 'button', class: 'secondary', 'data-need': 'operate', 'aria-label': `Seal dataset ${d.name}`,
        onclick: async () => {
          try { await post(`/v1/projects/${encodeURIComponent(p.project_id)}/datasets/${encodeURIComponent(d.name)}/seal`); refresh(); }
          catch (e) { say(`Seal refused: ${e.message}`); }
        },
      }, 'Seal'))))));
  }).catch((e) => out.replaceChildren(el('p', { class: 'error' }, e.message)));
  return out;
}

function keys(p) {
  const out = el('div', { 'data-need': 'admin' });
  const list = el('div', {});
  const [nameField, nameInput] = field('Name', { type: 'text', required: true, maxlength: 128 });
  const [roleField, roleSelect] = select('Role', [['viewer', 'viewer'], ['operator', 'operator'], ['admin', 'admin']]);
  const shown = el('div', { 'aria-live': 'polite' });
  const form = el('form', {}, el('div', { class: 'row' }, nameField, roleField,
    el('div', {}, el('button', { type: 'submit' }, 'Create key'))), shown);
  const load = () => get(`/v1/keys${q({ project_id: p.project_id })}`).then((ks) => list.replaceChildren(
    table(['Key', 'Name', 'Role', 'Created by', 'Last used', 'Revoked'], ks.map((k) => el('tr', {},
      el('td', { class: 'mono' }, k.key_id), el('td', {}, k.name), el('td', {}, k.role),
      el('td', { class: 'mono' }, k.created_by), el('td', {}, when(k.last_used_at)), el('td', {}, when(k.revoked_at))))),
  )).catch((e) => list.replaceChildren(el('p', { class: 'muted' }, e.message)));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    try {
      const k = await post('/v1/keys', { name: nameInput.value.trim(), role: roleSelect.value, project_id: p.project_id });
      shown.replaceChildren(el('div', { class: 'token-once' },
        el('p', {}, `Key ${k.key_id} (${k.role}) created. Copy the token now: it is not shown again.`),
        el('code', { class: 'mono', id: 'new-token' }, k.token)));
      nameInput.value = '';
      load();
    } catch (e) { say(`Key refused: ${e.message}`); }
  });
  load();
  out.append(el('h3', {}, 'API keys'), list, form);
  return out;
}

function webhooks(p) {
  const out = el('div', {});
  get(`/v1/webhooks${q({ project_id: p.project_id })}`).then((hooks) => out.replaceChildren(el('h3', {}, 'Webhooks'),
    hooks.length ? table(['URL', 'Actions', 'Failures', 'Last delivered', 'Last error'], hooks.map((w) => el('tr', {},
      el('td', { class: 'mono' }, w.url), el('td', {}, (w.actions || ['every action']).join(', ')),
      el('td', { class: 'num' }, w.failures), el('td', {}, when(w.last_delivered_at)),
      el('td', { class: 'error' }, w.last_error || '')))) : el('p', { class: 'muted' }, 'No webhooks.'),
  )).catch(() => out.replaceChildren());
  return out;
}

export function render(root, ctx) {
  const list = el('div', {});
  async function refresh() {
    try {
      const projects = await get('/v1/projects');
      list.replaceChildren(...projects.map((p) => el('section', { class: 'card', dataset: { project: p.project_id } },
        el('h2', {}, p.name && p.name !== p.project_id ? `${p.project_id} — ${p.name}` : p.project_id),
        quotaBar(p.used_bytes, p.reserved_bytes, p.quota_bytes, `Quota of ${p.project_id}`),
        el('h3', {}, 'Datasets'), datasets(p, refresh), keys(p), webhooks(p))));
    } catch (e) { list.replaceChildren(el('p', { class: 'error' }, `Could not list projects: ${e.message}`)); }
  }
  root.append(el('h1', {}, 'Projects'), list);
  refresh();
  return null;
}
