import { Bio, BioVec, BlkStatus, ReqOp, SECTOR_SIZE, bioChain, submitBio, type BlockDev, type Disk } from '@blkfilter/bio';
import { getPayloadBuffer, putPayloadBuffer } from './buffer-pool.js';
import { NbdCmd } from './protocol.js';
import type { RequestCtx } from './request-ctx.js';
import { ZERO_CHUNK, submitSplit, zeros } from './submit.js';

/**
 * Unaligned writes in flight on one disk, as byte ranges of the whole disk (so that exports of
 * a disk and of its partitions share them), and the ones waiting for an overlapping one to
 * finish. Two read-modify-writes of one block must not overlap: each would write back the
 * other's bytes as they were before. Only unaligned requests come here; aligned ones never
 * look (see the README's limitations).
 */
export class RmwLocks {
  readonly active: RmwOp[] = [];
  readonly waiting: RmwOp[] = [];

  private conflicts(op: RmwOp): boolean {
    const a = this.active;
    for (let i = 0; i < a.length; i++) {
      const o = a[i] as RmwOp;
      if (o.lockStart < op.lockEnd && op.lockStart < o.lockEnd) return true;
    }
    return false;
  }

  /** Starts `op` now, or once the ops overlapping it have finished. */
  acquire(op: RmwOp): void {
    if (this.conflicts(op)) {
      this.waiting.push(op);
      return;
    }
    this.active.push(op);
    op.start();
  }

  /** `op` is done: starts the waiting ops that no longer overlap an active one, in order. */
  release(op: RmwOp): void {
    const a = this.active;
    const i = a.indexOf(op);
    if (i >= 0) a.splice(i, 1);
    const w = this.waiting;
    if (w.length === 0) return;
    const ready: RmwOp[] = [];
    for (let j = 0; j < w.length; ) {
      const o = w[j] as RmwOp;
      if (this.conflicts(o)) {
        j++;
        continue;
      }
      w.splice(j, 1);
      a.push(o);
      ready.push(o);
    }
    // Started after the scan: an op may complete at once and release again.
    for (const o of ready) o.start();
  }
}

const rmwLocksByDisk = new WeakMap<Disk, RmwLocks>();

function rmwLocksFor(disk: Disk): RmwLocks {
  let l = rmwLocksByDisk.get(disk);
  if (l === undefined) {
    l = new RmwLocks();
    rmwLocksByDisk.set(disk, l);
  }
  return l;
}

/**
 * An unaligned WRITE or WRITE_ZEROES, done the way qemu-nbd does it: read the partial blocks
 * at the head and tail, merge the request's bytes (or zeros) into them, write them back, and
 * write the aligned middle as usual (from the payload, or as WRITE_ZEROES), FUA on every
 * piece. Holds the covering blocks in {@link RmwLocks} from the read to the last write.
 */
export class RmwOp {
  readonly ctx: RequestCtx;
  readonly dev: BlockDev;
  readonly locks: RmwLocks;
  /** The covering range on the whole disk, in bytes. */
  readonly lockStart: number;
  readonly lockEnd: number;
  /** Export offsets of the partial head and tail blocks, or -1. */
  readonly head: number;
  readonly tail: number;
  /** Whole blocks in the middle, export offsets [midStart, midEnd). */
  readonly midStart: number;
  readonly midEnd: number;
  readonly lbs: number;
  /** Flags of the writes: FUA, and NOUNMAP for the middle of a WRITE_ZEROES. */
  readonly fua: number;
  readonly nounmap: number;
  /** The partial blocks: head at 0, tail at lbs. */
  blocks: Buffer | null = null;

  constructor(ctx: RequestCtx, dev: BlockDev, lbs: number, fua: number, nounmap: number) {
    this.ctx = ctx;
    this.dev = dev;
    this.locks = rmwLocksFor(dev.disk);
    this.lbs = lbs;
    this.fua = fua;
    this.nounmap = nounmap;
    const start = ctx.offset;
    const end = start + ctx.length;
    const a0 = Math.floor(start / lbs) * lbs;
    const a1 = Math.ceil(end / lbs) * lbs;
    const base = dev.startSect * SECTOR_SIZE;
    this.lockStart = base + a0;
    this.lockEnd = base + a1;
    this.midStart = Math.ceil(start / lbs) * lbs;
    this.midEnd = Math.floor(end / lbs) * lbs;
    this.head = start !== a0 || end - a0 < lbs ? a0 : -1;
    const t = a1 - lbs;
    this.tail = end !== a1 && t !== this.head ? t : -1;
  }

