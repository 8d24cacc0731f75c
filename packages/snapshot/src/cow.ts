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
  createDiskSync,
  describeBio,
  NotSupportedError,
  opName,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  type BackendCapabilities,
  type BlkError,
  type BlockBackend,
  type BlockDev,
  type CompletionSink,
  type Disk,
  copyFromBioVecs,
  copyToBioVecs,
  sliceBioVecs,
} from '@blkfilter/bio';
import { FilterVerdict, type FilterContext, type FilterInstance, type FilterNext } from '@blkfilter/registry';
import { ALLOC_WAIT, type DiffStorage, type SlotWaiter } from './diff-storage.js';
import { CowNoioReserveError, CowWouldBlockError, SnapshotCorruptedError, SnapshotStateError } from './errors.js';
import { SNAPSHOT_EVENT_MARK_DIRTY, SNAPSHOT_FILTER_NAME, type MarkDirtyData, type SnapshotInfo } from './types.js';

/** What a device needs from its snapshot. */
export interface SnapshotCore {
  readonly id: string;
  readonly storage: DiffStorage;
  /** Set when the snapshot is corrupted: image bios fail with it. */
  corruptedError: SnapshotCorruptedError | null;
  /** Set while destroy() runs: a detach is then expected, not a corruption. */
  destroying: boolean;
  corrupt(error: BlkError, device: string | null): void;
  info(): SnapshotInfo;
}

/** Chunk state byte: 0 is not copied yet; the hot path only asks "copied or not". */
const COPIED = 1;

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
  slot: number;
  buf: Buffer | null;
  /** Writes to the original waiting for the copy. */
  waitBios: Bio[];
  /** Image pieces waiting for the copy. */
  waitPieces: ImagePiece[];

  constructor(dev: SnapshotDevice, index: number) {
    this.dev = dev;
    this.index = index;
    this.copying = false;
    this.copyWanted = false;
    this.readers = 0;
    this.slot = -1;
    this.buf = null;
    this.waitBios = [];
    this.waitPieces = [];
  }

  slotReady(slot: number): void {
    this.dev.copyWithSlot(this, slot);
  }
}

/** One image bio on its way: split into pieces of one chunk each, completed once by a counter. */
class ImageRequest {
  readonly dev: SnapshotDevice;
  readonly bio: Bio;
  readonly sink: CompletionSink;
  remaining: number;
  status: BlkStatus;
  error: BlkError | null;

  constructor(dev: SnapshotDevice, bio: Bio, sink: CompletionSink) {
    this.dev = dev;
    this.bio = bio;
    this.sink = sink;
    this.remaining = 1;
    this.status = BlkStatus.OK;
    this.error = null;
  }
}

/** The part of an image bio that falls in one chunk. */
class ImagePiece {
  readonly req: ImageRequest;
  readonly chunk: number;
  /** Byte offset within the chunk. */
  readonly offset: number;
  readonly length: number;
  /** Byte offset within the image bio's data. */
  readonly dataPos: number;

  constructor(req: ImageRequest, chunk: number, offset: number, length: number, dataPos: number) {
    this.req = req;
    this.chunk = chunk;
    this.offset = offset;
    this.length = length;
    this.dataPos = dataPos;
  }
}

function copyReadEndIo(bio: Bio): void {
  const lock = bio.private as ChunkLock;
  lock.dev.copyReadDone(lock, bio);
}

