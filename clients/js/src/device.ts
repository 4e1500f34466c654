/**
 * A connected device: one MQTT-over-WebSocket connection for requests and live events.
 *
 * What it does for the application, as the Python SDK does:
 * - keeps the inbox cursor in a {@link CursorStore} and, on every (re)connect, syncs from it until
 *   nothing is left, so a device that was offline misses nothing;
 * - hands out inbox events exactly once and in inbox order: a duplicate is dropped, a gap in the
 *   live stream triggers a sync before anything after the gap is delivered;
 * - acknowledges what it has delivered, cumulatively (which makes senders' messages *delivered*);
 * - retries {@link Device.send} under the same id, so a lost reply never makes a second message;
 * - reconnects by itself with backoff and jitter, refreshing the token when it nears expiry.
 */

import mqtt, { type IClientOptions, type MqttClient } from "mqtt";

import { Api } from "./api.js";
import { PigeonError, RequestTimeout } from "./errors.js";
import { type CursorStore, defaultStore } from "./store.js";
import type { Media, PigeonEvent, PresenceEvent, Profile, SentReply, UploadTicket } from "./types.js";

export type Status = "connecting" | "online" | "offline" | "refused" | "closed";

export interface DeviceOptions {
  /** Where the inbox cursor is kept (default: IndexedDB in browsers, memory elsewhere). */
  store?: CursorStore;
  /** MQTT keepalive in seconds (default 60; phones: 240 or more). */
  keepalive?: number;
  /** How long a request waits for its reply (default 10 s). */
  replyTimeoutMs?: number;
  /** Acks are batched over this delay (default 50 ms). */
  ackDelayMs?: number;
  /** Refresh the token when it expires within this long (default 7 days). */
  refreshBeforeMs?: number;
  /** Called with the profile after its token was refreshed, so the application can save it. */
  onProfile?: (profile: Profile) => void;
  /** Opens the MQTT connection (default: MQTT.js's `connect`); a seam for other transports and tests. */
  mqttConnect?: (url: string, options: IClientOptions) => MqttClient;
}

type Json = Record<string, unknown>;
type Listener = (event: PigeonEvent) => void;
interface Pending {
  resolve: (reply: Json) => void;
  reject: (err: Error) => void;
}

const REPLY_TYPES = new Set(["sent", "batch", "error", "media_upload", "media_ready", "media_url"]);
const RETRYABLE = new Set(["timeout", "rate_limited", "unavailable", "not_connected"]);
const MAX_BACKOFF_MS = 30_000;

const sleep = (ms: number) => new Promise<void>((resolve) => setTimeout(resolve, ms));

function newId(): string {
  return crypto.randomUUID().replace(/-/g, "");
}

function hex(buf: ArrayBuffer): string {
  return Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, "0")).join("");
}

/** SHA-256 of bytes, hex, with WebCrypto (browsers and Node alike). */
export async function sha256Hex(data: Uint8Array): Promise<string> {
  return hex(await crypto.subtle.digest("SHA-256", data as Uint8Array<ArrayBuffer>));
}

export class Device {
  readonly api: Api;
  readonly up: string;
  private readonly store: CursorStore;
  private readonly opts: Required<Omit<DeviceOptions, "store" | "onProfile" | "mqttConnect">>;
  private client: MqttClient | null = null;
  private readonly pending = new Map<string, Pending>();
  private readonly watchers = new Map<string, PresenceEvent[]>();
  private readonly listeners = new Set<Listener>();
  private readonly statusListeners = new Set<(s: Status) => void>();
  private readonly buffer = new Map<number, PigeonEvent>();
  private cursorPos = 0;
  private acked = 0;
  private syncChain: Promise<unknown> = Promise.resolve();
  private ackTimer: ReturnType<typeof setTimeout> | null = null;
  private gapTimer: ReturnType<typeof setTimeout> | null = null;
  private reconnectTimer: ReturnType<typeof setTimeout> | null = null;
  private failures = 0;
  private state: Status = "connecting";
  private suspended = false;
  private closing = false;
  // Sends in the order they were made, and those of them going again (refused or unanswered):
  // a later send waits for every earlier one here (see `send`).
  private sendsMade = 0;
  private readonly sendsAgain = new Map<number, Promise<void>>();

