/** The HTTP half of the SDK: login, chats, groups, history, receipts, users, media, push. */

import { PigeonError } from "./errors.js";
import { fetchTrusting, reason } from "./fetch.js";
import type {
  Chat, HistoryPage, MemberReceipt, Profile, SentReply, UploadTicket, User, WebPushToken,
} from "./types.js";

type Json = Record<string, unknown>;

function trimBase(url: string): string {
  return url.replace(/\/+$/, "");
}

/** Turn an HTTP reply into its JSON body, or a PigeonError carrying the server's code and message. */
async function parse(resp: Response): Promise<unknown> {
  const text = await resp.text();
  let body: unknown = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (resp.ok) return body;
  const err = (body as { error?: { code?: unknown; message?: unknown; retry_after_ms?: unknown } } | null)?.error;
  if (err && typeof err.code === "string") {
    throw new PigeonError(err.code, String(err.message ?? err.code), resp.status,
      typeof err.retry_after_ms === "number" ? err.retry_after_ms : undefined);
  }
  throw new PigeonError("http_error", `HTTP ${resp.status}`, resp.status);
}

async function call(base: string, method: string, path: string, body?: unknown, token?: string,
  ca?: string): Promise<unknown> {
  const headers: Record<string, string> = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (token) headers.authorization = `Bearer ${token}`;
  let resp: Response;
  try {
    resp = await fetchTrusting(ca, `${trimBase(base)}${path}`, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
  } catch (exc) {
    if (exc instanceof PigeonError) throw exc;
    throw new PigeonError("unavailable", `cannot reach ${base}: ${reason(exc)}`);
  }
  return parse(resp);
}

/** TLS under Node: `ca` is the PEM text of the CA (or CAs) the server's certificate is checked
 * against, for HTTPS and for `wss://`, instead of the system's CAs. Kept in the profile. */
export interface TlsOptions {
  ca?: string;
}

function checkedCa(ca: string | undefined): string | undefined {
  if (ca !== undefined && (typeof ca !== "string" || !ca.includes("-----BEGIN CERTIFICATE-----"))) {
    throw new PigeonError("bad_request", "ca must be the PEM text of a CA certificate (-----BEGIN CERTIFICATE-----)");
  }
  return ca;
}

/** Ask for a login code; returns it when the server runs with `--dev`, else null (it went by SMS). */
export async function requestCode(httpUrl: string, phone: string, opts: TlsOptions = {}): Promise<string | null> {
  const reply = (await call(httpUrl, "POST", "/v1/auth/code", { phone }, undefined, checkedCa(opts.ca))) as
    Json | null;
  return typeof reply?.dev_code === "string" ? reply.dev_code : null;
}

/** Link a new device with the code; the returned profile is what {@link Device} connects with. */
export async function verify(httpUrl: string, phone: string, code: string,
  opts: { deviceName?: string; platform?: string } & TlsOptions = {}): Promise<Profile> {
  const ca = checkedCa(opts.ca);
  const r = (await call(httpUrl, "POST", "/v1/auth/verify", {
    phone, code, device_name: opts.deviceName ?? "js-sdk", platform: opts.platform ?? "js",
  }, undefined, ca)) as { user_id: string; device_id: string; token: string; expires_at: number;
    mqtt: { host: string; port: number; ws_url: string | null } };
  return {
    httpUrl: trimBase(httpUrl), userId: r.user_id, deviceId: r.device_id, token: r.token,
    expiresAt: r.expires_at, mqttHost: r.mqtt.host, mqttPort: r.mqtt.port, wsUrl: r.mqtt.ws_url, phone,
    ...(ca === undefined ? {} : { ca }),
  };
}

/** Request a code and verify it in one step; in dev mode the code comes back from the server. */
export async function login(httpUrl: string, phone: string,
  opts: { code?: string; deviceName?: string; platform?: string } & TlsOptions = {}): Promise<Profile> {
  let code = opts.code ?? null;
  if (code === null) {
    code = await requestCode(httpUrl, phone, opts);
    if (code === null) throw new PigeonError("code_required", "the server sent the code by SMS; pass it as code");
  }
  return verify(httpUrl, phone, code, opts);
}

export class Api {
  constructor(readonly profile: Profile) {}

  private call(method: string, path: string, body?: unknown): Promise<unknown> {
    return call(this.profile.httpUrl, method, path, body, this.profile.token, this.profile.ca);
  }

  /** A new token for this device; the profile is updated in place (save it again). */
  async refresh(): Promise<Profile> {
    const r = (await this.call("POST", "/v1/auth/refresh")) as { token: string; expires_at: number };
    this.profile.token = r.token;
    this.profile.expiresAt = r.expires_at;
    return this.profile;
  }

  async me(): Promise<User> {
    return (await this.call("GET", "/v1/me")) as User;
  }

  async rename(name: string): Promise<User> {
    return (await this.call("PATCH", "/v1/me", { name })) as User;
  }

  /** The user id registered to a phone number (`not_found` if nobody has that phone). */
  async findUser(phone: string): Promise<string> {
    const r = (await this.call("GET", `/v1/users?phone=${encodeURIComponent(phone)}`)) as { user_id: string };
    return r.user_id;
  }

  /** Phone and name of oneself or of a user one shares a chat with. */
  async user(userId: string): Promise<User> {
    return (await this.call("GET", `/v1/users/${encodeURIComponent(userId)}`)) as User;
  }

  async chats(): Promise<Chat[]> {
    return ((await this.call("GET", "/v1/chats")) as { chats: Chat[] }).chats;
  }

  async chat(chatId: string): Promise<Chat> {
    return (await this.call("GET", `/v1/chats/${encodeURIComponent(chatId)}`)) as Chat;
  }

  /** The direct chat with that user, created on first use (idempotent). */
  async openDirect(peer: string): Promise<Chat> {
    return (await this.call("POST", "/v1/chats", { kind: "direct", peer })) as Chat;
  }

  async createGroup(title: string, members: string[]): Promise<Chat> {
    return (await this.call("POST", "/v1/chats", { kind: "group", title, members })) as Chat;
  }

  async addMember(chatId: string, userId: string): Promise<Chat> {
    return (await this.call("POST", `/v1/chats/${encodeURIComponent(chatId)}/members`, { user_id: userId })) as Chat;
  }

  async removeMember(chatId: string, userId: string): Promise<void> {
    await this.call("DELETE", `/v1/chats/${encodeURIComponent(chatId)}/members/${encodeURIComponent(userId)}`);
  }

  /** One page of a chat's messages, newest first; pass `next_before` back to page further into the past. */
  async history(chatId: string, opts: { before?: number | null; limit?: number } = {}): Promise<HistoryPage> {
    const q = new URLSearchParams({ limit: String(opts.limit ?? 50) });
    if (opts.before !== undefined && opts.before !== null) q.set("before", String(opts.before));
    return (await this.call("GET", `/v1/chats/${encodeURIComponent(chatId)}/messages?${q}`)) as HistoryPage;
  }

  async postMessage(chatId: string, body: string, id: string = crypto.randomUUID()): Promise<SentReply> {
    return (await this.call("POST", `/v1/chats/${encodeURIComponent(chatId)}/messages`, { id, body })) as SentReply;
  }

  /** Per-member delivered/read positions of a chat (for "read by N of M" in groups). */
  async receipts(chatId: string): Promise<MemberReceipt[]> {
    return ((await this.call("GET", `/v1/chats/${encodeURIComponent(chatId)}/receipts`)) as
      { receipts: MemberReceipt[] }).receipts;
  }

  async presence(userId: string): Promise<{ user: string; online: boolean; last_seen: number | null }> {
    return (await this.call("GET", `/v1/users/${encodeURIComponent(userId)}/presence`)) as
      { user: string; online: boolean; last_seen: number | null };
  }

  /** Unlink a device of one's own (this one by default): its token stops working. */
  async unlink(deviceId: string = this.profile.deviceId): Promise<void> {
    await this.call("DELETE", `/v1/devices/${encodeURIComponent(deviceId)}`);
  }

  /** The server's VAPID public key for Web Push, or null when the server offers no Web Push. */
  async vapidKey(): Promise<string | null> {
    try {
      const r = (await this.call("GET", "/v1/push/vapid")) as { public_key?: unknown };
      return typeof r.public_key === "string" ? r.public_key : null;
    } catch (exc) {
      if (exc instanceof PigeonError && exc.status === 404) return null;
      throw exc;
    }
  }

  /** Where to wake this device when it is not connected (protocol section 7). */
  async setPush(provider: "webpush", token: WebPushToken): Promise<void>;
  async setPush(provider: "fcm" | "apns" | "webhook", token: string): Promise<void>;
  async setPush(provider: string, token: string | WebPushToken): Promise<void> {
    await this.call("PUT", `/v1/devices/${encodeURIComponent(this.profile.deviceId)}/push`, { provider, token });
  }

  async clearPush(): Promise<void> {
    await this.call("DELETE", `/v1/devices/${encodeURIComponent(this.profile.deviceId)}/push`);
  }

  /** Upload bytes with a ticket from `media_upload`, straight to storage. */
  async putBlob(upload: UploadTicket, data: Uint8Array | Blob): Promise<void> {
    const blob = data instanceof Blob ? data : new Blob([data as Uint8Array<ArrayBuffer>]);
    let resp: Response;
    try {
      if (upload.method === "PUT") {
        resp = await fetchTrusting(this.profile.ca, upload.url, { method: "PUT", body: blob, headers: upload.headers ?? {} });
      } else {
        const form = new FormData();
        for (const [k, v] of Object.entries(upload.fields ?? {})) form.append(k, v);
        form.append("file", blob, "upload");
        resp = await fetchTrusting(this.profile.ca, upload.url, { method: "POST", body: form });
      }
    } catch (exc) {
      if (exc instanceof PigeonError) throw exc;
      throw new PigeonError("upload_failed", `cannot reach the storage: ${reason(exc)}`);
    }
    if (resp.status >= 300) {
      let detail = "";
      try {
        detail = (await parse(resp), "");
      } catch (exc) {
        detail = exc instanceof PigeonError ? `: ${exc.message}` : "";
      }
      throw new PigeonError("upload_failed", `storage refused the upload (HTTP ${resp.status})${detail}`, resp.status);
    }
  }

  async getBlob(url: string): Promise<Uint8Array> {
    let resp: Response;
    try {
      resp = await fetchTrusting(this.profile.ca, url);
    } catch (exc) {
      if (exc instanceof PigeonError) throw exc;
      throw new PigeonError("download_failed", `cannot reach the storage: ${reason(exc)}`);
    }
    if (resp.status >= 300) {
      throw new PigeonError("download_failed", `storage refused the download (HTTP ${resp.status})`, resp.status);
    }
    return new Uint8Array(await resp.arrayBuffer());
  }
}
