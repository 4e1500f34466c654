/** Web Push registration (protocol section 7): the browser's subscription, made with the server's
 * VAPID key, becomes this device's `webpush` push target. */

import type { Api } from "./api.js";
import type { WebPushToken } from "./types.js";

/** Decode base64url (no padding) into bytes, as `applicationServerKey` wants them. */
export function urlBase64ToBytes(b64url: string): Uint8Array {
  const b64 = b64url.replace(/-/g, "+").replace(/_/g, "/") + "=".repeat((4 - (b64url.length % 4)) % 4);
  const raw = atob(b64);
  return Uint8Array.from(raw, (c) => c.charCodeAt(0));
}

export type PushOutcome =
  | { registered: true; endpoint: string }
  | { registered: false; reason: "unsupported" | "no_server_push" | "denied" };

/**
 * Subscribe this browser to Web Push and tell the server where to wake this device.
 * Skips quietly (returns why) when the browser has no push support, the server offers no
 * VAPID key (`GET /v1/push/vapid` is 404), or the user does not allow notifications.
 * `registration` is the page's service worker registration.
 */
export async function registerWebPush(api: Api, registration: ServiceWorkerRegistration | null):
  Promise<PushOutcome> {
  if (registration === null || typeof Notification === "undefined" || !("pushManager" in registration)) {
    return { registered: false, reason: "unsupported" };
  }
  const key = await api.vapidKey();
  if (key === null) return { registered: false, reason: "no_server_push" };
  const permission = Notification.permission === "default" ? await Notification.requestPermission()
    : Notification.permission;
  if (permission !== "granted") return { registered: false, reason: "denied" };
  const sub = await registration.pushManager.subscribe({
    userVisibleOnly: true, applicationServerKey: urlBase64ToBytes(key) as Uint8Array<ArrayBuffer>,
  });
  const json = sub.toJSON();
  const token: WebPushToken = {
    endpoint: sub.endpoint, keys: { p256dh: json.keys?.p256dh ?? "", auth: json.keys?.auth ?? "" },
  };
  await api.setPush("webpush", token);
  return { registered: true, endpoint: sub.endpoint };
}
