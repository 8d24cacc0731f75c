import {
  Bio,
  bioEndioError,
  bioNeedsNoio,
  memallocNoioRestore,
  memallocNoioSave,
  BioIoError,
  BioVec,
  BlkStatus,
  blkStatusToErrno,
  bioSplitToLimits,
  opName,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  type BlkError,
  type BlockDev,
  type Disk,
} from '@blkfilter/bio';
import { FilterVerdict, type FilterContext, type FilterInstance, type FilterNext } from '@blkfilter/registry';
import { ALLOC_WAIT, type DiffStorage, type SlotWaiter } from './diff-storage.js';
import { CowNoioReserveError, CowWouldBlockError, SnapshotCorruptedError, SnapshotStateError } from './errors.js';
import { SNAPSHOT_FILTER_NAME, type SnapshotInfo } from './types.js';

/** What a device needs from its snapshot. */
export interface SnapshotCore {
  readonly id: string;
  readonly storage: DiffStorage;
  /** Set when the snapshot is corrupted: image bios fail with it. */
  corruptedError: SnapshotCorruptedError | null;
  /** Set while destroy() runs: a detach is then expected, not a corruption. */
  destroying: boolean;
  /** The cap on chunk copies in flight, shared by the snapshot's devices. */
  readonly copyQueue: CopyQueue;
  corrupt(error: BlkError, device: string | null): void;
  info(): SnapshotInfo;
}

/** Chunk state byte: 0 is not copied yet; the hot path only asks "copied or not". */
export const COPIED = 1;

/**
 * Something of the image's data path waiting on a chunk (a piece of an image bio): the CoW side
 * calls it back when the chunk was saved or CoW stopped. Kept narrow so the filter never
 * depends on the image (image.ts builds on this file, not the other way round).
 */
export interface ChunkWaiter {
  /** The chunk's copy finished (saved, or failed and the snapshot is corrupted): look again. */
  chunkReady(): void;
  /** Copy-on-write stopped with this waiting: fail it. */
  chunkFailed(): void;
}

/**
 * The lock of one chunk while something happens to it (blksnap's `chunk->lock`): a copy in
 * progress or wanted, image reads of the original in flight, and what waits for them. Exists
 * only while busy, so memory grows with work in flight, not with the device.
 */
class ChunkLock implements SlotWaiter {
  readonly dev: SnapshotDevice;
  readonly index: number;
  /** A copy to diff storage is in progress. */
  copying: boolean;
  /** A copy must start as soon as the image reads of the original drain. */
  copyWanted: boolean;
  /** Image reads of this chunk from the original in flight: a copy (and so a write) waits for them. */
  readers: number;
  /** Waiting in the snapshot's {@link CopyQueue} for a copy to start. */
  queued: boolean;
  /** The next lock in that queue. */
  nextQueued: ChunkLock | null;
  slot: number;
  /** A whole chunk from the queue's pool (diff storage in files), or null. */
  buf: Buffer | null;
  /** Writes to the original waiting for the copy. */
  waitBios: Bio[];
  /** Image requests waiting for the copy. */
  waitPieces: ChunkWaiter[];

  constructor(dev: SnapshotDevice, index: number) {
    this.dev = dev;
    this.index = index;
    this.copying = false;
    this.copyWanted = false;
    this.readers = 0;
    this.queued = false;
    this.nextQueued = null;
    this.slot = -1;
    this.buf = null;
    this.waitBios = [];
    this.waitPieces = [];
  }

  get deviceName(): string {
    return this.dev.name;
  }

  slotReady(slot: number): void {
    this.dev.copyWithSlot(this, slot);
  }
}

/**
 * The snapshot's cap on chunk copies in flight: a burst of first writes, or one huge discard
 * after take, would otherwise start every copy at once, each reading a whole chunk (and, for
 * diff storage in files, holding a chunk-sized buffer). Copies past the cap wait in FIFO order,
 * in a list threaded through their chunk locks (no allocation per entry); the bios that need
 * them wait on those locks as before. Shared by the snapshot's devices, as the diff storage is.
 */
export class CopyQueue {
  /** Most copies in flight. */
  readonly max: number;
  readonly chunkSize: number;
  /** Copies started and not finished (waiting for a slot, reading, or writing to storage). */
  running: number;
  /** Locks waiting for a copy to start, oldest first, linked by `nextQueued`. */
  private head: ChunkLock | null;
  private tail: ChunkLock | null;
  /** Set while {@link pump} runs: a copy that finishes inside it does not start another pump. */
  private pumping: boolean;
  /** Chunk buffers of finished copies to files, reused: never more than `max` exist. */
  private readonly buffers: Buffer[];

