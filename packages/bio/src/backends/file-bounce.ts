import { allocIoBuffer, isIoBufferAligned } from '../aligned.js';
import type { BioVec } from '../bio.js';

/** Free bounce buffers kept per backend. */
const BOUNCE_POOL_MAX = 8;

/**
 * Aligned bounce buffers of an O_DIRECT FileBackend: a READ or WRITE whose vecs are not aligned
 * to `minIoSize` is copied through one of these. Sized to the largest bio seen, doubling, so a
 * backend allocates a few sizes over its lifetime, not one buffer per bio.
 */
export class BouncePool {
  readonly minIoSize: number;
  private readonly free: Buffer[];
  private size: number;
  private open: boolean;

  constructor(minIoSize: number) {
    this.minIoSize = minIoSize;
    this.free = [];
    this.size = 0;
    this.open = true;
  }

  /** True when every vec can go to an O_DIRECT call as it is. */
  vecsAligned(vecs: readonly BioVec[]): boolean {
    const a = this.minIoSize;
    for (let i = 0; i < vecs.length; i++) {
      const v = vecs[i] as BioVec;
      if (!isIoBufferAligned(v.buffer, v.offset, v.length, a)) return false;
    }
    return true;
  }

  /** An aligned bounce buffer of at least `size` bytes; give it back with {@link put}. */
  get(size: number): Buffer {
    if (size > this.size) {
      // Smaller buffers still out are dropped when they come back.
      this.size = Math.max(size, this.size * 2);
      this.free.length = 0;
    }
    return this.free.pop() ?? allocIoBuffer(this.size, this.minIoSize);
  }

  put(buf: Buffer): void {
    if (buf.length === this.size && this.free.length < BOUNCE_POOL_MAX && this.open) this.free.push(buf);
  }

  /** The backend is closing: drop the pool and keep nothing that comes back. */
  close(): void {
    this.open = false;
    this.free.length = 0;
  }
}
