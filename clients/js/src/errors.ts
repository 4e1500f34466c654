/** Errors the SDK raises: the server's refusals carry the protocol's error code. */

export class PigeonError extends Error {
  /** The protocol's code (`bad_request`, `forbidden`, `not_found`, `rate_limited`, ...) or an SDK code
   * (`timeout`, `not_connected`, `connect_refused`, `upload_failed`, `http_error`). */
  readonly code: string;
  readonly status: number | undefined;
  readonly retryAfterMs: number | undefined;

  constructor(code: string, message: string, status?: number, retryAfterMs?: number) {
    super(message);
    this.name = "PigeonError";
    this.code = code;
    this.status = status;
    this.retryAfterMs = retryAfterMs;
  }
}

/** No reply arrived in time (the request may or may not have been handled). */
export class RequestTimeout extends PigeonError {
  constructor(message: string) {
    super("timeout", message);
    this.name = "RequestTimeout";
  }
}
