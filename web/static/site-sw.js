// The site service worker (scope /). Served at /sw.js with Cache-Control: no-cache;
// VERSION, PRECACHE and MAX_ENTRIES are written above this file by the server, and
// VERSION changes with every asset, so a deploy installs a new worker that deletes the
// old caches.
//
// Pages: network first (with a timeout), then the cache, then the offline page. Only
// successful GETs without `no-store` are cached, and the dynamic cache is trimmed to
// MAX_ENTRIES, oldest first. A feedback form posted without a connection is kept in the
// outbox and sent on Background Sync or on the next page load.
'use strict';

importScripts(OUTBOX_URL);

const SHELL = `tidings-shell-${VERSION}`;
const DYNAMIC = `tidings-pages-${VERSION}`;
const NETWORK_TIMEOUT_MS = 3000;

self.addEventListener('install', (event) => {
  event.waitUntil(
    (async () => {
      const cache = await caches.open(SHELL);
      await cache.addAll(PRECACHE);
      await self.skipWaiting();
    })(),
  );
});

self.addEventListener('activate', (event) => {
  event.waitUntil(
    (async () => {
      for (const name of await caches.keys()) {
        if (name !== SHELL && name !== DYNAMIC) await caches.delete(name);
      }
      await self.clients.claim();
    })(),
  );
});

/** The seed's trimCache: drop the oldest entries until at most `max` remain. */
async function trimCache(name, max) {
  const cache = await caches.open(name);
  const keys = await cache.keys();
  for (let i = 0; i < keys.length - max; i += 1) {
    await cache.delete(keys[i]);
  }
}

function cacheable(response) {
  if (!response || response.status !== 200 || response.type !== 'basic') return false;
  const control = response.headers.get('Cache-Control') || '';
  return !/no-store/i.test(control);
}

function withTimeout(promise, ms) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('network timeout')), ms);
    promise.then(
      (value) => {
        clearTimeout(timer);
        resolve(value);
      },
      (error) => {
        clearTimeout(timer);
        reject(error);
      },
    );
  });
}

async function networkFirst(request) {
  try {
    const response = await withTimeout(fetch(request), NETWORK_TIMEOUT_MS);
    if (cacheable(response)) {
      const copy = response.clone();
      const cache = await caches.open(DYNAMIC);
      await cache.put(request, copy);
      await trimCache(DYNAMIC, MAX_ENTRIES);
    }
    return response;
  } catch (e) {
    const cached = await caches.match(request);
    if (cached) return cached;
    if (request.mode === 'navigate') return caches.match('/offline');
    throw e;
  }
}

/** A form post that could not reach us: keep it, and say so. */
async function postOrKeep(request) {
  const copy = request.clone();
  try {
    return await fetch(request);
  } catch (e) {
    const form = await copy.formData();
    const fields = Object.fromEntries(form.entries());
    if (fields.website) return caches.match('/offline');
    await self.TidingsOutbox.save(fields);
    if (self.registration.sync) await self.registration.sync.register('feedback-outbox').catch(() => {});
    const page = await caches.match('/offline');
    const html = (await page.text()).replace('data-saved="false"', 'data-saved="true"');
    return new Response(html, { status: 202, headers: { 'Content-Type': 'text/html; charset=utf-8' } });
  }
}

self.addEventListener('fetch', (event) => {
  const request = event.request;
  const url = new URL(request.url);
  if (url.origin !== self.location.origin) return;
  if (url.pathname.startsWith('/admin/') || url.pathname.startsWith('/api/')) return;
  if (request.method === 'POST' && url.pathname === '/feedback') {
    event.respondWith(postOrKeep(request));
    return;
  }
  if (request.method !== 'GET') return;
  if (url.pathname.startsWith('/static/')) {
    // Hashed names never change: the cache is always right.
    event.respondWith(caches.match(request).then((hit) => hit || networkFirst(request)));
    return;
  }
  event.respondWith(networkFirst(request));
});

self.addEventListener('sync', (event) => {
  if (event.tag === 'feedback-outbox') event.waitUntil(self.TidingsOutbox.flush());
});
