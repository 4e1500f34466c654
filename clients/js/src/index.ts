/** Pigeon's JavaScript SDK: login over HTTP, live events over MQTT-over-WebSocket. */

export { Api, login, requestCode, verify } from "./api.js";
export type { TlsOptions } from "./api.js";
export { Device, sha256Hex } from "./device.js";
export type { DeviceOptions, Status } from "./device.js";
export { PigeonError, RequestTimeout } from "./errors.js";
export { defaultStore, IndexedDBStore, MemoryStore } from "./store.js";
export type { CursorStore } from "./store.js";
export { registerWebPush, urlBase64ToBytes } from "./push.js";
export type * from "./types.js";
