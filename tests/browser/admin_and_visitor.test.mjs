// Browser tests in headless Chromium, driven through playwright-core.
//
// Started by the Rust test `browser::the_site_works_in_a_real_browser`, which runs the
// app and the push-service stand-in and passes them in the environment:
//   APP_URL, PUSH_URL (the stand-in), SUBSCRIPTION (the stand-in's subscription JSON),
//   ADMIN_EMAIL, ADMIN_PASSWORD, CHROMIUM (path), ARTIFACTS (screenshot folder).
// Headless Chromium has no route to a push service, so `pushManager.subscribe` is
// stubbed to return the stand-in's subscription; the push the worker really sent is
// read back from the stand-in (decrypted there) and delivered into the service worker
// with CDP `ServiceWorker.deliverPushMessage`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const env = (name) => {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set: run these tests through cargo (see README)`);
  return value;
};

const APP = env('APP_URL');
const PUSH = env('PUSH_URL');
const SUBSCRIPTION = JSON.parse(env('SUBSCRIPTION'));
const ARTIFACTS = env('ARTIFACTS');
mkdirSync(ARTIFACTS, { recursive: true });

let browser;
let context;

before(async () => {
  browser = await chromium.launch({ executablePath: env('CHROMIUM'), headless: true });
  context = await browser.newContext({ viewport: { width: 1000, height: 800 } });
  await context.grantPermissions(['notifications'], { origin: APP });
  // The stub: `subscribe` answers with the stand-in's subscription and remembers it.
  await context.addInitScript((subscription) => {
    if (!('PushManager' in self)) return;
    const KEY = 'test.stub-subscribed';
    const stub = {
      endpoint: subscription.endpoint,
      expirationTime: null,
      toJSON: () => subscription,
      unsubscribe: async () => {
        localStorage.removeItem(KEY);
        return true;
      },
    };
    PushManager.prototype.subscribe = async function () {
      localStorage.setItem(KEY, '1');
      return stub;
    };
    PushManager.prototype.getSubscription = async function () {
      return localStorage.getItem(KEY) ? stub : null;
    };
  }, SUBSCRIPTION);
});

after(async () => {
  await browser?.close();
});

const waitFor = async (what, check, timeoutMs = 20000) => {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) return value;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
};

const shot = (page, name) => page.screenshot({ path: join(ARTIFACTS, `${name}.png`), fullPage: true });

