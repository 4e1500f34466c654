// A device's sends keep their order through refusals, without a server: a scripted MQTT connection
// numbers sends as they arrive and refuses like the bridge's admission control (a refused send, and
// with it every other send arriving until it comes back).
import assert from "node:assert/strict";
import { EventEmitter } from "node:events";
import { test } from "node:test";

import { Device, MemoryStore } from "../dist/index.js";

const profile = {
  httpUrl: "http://127.0.0.1:9", userId: "u1", deviceId: "d1", token: "t", expiresAt: Date.now() + 30 * 86_400_000,
  mqttHost: "127.0.0.1", mqttPort: 1883, wsUrl: "ws://127.0.0.1:9/mqtt", phone: "+15550001111",
};

/** Stands in for MQTT.js's client. The sends it sees first are counted 1, 2, ...; those counted in
 * `refuse` are refused, and with each (when `windowed`) every other send arriving until it returns. */
class RefusingClient extends EventEmitter {
  constructor(refuse, windowed = true) {
    super();
    Object.assign(this, { refuse, windowed, firsts: [], numbered: new Map(), window: null, arrivals: 0 });
    this.lastRefused = null; // the body of the send refused last (the test's jitter reads it)
    this.connected = false;
    setTimeout(() => { this.connected = true; this.emit("connect"); }, 1);
  }

  answer(req, reply) {
    // each answer in a turn of its own, so that the device handles it before the next comes
    setTimeout(() => {
      if (reply.type === "error") this.lastRefused = req.body;
      this.emit("message", "down/u1/d1", Buffer.from(JSON.stringify({ ...reply, id: req.id })));
    }, 1);
  }

  publish(_topic, payload, _opts, cb) {
    const req = JSON.parse(payload);
    cb?.();
    if (req.type === "sync") {
      this.answer(req, { type: "batch", items: [], last: req.after, more: false });
      return;
    }
    if (req.type !== "send") return;
    this.arrivals++;
    const refused = { type: "error", code: "rate_limited", message: "refused", retry_after_ms: 50 };
    if (!this.firsts.includes(req.id)) {
      this.firsts.push(req.id);
      if (this.window === null && this.refuse.has(this.firsts.length)) {
        if (this.windowed) this.window = req.id;
        this.answer(req, refused);
        return;
      }
    }
    if (!this.numbered.has(req.id)) {
      if (this.window !== null && req.id !== this.window) {
        this.answer(req, refused);
        return;
      }
      if (req.id === this.window) this.window = null;
      this.numbered.set(req.id, this.numbered.size + 1);
    }
    this.answer(req, { type: "sent", chat: "c1", seq: this.numbered.get(req.id), ts: 1 });
  }

  async subscribeAsync() { return []; }
  async publishAsync(topic, payload, opts) { this.publish(topic, payload, opts); }
  end() { this.connected = false; }
  async endAsync() { this.connected = false; }
}

/** The random part of a retry's wait made shorter the later the refused send was made (its body
 * `m{k}`): without the SDK's order, later sends would always go again first. */
function laterOnesFirst(client) {
  const random = Math.random;
  Math.random = () => {
    const k = /^m(\d+)$/.exec(String(client()?.lastRefused ?? ""));
    return k ? Math.max(0, 1 - Number(k[1]) / 5) : 0.5;
  };
  return () => { Math.random = random; };
}

for (const [name, refuse] of [["the first", [1]], ["the second", [2]], ["two of them", [1, 4]]]) {
  test(`sends made at once are numbered in their order when ${name} is refused`, async () => {
    let client;
    const restore = laterOnesFirst(() => client);
    const dev = new Device(profile, { store: new MemoryStore(),
      mqttConnect: () => (client = new RefusingClient(new Set(refuse))) });
    try {
      await dev.open();
      const replies = await Promise.all([0, 1, 2, 3, 4, 5].map((k) => dev.send({ chat: "c1", body: `m${k}` })));
      assert.deepEqual(replies.map((r) => r.seq), [1, 2, 3, 4, 5, 6]);
      assert.ok(client.arrivals > 6, "some were refused and went again");
    } finally {
      restore();
      await dev.close();
    }
  });
}

test("a send made while an earlier one waits to go again goes after it", async () => {
  let client;
  const restore = laterOnesFirst(() => client);
  const dev = new Device(profile, { store: new MemoryStore(),
    mqttConnect: () => (client = new RefusingClient(new Set([1]), false)) });
  try {
    await dev.open();
    const first = dev.send({ chat: "c1", body: "m0" });
    while (client.lastRefused === null) await new Promise((r) => setTimeout(r, 5));
    await new Promise((r) => setTimeout(r, 5)); // the device has handled the refusal
    const second = await dev.send({ chat: "c1", body: "m5" });
    assert.equal((await first).seq, 1);
    assert.equal(second.seq, 2, "the server would have taken it at once: the SDK held it back");
  } finally {
    restore();
    await dev.close();
  }
});
