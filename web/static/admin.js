// The admin pages' script: the "Notifications" panel (subscribe this browser).
//
// It explains before it asks (the browser's permission prompt only follows a click),
// shows the real state (unsupported / blocked / on / off), remembers the endpoint it
// registered so that a subscription the browser silently replaced or dropped is
// unsubscribed on the server and registered again, and sends the page's CSRF token in
// X-CSRF-Token with every change.
'use strict';

(function () {
  const panel = document.getElementById('push-panel');
  if (!panel) return;

  const STORED_ENDPOINT = 'tidings.push.endpoint';
  const state = panel.querySelector('[data-push-state]');
  const button = panel.querySelector('[data-push-toggle]');
  const message = panel.querySelector('[data-push-message]');

  const meta = (name) => {
    const el = document.querySelector(`meta[name="${name}"]`);
    return el ? el.getAttribute('content') : '';
  };

  const say = (text) => {
    message.textContent = text;
  };

  const show = (key, text, buttonLabel) => {
    state.dataset.state = key;
    state.textContent = text;
    if (buttonLabel) {
      button.hidden = false;
      button.textContent = buttonLabel;
    } else {
      button.hidden = true;
    }
  };

  const post = async (path, body) => {
    const response = await fetch(path, {
      method: 'POST',
      credentials: 'same-origin',
      headers: { 'Content-Type': 'application/json', 'X-CSRF-Token': meta('csrf-token') },
      body: JSON.stringify(body),
    });
    if (!response.ok && response.status !== 204) {
      let detail = `HTTP ${response.status}`;
      try {
        const json = await response.json();
        detail = json.error || JSON.stringify(json.errors || json);
      } catch (e) {
        /* keep the status */
      }
      throw new Error(detail);
    }
    return response;
  };

  const base64UrlToBytes = (text) => {
    const padded = (text + '='.repeat((4 - (text.length % 4)) % 4)).replace(/-/g, '+').replace(/_/g, '/');
    const raw = atob(padded);
    return Uint8Array.from(raw, (c) => c.charCodeAt(0));
  };

  const supported = () => 'serviceWorker' in navigator && 'PushManager' in window && 'Notification' in window;

  /** Keeps the server in step with what the browser really has. */
  const reconcile = async (registration) => {
    let subscription = await registration.pushManager.getSubscription();
    const stored = localStorage.getItem(STORED_ENDPOINT);
    if (!stored || (subscription && subscription.endpoint === stored)) return subscription;
    // The browser dropped or replaced our subscription without telling us: forget the
    // stale one on the server, and subscribe again (no prompt: permission was given).
    await post('/admin/push/unsubscribe', { endpoint: stored }).catch(() => {});
    localStorage.removeItem(STORED_ENDPOINT);
    if (Notification.permission !== 'granted') return subscription;
    if (!subscription) {
      const key = meta('vapid-public-key');
      if (!key) return null;
      subscription = await registration.pushManager.subscribe({
        userVisibleOnly: true,
        applicationServerKey: base64UrlToBytes(key),
      });
    }
    await post('/admin/push/subscribe', subscription.toJSON());
    localStorage.setItem(STORED_ENDPOINT, subscription.endpoint);
    return subscription;
  };

  const render = async (registration) => {
    if (Notification.permission === 'denied') {
      show(
        'blocked',
        'Blocked. Notifications for this site are turned off in your browser: open the site settings (the icon left of the address bar), allow notifications, then reload this page.',
        null,
      );
      return;
    }
    const subscription = await reconcile(registration);
    if (subscription && Notification.permission === 'granted') {
      show('on', 'On for this browser.', 'Turn off for this browser');
    } else {
      show('off', 'Off for this browser.', 'Turn on notifications for this browser');
    }
  };

  const subscribe = async (registration) => {
    const key = meta('vapid-public-key');
    if (!key) throw new Error('push is not configured on this server (no VAPID key)');
    // The permission prompt appears only now, after the admin asked for it.
    const permission = await Notification.requestPermission();
    if (permission !== 'granted') return;
    const subscription = await registration.pushManager.subscribe({
      userVisibleOnly: true,
      applicationServerKey: base64UrlToBytes(key),
    });
    await post('/admin/push/subscribe', subscription.toJSON());
    localStorage.setItem(STORED_ENDPOINT, subscription.endpoint);
    say('Done: this browser will be notified of new feedback.');
  };

  const unsubscribe = async (registration) => {
    const subscription = await registration.pushManager.getSubscription();
    if (subscription) {
      await post('/admin/push/unsubscribe', { endpoint: subscription.endpoint });
      await subscription.unsubscribe();
    }
    localStorage.removeItem(STORED_ENDPOINT);
    say('This browser will no longer be notified.');
  };

  const start = async () => {
    if (!supported()) {
      show('unsupported', 'This browser cannot receive push notifications.', null);
      return;
    }
    const registration = await navigator.serviceWorker.register(panel.dataset.serviceWorker, { scope: '/admin/' });
    await navigator.serviceWorker.ready;
    await render(registration);
    button.addEventListener('click', async () => {
      button.disabled = true;
      say('');
      try {
        if (state.dataset.state === 'on') {
          await unsubscribe(registration);
        } else {
          await subscribe(registration);
        }
        // Reload so the device list below shows the change.
        window.location.reload();
      } catch (e) {
        say(`That did not work: ${e.message}`);
        await render(registration);
      } finally {
        button.disabled = false;
      }
    });
  };

  start().catch((e) => say(`Notifications could not be set up: ${e.message}`));
})();