  constructor(readonly profile: Profile, private readonly options: DeviceOptions = {}) {
    if (!profile.wsUrl) {
      throw new PigeonError("no_websocket", "the server's login reply names no MQTT-over-WebSocket URL");
    }
    this.api = new Api(profile);
    this.store = options.store ?? defaultStore();
    this.opts = {
      keepalive: options.keepalive ?? 60,
      replyTimeoutMs: options.replyTimeoutMs ?? 10_000,
      ackDelayMs: options.ackDelayMs ?? 50,
      refreshBeforeMs: options.refreshBeforeMs ?? 7 * 86_400_000,
    };
    this.up = `up/${profile.userId}/${profile.deviceId}`;
  }

  /** Connect, subscribe, say online and sync from the stored cursor. */
  static async connect(profile: Profile, options: DeviceOptions = {}): Promise<Device> {
    const dev = new Device(profile, options);
    await dev.open();
    return dev;
  }

  /** The last inbox position handed to the application. */
  get cursor(): number {
    return this.cursorPos;
  }

  get status(): Status {
    return this.state;
  }

  /** Receive events: inbox events (msg, receipt) in order and once; typing and presence as they come.
   * Returns a function that removes the listener. */
  on(listener: Listener): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  onStatus(listener: (s: Status) => void): () => void {
    this.statusListeners.add(listener);
    return () => this.statusListeners.delete(listener);
  }

  async open(): Promise<void> {
    this.cursorPos = this.acked = await this.store.load(this.profile.deviceId);
    await this.connectOnce();
  }

  // -- connection ----------------------------------------------------------------------------------
  private setStatus(s: Status): void {
    if (s === this.state) return;
    this.state = s;
    for (const l of this.statusListeners) l(s);
  }

  private async refreshIfDue(): Promise<void> {
    if (this.profile.expiresAt - Date.now() > this.opts.refreshBeforeMs) return;
    await this.api.refresh();
    this.options.onProfile?.(this.profile);
  }

  /** One connection attempt; resolves once subscribed, online and synced. */
  private async connectOnce(): Promise<void> {
    this.setStatus("connecting");
    await this.refreshIfDue();
    const offline = JSON.stringify({ type: "presence", state: "offline" });
    const connect = this.options.mqttConnect ?? mqtt.connect;
    const client = connect(this.profile.wsUrl as string, {
      clientId: this.profile.deviceId, username: this.profile.deviceId, password: this.profile.token,
      clean: true, keepalive: this.opts.keepalive, protocolVersion: 4, reconnectPeriod: 0,
      connectTimeout: 10_000, resubscribe: false,
      will: { topic: this.up, payload: offline, qos: 1, retain: false },
      ...(this.profile.ca === undefined ? {} : { ca: this.profile.ca }),  // wss:// under Node
    });
    this.client = client;
    try {
      await new Promise<void>((resolve, reject) => {
        const onConnect = () => { cleanup(); resolve(); };
        const onError = (err: Error & { code?: number }) => {
          cleanup();
          const refused = err.code === 4 || err.code === 5;
          reject(new PigeonError(refused ? "connect_refused" : "unavailable", `MQTT connect failed: ${err.message}`));
        };
        const onClose = () => { cleanup(); reject(new PigeonError("unavailable", "the broker closed the connection")); };
        const cleanup = () => {
          client.off("connect", onConnect);
          client.off("error", onError);
          client.off("close", onClose);
        };
        client.on("connect", onConnect);
        client.on("error", onError);
        client.on("close", onClose);
      });
      client.on("message", (topic, payload) => this.onMessage(topic, payload));
      client.on("close", () => this.onClosed(client));
      client.on("error", () => { /* 'close' follows and reconnects */ });
      const me = this.profile.userId;
      await client.subscribeAsync({ [`down/${me}`]: { qos: 1 }, [`down/${me}/${this.profile.deviceId}`]: { qos: 1 } });
      await this.publish({ type: "presence", state: "online" });
      await this.sync();
      this.failures = 0;
      this.setStatus("online");
    } catch (exc) {
      client.removeAllListeners();
      client.on("error", () => {});
      client.end(true);
      if (this.client === client) this.client = null;
      if (exc instanceof PigeonError && exc.code === "connect_refused") this.setStatus("refused");
      throw exc;
    }
  }