test('an admin subscribes this browser, gets the notification and its click opens the message', async () => {
  const admin = await context.newPage();
  await admin.goto(`${APP}/admin/login`);
  await admin.fill('#email', env('ADMIN_EMAIL'));
  await admin.fill('#password', env('ADMIN_PASSWORD'));
  await Promise.all([admin.waitForURL(`${APP}/admin/`), admin.click('button[type=submit]')]);

  // The panel explains first and asks only after the click.
  await admin.goto(`${APP}/admin/notifications`);
  const state = admin.locator('[data-push-state]');
  await waitFor('the panel to show the state', async () => (await state.getAttribute('data-state')) === 'off');
  const registration = await admin.evaluate(async () => {
    const r = await navigator.serviceWorker.getRegistration('/admin/');
    return r ? r.scope : null;
  });
  assert.equal(registration, `${APP}/admin/`);
  await shot(admin, 'notifications-panel-off');
  await Promise.all([admin.waitForEvent('load'), admin.click('[data-push-toggle]')]);
  await waitFor('the panel to say on', async () => (await state.getAttribute('data-state')) === 'on');
  assert.match(await admin.locator('table.devices').innerText(), /Chrome on Linux|Chrome/);
  await shot(admin, 'notifications-panel');

  // A subscription the browser replaced silently is noticed on the next visit: the
  // stale endpoint is dropped on the server and the current one registered again.
  await admin.evaluate(() => localStorage.setItem('tidings.push.endpoint', 'https://fcm.googleapis.com/fcm/send/stale'));
  await admin.reload();
  await waitFor('the panel to reconcile', async () =>
    (await admin.evaluate(() => localStorage.getItem('tidings.push.endpoint'))) === SUBSCRIPTION.endpoint,
  );
  await waitFor('the panel to say on again', async () => (await state.getAttribute('data-state')) === 'on');

  // A visitor sends feedback in another page; the worker pushes it to the stand-in.
  const visitor = await context.newPage();
  await visitor.goto(`${APP}/feedback`);
  await shot(visitor, 'feedback-form');
  await visitor.fill('#submitter_name', 'Ann');
  await visitor.fill('#submitter_email', 'ann@example.com');
  await visitor.fill('#content', 'The checkout page is broken');
  await Promise.all([visitor.waitForURL(`${APP}/feedback/thanks`), visitor.click('button[type=submit]')]);
  const pushed = await waitFor('the push to reach the stand-in', async () => {
    const received = await (await fetch(`${PUSH}/received`)).json();
    return received.find((p) => p.endpoint === SUBSCRIPTION.endpoint);
  });
  const payload = JSON.parse(pushed.payload);
  assert.equal(payload.title, 'Ann:');

  // Deliver that push into the admin service worker, as the browser's push service would.
  const cdp = await context.newCDPSession(admin);
  const registrations = [];
  cdp.on('ServiceWorker.workerRegistrationUpdated', (event) => registrations.push(...event.registrations));
  await cdp.send('ServiceWorker.enable');
  await waitFor('the admin registration over CDP', async () =>
    registrations.find((r) => r.scopeURL === `${APP}/admin/` && !r.isDeleted),
  );
  // The newest state of the admin registration: under load Chromium may report it more
  // than once (and a delivery to a superseded id is dropped), so deliver again if the
  // notification does not show.
  const deliver = async () => {
    const latest = registrations.filter((r) => r.scopeURL === `${APP}/admin/`).at(-1);
    await cdp.send('ServiceWorker.deliverPushMessage', {
      origin: new URL(APP).origin,
      registrationId: latest.registrationId,
      data: pushed.payload,
    });
  };
  const notificationsShown = async () => {
    const list = await admin.evaluate(async () => {
      const r = await navigator.serviceWorker.getRegistration('/admin/');
      const notifications = await r.getNotifications();
      return notifications.map((n) => ({ title: n.title, body: n.body, url: n.data && n.data.url }));
    });
    return list.length ? list : null;
  };
  let shown = null;
  for (let delivery = 0; !shown && delivery < 4; delivery += 1) {
    await deliver();
    shown = await waitFor('the notification to be shown', notificationsShown, 6000).catch(() => null);
  }
  if (!shown) throw new Error('timed out waiting for the notification to be shown');
  assert.equal(shown[0].title, 'Ann:');
  assert.equal(shown[0].body, 'The checkout page is broken');
  assert.match(shown[0].url, /\/admin\/feedback\/\d+$/);

  // Clicking it brings the admin tab to that message.
  await admin.goto(`${APP}/admin/`);
  await shot(admin, 'inbox');
  const worker = await waitFor('the admin service worker', async () =>
    context.serviceWorkers().find((w) => w.url().endsWith('/admin/sw.js')),
  );
  await worker.evaluate(async () => {
    const [notification] = await self.registration.getNotifications();
    self.dispatchEvent(new NotificationEvent('notificationclick', { notification }));
  });
  await admin.waitForURL(shown[0].url, { timeout: 10000 });
  assert.match(await admin.locator('.message').innerText(), /The checkout page is broken/);
  await shot(admin, 'feedback-detail');

  // The Queues page draws its charts without script.
  await admin.goto(`${APP}/admin/queues`);
  assert.equal(await admin.locator('figure.chart svg').count(), 2);
  await shot(admin, 'queues');
});

test('the manifest parses and a 404 carries the security headers', async () => {
  const page = await context.newPage();
  await page.goto(`${APP}/feedback`);
  const cdp = await context.newCDPSession(page);
  const manifest = await cdp.send('Page.getAppManifest');
  assert.deepEqual(manifest.errors, [], JSON.stringify(manifest.errors));
  assert.match(manifest.data, /"display":"standalone"/);
  const response = await page.goto(`${APP}/no-such-page`);
  assert.equal(response.status(), 404);
  const headers = response.headers();
  assert.match(headers['content-security-policy'], /frame-ancestors 'none'/);
  assert.equal(headers['x-frame-options'], 'DENY');
  assert.equal(headers['x-content-type-options'], 'nosniff');
  assert.equal(headers['referrer-policy'], 'same-origin');
});

test('offline: visited pages come from the cache, others show the offline page, and a form is kept and sent later', async () => {
  const page = await context.newPage();
  await page.goto(`${APP}/feedback`);
  await waitFor('the site service worker to control the page', async () =>
    page.evaluate(() => navigator.serviceWorker.controller !== null),
  );
  await page.goto(`${APP}/feedback/thanks`); // visited once, so cached
  await context.setOffline(true);
  try {
    await page.goto(`${APP}/feedback/thanks`);
    assert.match(await page.locator('h1').innerText(), /Thank you/);
    await page.goto(`${APP}/never-visited`);
    assert.match(await page.locator('h1').innerText(), /You are offline/);

    await page.goto(`${APP}/feedback`);
    await page.fill('#submitter_name', 'Offline Olga');
    await page.fill('#submitter_email', 'olga@example.com');
    await page.fill('#content', 'Written on a train without signal');
    await page.click('button[type=submit]');
    await waitFor('the saved notice', async () => /saved on this device/.test(await page.locator('main').innerText()));
    await shot(page, 'offline-saved');
  } finally {
    await context.setOffline(false);
  }
  // Back online: the page sends what it kept.
  await page.evaluate(() => window.dispatchEvent(new Event('online')));
  await waitFor('the kept message to arrive', async () => {
    const received = await (await fetch(`${PUSH}/received`)).json();
    return received.some((p) => JSON.parse(p.payload).title === 'Offline Olga:');
  }, 30000);
});