  /** Reads the partial blocks (the lock is held). */
  start(): void {
    const lbs = this.lbs;
    const blocks = getPayloadBuffer(2 * lbs);
    this.blocks = blocks;
    let parent: Bio | null = null;
    let child: Bio | null = null;
    if (this.head >= 0) parent = new Bio(ReqOp.READ, this.dev, this.head / SECTOR_SIZE, lbs, [new BioVec(blocks, 0, lbs)]);
    if (this.tail >= 0) {
      const b = new Bio(ReqOp.READ, this.dev, this.tail / SECTOR_SIZE, lbs, [new BioVec(blocks, lbs, lbs)]);
      if (parent === null) parent = b;
      else child = b;
    }
    const p = parent as Bio;
    p.endIo = (bio) => this.merged(bio);
    if (child !== null) {
      bioChain(child, p);
      submitBio(child);
    }
    submitBio(p);
  }

  /** The partial blocks were read: merge, then write everything. */
  private merged(read: Bio): void {
    if (read.status !== BlkStatus.OK) {
      this.finish(read);
      return;
    }
    const ctx = this.ctx;
    const lbs = this.lbs;
    const blocks = this.blocks as Buffer;
    const data = ctx.type === NbdCmd.WRITE ? (ctx.buf as Buffer) : null;
    const start = ctx.offset;
    const end = start + ctx.length;
    const dev = this.dev;
    const pieces: Bio[] = [];
    for (let k = 0; k < 2; k++) {
      const blk = k === 0 ? this.head : this.tail;
      if (blk < 0) continue;
      const from = Math.max(start, blk);
      const to = Math.min(end, blk + lbs);
      const at = k * lbs + (from - blk);
      if (data !== null) data.copy(blocks, at, from - start, to - start);
      else blocks.fill(0, at, at + (to - from));
      const w = new Bio(ReqOp.WRITE, dev, blk / SECTOR_SIZE, lbs, [new BioVec(blocks, k * lbs, lbs)]);
      w.flags = this.fua;
      pieces.push(w);
    }
    const midLen = this.midEnd - this.midStart;
    if (midLen > 0) {
      const sector = this.midStart / SECTOR_SIZE;
      if (data !== null) {
        const w = new Bio(ReqOp.WRITE, dev, sector, midLen, [new BioVec(data, this.midStart - start, midLen)]);
        w.flags = this.fua;
        pieces.push(w);
      } else if (dev.disk.limits.maxWriteZeroesSectors > 0) {
        const w = new Bio(ReqOp.WRITE_ZEROES, dev, sector, midLen);
        w.flags = this.fua | this.nounmap;
        pieces.push(w);
      } else {
        const z = zeros();
        for (let done = 0; done < midLen; done += ZERO_CHUNK) {
          const n = Math.min(ZERO_CHUNK, midLen - done);
          const w = new Bio(ReqOp.WRITE, dev, sector + done / SECTOR_SIZE, n, [new BioVec(z, 0, n)]);
          w.flags = this.fua;
          pieces.push(w);
        }
      }
    }
    const parent = pieces[pieces.length - 1] as Bio;
    parent.endIo = (bio) => this.finish(bio);
    for (let i = 0; i < pieces.length - 1; i++) bioChain(pieces[i] as Bio, parent);
    for (let i = 0; i < pieces.length - 1; i++) submitSplit(pieces[i] as Bio);
    submitSplit(parent);
  }

  private finish(bio: Bio): void {
    const blocks = this.blocks;
    if (blocks !== null) {
      this.blocks = null;
      putPayloadBuffer(blocks);
    }
    this.locks.release(this);
    this.ctx.owner.ioDone(this.ctx, bio);
  }
}
