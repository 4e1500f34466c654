// Pigeon's service worker: shows a notification when the server wakes this browser through Web Push.
// The push carries no message text (protocol section 7), only that something is waiting.
self.addEventListener("push", (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch {
    data = {};
  }
  const unread = typeof data.unread === "number" && data.unread > 0 ? ` (${data.unread} unread)` : "";
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    if (windows.some((w) => w.visibilityState === "visible")) return; // the open page shows it already
    await self.registration.showNotification("Pigeon", {
      body: `New messages${unread}`, tag: "pigeon-wake", renotify: true, icon: "icon.svg",
    });
  })());
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: "window", includeUncontrolled: true });
    if (windows.length > 0) return windows[0].focus();
    return self.clients.openWindow("./");
  })());
});
