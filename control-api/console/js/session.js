// Session detail: state, object, SHA-256 and its verification, validation verdict, parts,
// state history from the audit log, the device-signed manifest with its verification,
// and a short-lived download link (a presigned GET: the bytes come from storage).

import { get } from './api.js';
import { debounce } from './feed.js';
import { ACTIVE, steerButtons } from './uploads.js';
import { el, bytes, pill, progressBar, rate, say, table, when } from './ui.js';

function kv(pairs) {
  return el('dl', { class: 'kv' }, pairs.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v ?? '—')]));
}

export function render(root, ctx, id) {
  let stopped = false;
  // The download link, kept across re-renders (asking for it is itself an audited event).
  let link = null;
  const body = el('div', {});
  root.append(el('p', {}, el('a', { href: '#/uploads' }, '← Uploads')), body);

  const linkView = () => (link && new Date(link.expires_at) > new Date()
    ? [el('a', { href: link.url, id: 'download-link', rel: 'noreferrer' }, 'Download the object'),
      el('span', { class: 'muted' }, ` (link valid until ${when(link.expires_at)})`)]
    : []);

  async function download(out) {
    try {
      link = await get(`/v1/sessions/${id}/download`);
      out.replaceChildren(...linkView());
    } catch (e) { say(`Download link refused: ${e.message}`); }
  }

  async function refresh() {
    if (stopped) return;
    let s;
    try { s = await get(`/v1/sessions/${id}`); } catch (e) {
      body.replaceChildren(el('p', { class: 'error' }, `No such session: ${e.message}`));
      return;
    }
    const live = ACTIVE.includes(s.state);
    const [status, history, custody] = await Promise.all([
      live ? get(`/v1/sessions/${id}/status`).catch(() => null) : null,
      get(`/v1/audit?subject=${encodeURIComponent(id)}&limit=1000`).catch(() => []),
      s.state === 'completed' ? get(`/v1/sessions/${id}/manifest`).catch(() => null) : null,
    ]);
    if (stopped) return;
    const dl = el('div', { id: 'download' }, linkView());
    const head = el('section', { class: 'card' },
      el('h1', {}, s.file_name, ' ', pill(s.state)),
      progressBar(s.bytes_done, s.size, `Progress of ${s.file_name}`),
      el('div', { class: 'actions' }, steerButtons(s, refresh)),
      kv([
        ['Session', el('span', { class: 'mono' }, s.session_id)],
        ['Device or owner', s.device_id || s.owner],
        ['Project / dataset', `${s.project_id} / ${s.dataset}`],
        ['Size', `${bytes(s.size)} (${s.size} bytes) in ${s.part_count} parts of ${bytes(s.part_size)}`],
        ['Rate', live ? rate(s.rate_bps) : '—'],
        ['Object', el('span', { class: 'mono', id: 'object-key' }, `${s.bucket}/${s.object_key}`)],
        ['SHA-256', el('span', { class: 'mono', id: 'sha256' }, s.sha256 || '—')],
        ['Stored SHA-256', el('span', { class: 'mono', id: 'stored-sha256' }, s.stored_sha256 || '—')],
        ['Digest check', el('span', { id: 'digest-check' }, pill(s.digest_check || 'not yet'))],
        ['Validation', s.validation ? el('span', {}, pill(s.validation), ' ', s.validation_error || '') : 'no validator'],
        ['Deduplicated from', s.deduplicated_from ? el('a', { href: `#/session/${s.deduplicated_from}` }, s.deduplicated_from) : '—'],
        ['Error', s.error ? el('span', { class: 'error' }, s.error) : '—'],
        ['Created / completed', `${when(s.created_at)} / ${when(s.completed_at)}`],
      ]),
      s.state === 'completed'
        ? el('p', {}, el('button', { type: 'button', id: 'get-download', onclick: () => download(dl) }, 'Get a download link'), dl)
        : null);

    const parts = status?.stored_parts?.length
      ? table(['Part', 'Size', 'ETag'], status.stored_parts.map((p) => el('tr', {},
        el('td', { class: 'num' }, p.number), el('td', { class: 'num' }, bytes(p.size)), el('td', { class: 'mono' }, p.etag))),
      `${status.stored_parts.length} of ${s.part_count} parts in storage`)
      : custody?.part_digests
        ? table(['Part', `${custody.part_checksum === 'sha256' ? 'SHA-256' : 'MD5'} (base64)`], custody.part_digests.map((m, i) => el('tr', {}, el('td', { class: 'num' }, i + 1), el('td', { class: 'mono' }, m))))
        : el('p', { class: 'muted' }, live ? 'No part in storage yet.' : `${s.part_count} parts.`);

    const transitions = history.map((e) => el('tr', {},
      el('td', {}, when(e.at)), el('td', {}, e.action),
      el('td', {}, e.action === 'session.transition' ? `${e.detail.from} → ${e.detail.to}` : ''),
      el('td', { class: 'mono' }, e.actor),
      el('td', { class: 'error' }, e.detail?.error || '')));

    const manifest = custody
      ? el('section', { class: 'card', id: 'custody' }, el('h2', {}, 'Device-signed manifest'),
        kv([
          ['Signature', pill(custody.signature_valid ? 'valid' : 'invalid')],
          ['Parts digest', pill(custody.parts_digest_valid ? 'valid' : 'invalid')],
          ['Signed by', el('span', { class: 'mono' }, custody.signed_request?.device_id)],
          ['Recorded', when(custody.recorded_at)],
        ]),
        el('pre', { class: 'mono' }, JSON.stringify(custody.manifest, null, 2)))
      : el('section', { class: 'card' }, el('h2', {}, 'Device-signed manifest'),
        el('p', { class: 'muted' }, s.device_id ? 'None recorded (not completed yet, or an agent without manifests).' : 'An upload from a workstation or browser has no device manifest.'));

    body.replaceChildren(head,
      el('section', { class: 'card' }, el('h2', {}, 'Parts'), parts),
      manifest,
      el('section', { class: 'card' }, el('h2', {}, 'History (audit log)'),
        table(['When', 'Action', 'Transition', 'Actor', 'Error'], transitions)));
  }

  refresh();
  // Progress and state changes arrive on the live feed, audited steps on the event feed.
  const soon = debounce(refresh);
  const unlive = ctx.live.subscribe((page) => { if (page.sessions.some((s) => s.session_id === id)) soon(); });
  const unsub = ctx.feed.subscribe((e) => { if (e.subject === id) soon(); });
  return () => { stopped = true; unlive(); unsub(); };
}
