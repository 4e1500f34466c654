// Bundle the SDK with MQTT.js into one browser ES module for the web client (clients/web/pigeon-sdk.js).
// `node build-web.mjs --check` builds in memory and fails if the committed file is not what the
// sources make (so the served bundle never falls behind the TypeScript).
import { readFileSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";

import { build } from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const out = join(here, "..", "web", "pigeon-sdk.js");
const check = process.argv.includes("--check");

const result = await build({
  entryPoints: [join(here, "src", "index.ts")],
  bundle: true,
  format: "esm",
  platform: "browser",
  target: "es2022",
  minify: true,
  legalComments: "eof",
  banner: { js: "// Pigeon JavaScript SDK with MQTT.js, bundled from clients/js by `npm run bundle`; do not edit." },
  write: false,
  logLevel: "warning",
});
const text = result.outputFiles[0].text;
if (check) {
  let committed = "";
  try {
    committed = readFileSync(out, "utf8");
  } catch {
    committed = "";
  }
  if (committed !== text) {
    console.error(`${out} is stale: run 'npm run bundle' in clients/js and commit it`);
    process.exit(1);
  }
  console.log(`${out} is up to date`);
} else {
  writeFileSync(out, text);
  console.log(`wrote ${out} (${text.length} bytes)`);
}