  constructor(max: number, chunkSize: number) {
    this.max = max;
    this.chunkSize = chunkSize;
    this.running = 0;
    this.head = null;
    this.tail = null;
    this.pumping = false;
    this.buffers = [];
  }

  /** Starts the copy of `lock` now if under the cap and nobody is ahead of it, else queues it. */
  admit(lock: ChunkLock): void {
    if (this.running < this.max && this.head === null) {
      this.running++;
      lock.dev.startCopy(lock);
      return;
    }
    lock.queued = true;
    if (this.tail === null) this.head = lock;
    else this.tail.nextQueued = lock;
    this.tail = lock;
  }

  /** A copy finished: the oldest queued ones take its place. */
  done(): void {
    this.running--;
    this.pump();
  }

  /**
   * Starts queued copies while under the cap. A copy that finishes inside `startCopy` (a
   * backend that completes at once) calls `done` back in here: the loop below picks up its
   * place rather than a nested pump. Locks whose device stopped copy-on-write are dropped.
   */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    try {
      while (this.running < this.max && this.head !== null) {
        const lock = this.head;
        this.head = lock.nextQueued;
        if (this.head === null) this.tail = null;
        lock.nextQueued = null;
        lock.queued = false;
        const dev = lock.dev;
        if (!lock.copyWanted || dev.state === null) {
          dev.releaseIfIdle(lock);
          continue;
        }
        this.running++;
        dev.startCopy(lock);
      }
    } finally {
      this.pumping = false;
    }
  }

  /** A chunk-sized buffer for a copy to files (fully overwritten by the read). */
  takeBuffer(): Buffer {
    return this.buffers.pop() ?? Buffer.allocUnsafeSlow(this.chunkSize);
  }

  /** Gives back a buffer of {@link takeBuffer} once its copy is done. */
  giveBuffer(buf: Buffer): void {
    this.buffers.push(buf);
  }

  /** Drops the pooled buffers (destroy). */
  clear(): void {
    this.buffers.length = 0;
  }
}

function flushEndIo(bio: Bio): void {
  const done = bio.private as (err: BlkError | null) => void;
  if (bio.status === BlkStatus.OK) done(null);
  else
    done(
      new BioIoError(
        bio.status,
        `cannot take the snapshot: flushing the write cache of "${bio.bdev.name}" failed (${blkStatusToErrno(bio.status)}${bio.error !== null ? `: ${bio.error.message}` : ''}); data acknowledged before the take may not be on stable storage`,
        { cause: bio.error },
      ),
    );
}

function copyReadEndIo(bio: Bio): void {
  const lock = bio.private as ChunkLock;
  lock.dev.copyReadDone(lock, bio);
}

/**
 * One original device of a snapshot: the copy-on-write filter instance attached to it, the
 * chunk state, and the image's data path.
 */
export class SnapshotDevice implements FilterInstance {
  readonly core: SnapshotCore;
  readonly bdev: BlockDev;
  readonly name: string;
  readonly chunkSize: number;
  readonly chunkSectors: number;
  readonly chunkCount: number;
  /** Image name asked for by the user, or null for the default. */
  readonly requestedImageName: string | null;
  ctx: FilterContext | null;
  next: FilterNext | null;
  /** One byte per chunk (COPIED or not) while CoW runs; null before take and once stopped. */
  state: Uint8Array | null;
  /** Diff storage slot of every copied chunk. */
  readonly slots: Map<number, number>;
  readonly locks: Map<number, ChunkLock>;
  copiedChunks: number;
  image: Disk | null;
  /** Copies in flight (their storage writes outlive the bios a freeze drains). */
  private copies: number;
  private idleWaiters: Array<() => void>;
  readonly ctl: Readonly<Record<string, (args: unknown) => unknown>>;

  constructor(core: SnapshotCore, bdev: BlockDev, chunkSize: number, imageName: string | null) {
    this.core = core;
    this.bdev = bdev;
    this.name = bdev.name;
    this.chunkSize = chunkSize;
    this.chunkSectors = chunkSize / SECTOR_SIZE;
    this.chunkCount = Math.ceil(bdev.nrSects / this.chunkSectors);
    this.requestedImageName = imageName;
    this.ctx = null;
    this.next = null;
    this.state = null;
    this.slots = new Map();
    this.locks = new Map();
    this.copiedChunks = 0;
    this.image = null;
    this.copies = 0;
    this.idleWaiters = [];
    this.ctl = Object.freeze({ info: () => core.info() });
  }

