// Start a real `pigeon serve --dev` (embedded profile) on free loopback ports for the tests, and stop it;
// `startServer(["--tls-cert", ...])` passes more flags, and the result names every listener it serves.
import { execFileSync, spawn } from "node:child_process";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

function python() {
  if (process.env.PIGEON_PYTHON) return process.env.PIGEON_PYTHON;
  const venv = join(ROOT, ".venv", "bin", "python");
  return existsSync(venv) ? venv : "python3";
}

export async function startServer(extraArgs = []) {
  const dataDir = mkdtempSync(join(tmpdir(), "pigeon-js-"));
  const env = { ...process.env, PYTHONUNBUFFERED: "1" };
  for (const k of ["PIGEON_STORE", "PIGEON_MEDIA", "PIGEON_REDIS", "PIGEON_BROKER", "PIGEON_BROKER_CREDENTIALS_FILE"]) {
    delete env[k];
  }
  const proc = spawn(python(), ["-m", "clients.cli", "serve", "--dev", "--data-dir", dataDir, "--host", "127.0.0.1",
    "--http-port", "0", "--mqtt-port", "0", "--ws-port", "0", "--log-level", "WARNING", ...extraArgs],
  { cwd: ROOT, env, stdio: ["ignore", "pipe", "pipe"] });
  let log = "";
  proc.stderr.on("data", (d) => { log += d; });
  // every listener the ready line names (http, mqtt, ws; https, mqtts, wss with TLS), "off" if not served
  const ready = await new Promise((resolveReady, reject) => {
    let out = "";
    const timer = setTimeout(() => reject(new Error(`pigeon serve did not start in time:\n${log}`)), 60_000);
    proc.stdout.on("data", (d) => {
      out += d;
      const m = /pigeon ready (.*)\n/.exec(out);
      if (m) {
        clearTimeout(timer);
        resolveReady(Object.fromEntries(m[1].split(" ").filter((w) => w.includes("=")).map((w) => w.split(/=(.*)/s, 2))));
      }
    });
    proc.on("exit", (code) => { clearTimeout(timer); reject(new Error(`pigeon serve exited (${code}):\n${log}`)); });
  });
  return {
    ...ready,
    async stop() {
      if (proc.exitCode === null) {
        const exited = new Promise((r) => proc.once("exit", r));
        proc.kill("SIGTERM");
        await Promise.race([exited, new Promise((r) => setTimeout(r, 20_000))]);
        if (proc.exitCode === null) proc.kill("SIGKILL");
      }
      rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

let counter = Math.floor(Math.random() * 9_000_000);
/** A throwaway CA (trustme, as tests/test_e2e_tls.py) and a certificate it signs for 127.0.0.1
 * and localhost, written to `dir`; and a CA that signed nothing of the server's. */
export function makePki(dir) {
  const script = `import sys, trustme
ca, wrong = trustme.CA(), trustme.CA()
d = sys.argv[1]
ca.cert_pem.write_to_path(d + "/ca.pem")
wrong.cert_pem.write_to_path(d + "/wrong-ca.pem")
issued = ca.issue_cert("127.0.0.1", "localhost")
issued.private_key_pem.write_to_path(d + "/key.pem")
issued.cert_chain_pems[0].write_to_path(d + "/cert.pem")`;
  execFileSync(python(), ["-c", script, dir], { stdio: ["ignore", "ignore", "inherit"] });
  return { ca: join(dir, "ca.pem"), wrongCa: join(dir, "wrong-ca.pem"), cert: join(dir, "cert.pem"), key: join(dir, "key.pem") };
}

export function freshPhone() {
  counter += 1;
  return `+1556${String(1_000_000 + (counter % 8_999_999)).padStart(7, "0")}`;
}

/** Collects a device's events; `until(pred)` waits for one that matches. */
export class Collector {
  constructor(device) {
    this.events = [];
    this.waiters = [];
    device.on((ev) => {
      this.events.push(ev);
      this.waiters = this.waiters.filter((w) => !w.check());
    });
  }

  until(pred, timeoutMs = 10_000, what = "an event") {
    return new Promise((resolveWait, reject) => {
      const timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.events)}`)),
        timeoutMs);
      const w = {
        check: () => {
          const found = this.events.find(pred);
          if (found) { clearTimeout(timer); resolveWait(found); return true; }
          return false;
        },
      };
      if (!w.check()) this.waiters.push(w);
    });
  }
}