function originReadEndIo(bio: Bio): void {
  const piece = bio.private as ImagePiece;
  piece.req.dev.originReadDone(piece, bio);
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
          `NOWAIT ${opName(bio.op)} to chunk ${first} of "${this.name}" must wait for copy-on-write (snapshot ${this.core.id}); the copy has started, retry (or submit without NOWAIT)`,
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

  private lockFor(c: number): ChunkLock {
    let lock = this.locks.get(c);
    if (lock === undefined) {
      lock = new ChunkLock(this, c);
      this.locks.set(c, lock);
    }
    return lock;
  }

  private releaseIfIdle(lock: ChunkLock): void {
    if (!lock.copying && !lock.copyWanted && lock.readers === 0 && lock.waitBios.length === 0 && lock.waitPieces.length === 0) {
      if (this.locks.get(lock.index) === lock) this.locks.delete(lock.index);
    }
  }

  /** Makes sure chunk `c` gets copied: now, or once the image reads holding it drain. */
  private requestCopy(c: number): void {
    const lock = this.lockFor(c);
    if (lock.copying) return;
    lock.copyWanted = true;
    if (lock.readers === 0) this.startCopy(lock);
  }

  private startCopy(lock: ChunkLock): void {
    lock.copyWanted = false;
    lock.copying = true;
    this.copies++;
    const slot = this.core.storage.alloc();
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
    const buf = mem !== null ? mem.subarray(0, len) : Buffer.allocUnsafe(len);
    lock.buf = buf;
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
    const buf = lock.buf as Buffer;
    storage.write(lock.slot, 0, buf, buf.length, (err) => {
      if (err !== null) this.core.corrupt(err, this.name);
      this.copyFinished(lock, err === null);
    });
  }

  private copyFinished(lock: ChunkLock, ok: boolean): void {
    this.copies--;
    lock.copying = false;
    lock.buf = null;
    const state = this.state;
    if (ok && state !== null && this.core.corruptedError === null) {
      // Saved before anyone may write the chunk: waiters run only after this.
      state[lock.index] = COPIED;
      this.slots.set(lock.index, lock.slot);
      this.copiedChunks++;
    }
    this.wake(lock);
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
      for (let i = 0; i < pieces.length; i++) this.dispatchPiece(pieces[i] as ImagePiece);
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
      for (const p of pieces) this.pieceFailed(p);
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

  // --- the image ---------------------------------------------------------------------------------

  /** Starts copy-on-write with a fresh chunk map and creates the image disk (device frozen). */
  activate(state: Uint8Array, imageName: string): Disk {
    const disk = this.bdev.disk;
    const l = disk.limits;
    const image = createDiskSync({
      name: imageName,
      backend: new SnapshotImageBackend(this),
      logicalBlockSize: l.logicalBlockSize,
      physicalBlockSize: l.physicalBlockSize,
      limits: {
        maxSectors: l.maxSectors,
        maxSegments: l.maxSegments,
        discardGranularity: l.discardGranularity,
        maxDiscardSectors: l.maxDiscardSectors,
        maxWriteZeroesSectors: l.maxWriteZeroesSectors,
      },
    });
    this.state = state;
    this.image = image;
    return image;
  }

  /** @internal an image bio, from {@link SnapshotImageBackend.queueBio}. */
  queueImageBio(bio: Bio, sink: CompletionSink): void {
    const op = bio.op;
    if (op !== ReqOp.READ && op !== ReqOp.WRITE && op !== ReqOp.DISCARD && op !== ReqOp.WRITE_ZEROES) {
      if (bio.error === null) bio.error = new NotSupportedError(`${describeBio(bio)}: a snapshot image does not support ${opName(op)}`);
      sink.complete(bio, BlkStatus.NOTSUPP);
      return;
    }
    const corrupted = this.core.corruptedError;
    if (corrupted !== null || this.state === null) {
      if (bio.error === null) bio.error = corrupted ?? this.stoppedError();
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    if (op !== ReqOp.READ) {
      // So that CBT on the original counts it: the next incremental backup must copy it.
      const data: MarkDirtyData = { ranges: [{ sector: bio.sector, sectors: bio.size / SECTOR_SIZE }] };
      (this.ctx as FilterContext).emit(SNAPSHOT_EVENT_MARK_DIRTY, data);
    }
    const req = new ImageRequest(this, bio, sink);
    const chunkSize = this.chunkSize;
    let byte = bio.sector * SECTOR_SIZE;
    const end = byte + bio.size;
    let pos = 0;
    while (byte < end) {
      const c = Math.floor(byte / chunkSize);
      const off = byte - c * chunkSize;
      const len = Math.min(chunkSize - off, end - byte);
      req.remaining++;
      this.dispatchPiece(new ImagePiece(req, c, off, len, pos));
      byte += len;
      pos += len;
    }
    this.pieceDone(req, BlkStatus.OK, null);
  }

  private stoppedError(): SnapshotCorruptedError {
    return new SnapshotCorruptedError(`copy-on-write of "${this.name}" has stopped (snapshot ${this.core.id} is being destroyed): its image can no longer be read`);
  }

  /** Serves one piece: from diff storage if its chunk is saved, else from the original under the chunk lock. */
  private dispatchPiece(p: ImagePiece): void {
    const state = this.state;
    if (state === null || this.core.corruptedError !== null) {
      this.pieceFailed(p);
      return;
    }
    const c = p.chunk;
    if (state[c] === COPIED) {
      this.pieceFromStorage(p);
      return;
    }
    const lock = this.lockFor(c);
    if (p.req.bio.op === ReqOp.READ) {
      if (lock.copying || lock.copyWanted) {
        // A writer is waiting for this chunk: do not starve it, read the saved copy after.
        lock.waitPieces.push(p);
        return;
      }
      // While readers hold the chunk no copy starts, so no write can change it under the read.
      lock.readers++;
      const bio = p.req.bio;
      const rb = new Bio(
        ReqOp.READ,
        this.bdev,
        c * this.chunkSectors + p.offset / SECTOR_SIZE,
        p.length,
        p.dataPos === 0 && p.length === bio.size ? bio.vecs : sliceBioVecs(bio.vecs, p.dataPos, p.length),
      );
      rb.private = p;
      rb.endIo = originReadEndIo;
      // Below this filter, not through submitBio: a freeze of the original would otherwise hold
      // this read while a held write waits for its chunk lock, and never drain.
      (this.next as FilterNext).submit(rb);
      return;
    }
    // A write to the image first saves the chunk, then changes the saved copy.
    lock.waitPieces.push(p);
    this.requestCopy(c);
  }

  /** @internal an image read of the original completed. */
  originReadDone(p: ImagePiece, rb: Bio): void {
    const lock = this.locks.get(p.chunk);
    if (lock !== undefined) {
      lock.readers--;
      if (lock.readers === 0 && lock.copyWanted && !lock.copying && this.state !== null) this.startCopy(lock);
      else this.releaseIfIdle(lock);
    }
    if (rb.status !== BlkStatus.OK) this.pieceDone(p.req, rb.status, rb.error);
    else if (this.core.corruptedError !== null) this.pieceFailed(p);
    else this.pieceDone(p.req, BlkStatus.OK, null);
  }

  private pieceFromStorage(p: ImagePiece): void {
    const storage = this.core.storage;
    const slot = this.slots.get(p.chunk) as number;
    const bio = p.req.bio;
    const op = bio.op;
    const mem = storage.memory(slot);
    if (mem !== null) {
      if (op === ReqOp.READ) copyToBioVecs(bio.vecs, p.dataPos, mem, p.offset, p.length);
      else if (op === ReqOp.WRITE) copyFromBioVecs(bio.vecs, p.dataPos, mem, p.offset, p.length);
      else mem.fill(0, p.offset, p.offset + p.length);
      this.pieceDone(p.req, BlkStatus.OK, null);
      return;
    }
    if (op === ReqOp.READ) {
      const tmp = Buffer.allocUnsafe(p.length);
      storage.read(slot, p.offset, tmp, p.length, (err) => {
        if (err !== null) this.storageFailed(p, err);
        else {
          copyToBioVecs(bio.vecs, p.dataPos, tmp, 0, p.length);
          this.pieceDone(p.req, BlkStatus.OK, null);
        }
      });
      return;
    }
    const tmp = op === ReqOp.WRITE ? Buffer.allocUnsafe(p.length) : Buffer.alloc(p.length);
    if (op === ReqOp.WRITE) copyFromBioVecs(bio.vecs, p.dataPos, tmp, 0, p.length);
    storage.write(slot, p.offset, tmp, p.length, (err) => {
      if (err !== null) this.storageFailed(p, err);
      else this.pieceDone(p.req, BlkStatus.OK, null);
    });
  }

  private storageFailed(p: ImagePiece, err: BlkError): void {
    // The image can no longer be trusted (blksnap marks the snapshot corrupted too).
    this.core.corrupt(err, this.name);
    this.pieceDone(p.req, BlkStatus.IOERR, err);
  }

  private pieceFailed(p: ImagePiece): void {
    this.pieceDone(p.req, BlkStatus.IOERR, this.core.corruptedError ?? this.stoppedError());
  }

  private pieceDone(req: ImageRequest, status: BlkStatus, error: BlkError | null): void {
    if (status !== BlkStatus.OK && req.status === BlkStatus.OK) {
      req.status = status;
      req.error = error;
    }
    if (--req.remaining !== 0) return;
    const bio = req.bio;
    if (req.error !== null && bio.error === null) bio.error = req.error;
    req.sink.complete(bio, req.status);
  }
}

const IMAGE_CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: false, discard: true, writeZeroes: true });

/**
 * The backend of a snapshot image disk: reads return the original device's data of the instant
 * of take (from diff storage for chunks saved since, else from the original under the chunk
 * lock); writes, discards and write-zeroes change the saved copy in diff storage, never the
 * original. Created by `Snapshot.take()`; not constructed by users.
 */
export class SnapshotImageBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly = false;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = IMAGE_CAPABILITIES;
  /** @internal */
  readonly device: SnapshotDevice;

  /** @internal */
  constructor(device: SnapshotDevice) {
    this.device = device;
    this.sizeBytes = device.bdev.nrSects * SECTOR_SIZE;
    this.description = `snapshot ${device.core.id} of "${device.name}"`;
  }

  /** The snapshot's id. */
  get snapshotId(): string {
    return this.device.core.id;
  }

  /** The name of the original device. */
  get original(): string {
    return this.device.name;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    this.device.queueImageBio(bio, sink);
  }

  async close(): Promise<void> {}
}

