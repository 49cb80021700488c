// Upload a file from this browser straight to storage: the file is hashed here (SHA-256 of
// the whole file, MD5 of each part), the API opens a session and presigns each part with
// its Content-MD5 signed in, and the parts go from the browser to storage (no byte passes
// through the API). What was planned is kept in localStorage (no secret: ids and digests),
// so after a reload picking the same file again sends only the parts storage lacks.

import { get, post, q } from './api.js';
import { Md5, Sha256, hex, base64 } from './hash.js';
import { el, field, bytes, progressBar, say } from './ui.js';

const MIB = 1024 * 1024;
const CONCURRENCY = 3;
const PLANS = 'uplink.uploads';
// Headers a page may not set; the browser sends them itself.
const FORBIDDEN = new Set(['host', 'content-length', 'connection']);

const plans = {
  all: () => { try { return JSON.parse(localStorage.getItem(PLANS)) || {}; } catch { return {}; } },
  key: (project, dataset, f) => JSON.stringify([project, dataset, f.name, f.size, f.lastModified]),
  get(k) { return this.all()[k]; },
  put(k, v) { const a = this.all(); a[k] = v; localStorage.setItem(PLANS, JSON.stringify(a)); },
  drop(k) { const a = this.all(); delete a[k]; localStorage.setItem(PLANS, JSON.stringify(a)); },
};

// SHA-256 of the file and MD5 (base64) of each part, reading one part at a time.
async function digest(file, partSize, onProgress) {
  const sha = new Sha256();
  const md5s = [];
  const count = Math.max(1, Math.ceil(file.size / partSize));
  for (let i = 0; i < count; i++) {
    const bytesOf = new Uint8Array(await file.slice(i * partSize, Math.min(file.size, (i + 1) * partSize)).arrayBuffer());
    sha.update(bytesOf);
    md5s.push(base64(new Md5().update(bytesOf).digest()));
    onProgress(Math.min(file.size, (i + 1) * partSize));
    await new Promise((r) => setTimeout(r)); // let the page breathe between parts
  }
  return { sha256: hex(sha.digest()), md5s };
}

async function putPart(file, plan, part) {
  const start = (part.number - 1) * plan.part_size;
  const headers = {};
  for (const [k, v] of part.headers) if (!FORBIDDEN.has(k.toLowerCase())) headers[k] = v;
  const resp = await fetch(part.url, {
    method: part.method || 'PUT', headers, body: file.slice(start, Math.min(file.size, start + plan.part_size)),
    credentials: 'omit', referrerPolicy: 'no-referrer',
  });
  if (!resp.ok) throw new Error(`storage answered ${resp.status} for part ${part.number}`);
}

