// Inbox ordering without a server: a scripted MQTT connection delivers live events out of order,
// with a gap and a duplicate, and answers sync from its own inbox.
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { test } from "node:test";

import { Device, MemoryStore } from "../dist/index.js";

const profile = {
  httpUrl: "http://127.0.0.1:9", userId: "u1", deviceId: "d1", token: "t", expiresAt: Date.now() + 30 * 86_400_000,
  mqttHost: "127.0.0.1", mqttPort: 1883, wsUrl: "ws://127.0.0.1:9/mqtt", phone: "+15550001111",
};

/** Stands in for MQTT.js's client: answers sync from `inbox`, records every publish. */
class ScriptedClient extends EventEmitter {
  constructor(inbox) {
    super();
    this.inbox = inbox;
    this.connected = false;
    this.published = [];
    setTimeout(() => { this.connected = true; this.emit("connect"); }, 1);
  }

  deliver(event) {
    this.emit("message", "down/u1", Buffer.from(JSON.stringify(event)));
  }

  async subscribeAsync() { return []; }

  publish(_topic, payload, _opts, cb) {
    const req = JSON.parse(payload);
    this.published.push(req);
    if (req.type === "sync") {
      const items = this.inbox.filter((e) => e.inbox > req.after);
      setTimeout(() => this.emit("message", "down/u1/d1", Buffer.from(JSON.stringify(
        { type: "batch", id: req.id, items, last: items.at(-1)?.inbox ?? req.after, more: false }))), 1);
    }
    cb?.();
  }

  async publishAsync(topic, payload, opts) { this.publish(topic, payload, opts); }

  end() { this.connected = false; }

  async endAsync() { this.connected = false; }
}

const msg = (inbox, seq) => ({ type: "msg", inbox, chat: "c1", seq, id: `m${seq}`, from: "u2", device: "d2",
  ts: 1, kind: "text", body: `body ${seq}` });

test("a gap in live inbox positions is filled by a sync before later events; duplicates are dropped", async () => {
  const inbox = [msg(1, 1)];
  let client;
  const dev = new Device(profile, { store: new MemoryStore(), mqttConnect: () => (client = new ScriptedClient(inbox)) });
  const seen = [];
  dev.on((ev) => seen.push(ev.inbox));
  await dev.open();
  assert.deepEqual(seen, [1], "the first sync delivered what was waiting");

  inbox.push(msg(2, 2), msg(3, 3), msg(4, 4));
  const syncsBefore = client.published.filter((r) => r.type === "sync").length;
  client.deliver(msg(3, 3)); // 2 is missing: 3 must wait
  assert.deepEqual(seen, [1]);
  client.deliver(msg(1, 1)); // a duplicate of what was delivered
  await new Promise((r) => setTimeout(r, 200));
  assert.deepEqual(seen, [1, 2, 3, 4], "the gap sync delivered 2, then 3, and what came after");
  assert.equal(client.published.filter((r) => r.type === "sync").length, syncsBefore + 1);
  client.deliver(msg(4, 4)); // live copy of what the sync already gave
  client.deliver(msg(5, 5));
  await new Promise((r) => setTimeout(r, 100));
  assert.deepEqual(seen, [1, 2, 3, 4, 5]);
  // acks are cumulative: the last one covers everything delivered
  const acks = client.published.filter((r) => r.type === "ack").map((r) => r.up_to);
  assert.equal(acks.at(-1), 5);
  assert.deepEqual(acks, [...acks].sort((a, b) => a - b));
  await dev.close();
});
