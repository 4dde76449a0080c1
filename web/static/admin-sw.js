// The admin service worker (scope /admin/): shows pushed notifications and opens the
// message when one is clicked. Served at /admin/sw.js with Cache-Control: no-cache.
'use strict';

const FALLBACK_URL = '/admin/';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let data = {};
  if (event.data) {
    try {
      data = event.data.json();
    } catch (e) {
      data = { body: event.data.text() };
    }
  }
  const title = data.title || 'New feedback';
  event.waitUntil(
    self.registration.showNotification(title, {
      body: data.body || '',
      icon: ICON_URL,
      tag: data.tag,
      data: { url: data.url || FALLBACK_URL },
    }),
  );
});

/** The notification's URL if it stays on this site, else the inbox. */
function sameOriginUrl(raw) {
  try {
    const url = new URL(raw, self.location.origin);
    return url.origin === self.location.origin ? url.href : new URL(FALLBACK_URL, self.location.origin).href;
  } catch (e) {
    return new URL(FALLBACK_URL, self.location.origin).href;
  }
}

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const target = sameOriginUrl(event.notification.data && event.notification.data.url);
  event.waitUntil(
    (async () => {
      const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
      const focus = async (client) => {
        // Focusing needs the click's user activation; navigating does not.
        try {
          return await client.focus();
        } catch (e) {
          return client;
        }
      };
      for (const client of windows) {
        if (client.url === target) return focus(client);
      }
      for (const client of windows) {
        if (new URL(client.url).pathname.startsWith('/admin/') && 'navigate' in client) {
          const navigated = await client.navigate(target);
          return focus(navigated || client);
        }
      }
      return self.clients.openWindow(target);
    })(),
  );
});
