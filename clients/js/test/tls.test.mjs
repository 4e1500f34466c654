// The JS SDK under Node against a real `pigeon serve --tls-cert ... --no-plaintext`, its certificate
// from a throwaway CA: the SDK checks HTTPS (login, the API, media) and wss:// against the CA it is
// given, and one trusting another CA (or the system's) is refused.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";

import { Api, Device, MemoryStore, PigeonError, login, requestCode } from "../dist/index.js";
import { Collector, freshPhone, makePki, startServer } from "./server.mjs";

let srv;
let pki;
let ca;
let wrongCa;
let dir;
const opened = [];

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "pigeon-js-pki-"));
  pki = makePki(dir);
  ca = readFileSync(pki.ca, "utf8");
  wrongCa = readFileSync(pki.wrongCa, "utf8");
  srv = await startServer(["--tls-cert", pki.cert, "--tls-key", pki.key, "--https-port", "0", "--mqtts-port", "0",
    "--wss-port", "0", "--no-plaintext"]);
});
after(async () => {
  for (const d of opened) await d.close();
  await srv.stop();
  rmSync(dir, { recursive: true, force: true });
});

async function device(profile) {
  const dev = await Device.connect(profile, { store: new MemoryStore() });
  opened.push(dev);
  return dev;
}

test("the server has no plaintext listener: only https and wss", () => {
  assert.equal(srv.http, "off");
  assert.equal(srv.ws, "off");
  assert.match(srv.https, /^https:\/\/127\.0\.0\.1:\d+$/);
});

test("with the CA: login over HTTPS, the API, messages over wss:// and media over HTTPS", async () => {
  const alice = await login(srv.https, freshPhone(), { ca });
  const bob = await login(srv.https, freshPhone(), { ca });
  assert.equal(alice.ca, ca);  // kept in the profile, for the device and the API
  assert.match(alice.wsUrl, /^wss:\/\//);
  assert.equal((await new Api(alice).me()).user_id, alice.userId);
  const a = await device(alice);
  const b = await device(bob);
  const be = new Collector(b);
  await a.send({ to: bob.userId, body: "over wss" });
  await be.until((ev) => ev.type === "msg" && ev.body === "over wss");
  const data = new TextEncoder().encode("a file over https\n");
  const media = await a.upload(data, "text/plain", "tls.txt");
  await a.send({ to: bob.userId, media });
  const got = await be.until((ev) => ev.type === "msg" && ev.kind === "media");
  assert.deepEqual(Buffer.from(await b.download(got.media.key, got.chat, got.media.sha256)), Buffer.from(data));
});

test("trusting another CA, or the system's, is refused: HTTPS and wss://", async () => {
  const refused = (e) => e instanceof PigeonError && e.code === "unavailable" && /certificate/i.test(e.message);
  await assert.rejects(login(srv.https, freshPhone(), { ca: wrongCa }), refused);
  await assert.rejects(requestCode(srv.https, freshPhone()), refused);  // no CA: the system's CAs
  const carol = await login(srv.https, freshPhone(), { ca });
  await assert.rejects(new Api({ ...carol, ca: wrongCa }).me(), refused);
  const dev = new Device({ ...carol, ca: wrongCa }, { store: new MemoryStore() });
  opened.push(dev);
  await assert.rejects(dev.open(), (e) => e instanceof PigeonError && e.code === "unavailable");
  assert.notEqual(dev.status, "online");
});

test("a CA that is not PEM is a clear error, and nothing is sent", async () => {
  for (const bad of ["", "not a certificate", 42]) {
    await assert.rejects(login(srv.https, freshPhone(), { ca: bad }),
      (e) => e instanceof PigeonError && e.code === "bad_request" && /PEM/.test(e.message));
  }
});
