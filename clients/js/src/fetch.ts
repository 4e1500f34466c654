/**
 * HTTP requests checked against a CA of the application's (a profile's `ca`), under Node.
 *
 * Node's `fetch` takes no CA of its own (it would need undici's dispatcher, which Node does not
 * expose), so a request to an `https://` URL with a CA goes through `node:https` with that CA
 * instead, and its answer is made a standard `Response`. Without a CA, or for `http://`, it is
 * plain `fetch`. In a browser the browser's own CAs decide: a CA there is refused with a clear
 * error rather than silently ignored.
 */

import { PigeonError } from "./errors.js";

interface NodeAnswer {
  statusCode?: number;
  headers: Record<string, string | string[] | undefined>;
  on(event: "data", listener: (chunk: Uint8Array) => void): void;
  on(event: "end", listener: () => void): void;
  on(event: "error", listener: (err: Error) => void): void;
}

interface NodeRequest {
  on(event: "error", listener: (err: Error) => void): void;
  end(body?: Uint8Array): void;
}

interface NodeHttps {
  request(url: string, options: { method: string; headers: Record<string, string>; ca: string },
    answer: (res: NodeAnswer) => void): NodeRequest;
}

// not a literal: the web bundle must not try to include Node's module
const NODE_HTTPS = ["node", "https"].join(":");
const NO_BODY = new Set([101, 204, 205, 304]);

async function nodeHttps(): Promise<NodeHttps> {
  try {
    return (await import(NODE_HTTPS)) as NodeHttps;
  } catch {
    throw new PigeonError("bad_request",
      "a CA of one's own (the profile's ca) is taken only under Node; a browser checks certificates against its own CAs");
  }
}

/** `fetch(url, init)`, with an `https://` URL's certificate checked against `ca` (PEM) when given. */
export async function fetchTrusting(ca: string | undefined, url: string, init: RequestInit = {}): Promise<Response> {
  if (ca === undefined || !url.startsWith("https:")) return fetch(url, init);
  const https = await nodeHttps();
  const request = new Request(url, init);  // a FormData or Blob body is encoded as fetch would
  const body = request.method === "GET" || request.method === "HEAD"
    ? undefined : new Uint8Array(await request.arrayBuffer());
  const headers: Record<string, string> = {};
  request.headers.forEach((value, name) => { headers[name] = value; });
  if (body !== undefined) headers["content-length"] = String(body.length);
  return new Promise((resolve, reject) => {
    const sent = https.request(url, { method: request.method, headers, ca }, (res) => {
      const chunks: Uint8Array[] = [];
      res.on("data", (chunk) => { chunks.push(chunk); });
      res.on("error", reject);
      res.on("end", () => {
        const status = res.statusCode ?? 502;
        const answerHeaders = new Headers();
        for (const [name, value] of Object.entries(res.headers)) {
          for (const v of Array.isArray(value) ? value : value === undefined ? [] : [value]) answerHeaders.append(name, v);
        }
        const whole = new Uint8Array(chunks.reduce((n, c) => n + c.length, 0));
        let at = 0;
        for (const c of chunks) { whole.set(c, at); at += c.length; }
        const empty = NO_BODY.has(status) || request.method === "HEAD";
        resolve(new Response(empty ? null : whole, { status, headers: answerHeaders }));
      });
    });
    sent.on("error", reject);
    sent.end(body);
  });
}

/** What went wrong with a request, with the reason Node's `fetch` keeps in `cause` (a refused
 * certificate says so there; its own message is only "fetch failed"). */
export function reason(exc: unknown): string {
  const err = exc as Error & { cause?: unknown };
  const cause = err.cause instanceof Error ? err.cause.message : "";
  return cause && !err.message.includes(cause) ? `${err.message}: ${cause}` : String(err.message ?? exc);
}
