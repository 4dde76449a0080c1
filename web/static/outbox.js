// The offline outbox: feedback forms submitted without a connection are kept in
// IndexedDB and sent when the connection returns. Loaded by the pages and by the site
// service worker (importScripts), so both can save and flush.
'use strict';

(function (global) {
  const DB = 'tidings';
  const STORE = 'outbox';

  const open = () =>
    new Promise((resolve, reject) => {
      const request = indexedDB.open(DB, 1);
      request.onupgradeneeded = () => request.result.createObjectStore(STORE, { keyPath: 'id', autoIncrement: true });
      request.onsuccess = () => resolve(request.result);
      request.onerror = () => reject(request.error);
    });

  const run = async (mode, work) => {
    const db = await open();
    return new Promise((resolve, reject) => {
      const tx = db.transaction(STORE, mode);
      const result = work(tx.objectStore(STORE));
      tx.oncomplete = () => resolve(result && 'result' in result ? result.result : undefined);
      tx.onerror = () => reject(tx.error);
    });
  };

  /** Keeps the three fields of a form (never the CSRF token: it is fetched fresh). */
  const save = (fields) =>
    run('readwrite', (store) =>
      store.add({
        submitter_name: fields.submitter_name || '',
        submitter_email: fields.submitter_email || '',
        content: fields.content || '',
        saved_at: Date.now(),
      }),
    );

  const all = () => run('readonly', (store) => store.getAll());
  const remove = (id) => run('readwrite', (store) => store.delete(id));

  /** A fresh CSRF token (and its cookie) from the form page. */
  const token = async () => {
    const response = await fetch('/feedback', { credentials: 'same-origin', cache: 'no-store' });
    const html = await response.text();
    const match = html.match(/name="csrf_token" value="([^"]+)"/);
    if (!match) throw new Error('no CSRF token on the form page');
    return match[1];
  };

  /** Sends every kept submission once, even if a page and the worker flush together. */
  const flush = () =>
    self.navigator && self.navigator.locks ? self.navigator.locks.request('tidings-outbox', send) : send();

  /** Sends every kept submission; keeps what could not be sent. Returns the number sent. */
  const send = async () => {
    const pending = await all();
    if (!pending.length) return 0;
    let sent = 0;
    const csrf = await token();
    for (const entry of pending) {
      const body = new URLSearchParams({
        csrf_token: csrf,
        submitter_name: entry.submitter_name,
        submitter_email: entry.submitter_email,
        content: entry.content,
      });
      const response = await fetch('/feedback', {
        method: 'POST',
        credentials: 'same-origin',
        body,
      });
      // Accepted (the 303 was followed to the thanks page), or refused as invalid (422):
      // either way it is settled. Anything else (429, 5xx) stays for the next attempt.
      if (response.ok || response.status === 422) {
        await remove(entry.id);
        if (response.ok) sent += 1;
      } else {
        break;
      }
    }
    return sent;
  };

  global.TidingsOutbox = { save, all, flush };
})(self);
