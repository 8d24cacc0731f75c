import { createHash } from 'node:crypto';
import { Worker } from 'node:worker_threads';

// The worker's code, evaluated (a separate file would need its own build entry). It hashes
// ranges of a SharedArrayBuffer the main thread filled, so no byte is copied to it.
const CODE = `
const { parentPort } = require('node:worker_threads');
const { createHash } = require('node:crypto');
parentPort.on('message', ({ id, buf, ranges }) => {
  const out = [];
  for (const [off, len] of ranges) out.push(createHash('sha256').update(new Uint8Array(buf, off, len)).digest('hex'));
  parentPort.postMessage({ id, out });
});
`;

/** A range of a shared buffer to hash. */
export interface HashRange {
  readonly buf: SharedArrayBuffer;
  readonly offset: number;
  readonly length: number;
}

/**
 * SHA-256 of buffer ranges on a worker thread, so that restore's digests run beside its reads
 * and writes instead of between them. Jobs complete in the order they were given.
 */
export class HashWorker {
  private readonly worker: Worker;
  private nextId = 0;
  private readonly pending = new Map<number, { resolve: (out: string[]) => void; reject: (err: Error) => void }>();
  private failed: Error | null = null;

  private constructor(worker: Worker) {
    this.worker = worker;
    worker.on('message', (m: { id: number; out: string[] }) => {
      this.pending.get(m.id)?.resolve(m.out);
      this.pending.delete(m.id);
    });
    const fail = (err: Error): void => {
      this.failed = err;
      for (const p of this.pending.values()) p.reject(err);
      this.pending.clear();
    };
    worker.on('error', fail);
    worker.on('exit', (code) => fail(new Error(`the hash worker exited (${code})`)));
  }

  /** A worker, or null where workers cannot start (then callers hash inline). */
  static start(): HashWorker | null {
    try {
      return new HashWorker(new Worker(CODE, { eval: true }));
    } catch {
      return null;
    }
  }

  /** Digests of `ranges` (all in one shared buffer), hex. */
  hash(buf: SharedArrayBuffer, ranges: ReadonlyArray<readonly [number, number]>): Promise<string[]> {
    if (this.failed !== null) return Promise.reject(this.failed);
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      this.worker.postMessage({ id, buf, ranges });
    });
  }

  async close(): Promise<void> {
    this.worker.removeAllListeners('exit');
    await this.worker.terminate();
  }
}

/** The same digests, computed here (for callers without a worker). */
export function hashInline(buf: SharedArrayBuffer, ranges: ReadonlyArray<readonly [number, number]>): string[] {
  return ranges.map(([off, len]) => createHash('sha256').update(new Uint8Array(buf, off, len)).digest('hex'));
}