  private onClosed(client: MqttClient): void {
    if (this.client !== client) return;
    this.client = null;
    client.removeAllListeners();
    client.on("error", () => {});
    for (const [id, p] of this.pending) {
      this.pending.delete(id);
      p.reject(new PigeonError("not_connected", "the connection was lost before the reply came"));
    }
    if (this.closing) return;
    this.setStatus("offline");
    this.scheduleReconnect();
  }

  private scheduleReconnect(): void {
    if (this.closing || this.suspended || this.reconnectTimer !== null) return;
    const base = Math.min(MAX_BACKOFF_MS, 500 * 2 ** this.failures);
    const delay = base * (0.5 + Math.random() / 2);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = null;
      if (this.closing || this.suspended || this.client !== null) return;
      this.connectOnce().catch((exc: unknown) => {
        if (exc instanceof PigeonError && exc.code === "connect_refused") return; // unlinked or expired: stop
        this.failures += 1;
        this.setStatus("offline");
        this.scheduleReconnect();
      });
    }, delay);
  }

  /** Drop the connection and stop reconnecting (e.g. the browser went offline). */
  suspend(): void {
    this.suspended = true;
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    const client = this.client;
    if (client !== null) {
      client.end(true);
      this.onClosed(client);
    }
  }

  /** Reconnect at once after {@link suspend} (or cut a backoff wait short), then catch up. */
  resume(): void {
    this.suspended = false;
    this.failures = 0;
    if (this.client !== null || this.closing) return;
    if (this.reconnectTimer !== null) clearTimeout(this.reconnectTimer);
    this.reconnectTimer = null;
    this.scheduleReconnectNow();
  }

  private scheduleReconnectNow(): void {
    this.connectOnce().catch((exc: unknown) => {
      if (exc instanceof PigeonError && exc.code === "connect_refused") return;
      this.failures += 1;
      this.setStatus("offline");
      this.scheduleReconnect();
    });
  }

  /** Acknowledge what was delivered, say offline, disconnect. The cursor stays in the store. */
  async close(): Promise<void> {
    if (this.closing) return;
    const client = this.client;
    if (client !== null && client.connected) {
      await this.bounded(this.flushAck());
      await this.bounded(this.publish({ type: "presence", state: "offline" }));
    }
    this.closing = true;
    for (const t of [this.ackTimer, this.gapTimer, this.reconnectTimer]) if (t !== null) clearTimeout(t);
    if (client !== null) await this.bounded(client.endAsync());
    this.client = null;
    await this.store.save(this.profile.deviceId, this.acked);
    this.setStatus("closed");
  }

  private async bounded(step: Promise<unknown>): Promise<void> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const limit = new Promise<void>((resolve) => { timer = setTimeout(resolve, 5000); });
    try {
      await Promise.race([step.catch(() => undefined), limit]);
    } finally {
      clearTimeout(timer);
    }
  }

  // -- plumbing --------------------------------------------------------------------------------------
  private async publish(payload: Json, qos: 0 | 1 = 1): Promise<void> {
    const client = this.client;
    if (client === null || !client.connected) throw new PigeonError("not_connected", "the device is not connected");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const limit = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new RequestTimeout(`the broker did not acknowledge a ${String(payload.type)}`)),
        this.opts.replyTimeoutMs);
    });
    try {
      await Promise.race([client.publishAsync(this.up, JSON.stringify(payload), { qos }), limit]);
    } finally {
      clearTimeout(timer);
    }
  }

  /** Publish a request with an id and wait for the reply that echoes it (or an error reply). */
  async request(payload: Json, timeoutMs?: number): Promise<Json> {
    const client = this.client;
    if (client === null || !client.connected) throw new PigeonError("not_connected", "the device is not connected");
    const id = typeof payload.id === "string" ? payload.id : newId();
    const body = { ...payload, id };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const reply = new Promise<Json>((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      timer = setTimeout(() => reject(new RequestTimeout(`no reply to ${String(payload.type)} ${id}`)),
        timeoutMs ?? this.opts.replyTimeoutMs);
    });
    // registered before the publish: the reply may come before the PUBACK
    client.publish(this.up, JSON.stringify(body), { qos: 1 }, (err) => {
      if (err) this.pending.get(id)?.reject(new PigeonError("not_connected", `publish failed: ${err.message}`));
    });
    try {
      const r = await reply;
      if (r.type === "error") {
        throw new PigeonError(String(r.code), String(r.message ?? r.code), undefined,
          typeof r.retry_after_ms === "number" ? r.retry_after_ms : undefined);
      }
      return r;
    } finally {
      clearTimeout(timer);
      this.pending.delete(id);
    }
  }

  private onMessage(_topic: string, payload: Uint8Array): void {
    let event: unknown;
    try {
      event = JSON.parse(new TextDecoder().decode(payload));
    } catch {
      return; // not JSON: nothing the protocol sends
    }
    if (typeof event !== "object" || event === null || Array.isArray(event)) return;
    const ev = event as Json;
    const id = typeof ev.id === "string" ? ev.id : null;
    if (id !== null && REPLY_TYPES.has(String(ev.type)) && this.pending.has(id)) {
      this.pending.get(id)?.resolve(ev);
      return;
    }
    if (id !== null && ev.type === "presence" && this.watchers.has(id)) {
      this.watchers.get(id)?.push(ev as unknown as PresenceEvent);
      return;
    }
    if (typeof ev.inbox === "number") this.take(ev as PigeonEvent, false);
    else this.emit(ev as PigeonEvent);
  }

  private emit(event: PigeonEvent): void {
    for (const l of this.listeners) {
      try {
        l(event);
      } catch (exc) {
        console.error("pigeon: an event listener failed", exc);
      }
    }
  }

  /** Deliver inbox events once and in order. What sync returns comes from the store in inbox order
   * and is authoritative: a position it skips does not exist. A live event past a gap waits. */
  private take(event: PigeonEvent, fromStore: boolean): void {
    const pos = (event as { inbox: number }).inbox;
    if (pos <= this.cursorPos) return;
    this.buffer.set(pos, event);
    if (fromStore) {
      for (const early of [...this.buffer.keys()].filter((p) => p < pos).sort((a, b) => a - b)) this.deliver(early);
      this.deliver(pos);
    }
    while (this.buffer.has(this.cursorPos + 1)) this.deliver(this.cursorPos + 1);
    if (this.buffer.size > 0) this.scheduleGapSync();
  }

  private deliver(pos: number): void {
    const ev = this.buffer.get(pos) as PigeonEvent;
    this.buffer.delete(pos);
    this.cursorPos = pos;
    this.emit(ev);
    if (this.ackTimer === null) {
      this.ackTimer = setTimeout(() => {
        this.ackTimer = null;
        this.flushAck().catch(() => { /* the next ack carries it */ });
      }, this.opts.ackDelayMs);
    }
  }

  private scheduleGapSync(): void {
    if (this.gapTimer !== null) return;
    this.gapTimer = setTimeout(() => { // let in-flight live events land before asking
      this.gapTimer = null;
      if (this.buffer.size === 0 || this.client === null) return;
      this.sync().catch(async () => {
        await sleep(1000 + Math.random() * 1000);
        if (this.buffer.size > 0) this.scheduleGapSync();
      });
    }, 50);
  }

  private async flushAck(): Promise<void> {
    if (this.cursorPos <= this.acked) return;
    const upTo = this.cursorPos;
    await this.publish({ type: "ack", up_to: upTo });
    if (upTo > this.acked) this.acked = upTo;
    await this.store.save(this.profile.deviceId, this.acked);
  }

  // -- requests --------------------------------------------------------------------------------------
  /** Fetch every inbox event after the cursor (delivered to listeners); returns how many were new. */
  sync(limit = 500): Promise<number> {
    const run = async (): Promise<number> => {
      const before = this.cursorPos;
      for (;;) {
        const batch = await this.request({ type: "sync", after: this.cursorPos, limit }) as
          { items: PigeonEvent[]; more: boolean };
        for (const item of batch.items) this.take(item, true);
        if (!batch.more || batch.items.length === 0) break;
      }
      await this.flushAck();
      return this.cursorPos - before;
    };
    const next = this.syncChain.then(run, run);
    this.syncChain = next.catch(() => undefined);
    return next;
  }

  /** Send a message to a chat (`chat`) or to a user's direct chat (`to`); retried under the same id
   * until the server answers `sent` (the single tick). Sends keep the order they were made in
   * through retries: once one is refused (`rate_limited`, `unavailable`) or unanswered, the device's
   * later sends (new ones, and refused ones going again) wait until it is through, so the server
   * numbers them in that order, as the protocol promises for one device's sends to a chat. */
  async send(msg: { body?: string; chat?: string; to?: string; media?: Media; id?: string; retries?: number }):
    Promise<SentReply> {
    const payload: Json = { type: "send", id: msg.id ?? newId() };
    if (msg.chat !== undefined) payload.chat = msg.chat;
    if (msg.to !== undefined) payload.to = msg.to;
    if (msg.body !== undefined) payload.body = msg.body;
    if (msg.media !== undefined) payload.media = msg.media;
    const retries = msg.retries ?? 3;
    const order = ++this.sendsMade;
    let through: (() => void) | null = null;
    let delay = 500;
    try {
      for (let attempt = 0; ; attempt++) {
        await this.afterEarlierSends(order);
        try {
          return (await this.request(payload)) as unknown as SentReply;
        } catch (exc) {
          if (!(exc instanceof PigeonError) || !RETRYABLE.has(exc.code) || attempt >= retries) throw exc;
          delay = Math.max(delay, exc.retryAfterMs ?? 0);
        }
        if (through === null) {
          this.sendsAgain.set(order, new Promise<void>((resolve) => { through = resolve; }));
        }
        await sleep(Math.min(delay, 10_000) * (1 + Math.random() / 2));
        delay *= 2;
      }
    } finally {
      if (through !== null) {
        this.sendsAgain.delete(order);
        (through as () => void)();
      }
    }
  }

  /** Wait until no send made before this one is still going again. */
  private async afterEarlierSends(order: number): Promise<void> {
    for (;;) {
      const earlier = [...this.sendsAgain].find(([k]) => k < order);
      if (earlier === undefined) return;
      await earlier[1];
    }
  }

  /** The user has read the chat up to `seq`. */
  async read(chat: string, upTo: number): Promise<void> {
    await this.publish({ type: "read", chat, up_to: upTo });
  }

  /** Tell the chat's online members this user is typing (QoS 0, never stored). */
  async typing(chat: string): Promise<void> {
    await this.publish({ type: "typing", chat }, 0);
  }

  /** Presence of the visible users now; later changes arrive as `presence` events for `ttl` seconds. */
  async watch(users: string[], ttl = 300): Promise<PresenceEvent[]> {
    const id = newId();
    const got: PresenceEvent[] = [];
    this.watchers.set(id, got);
    try {
      await this.publish({ type: "watch", id, users, ttl });
      const want = new Set(users).size;
      const deadline = Date.now() + 2000;
      while (got.length < want && Date.now() < deadline) await sleep(20);
      return got.slice();
    } finally {
      this.watchers.delete(id);
    }
  }

  /** Upload bytes (SHA-256 computed with WebCrypto) and return the MEDIA object to pass to {@link send}. */
  async upload(data: Uint8Array | Blob, mime: string, name?: string): Promise<Media> {
    const bytes = data instanceof Uint8Array ? data : new Uint8Array(await data.arrayBuffer());
    const sha256 = await sha256Hex(bytes);
    const reply = await this.request({ type: "media_upload", sha256, size: bytes.length, mime }) as
      { key: string; exists: boolean; upload?: UploadTicket };
    if (!reply.exists) {
      if (!reply.upload) throw new PigeonError("bad_request", "the server gave no upload ticket");
      await this.api.putBlob(reply.upload, bytes);
    }
    await this.request({ type: "media_done", key: reply.key });
    const media: Media = { key: reply.key, mime, size: bytes.length, sha256 };
    if (name) media.name = name;
    return media;
  }

  /** A short-lived download URL for a media key carried by a message of that chat. */
  async mediaUrl(key: string, chat: string): Promise<string> {
    return String((await this.request({ type: "media_url", key, chat })).url);
  }

  /** Download a media object and check it against the SHA-256 the message declared (when given). */
  async download(key: string, chat: string, sha256?: string): Promise<Uint8Array> {
    const data = await this.api.getBlob(await this.mediaUrl(key, chat));
    if (sha256 !== undefined && (await sha256Hex(data)) !== sha256) {
      throw new PigeonError("download_failed", "the downloaded file does not match its SHA-256");
    }
    return data;
  }
}