  /** Called by the filter's attach, with the device frozen. */
  bind(ctx: FilterContext): this {
    this.ctx = ctx;
    this.next = ctx.next;
    return this;
  }

  /** Bytes of chunk `c`: the last one may be shorter. */
  chunkBytes(c: number): number {
    const start = c * this.chunkSectors;
    return Math.min(this.chunkSectors, this.bdev.nrSects - start) * SECTOR_SIZE;
  }

  // --- the filter: writes, discards and write-zeroes to the original -----------------------------

  /**
   * The hot path: a write to chunks already copied passes with no allocation; any other goes
   * to the slow path, which holds it until its chunks are saved.
   */
  write(bio: Bio, next: FilterNext): FilterVerdict {
    const state = this.state;
    if (state === null) return FilterVerdict.PASS;
    const cs = this.chunkSectors;
    const last = Math.floor((bio.sector + bio.size / SECTOR_SIZE - 1) / cs);
    for (let c = Math.floor(bio.sector / cs); c <= last; c++) {
      if (state[c] !== COPIED) return this.cowSlow(bio, next, c, last);
    }
    return FilterVerdict.PASS;
  }

  /** Copy-on-write like a write: the discarded data must still be readable from the image. */
  discard(bio: Bio, next: FilterNext): FilterVerdict {
    return this.write(bio, next);
  }

  /** Copy-on-write like a write. */
  writeZeroes(bio: Bio, next: FilterNext): FilterVerdict {
    return this.write(bio, next);
  }

  private cowSlow(bio: Bio, _next: FilterNext, first: number, last: number): FilterVerdict {
    // Swap I/O (or a no-I/O scope) must not wait for diff storage to grow: that growth may need
    // the very memory or I/O the swap write is freeing. It uses the reserve of allocated slots,
    // or fails retryably while the storage grows outside the scope. It never bypasses CoW.
    if (bioNeedsNoio(bio) && this.state !== null) {
      let need = 0;
      for (let c = first; c <= last; c++) if (this.state[c] !== COPIED && this.locks.get(c)?.copying !== true) need++;
      if (need > this.core.storage.freeSlots()) {
        this.core.storage.growSoon();
        bioEndioError(
          bio,
          BlkStatus.RESOURCE,
          new CowNoioReserveError(
            `swap ${opName(bio.op)} to chunk ${first} of "${this.name}" needs ${need} diff-storage slot(s) and only ${this.core.storage.freeSlots()} are reserved; storage grows now, outside the no-I/O scope: retry (snapshot ${this.core.id})`,
          ),
        );
        return FilterVerdict.TAKEN;
      }
    }
    // Start every copy the bio needs at once, so a bio over several chunks waits for the
    // slowest copy, not for the sum of them. For swap I/O, in a no-I/O scope: storage growth
    // that these copies trigger is deferred.
    const token = bioNeedsNoio(bio) ? memallocNoioSave() : -1;
    try {
      for (let c = first; c <= last; c++) {
        const state = this.state;
        if (state === null) break;
        if (state[c] !== COPIED) this.requestCopy(c);
      }
    } finally {
      if (token >= 0) memallocNoioRestore(token);
    }
    // A copy that could not get storage corrupted the snapshot and stopped CoW: let it pass.
    if (this.state === null) return FilterVerdict.PASS;
    if ((bio.flags & ReqFlag.NOWAIT) !== 0) {
      bioEndioError(
        bio,
        BlkStatus.AGAIN,
        new CowWouldBlockError(
          `NOWAIT ${opName(bio.op)} to chunk ${first} of "${this.name}" must wait for copy-on-write (snapshot ${this.core.id}); the copy is under way (started, or queued behind maxConcurrentCopies others), retry (or submit without NOWAIT)`,
        ),
      );
      return FilterVerdict.TAKEN;
    }
    const c = this.firstUncopied(bio);
    if (c < 0) return FilterVerdict.PASS;
    (this.locks.get(c) as ChunkLock).waitBios.push(bio);
    return FilterVerdict.TAKEN;
  }

