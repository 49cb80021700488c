// The console: sign-in, navigation between views (#/fleet, #/uploads, #/session/ID,
// #/projects, #/upload), and what the signed-in key may do.

import { get, token, ApiError } from './api.js';
import { Feed, Live } from './feed.js';
import { say } from './ui.js';
import * as fleet from './fleet.js';
import * as uploads from './uploads.js';
import * as session from './session.js';
import * as projects from './projects.js';
import * as upload from './upload.js';

const $ = (id) => document.getElementById(id);
const routes = { fleet, uploads, session, projects, upload };
let ctx = null;
let cleanup = null;

function can(me) {
  const operate = me.role === 'operator' || me.role === 'admin';
  const admin = me.role === 'admin';
  return { operate, admin, global: admin && !me.project_id };
}

async function signIn(t) {
  token.set(t);
  const me = await get('/v1/whoami');
  const may = can(me);
  document.body.classList.toggle('can-operate', may.operate);
  document.body.classList.toggle('can-admin', may.admin);
  document.body.classList.toggle('can-global', may.global);
  $('who').textContent = `${me.name} · ${me.role}${me.project_id ? ` of ${me.project_id}` : ' · every project'}`;
  $('who').dataset.role = me.role;
  $('signin').hidden = true;
  $('nav').hidden = false;
  $('signout').hidden = false;
  const feed = new Feed();
  feed.start().catch(() => {});
  const live = new Live();
  await live.init();
  live.start().catch(() => {});
  ctx = { me, may, feed, live };
  route();
}

function signOut() {
  token.clear();
  ctx?.feed.stop();
  ctx?.live.stop();
  ctx = null;
  cleanup?.();
  cleanup = null;
  document.body.classList.remove('can-operate', 'can-admin', 'can-global');
  $('view').replaceChildren();
  $('nav').hidden = true;
  $('signout').hidden = true;
  $('who').textContent = '';
  $('signin').hidden = false;
  $('token').value = '';
  $('token').focus();
}

function route() {
  if (!ctx) return;
  const [, name = 'fleet', arg] = (location.hash || '#/fleet').split('/');
  const view = routes[name] || fleet;
  cleanup?.();
  for (const a of document.querySelectorAll('#nav a')) {
    if (a.getAttribute('href') === `#/${name}`) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  const root = $('view');
  root.replaceChildren();
  cleanup = view.render(root, ctx, arg ? decodeURIComponent(arg) : undefined) || null;
  $('main').focus({ preventScroll: true });
}

window.addEventListener('hashchange', route);
window.addEventListener('uplink:unauthorized', () => {
  signOut();
  $('signin-error').textContent = 'The key was refused (revoked or wrong): sign in again.';
});

$('signin').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('signin-error').textContent = '';
  try {
    await signIn($('token').value.trim());
  } catch (e) {
    token.clear();
    $('signin-error').textContent = e instanceof ApiError && e.status === 401
      ? 'That key is not valid (or revoked).' : `Sign-in failed: ${e.message}`;
  }
});
$('signout').addEventListener('click', signOut);

// A reload keeps the tab signed in (sessionStorage survives it; a new tab does not).
if (token.get()) {
  signIn(token.get()).catch((e) => { signOut(); say(`Sign-in failed: ${e.message}`); });
} else {
  signOut();
}
