// Every page: registers the site service worker, and sends feedback kept offline.
'use strict';

(function () {
  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.register('/sw.js', { scope: '/' }).catch(() => {});
  }

  const notice = (text) => {
    let el = document.getElementById('outbox-notice');
    if (!el) {
      el = document.createElement('p');
      el.id = 'outbox-notice';
      el.className = 'notice';
      el.setAttribute('role', 'status');
      const main = document.querySelector('main');
      if (main) main.prepend(el);
    }
    el.textContent = text;
  };

  const outbox = self.TidingsOutbox;
  if (!outbox || !('indexedDB' in self)) return;

  // Offline: keep the form in the outbox instead of losing it.
  const form = document.querySelector('form[data-outbox]');
  if (form) {
    form.addEventListener('submit', async (event) => {
      if (navigator.onLine) return;
      event.preventDefault();
      const fields = Object.fromEntries(new FormData(form).entries());
      await outbox.save(fields);
      if ('serviceWorker' in navigator && 'SyncManager' in window) {
        const registration = await navigator.serviceWorker.ready;
        await registration.sync.register('feedback-outbox').catch(() => {});
      }
      form.reset();
      notice('You are offline. Your message is saved on this device and will be sent as soon as the connection returns.');
    });
  }

  const flush = async () => {
    try {
      const sent = await outbox.flush();
      if (sent > 0) notice(`Back online: ${sent === 1 ? 'your saved message was' : sent + ' saved messages were'} sent. Thank you!`);
    } catch (e) {
      /* still offline: the next load or "online" event tries again */
    }
  };
  window.addEventListener('online', flush);
  if (navigator.onLine) flush();
})();
