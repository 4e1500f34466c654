// The JS SDK against a real `pigeon serve --dev` on free loopback ports (embedded profile).
import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { Api, Device, MemoryStore, PigeonError, login, requestCode, sha256Hex, verify } from "../dist/index.js";
import { Collector, freshPhone, startServer } from "./server.mjs";

let srv;
const opened = [];

before(async () => { srv = await startServer(); });
after(async () => {
  for (const d of opened) await d.close();
  await srv.stop();
});

async function device(profile, options = {}) {
  const dev = await Device.connect(profile, { store: new MemoryStore(), ...options });
  opened.push(dev);
  return dev;
}

/** A device whose events are collected from before it connects (sync included). */
async function watched(profile, options = {}) {
  const dev = new Device(profile, { store: new MemoryStore(), ...options });
  const seen = new Collector(dev);
  opened.push(dev);
  await dev.open();
  return [dev, seen];
}

function statusReached(dev, want) {
  return new Promise((resolve) => {
    if (dev.status === want) return resolve();
    const off = dev.onStatus((s) => { if (s === want) { off(); resolve(); } });
  });
}

const isMsg = (body) => (ev) => ev.type === "msg" && ev.body === body;

test("login: dev code, wrong code refused, profile carries the WebSocket URL", async () => {
  const phone = freshPhone();
  const code = await requestCode(srv.http, phone);
  assert.match(code, /^\d{6}$/);
  const wrong = code === "000000" ? "111111" : "000000";
  await assert.rejects(verify(srv.http, phone, wrong), (e) => e instanceof PigeonError && e.status >= 400 && e.status < 500 && /code/i.test(e.message));
  const profile = await verify(srv.http, phone, code, { deviceName: "node-test" });
  assert.equal(profile.phone, phone);
  assert.equal(profile.wsUrl, srv.ws);
  assert.match(profile.userId, /^u/);
  const api = new Api(profile);
  assert.equal((await api.me()).phone, phone);
  await assert.rejects(api.findUser(freshPhone()), (e) => e.code === "not_found" && e.status === 404);
  await assert.rejects(requestCode(srv.http, "not a phone"), (e) => e.code === "bad_request");
});

test("refresh gives a new token the device connects with", async () => {
  const profile = await login(srv.http, freshPhone());
  const old = profile.token;
  await new Api(profile).refresh();
  assert.notEqual(profile.token, old);
  const dev = await device(profile);
  assert.equal(dev.status, "online");
});

test("messages, ticks, typing and presence between two devices", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const a = await device(alice);
  const b = await device(bob);
  const ae = new Collector(a);
  const be = new Collector(b);

  const sent = await a.send({ to: bob.userId, body: "hi bob" });
  assert.equal(sent.type, "sent");
  assert.equal(sent.seq, 1);
  const got = await be.until(isMsg("hi bob"));
  assert.equal(got.from, alice.userId);
  assert.equal(got.chat, sent.chat);
  // bob's SDK acknowledged it: alice sees it delivered, then read once bob reads
  await ae.until((ev) => ev.type === "receipt" && ev.kind === "delivered" && ev.up_to >= 1, 10_000, "delivered");
  await b.read(sent.chat, got.seq);
  await ae.until((ev) => ev.type === "receipt" && ev.kind === "read" && ev.up_to === 1, 10_000, "read");

  await b.typing(sent.chat);
  await ae.until((ev) => ev.type === "typing" && ev.user === bob.userId && ev.chat === sent.chat);

  const now = await a.watch([bob.userId]);
  assert.deepEqual(now.map((p) => [p.user, p.online]), [[bob.userId, true]]);
  await b.close();
  await ae.until((ev) => ev.type === "presence" && ev.user === bob.userId && ev.online === false);
});

test("a retry under the same id returns the same seq and stores one message", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const a = await device(alice);
  const b = await device(bob);
  const be = new Collector(b);
  const first = await a.send({ to: bob.userId, body: "once", id: "fixed-id-1" });
  const again = await a.send({ to: bob.userId, body: "once", id: "fixed-id-1" });
  assert.equal(again.seq, first.seq);
  await a.send({ chat: first.chat, body: "marker" });
  await be.until(isMsg("marker"));
  assert.equal(be.events.filter(isMsg("once")).length, 1);
  const page = await a.api.history(first.chat);
  assert.deepEqual(page.messages.map((m) => m.body), ["marker", "once"]);
});

