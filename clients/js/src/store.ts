/** Where a device keeps its inbox cursor: IndexedDB in browsers, anything else through the interface. */

export interface CursorStore {
  /** The last inbox position this device has stored and acknowledged, 0 if none. */
  load(deviceId: string): Promise<number>;
  save(deviceId: string, cursor: number): Promise<void>;
  /** Forget the device's cursor (after logout). */
  remove(deviceId: string): Promise<void>;
}

/** Keeps cursors in memory: a process that restarts syncs from the start of the inbox. */
export class MemoryStore implements CursorStore {
  private readonly cursors = new Map<string, number>();

  async load(deviceId: string): Promise<number> {
    return this.cursors.get(deviceId) ?? 0;
  }

  async save(deviceId: string, cursor: number): Promise<void> {
    this.cursors.set(deviceId, cursor);
  }

  async remove(deviceId: string): Promise<void> {
    this.cursors.delete(deviceId);
  }
}

function done<T>(req: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    req.onsuccess = () => resolve(req.result);
    req.onerror = () => reject(req.error);
  });
}

/** Keeps cursors in the browser's IndexedDB (database `pigeon`, store `cursors`). */
export class IndexedDBStore implements CursorStore {
  private db: Promise<IDBDatabase> | null = null;

  constructor(private readonly name = "pigeon") {}

  private open(): Promise<IDBDatabase> {
    if (this.db === null) {
      const req = indexedDB.open(this.name, 1);
      req.onupgradeneeded = () => req.result.createObjectStore("cursors");
      this.db = done(req);
    }
    return this.db;
  }

  private async tx(mode: IDBTransactionMode): Promise<IDBObjectStore> {
    return (await this.open()).transaction("cursors", mode).objectStore("cursors");
  }

  async load(deviceId: string): Promise<number> {
    const value: unknown = await done((await this.tx("readonly")).get(deviceId));
    return typeof value === "number" ? value : 0;
  }

  async save(deviceId: string, cursor: number): Promise<void> {
    await done((await this.tx("readwrite")).put(cursor, deviceId));
  }

  async remove(deviceId: string): Promise<void> {
    await done((await this.tx("readwrite")).delete(deviceId));
  }
}

/** IndexedDB where the runtime has it (browsers), memory elsewhere. */
export function defaultStore(): CursorStore {
  return typeof indexedDB !== "undefined" ? new IndexedDBStore() : new MemoryStore();
}