  /** The first chunk of `bio` not yet copied, or -1. */
  private firstUncopied(bio: Bio): number {
    const state = this.state as Uint8Array;
    const cs = this.chunkSectors;
    const last = Math.floor((bio.sector + bio.size / SECTOR_SIZE - 1) / cs);
    for (let c = Math.floor(bio.sector / cs); c <= last; c++) if (state[c] !== COPIED) return c;
    return -1;
  }

  /** A held write whose chunk was saved: wait for its next unsaved chunk, or send it on. */
  private resumeBio(bio: Bio): void {
    const next = this.next as FilterNext;
    if (this.state === null) {
      next.submit(bio);
      return;
    }
    const c = this.firstUncopied(bio);
    if (c < 0) {
      next.submit(bio);
      return;
    }
    this.requestCopy(c);
    const lock = this.state === null ? undefined : this.locks.get(c);
    if (lock === undefined) next.submit(bio);
    else lock.waitBios.push(bio);
  }

  /** @internal */
  lockFor(c: number): ChunkLock {
    let lock = this.locks.get(c);
    if (lock === undefined) {
      lock = new ChunkLock(this, c);
      this.locks.set(c, lock);
    }
    return lock;
  }

  /** @internal */
  releaseIfIdle(lock: ChunkLock): void {
    if (!lock.copying && !lock.copyWanted && lock.readers === 0 && lock.waitBios.length === 0 && lock.waitPieces.length === 0) {
      if (this.locks.get(lock.index) === lock) this.locks.delete(lock.index);
    }
  }

  /**
   * Makes sure chunk `c` gets copied: now, or once the image reads holding it drain, or when
   * the snapshot's copy queue lets it start.
   */
  requestCopy(c: number): void {
    const lock = this.lockFor(c);
    if (lock.copying || lock.queued) return;
    lock.copyWanted = true;
    if (lock.readers === 0) this.core.copyQueue.admit(lock);
  }

  /** @internal called by the {@link CopyQueue}, which counts the copy as running. */
  startCopy(lock: ChunkLock): void {
    lock.copyWanted = false;
    lock.copying = true;
    this.copies++;
    const slot = this.core.storage.alloc(lock);
    if (slot === ALLOC_WAIT) this.core.storage.wait(lock);
    else this.copyWithSlot(lock, slot);
  }

  /** Reads the old chunk below this filter, into its slot (memory) or a buffer (files). */
  copyWithSlot(lock: ChunkLock, slot: number): void {
    if (slot < 0 || this.state === null) {
      this.copyFinished(lock, false);
      return;
    }
    lock.slot = slot;
    const c = lock.index;
    const len = this.chunkBytes(c);
    const mem = this.core.storage.memory(slot);
    let buf: Buffer;
    if (mem !== null) buf = mem;
    else {
      buf = this.core.copyQueue.takeBuffer();
      lock.buf = buf;
    }
    const bio = new Bio(ReqOp.READ, this.bdev, c * this.chunkSectors, len, [new BioVec(buf, 0, len)]);
    bio.private = lock;
    bio.endIo = copyReadEndIo;
    const next = this.next as FilterNext;
    // A chunk may be larger than the device takes in one bio.
    for (let split = bioSplitToLimits(bio); split !== null; split = bioSplitToLimits(bio)) next.submit(split);
    next.submit(bio);
  }

  /** @internal the old chunk was read. */
  copyReadDone(lock: ChunkLock, bio: Bio): void {
    if (bio.status !== BlkStatus.OK) {
      const cause = bio.error;
      this.core.corrupt(
        new BioIoError(
          bio.status,
          `copy-on-write could not read chunk ${lock.index} of "${this.name}" (${blkStatusToErrno(bio.status)}${cause !== null ? `: ${cause.message}` : ''}); the snapshot cannot hold its old data`,
          { cause },
        ),
        this.name,
      );
      this.copyFinished(lock, false);
      return;
    }
    const storage = this.core.storage;
    if (storage.memory(lock.slot) !== null) {
      this.copyFinished(lock, true);
      return;
    }
    storage.write(lock.slot, 0, lock.buf as Buffer, this.chunkBytes(lock.index), (err) => {
      if (err !== null) this.core.corrupt(err, this.name);
      this.copyFinished(lock, err === null);
    });
  }

