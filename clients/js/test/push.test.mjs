// Web Push through the SDK, end to end: the SDK registers a subscription (as a page does with
// what `pushManager.subscribe` gives it), a real `pigeon serve --dev` wakes the device while it is
// not connected, and a push endpoint on loopback checks the request the way a push service
// would (VAPID signed by the server's key, RFC 8292) and decrypts the body with the
// subscription's private key (aes128gcm, RFC 8291). A browser's own push service is out of reach
// here, so this endpoint stands in for it, speaking its wire protocol.
import assert from "node:assert/strict";
import { createECDH, createDecipheriv, createPublicKey, hkdfSync, randomBytes, verify } from "node:crypto";
import { createServer } from "node:http";
import { after, before, test } from "node:test";

import { Api, login } from "../dist/index.js";
import { freshPhone, startServer } from "./server.mjs";

let srv;
before(async () => { srv = await startServer(); });
after(async () => { await srv.stop(); });

const b64url = (buf) => Buffer.from(buf).toString("base64url");

/** A push endpoint on loopback that keeps what it was sent. */
async function pushEndpoint() {
  const got = [];
  const waiters = [];
  const server = createServer((req, res) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => {
      got.push({ path: req.url, headers: req.headers, body: Buffer.concat(chunks) });
      res.writeHead(201).end();
      for (const w of waiters.splice(0)) w();
    });
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = `http://127.0.0.1:${server.address().port}`;
  return {
    url,
    got,
    async next(timeoutMs = 15_000) {
      const deadline = Date.now() + timeoutMs;
      while (got.length === 0) {
        if (Date.now() > deadline) throw new Error("no push arrived");
        await new Promise((r) => { waiters.push(r); setTimeout(r, 200); });
      }
      return got.shift();
    },
    close: () => new Promise((r) => server.close(r)),
  };
}

/** Check a VAPID `Authorization` header: ES256 JWT by `k`, for this origin, not expired. */
function checkVapid(header, origin, serverKey) {
  const m = /^vapid t=([^,\s]+),\s*k=(\S+)$/.exec(header ?? "");
  assert.ok(m, `a VAPID authorization header, got ${header}`);
  const [jwt, k] = [m[1], m[2]];
  assert.equal(k, serverKey, "signed with the key GET /v1/push/vapid gives");
  const [h, p, s] = jwt.split(".");
  const claims = JSON.parse(Buffer.from(p, "base64url"));
  assert.equal(JSON.parse(Buffer.from(h, "base64url")).alg, "ES256");
  assert.equal(claims.aud, origin);
  assert.ok(claims.exp > Date.now() / 1000 && claims.exp <= Date.now() / 1000 + 24 * 3600);
  const raw = Buffer.from(k, "base64url"); // the uncompressed P-256 point
  const key = createPublicKey({ key: { kty: "EC", crv: "P-256", x: b64url(raw.subarray(1, 33)),
    y: b64url(raw.subarray(33, 65)) }, format: "jwk" });
  assert.ok(verify("sha256", Buffer.from(`${h}.${p}`), { key, dsaEncoding: "ieee-p1363" },
    Buffer.from(s, "base64url")), "the JWT's signature holds");
}

/** Decrypt an aes128gcm body (RFC 8188/8291) with the subscription's keys. */
function decrypt(body, ua, auth) {
  const salt = body.subarray(0, 16);
  const idlen = body[20];
  const asPublic = body.subarray(21, 21 + idlen);
  const secret = ua.computeSecret(asPublic);
  const keyInfo = Buffer.concat([Buffer.from("WebPush: info\0"), ua.getPublicKey(), asPublic]);
  const ikm = Buffer.from(hkdfSync("sha256", secret, auth, keyInfo, 32));
  const cek = Buffer.from(hkdfSync("sha256", ikm, salt, Buffer.from("Content-Encoding: aes128gcm\0"), 16));
  const nonce = Buffer.from(hkdfSync("sha256", ikm, salt, Buffer.from("Content-Encoding: nonce\0"), 12));
  const record = body.subarray(21 + idlen);
  const decipher = createDecipheriv("aes-128-gcm", cek, nonce);
  decipher.setAuthTag(record.subarray(record.length - 16));
  const plain = Buffer.concat([decipher.update(record.subarray(0, record.length - 16)), decipher.final()]);
  let end = plain.length - 1;
  while (end > 0 && plain[end] === 0) end -= 1;
  assert.equal(plain[end], 2, "the last record ends with the 0x02 delimiter");
  return JSON.parse(plain.subarray(0, end).toString("utf8"));
}

test("web push: a subscription registered through the SDK wakes the device, signed and encrypted", async () => {
  const endpoint = await pushEndpoint();
  try {
    const bob = await login(srv.http, freshPhone());
    const alice = await login(srv.http, freshPhone());
    const bobApi = new Api(bob);
    const serverKey = await bobApi.vapidKey();
    assert.ok(serverKey, "pigeon serve makes a VAPID key when none is given");

    const ua = createECDH("prime256v1");
    ua.generateKeys();
    const auth = randomBytes(16);
    await bobApi.setPush("webpush", {
      endpoint: `${endpoint.url}/push/bob-browser`,
      keys: { p256dh: b64url(ua.getPublicKey()), auth: b64url(auth) },
    });
    const listed = await (await fetch(`${srv.http}/v1/devices`,
      { headers: { authorization: `Bearer ${bob.token}` } })).json();
    assert.equal(listed.devices.find((d) => d.device_id === bob.deviceId).push, "webpush");

    // Bob has no device connected: Alice's message wakes his browser
    const aliceApi = new Api(alice);
    const chat = await aliceApi.openDirect(bob.userId);
    await aliceApi.postMessage(chat.chat, "are you there?");
    const push = await endpoint.next();
    assert.equal(push.path, "/push/bob-browser");
    assert.equal(push.headers["content-encoding"], "aes128gcm");
    assert.equal(push.headers.urgency, "high");
    assert.match(push.headers.topic, /^[A-Za-z0-9_-]{1,32}$/);
    assert.ok(Number(push.headers.ttl) > 0);
    checkVapid(push.headers.authorization, endpoint.url, serverKey);
    const wake = decrypt(push.body, ua, auth);
    assert.equal(wake.type, "wake");
    assert.ok(!JSON.stringify(wake).includes("are you there"), "the wake carries no message text");

    // unregistering stops the pushes
    await bobApi.clearPush();
    const again = await (await fetch(`${srv.http}/v1/devices`,
      { headers: { authorization: `Bearer ${bob.token}` } })).json();
    assert.equal(again.devices.find((d) => d.device_id === bob.deviceId).push, null);
  } finally {
    await endpoint.close();
  }
});
