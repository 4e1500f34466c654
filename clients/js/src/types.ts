/** The wire shapes of the Pigeon protocol (docs/protocol.md), as the SDK hands them out. */

/** A linked device: where the server is, who we are. Keep it to reconnect later. */
export interface Profile {
  httpUrl: string;
  userId: string;
  deviceId: string;
  token: string;
  expiresAt: number;
  mqttHost: string;
  mqttPort: number;
  /** The broker's MQTT-over-WebSocket URL from the login reply (null if the broker has none). */
  wsUrl: string | null;
  phone: string;
  /** Under Node: the PEM text of the CA the server's certificate is checked against, for HTTPS
   * and `wss://`, instead of the system's CAs (from `login(..., { ca })`). */
  ca?: string;
}

export interface Media {
  key: string;
  mime: string;
  size: number;
  sha256: string;
  name?: string;
}

export interface MessageEvent {
  type: "msg";
  inbox?: number;
  chat: string;
  seq: number;
  id: string;
  from: string;
  device: string;
  ts: number;
  kind: "text" | "media" | "system";
  body?: string;
  media?: Media;
  event?: string;
  user?: string;
  [extra: string]: unknown;
}

export interface ReceiptEvent {
  type: "receipt";
  inbox: number;
  chat: string;
  user: string;
  kind: "delivered" | "read";
  up_to: number;
}

export interface TypingEvent {
  type: "typing";
  chat: string;
  user: string;
}

export interface PresenceEvent {
  type: "presence";
  user: string;
  online: boolean;
  last_seen: number | null;
  id?: string;
}

/** Anything else the server adds later; unknown fields and types are passed through. */
export interface OtherEvent {
  type: string;
  inbox?: number;
  [extra: string]: unknown;
}

export type PigeonEvent = MessageEvent | ReceiptEvent | TypingEvent | PresenceEvent | OtherEvent;

export interface SentReply {
  type: "sent";
  id: string;
  chat: string;
  seq: number;
  ts: number;
}

export interface Chat {
  chat: string;
  kind: "direct" | "group";
  title: string | null;
  members: string[];
  admins?: string[];
  last_seq: number;
}

export interface User {
  user_id: string;
  phone: string;
  name: string | null;
}

export interface HistoryPage {
  messages: MessageEvent[];
  next_before: number | null;
}

export interface MemberReceipt {
  user: string;
  delivered: number;
  read: number;
}

export interface UploadTicket {
  method: "PUT" | "POST";
  url: string;
  fields?: Record<string, string>;
  headers?: Record<string, string>;
  expires: number;
}

/** A Web Push subscription as the protocol's `webpush` provider takes it (RFC 8030). */
export interface WebPushToken {
  endpoint: string;
  keys: { p256dh: string; auth: string };
}