export function render(root, ctx) {
  let stopped = false;
  const [projField, projInput] = field('Project', { type: 'text', id: 'up-project', required: true, value: ctx.me.project_id || 'default' });
  const [dsField, dsInput] = field('Dataset', { type: 'text', id: 'up-dataset', value: 'default' });
  const [sizeField, sizeInput] = field('Part size (MiB, 5 or more)', { type: 'number', id: 'up-part-size', min: 5, max: 5120, value: 8 });
  const [fileField, fileInput] = field('File', { type: 'file', id: 'up-file', required: true });
  const state = el('p', { id: 'up-state', 'aria-live': 'polite' });
  const bar = el('div', { id: 'up-progress' });
  const form = el('form', { class: 'card', id: 'browser-upload' },
    el('div', { class: 'row' }, projField, dsField, sizeField), fileField,
    el('p', {}, el('button', { type: 'submit', id: 'up-start' }, 'Upload')), bar, state);

  const show = (text, done, total) => {
    state.textContent = text;
    if (total !== undefined) bar.replaceChildren(progressBar(done, total, 'Upload progress'));
  };

  async function upload(file, project, dataset, partSize) {
    const k = plans.key(project, dataset, file);
    let plan = plans.get(k);
    if (!plan) {
      show('Hashing (SHA-256 of the file, MD5 of each part)…', 0, file.size);
      const d = await digest(file, partSize, (n) => show(`Hashing… ${bytes(n)} of ${bytes(file.size)}`, n, file.size));
      plan = { job_id: crypto.randomUUID(), part_size: partSize, ...d };
      plans.put(k, plan);
    } else {
      show('Resuming: this browser planned this upload before.', 0, file.size);
    }
    const session = await post(`/v1/projects/${encodeURIComponent(project)}/uploads`, {
      job_id: plan.job_id, file_name: file.name, dataset: dataset || undefined,
      size: file.size, sha256: plan.sha256, part_size: plan.part_size,
    });
    plan.session_id = session.session_id;
    plans.put(k, plan);
    state.dataset.skipped = '0';
    if (session.state !== 'completed') {
      const status = await get(`/v1/sessions/${session.session_id}/status`);
      const stored = new Set(status.stored_parts.map((p) => p.number));
      const todo = plan.md5s.map((md5, i) => ({ number: i + 1, md5 })).filter((p) => !stored.has(p.number));
      const sizeOf = (n) => Math.min(plan.part_size, file.size - (n - 1) * plan.part_size);
      let done = status.stored_parts.reduce((a, p) => a + p.size, 0);
      const skipped = stored.size;
      state.dataset.skipped = String(skipped);
      show(`Uploading ${todo.length} parts${skipped ? ` (${skipped} already in storage)` : ''}…`, done, file.size);
      let next = 0;
      const worker = async () => {
        while (next < todo.length && !stopped) {
          const batch = todo.slice(next, next + 1);
          next += 1;
          const signed = await post(`/v1/sessions/${session.session_id}/parts`, { parts: batch });
          for (const part of signed.parts) {
            await putPart(file, plan, part);
            done += sizeOf(part.number);
            show(`Uploading: part ${part.number} stored; ${bytes(done)} of ${bytes(file.size)}`, done, file.size);
          }
        }
      };
      await Promise.all(Array.from({ length: CONCURRENCY }, worker));
      if (stopped) return;
      show('Completing (storage checks every part)…', done, file.size);
      const final = await post(`/v1/sessions/${session.session_id}/complete`);
      if (final.state !== 'completed') throw new Error(`the session is ${final.state}${final.error ? `: ${final.error}` : ''}`);
    }
    plans.drop(k);
    show('', file.size, file.size);
    state.replaceChildren('Completed: ', el('a', { href: `#/session/${session.session_id}`, id: 'up-session' }, file.name),
      ' · SHA-256 ', el('span', { class: 'mono', id: 'up-sha256' }, plan.sha256));
    say(`${file.name} uploaded and verified.`);
  }

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    const file = fileInput.files[0];
    if (!file) return;
    const partSize = Math.max(5, Number(sizeInput.value) || 8) * MIB;
    const button = document.getElementById('up-start');
    button.disabled = true;
    try { await upload(file, projInput.value.trim(), dsInput.value.trim(), partSize); }
    catch (e) { show(`Upload stopped: ${e.message}. Pick the same file again to resume.`); }
    finally { button.disabled = false; }
  });

  const pending = Object.entries(plans.all());
  root.append(el('h1', {}, 'Upload a file from this browser'),
    el('p', { class: 'muted' }, 'Bytes go straight to storage through presigned part URLs; each part carries its MD5, which storage checks. An interrupted upload resumes when you pick the same file again.'),
    pending.length ? el('div', { class: 'card', id: 'up-pending' }, el('h2', {}, 'Unfinished uploads in this browser'),
      el('ul', {}, pending.map(([k]) => { const [p, d, name, size] = JSON.parse(k); return el('li', {}, `${name} (${bytes(size)}) → ${p}/${d || 'default'}`); }))) : null,
    form);
  return () => { stopped = true; };
}