test("offline catch-up from the stored cursor: in order, none twice, none again after reconnect", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const store = new MemoryStore();
  const [a, ae] = await watched(alice);
  const [b1, seen1] = await watched(bob, { store });
  const first = await a.send({ to: bob.userId, body: "before" });
  await seen1.until(isMsg("before"));
  await b1.close();
  const cursor = await store.load(bob.deviceId);
  assert.ok(cursor >= 1, "the cursor was saved in the pluggable store");

  for (let i = 0; i < 12; i++) await a.send({ chat: first.chat, body: `m${i}` });
  const [b2, seen] = await watched(bob, { store });
  await seen.until(isMsg("m11"));
  const bodies = seen.events.filter((e) => e.type === "msg").map((e) => e.body);
  assert.deepEqual(bodies, Array.from({ length: 12 }, (_, i) => `m${i}`));
  const inboxes = seen.events.map((e) => e.inbox);
  assert.deepEqual(inboxes, [...inboxes].sort((x, y) => x - y));
  assert.equal(new Set(inboxes).size, inboxes.length);
  assert.equal(await b2.sync(), 0, "a second sync finds nothing new");
  assert.equal(seen.events.filter((e) => e.type === "msg").length, 12);
  // the server got the cumulative ack: alice sees everything delivered
  await ae.until((ev) => ev.type === "receipt" && ev.kind === "delivered" && ev.up_to === 13, 10_000, "delivered 13");
  const receipts = await a.api.receipts(first.chat);
  assert.equal(receipts.find((r) => r.user === bob.userId).delivered, 13);
});

test("the connection dropping and coming back catches up what was sent meanwhile", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const a = await device(alice);
  const b = await device(bob);
  const be = new Collector(b);
  const statuses = [];
  b.onStatus((s) => statuses.push(s));
  const first = await a.send({ to: bob.userId, body: "live" });
  await be.until(isMsg("live"));
  b.suspend();
  assert.equal(b.status, "offline");
  for (let i = 0; i < 5; i++) await a.send({ chat: first.chat, body: `while-away-${i}` });
  b.resume();
  await be.until(isMsg("while-away-4"));
  await statusReached(b, "online");
  assert.deepEqual(be.events.filter((e) => e.type === "msg").map((e) => e.body),
    ["live", "while-away-0", "while-away-1", "while-away-2", "while-away-3", "while-away-4"]);
  assert.deepEqual(statuses, ["offline", "connecting", "online"]);
});

test("media: SHA-256 upload, send, download checked; a bad hash is refused", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const a = await device(alice);
  const b = await device(bob);
  const be = new Collector(b);
  const data = new TextEncoder().encode("a small file from node\n");
  const media = await a.upload(data, "text/plain", "note.txt");
  assert.equal(media.sha256, await sha256Hex(data));
  assert.equal(media.size, data.length);
  await a.send({ to: bob.userId, media });
  const got = await be.until((ev) => ev.type === "msg" && ev.kind === "media");
  assert.equal(got.media.name, "note.txt");
  const back = await b.download(got.media.key, got.chat, got.media.sha256);
  assert.deepEqual(Buffer.from(back), Buffer.from(data));
  await assert.rejects(b.download(got.media.key, got.chat, "0".repeat(64)), (e) => e.code === "download_failed");
  // a key nobody sent in that chat is not handed out
  await assert.rejects(b.mediaUrl("nope", got.chat), (e) => e instanceof PigeonError && e.code !== "timeout");
});

test("groups, chat list, user cards and history paged backwards", async () => {
  const alice = await login(srv.http, freshPhone());
  const bob = await login(srv.http, freshPhone());
  const carol = await login(srv.http, freshPhone());
  const a = await device(alice);
  await new Api(alice).rename("Alice");
  const group = await a.api.createGroup("Book club", [bob.userId]);
  assert.equal(group.kind, "group");
  await a.api.addMember(group.chat, carol.userId);
  assert.equal((await a.api.chat(group.chat)).members.length, 3);
  for (let i = 0; i < 7; i++) await a.send({ chat: group.chat, body: `g${i}` });
  const chats = await new Api(bob).chats();
  assert.ok(chats.some((c) => c.chat === group.chat && c.title === "Book club"));
  const card = await new Api(bob).user(alice.userId);
  assert.deepEqual(card, { user_id: alice.userId, phone: alice.phone, name: "Alice" });
  const stranger = await login(srv.http, freshPhone());
  await assert.rejects(new Api(stranger).user(alice.userId), (e) => e.code === "forbidden");

  const api = new Api(carol);
  const pages = [];
  let before = null;
  for (;;) {
    const page = await api.history(group.chat, { before, limit: 3 });
    pages.push(page.messages.map((m) => m.seq));
    if (page.next_before === null) break;
    before = page.next_before;
  }
  const all = pages.flat();
  assert.deepEqual(all, [...all].sort((x, y) => y - x), "newest first, page after page");
  assert.equal(all.length, new Set(all).size);
  assert.equal(all[0], (await api.chat(group.chat)).last_seq);
  assert.equal(all.at(-1), 1);
  await a.api.removeMember(group.chat, carol.userId);
  await assert.rejects(api.history(group.chat), (e) => e.code === "forbidden");
});

test("push: a server without Web Push reports no VAPID key; unlink stops the device", async () => {
  const profile = await login(srv.http, freshPhone());
  const api = new Api(profile);
  const key = await api.vapidKey();
  const vapid = await fetch(`${srv.http}/v1/push/vapid`, { headers: { authorization: `Bearer ${profile.token}` } });
  assert.equal(key === null, vapid.status === 404);
  await api.unlink();
  await assert.rejects(api.me(), (e) => e.status === 401);
  await assert.rejects(Device.connect(profile, { store: new MemoryStore() }), (e) => e.code === "connect_refused");
});