  private copyFinished(lock: ChunkLock, ok: boolean): void {
    this.copies--;
    lock.copying = false;
    const queue = this.core.copyQueue;
    if (lock.buf !== null) {
      queue.giveBuffer(lock.buf);
      lock.buf = null;
    }
    const state = this.state;
    if (ok && state !== null && this.core.corruptedError === null) {
      // Saved before anyone may write the chunk: waiters run only after this.
      state[lock.index] = COPIED;
      this.slots.set(lock.index, lock.slot);
      this.copiedChunks++;
    }
    this.wake(lock);
    // After the wake: the writes that waited for this chunk go on before queued copies start.
    queue.done();
    if (this.copies === 0 && this.idleWaiters.length > 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  private wake(lock: ChunkLock): void {
    const bios = lock.waitBios;
    const pieces = lock.waitPieces;
    if (bios.length > 0) {
      lock.waitBios = [];
      for (let i = 0; i < bios.length; i++) this.resumeBio(bios[i] as Bio);
    }
    if (pieces.length > 0) {
      lock.waitPieces = [];
      for (let i = 0; i < pieces.length; i++) (pieces[i] as ChunkWaiter).chunkReady();
    }
    this.releaseIfIdle(lock);
  }

  /**
   * Stops copy-on-write (corruption, detach): held writes go on to the device (a write to the
   * original never fails because of a snapshot), held image pieces fail.
   */
  deactivate(): void {
    if (this.state === null) return;
    this.state = null;
    const next = this.next as FilterNext;
    for (const lock of [...this.locks.values()]) {
      lock.copyWanted = false;
      const bios = lock.waitBios;
      const pieces = lock.waitPieces;
      lock.waitBios = [];
      lock.waitPieces = [];
      for (const bio of bios) next.submit(bio);
      for (const p of pieces) p.chunkFailed();
      this.releaseIfIdle(lock);
    }
  }

  /** Resolves when no copy is in flight (destroy waits for it before freeing the storage). */
  idle(): Promise<void> {
    if (this.copies === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  /** The registry detaches the filter (device frozen and drained). */
  detach(): void {
    if (!this.core.destroying && this.state !== null) {
      this.core.corrupt(
        new SnapshotStateError(
          `the ${SNAPSHOT_FILTER_NAME} filter was detached from "${this.name}" outside Snapshot.destroy(): writes to it are no longer copied; destroy snapshot ${this.core.id}`,
        ),
        this.name,
      );
    }
    this.deactivate();
  }

  // --- what the image's data path asks of the filter ----------------------------------------------

  /** Starts copy-on-write with a fresh chunk map; `image` is the image disk made for it (device frozen). */
  activate(state: Uint8Array, image: Disk): void {
    this.state = state;
    this.image = image;
  }

  /**
   * An image read of chunk `c` wants the original device: true when it may read now (the chunk
   * is then held against copies until {@link endOriginRead}), false when a writer waits for
   * the chunk's copy: the read waits too (`waiter.chunkReady()`) and then reads the saved copy.
   */
  beginOriginRead(c: number, waiter: ChunkWaiter): boolean {
    const lock = this.lockFor(c);
    if (lock.copying || lock.copyWanted) {
      lock.waitPieces.push(waiter);
      return false;
    }
    // While readers hold the chunk no copy starts, so no write can change it under the read.
    lock.readers++;
    return true;
  }

  /** An image read of the original, begun with {@link beginOriginRead}, completed. */
  endOriginRead(c: number): void {
    const lock = this.locks.get(c);
    if (lock === undefined) return;
    lock.readers--;
    if (lock.readers === 0 && lock.copyWanted && !lock.copying && !lock.queued && this.state !== null) this.core.copyQueue.admit(lock);
    else this.releaseIfIdle(lock);
  }

  /** An image write to chunk `c`: the chunk is saved first; `waiter.chunkReady()` then. */
  saveBeforeImageWrite(c: number, waiter: ChunkWaiter): void {
    this.lockFor(c).waitPieces.push(waiter);
    this.requestCopy(c);
  }

  /** Flushes the original's write cache below this filter (usable while the device is frozen). */
  flushBelow(): Promise<void> {
    return new Promise((resolve, reject) => {
      const bio = new Bio(ReqOp.FLUSH, this.bdev, 0, 0);
      bio.endIo = flushEndIo;
      bio.private = (err: BlkError | null) => (err === null ? resolve() : reject(err));
      (this.next as FilterNext).submit(bio);
    });
  }

  /** Why the image cannot be read while CoW is stopped for destroy. */
  stoppedError(): SnapshotCorruptedError {
    return new SnapshotCorruptedError(`copy-on-write of "${this.name}" has stopped (snapshot ${this.core.id} is being destroyed): its image can no longer be read`);
  }
}
