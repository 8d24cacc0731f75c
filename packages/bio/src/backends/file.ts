import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { allocIoBuffer, isIoBufferAligned, requireDirectIo } from '../aligned.js';
import type { BackendCapabilities, BlockBackend } from '../backend.js';
import { BioVec, copyFromBioVecs, copyToBioVecs, describeBio, SECTOR_SIZE, type Bio, type CompletionSink } from '../bio.js';
import {
  BlkError,
  DeviceOfflineError,
  InvalidArgumentError,
  NoSuchDeviceError,
  NotSupportedError,
  ReadOnlyDeviceError,
} from '../errors.js';
import { opIsWrite, opName, ReqFlag, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';

// Cost model (INTEROP.md): every fs.read/fs.write/fs.fdatasync is a libuv threadpool round
// trip, ~40 us here, and the pool has 4 threads unless UV_THREADPOOL_SIZE says otherwise, so a
// deep queue of small bios is bounded by the pool, not by the disk; a server that wants more
// should raise UV_THREADPOOL_SIZE before the first fs call. We use the callback API, not
// fs/promises: a Promise per bio costs ~65 ns plus a microtask, and the callbacks here are
// bound once per pooled FileRequest, so the data path allocates nothing per single-vec bio.
//
// Small reads skip the threadpool while the page cache answers them. Profiled under an NBD
// server doing 4 KiB random reads at QD32 on a cached image, the threadpool hop (queueing,
// waking a worker, the eventfd back, one context switch or more per read on 2 cores) took over
// half of the JavaScript thread and most of the workers' time; a pread of 4 KiB from the page
// cache takes a microsecond or two. So a single-vec READ of at most INLINE_READ_MAX bytes is
// read with fs.readSync and completed from a setImmediate (never inside queueBio). A read that
// takes longer than INLINE_MISS_MS went to the disk: inline reads then stop for a while
// (doubling on each miss, up to INLINE_BACKOFF_MAX_MS), so a cold image costs the event loop
// one disk read per backoff period, not one per bio. Writes always go to the threadpool: a
// write into the page cache can block on dirty-page throttling for milliseconds.

/** Options of {@link FileBackend.open}. */
export interface FileBackendOptions {
  /** Open read-only: the disk is then read-only too. */
  readonly readOnly?: boolean;
  /**
   * Open with O_DIRECT (bypass the page cache). Every transfer is then aligned to
   * `minIoSize`: aligned bio buffers ({@link allocIoBuffer}) are used as they are, others are
   * copied through a bounce buffer. Not every filesystem supports it (tmpfs does not).
   */
  readonly direct?: boolean;
  /** Alignment of every I/O: 512 or 4096; default 4096 with `direct`, else 512. */
  readonly minIoSize?: 512 | 4096;
  /** Open with O_DSYNC: every write is stable when it completes, so FUA costs nothing extra. */
  readonly sync?: boolean;
  /**
   * Read small bios (up to 64 KiB, one vec) on the JavaScript thread while the page cache
   * holds them, instead of a threadpool round trip; reads that go to the disk pause this for a
   * while (default true; never with `direct`). Turn it off for an image that is mostly not
   * cached on a slow disk, where even the occasional probe read blocking the event loop is
   * too much.
   */
  readonly inlineReads?: boolean;
  /** Create a sparse file of `sizeBytes` (a multiple of 512) if the file does not exist. */
  readonly create?: { readonly sizeBytes: number };
  /**
   * With `create`: if the file exists with another size, truncate or extend it to
   * `create.sizeBytes` instead of refusing (data past the new end is lost).
   */
  readonly resize?: boolean;
}

/** Counters of a {@link FileBackend}, for tests and tuning. */
export interface FileBackendStats {
  /** READ/WRITE bios copied through a bounce buffer because their vecs were not aligned (O_DIRECT). */
  bouncedBios: number;
  /** DISCARD/WRITE_ZEROES bios that wrote zeros because the filesystem cannot punch holes. */
  punchFallbacks: number;
  /** Reads done on the JavaScript thread because the page cache held their data. */
  inlineReads: number;
  /** Inline reads slow enough to have gone to the disk: each pauses inline reads for a while. */
  inlineMisses: number;
}

const CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: true, discard: true, writeZeroes: true });

/** Zeros are written in chunks of this many bytes, from one shared buffer. */
const ZERO_CHUNK = 1 << 20;
/** Free requests kept per backend; more are dropped to the GC. */
const REQUEST_POOL_MAX = 256;
/** Free bounce buffers kept per backend. */
const BOUNCE_POOL_MAX = 8;
/** Largest read done inline (see the cost model above); larger ones gain from a parallel copy. */
const INLINE_READ_MAX = 64 * 1024;
/**
 * Inline reads between two event-loop turns, in bytes: bounds how long a burst of reads keeps
 * the JavaScript thread (the rest go to the threadpool).
 */
const INLINE_TURN_BYTES = 1024 * 1024;
/**
 * A page-cache hit of 64 KiB takes ~10 us, an NVMe read ~80 us: a read slower than this went to
 * the disk, or this thread was preempted during it (on a busy machine that happens every few
 * thousand reads). Only INLINE_MISS_STREAK slow reads in a row count as a miss.
 */
const INLINE_MISS_MS = 0.05;
const INLINE_MISS_STREAK = 2;
/** After a miss inline reads pause this long, doubling on each miss that follows, up to the max. */
const INLINE_BACKOFF_MS = 50;
const INLINE_BACKOFF_MAX_MS = 2000;

const NO_VECS: BioVec[] = [];
const EMPTY = Buffer.alloc(0);

type ErrnoCallback = (err: NodeJS.ErrnoException | null) => void;
type IoCallback = (err: NodeJS.ErrnoException | null, bytes: number) => void;

interface FsNativeExtensions {
  trim(fd: number, offset: number, length: number): Promise<void>;
}

// Loaded on first DISCARD/WRITE_ZEROES, not at import: it is a native addon, and a platform
// where it did not build still gets discard by writing zeros.
let fsExt: FsNativeExtensions | null = null;
let fsExtTried = false;

function loadFsExt(): FsNativeExtensions | null {
  if (!fsExtTried) {
    fsExtTried = true;
    try {
      fsExt = createRequire(import.meta.url)('fs-native-extensions') as FsNativeExtensions;
    } catch {
      fsExt = null;
    }
  }
  return fsExt;
}

// One zero buffer for every backend: it is only ever written from, never into. Aligned to
// 4096 so that it also serves O_DIRECT backends of either minIoSize.
let zeroBuffer: Buffer | null = null;

function zeros(): Buffer {
  return (zeroBuffer ??= allocIoBuffer(ZERO_CHUNK, 4096));
}

/** Error codes of a filesystem that cannot punch holes (libuv names EOPNOTSUPP `ENOTSUP`). */
function isPunchUnsupported(code: string | undefined): boolean {
  return code === 'ENOTSUP' || code === 'EOPNOTSUPP' || code === 'ENOSYS';
}

/** The status a bio completes with for an fs error (the kernel's `errno_to_blk_status`). */
function statusForErrno(code: string | undefined): BlkStatus {
  switch (code) {
    case 'ENOSPC':
    case 'EDQUOT':
      return BlkStatus.NOSPC;
    case 'EAGAIN':
      return BlkStatus.AGAIN;
    case 'ENOMEM':
      return BlkStatus.RESOURCE;
    default:
      // EROFS, EPERM, EACCES and the rest: the kernel reports them all as BLK_STS_IOERR.
      return BlkStatus.IOERR;
  }
}

const MAIN_READ = 0;
const MAIN_WRITE = 1;
const MAIN_TRIM = 2;
const MAIN_ZERO = 3;
const MAIN_NONE = 4;

const STAGE_PRE = 0;
const STAGE_MAIN = 1;
const STAGE_POST = 2;

/**
 * The state of one bio on its way through the file: pooled per backend, with its callbacks
 * bound once, so that a bio costs no closure. A bio moves through up to three stages:
 * PREFLUSH sync, the main transfer (looping on short reads and writes), FUA sync.
 */
class FileRequest {
  readonly engine: FileEngine;
  bio: Bio | null;
  sink: CompletionSink | null;
  main: number;
  stage: number;
  postSync: boolean;
  /** File position of the next byte to move. */
  pos: number;
  /** Bytes still to move. */
  left: number;
  /** Where the data is: the bio's vecs, or `bounceVecs`. */
  vecs: BioVec[];
  /** Index in `vecs` and offset within it of the next byte. */
  vi: number;
  vo: number;
  bounce: Buffer | null;
  readonly bounceVecs: BioVec[];
  /** Reused iovec array for readv/writev (the views are made per call). */
  readonly iov: Uint8Array[];
  readonly onIo: IoCallback;
  readonly onSync: ErrnoCallback;
  readonly onTrimDone: () => void;
  readonly onTrimError: (err: unknown) => void;
  /** Outcome of an inline read, delivered to `ioDone` from the engine's setImmediate. */
  inlineErr: NodeJS.ErrnoException | null;
  inlineBytes: number;

  constructor(engine: FileEngine) {
    this.engine = engine;
    this.bio = null;
    this.sink = null;
    this.main = MAIN_NONE;
    this.stage = STAGE_PRE;
    this.postSync = false;
    this.pos = 0;
    this.left = 0;
    this.vecs = NO_VECS;
    this.vi = 0;
    this.vo = 0;
    this.bounce = null;
    this.bounceVecs = [new BioVec(EMPTY, 0, 0)];
    this.iov = [];
    this.onIo = this.ioDone.bind(this);
    this.onSync = this.syncDone.bind(this);
    this.onTrimDone = this.trimDone.bind(this);
    this.onTrimError = this.trimFailed.bind(this);
    this.inlineErr = null;
    this.inlineBytes = 0;
  }

  start(bio: Bio, sink: CompletionSink): void {
    const b = this.engine;
    this.bio = bio;
    this.sink = sink;
    const op = bio.op;
    const flags = bio.flags;
    switch (op) {
      case ReqOp.READ:
        this.main = MAIN_READ;
        break;
      case ReqOp.WRITE:
        this.main = MAIN_WRITE;
        break;
      case ReqOp.DISCARD:
        this.main = b.punchOrZero();
        break;
      case ReqOp.WRITE_ZEROES:
        // NOUNMAP: the blocks must stay allocated, so zeros are written, never punched.
        this.main = (flags & ReqFlag.NOUNMAP) !== 0 ? MAIN_ZERO : b.punchOrZero();
        break;
      default:
        // FLUSH: the main stage is empty and the sync is all there is.
        this.main = MAIN_NONE;
    }
    this.pos = bio.sector * SECTOR_SIZE;
    this.left = bio.size;
    // With O_DSYNC a WRITE is stable once it completes; a punched hole is not, it needs the sync.
    this.postSync = op === ReqOp.FLUSH || ((flags & ReqFlag.FUA) !== 0 && !(b.sync && op === ReqOp.WRITE));
    if ((flags & ReqFlag.PREFLUSH) !== 0 && op !== ReqOp.FLUSH) {
      this.stage = STAGE_PRE;
      this.issueSync();
    } else {
      this.startMain();
    }
  }

  private startMain(): void {
    this.stage = STAGE_MAIN;
    const main = this.main;
    if (main === MAIN_READ || main === MAIN_WRITE) {
      const bio = this.bio as Bio;
      const b = this.engine;
      if (b.direct && !b.vecsAligned(bio.vecs)) {
        b.stats.bouncedBios++;
        const bounce = b.getBounce(bio.size);
        this.bounce = bounce;
        const v = this.bounceVecs[0] as BioVec;
        v.buffer = bounce;
        v.offset = 0;
        v.length = bio.size;
        this.vecs = this.bounceVecs;
        if (main === MAIN_WRITE) copyFromBioVecs(bio.vecs, 0, bounce, 0, bio.size);
      } else {
        this.vecs = bio.vecs;
      }
      this.vi = 0;
      this.vo = 0;
      this.skipEmpty();
      this.issueIo();
    } else if (main === MAIN_TRIM) {
      this.issueTrim();
    } else if (main === MAIN_ZERO) {
      this.issueIo();
    } else {
      this.mainDone();
    }
  }

  /** Issues the next read or write of the main stage. */
  private issueIo(): void {
    const fd = this.engine.fd;
    const main = this.main;
    try {
      if (main === MAIN_ZERO) {
        const z = zeros();
        fs.write(fd, z, 0, Math.min(this.left, z.length), this.pos, this.onIo);
        return;
      }
      const vecs = this.vecs;
      const v = vecs[this.vi] as BioVec;
      const rest = v.length - this.vo;
      if (rest >= this.left) {
        // The common case, one vec: no view, no array.
        if (main === MAIN_READ) {
          if (this.left <= INLINE_READ_MAX && this.engine.mayReadInline(this.left)) this.readInline(fd, v.buffer, v.offset + this.vo);
          else fs.read(fd, v.buffer, v.offset + this.vo, this.left, this.pos, this.onIo);
        } else {
          fs.write(fd, v.buffer, v.offset + this.vo, this.left, this.pos, this.onIo);
        }
        return;
      }
      const iov = this.iov;
      iov.length = 0;
      iov.push(v.buffer.subarray(v.offset + this.vo, v.offset + v.length));
      for (let i = this.vi + 1; i < vecs.length; i++) {
        const w = vecs[i] as BioVec;
        iov.push(w.offset === 0 && w.length === w.buffer.length ? w.buffer : w.buffer.subarray(w.offset, w.offset + w.length));
      }
      if (main === MAIN_READ) fs.readv(fd, iov, this.pos, this.onIo);
      else fs.writev(fd, iov, this.pos, this.onIo);
    } catch (err) {
      // Only argument validation throws synchronously (a detached buffer, a closed backend).
      this.fail(err);
    }
  }

  /** Reads on this thread; the outcome goes to `ioDone` from the engine's setImmediate. */
  private readInline(fd: number, buf: Uint8Array, offset: number): void {
    const engine = this.engine;
    const t0 = performance.now();
    let n = 0;
    let err: NodeJS.ErrnoException | null = null;
    try {
      n = fs.readSync(fd, buf, offset, this.left, this.pos);
    } catch (e) {
      err = e as NodeJS.ErrnoException;
      if (typeof err.errno !== 'number') {
        // Refused before any I/O (a detached buffer): at once, as fs.read would have thrown.
        this.fail(err);
        return;
      }
    }
    engine.inlineDone(this, err, n, performance.now() - t0);
  }

  /** @internal the engine delivers an inline read's outcome. */
  completeInline(): void {
    const err = this.inlineErr;
    this.inlineErr = null;
    this.ioDone(err, this.inlineBytes);
  }

  private ioDone(err: NodeJS.ErrnoException | null, n: number): void {
    if (err !== null) {
      this.fail(err);
      return;
    }
    if (this.main === MAIN_READ) {
      // 0 bytes is end of file: the file is shorter than the disk (sparse, or truncated behind
      // our back), and a disk reads zeros there. With O_DIRECT a read ending off the alignment
      // also means end of file, and the next read could not even be issued there.
      if (n === 0 || (this.engine.direct && n % this.engine.minIoSize !== 0)) {
        this.advance(n);
        this.zeroRest();
        this.mainDone();
        return;
      }
    } else if (n === 0) {
      this.fail(Object.assign(new Error(`write returned 0 bytes with ${this.left} left`), { code: 'EIO' }));
      return;
    }
    this.advance(n);
    if (this.left === 0) this.mainDone();
    else this.issueIo();
  }

  private advance(n: number): void {
    this.pos += n;
    this.left -= n;
    if (this.main === MAIN_ZERO) return;
    let vo = this.vo + n;
    let vi = this.vi;
    const vecs = this.vecs;
    while (vi < vecs.length && vo >= (vecs[vi] as BioVec).length) {
      vo -= (vecs[vi] as BioVec).length;
      vi++;
    }
    this.vi = vi;
    this.vo = vo;
    this.skipEmpty();
  }

  private skipEmpty(): void {
    const vecs = this.vecs;
    while (this.vi < vecs.length - 1 && this.vo >= (vecs[this.vi] as BioVec).length) {
      this.vi++;
      this.vo = 0;
    }
  }

  private zeroRest(): void {
    const vecs = this.vecs;
    let vo = this.vo;
    for (let i = this.vi; i < vecs.length; i++) {
      const v = vecs[i] as BioVec;
      if (vo < v.length) v.buffer.fill(0, v.offset + vo, v.offset + v.length);
      vo = 0;
    }
    this.left = 0;
  }

  private issueTrim(): void {
    const ext = loadFsExt() as FsNativeExtensions;
    let p: Promise<void>;
    try {
      p = ext.trim(this.engine.fd, this.pos, this.left);
    } catch (err) {
      this.trimFailed(err);
      return;
    }
    // DISCARD is rare next to READ/WRITE; the addon only offers a promise, so one per discard.
    p.then(this.onTrimDone, this.onTrimError);
  }

  private trimDone(): void {
    this.mainDone();
  }

  private trimFailed(err: unknown): void {
    const code = (err as NodeJS.ErrnoException | null)?.code;
    if (isPunchUnsupported(code)) {
      // Reads of a discarded range must return zeros, so a filesystem without hole punching
      // gets zeros written; remember it so later discards go straight there.
      this.engine.punchUnsupported();
      this.engine.stats.punchFallbacks++;
      this.main = MAIN_ZERO;
      this.issueIo();
      return;
    }
    this.fail(err);
  }

  private issueSync(): void {
    try {
      fs.fdatasync(this.engine.fd, this.onSync);
    } catch (err) {
      this.fail(err);
    }
  }

  private syncDone(err: NodeJS.ErrnoException | null): void {
    if (err !== null) {
      this.fail(err);
      return;
    }
    if (this.stage === STAGE_PRE) this.startMain();
    else this.finish(BlkStatus.OK);
  }

  private mainDone(): void {
    if (this.bounce !== null && this.main === MAIN_READ) copyToBioVecs((this.bio as Bio).vecs, 0, this.bounce, 0, (this.bio as Bio).size);
    if (this.postSync) {
      this.stage = STAGE_POST;
      this.issueSync();
    } else {
      this.finish(BlkStatus.OK);
    }
  }

  private fail(err: unknown): void {
    const bio = this.bio as Bio;
    const e = err as NodeJS.ErrnoException | null;
    const code = typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code) ? e.code : 'EIO';
    if (bio.error === null) {
      const reason = e instanceof Error ? e.message : String(err);
      bio.error = new BlkError(code, `${describeBio(bio)} failed on file "${this.engine.path}": ${reason}`, { cause: err });
    }
    this.finish(statusForErrno(code));
  }

  /** Releases everything before completing: the end-io may queue the next bio at once. */
  private finish(status: BlkStatus): void {
    const bio = this.bio as Bio;
    const sink = this.sink as CompletionSink;
    const b = this.engine;
    if (this.bounce !== null) {
      b.putBounce(this.bounce);
      this.bounce = null;
      (this.bounceVecs[0] as BioVec).buffer = EMPTY;
    }
    this.bio = null;
    this.sink = null;
    this.vecs = NO_VECS;
    this.iov.length = 0;
    b.putRequest(this);
    sink.complete(bio, status);
  }
}

const openAsync = (p: string, flags: number): Promise<number> =>
  new Promise((resolve, reject) => fs.open(p, flags, 0o666, (err, fd) => (err ? reject(err) : resolve(fd))));

/**
 * What a {@link FileBackend}'s requests share: the fd, the mode, the pools. Kept apart from the
 * backend so that pooling stays out of the backend's public type.
 */
class FileEngine {
  readonly path: string;
  readonly description: string;
  readonly direct: boolean;
  readonly sync: boolean;
  readonly minIoSize: number;
  readonly stats: FileBackendStats;
  fd: number;
  private canPunch: boolean;
  private readonly requests: FileRequest[];
  private readonly bounces: Buffer[];
  private bounceSize: number;
  /** Inline reads allowed at all (option, and never with O_DIRECT). */
  private readonly inlineAllowed: boolean;
  /** performance.now() before which inline reads are paused after a miss. */
  private inlinePausedUntil: number;
  private inlineBackoff: number;
  /** Slow inline reads in a row. */
  private inlineSlow: number;
  /** Inline bytes read since the last drain (one event-loop turn). */
  private inlineTurnBytes: number;
  /** Inline reads done, waiting for the drain; swapped with `inlineSpare` while draining. */
  private inlineQueue: FileRequest[];
  private inlineSpare: FileRequest[];
  private readonly onInlineDrain: () => void;

  constructor(file: string, description: string, fd: number, direct: boolean, sync: boolean, minIoSize: number, inlineReads: boolean) {
    this.path = file;
    this.description = description;
    this.fd = fd;
    this.direct = direct;
    this.sync = sync;
    this.minIoSize = minIoSize;
    this.stats = { bouncedBios: 0, punchFallbacks: 0, inlineReads: 0, inlineMisses: 0 };
    this.canPunch = true;
    this.requests = [];
    this.bounces = [];
    this.bounceSize = 0;
    this.inlineAllowed = inlineReads && !direct;
    this.inlinePausedUntil = 0;
    this.inlineBackoff = INLINE_BACKOFF_MS;
    this.inlineSlow = 0;
    this.inlineTurnBytes = 0;
    this.inlineQueue = [];
    this.inlineSpare = [];
    this.onInlineDrain = () => this.drainInline();
  }

  /** May a read of `size` bytes be done inline now? */
  mayReadInline(size: number): boolean {
    if (!this.inlineAllowed || this.inlineTurnBytes + size > INLINE_TURN_BYTES) return false;
    return this.inlinePausedUntil === 0 || this.inlineResumed();
  }

  private inlineResumed(): boolean {
    if (performance.now() < this.inlinePausedUntil) return false;
    // The next inline read probes the cache; a hit resets the backoff, a miss doubles it.
    this.inlinePausedUntil = 0;
    return true;
  }

  /** Records an inline read that took `ms` and queues its completion for the drain. */
  inlineDone(req: FileRequest, err: NodeJS.ErrnoException | null, n: number, ms: number): void {
    this.stats.inlineReads++;
    this.inlineTurnBytes += n;
    if (ms > INLINE_MISS_MS) {
      if (++this.inlineSlow >= INLINE_MISS_STREAK) {
        this.stats.inlineMisses++;
        this.inlinePausedUntil = performance.now() + this.inlineBackoff;
        this.inlineBackoff = Math.min(this.inlineBackoff * 2, INLINE_BACKOFF_MAX_MS);
        // The probe after the pause is the streak's next read: one more miss pauses again.
        this.inlineSlow = INLINE_MISS_STREAK - 1;
      }
    } else if (this.inlineSlow !== 0) {
      this.inlineSlow = 0;
      this.inlineBackoff = INLINE_BACKOFF_MS;
    }
    req.inlineErr = err;
    req.inlineBytes = n;
    const q = this.inlineQueue;
    q.push(req);
    if (q.length === 1) setImmediate(this.onInlineDrain);
  }

  /**
   * Completes the inline reads queued so far. Reads they lead to (the next piece of a short
   * read, the next bio of an end-io) queue for the next turn, so I/O is polled in between.
   */
  private drainInline(): void {
    const q = this.inlineQueue;
    this.inlineQueue = this.inlineSpare;
    this.inlineSpare = q;
    this.inlineTurnBytes = 0;
    for (let i = 0; i < q.length; i++) (q[i] as FileRequest).completeInline();
    q.length = 0;
  }

  getRequest(): FileRequest {
    return this.requests.pop() ?? new FileRequest(this);
  }

  putRequest(req: FileRequest): void {
    if (this.requests.length < REQUEST_POOL_MAX && this.fd >= 0) this.requests.push(req);
  }

  /** How to zero a range that may be deallocated: punch a hole where the filesystem can. */
  punchOrZero(): number {
    if (this.canPunch && loadFsExt() !== null) return MAIN_TRIM;
    this.stats.punchFallbacks++;
    return MAIN_ZERO;
  }

  punchUnsupported(): void {
    this.canPunch = false;
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

  /** An aligned bounce buffer of at least `size` bytes. */
  getBounce(size: number): Buffer {
    if (size > this.bounceSize) {
      // Sized to the largest bio seen, doubling: a few sizes over a lifetime, not one per bio.
      // Smaller buffers still out are dropped when they come back.
      this.bounceSize = Math.max(size, this.bounceSize * 2);
      this.bounces.length = 0;
    }
    return this.bounces.pop() ?? allocIoBuffer(this.bounceSize, this.minIoSize);
  }

  putBounce(buf: Buffer): void {
    if (buf.length === this.bounceSize && this.bounces.length < BOUNCE_POOL_MAX && this.fd >= 0) this.bounces.push(buf);
  }

  closing(): void {
    this.fd = -1;
    this.requests.length = 0;
    this.bounces.length = 0;
  }
}

/**
 * A backend over a raw image file (or a block device): sector `s` of the disk is byte
 * `s * 512` of the file. Unwritten parts of a sparse file read as zeros, and so does anything
 * past its end. DISCARD and WRITE_ZEROES punch holes (fallocate PUNCH_HOLE|KEEP_SIZE on
 * Linux), falling back to writing zeros where the filesystem cannot; WRITE_ZEROES with NOUNMAP
 * writes zeros. FLUSH, PREFLUSH and FUA map to fdatasync. Open with {@link FileBackend.open};
 * every bio completes later, never inside `queueBio`: from a libuv threadpool callback, or for
 * a small read the page cache answered on this thread, from a `setImmediate`.
 */
export class FileBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly minIoSize: number;
  readonly capabilities = CAPABILITIES;
  /** The image's path, resolved to an absolute path. */
  readonly path: string;
  /** Opened with O_DIRECT. */
  readonly direct: boolean;
  /** Opened with O_DSYNC. */
  readonly sync: boolean;
  private readonly engine: FileEngine;

  private constructor(
    file: string,
    fd: number,
    sizeBytes: number,
    readOnly: boolean,
    direct: boolean,
    sync: boolean,
    minIoSize: number,
    inlineReads: boolean,
  ) {
    const mode = [readOnly ? 'ro' : 'rw', direct ? 'direct' : '', sync ? 'dsync' : ''].filter(Boolean).join(',');
    this.description = `file:${file} (${mode})`;
    this.path = file;
    this.sizeBytes = sizeBytes;
    this.readOnly = readOnly;
    this.direct = direct;
    this.sync = sync;
    this.minIoSize = minIoSize;
    this.engine = new FileEngine(file, this.description, fd, direct, sync, minIoSize, inlineReads);
  }

  /**
   * Opens (or with `create`, creates) the image at `file`. The size is the file's (or the
   * block device's). Throws {@link NoSuchDeviceError} (ENOENT) for a missing file without
   * `create`, {@link InvalidArgumentError} for bad options or a size that is not a multiple of
   * 512, {@link NotSupportedError} when O_DIRECT is not available there, and a
   * {@link BlkError} carrying the errno for other failures.
   */
  static async open(file: string, options: FileBackendOptions = {}): Promise<FileBackend> {
    const abs = path.resolve(file);
    const readOnly = options.readOnly === true;
    const direct = options.direct === true;
    const sync = options.sync === true;
    const minIoSize = options.minIoSize ?? (direct ? 4096 : SECTOR_SIZE);
    if (minIoSize !== 512 && minIoSize !== 4096) {
      throw new InvalidArgumentError(`minIoSize ${String(minIoSize)} for "${abs}" is not supported: use 512 or 4096`);
    }
    const create = options.create;
    if (create !== undefined) {
      const s = create.sizeBytes;
      if (!Number.isSafeInteger(s) || s <= 0 || s % SECTOR_SIZE !== 0) {
        throw new InvalidArgumentError(`create.sizeBytes ${s} for "${abs}" must be a positive multiple of 512 bytes`);
      }
      if (readOnly) throw new InvalidArgumentError(`cannot create "${abs}" read-only: drop readOnly or create`);
    }
    if (options.resize === true && create === undefined) {
      throw new InvalidArgumentError(`resize for "${abs}" needs create: { sizeBytes } to say the size to resize to`);
    }
    let flags = readOnly ? fs.constants.O_RDONLY : fs.constants.O_RDWR;
    if (direct) {
      const oDirect = fs.constants.O_DIRECT as number | undefined;
      if (oDirect === undefined) {
        throw new NotSupportedError(`O_DIRECT is not available on ${process.platform}: open "${abs}" without direct: true`);
      }
      requireDirectIo(`O_DIRECT on "${abs}"`);
      flags |= oDirect;
    }
    if (sync) flags |= fs.constants.O_DSYNC;

    let fd: number;
    let created = false;
    try {
      fd = await openAsync(abs, flags);
    } catch (err) {
      if (create === undefined || (err as NodeJS.ErrnoException).code !== 'ENOENT') throw openError(err, abs, readOnly, direct);
      try {
        // O_EXCL: only the process that creates the file sizes it without asking.
        fd = await openAsync(abs, flags | fs.constants.O_CREAT | fs.constants.O_EXCL);
        created = true;
      } catch (err2) {
        if ((err2 as NodeJS.ErrnoException).code !== 'EEXIST') throw openError(err2, abs, readOnly, direct);
        try {
          fd = await openAsync(abs, flags);
        } catch (err3) {
          throw openError(err3, abs, readOnly, direct);
        }
      }
    }
    try {
      const sizeBytes = await sizeOf(fd, abs, create?.sizeBytes, created || options.resize === true, minIoSize, direct);
      return new FileBackend(abs, fd, sizeBytes, readOnly, direct, sync, minIoSize, options.inlineReads !== false);
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** The file descriptor (-1 once closed): for inspection such as fstat, not for I/O. */
  get fd(): number {
    return this.engine.fd;
  }

  /** Counters, for tests and tuning. */
  get stats(): Readonly<FileBackendStats> {
    return this.engine.stats;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    const op = bio.op;
    if (this.engine.fd < 0) {
      if (bio.error === null) bio.error = new DeviceOfflineError(`${describeBio(bio)} refused: backend ${this.description} is closed`);
      sink.complete(bio, BlkStatus.OFFLINE);
      return;
    }
    if (op !== ReqOp.READ && op !== ReqOp.WRITE && op !== ReqOp.FLUSH && op !== ReqOp.DISCARD && op !== ReqOp.WRITE_ZEROES) {
      if (bio.error === null) bio.error = new NotSupportedError(`${opName(op)} is not supported by ${this.description}`);
      sink.complete(bio, BlkStatus.NOTSUPP);
      return;
    }
    if (this.readOnly && opIsWrite(op)) {
      // The block layer refuses these first; this guards a backend driven directly.
      if (bio.error === null) bio.error = new ReadOnlyDeviceError(`${describeBio(bio)} refused: ${this.description} is read-only`);
      sink.complete(bio, BlkStatus.IOERR);
      return;
    }
    this.engine.getRequest().start(bio, sink);
  }

  /** Closes the file. The disk drains its bios before calling this; a second call does nothing. */
  async close(): Promise<void> {
    const fd = this.engine.fd;
    if (fd < 0) return;
    this.engine.closing();
    await new Promise<void>((resolve, reject) => fs.close(fd, (err) => (err ? reject(err) : resolve())));
  }
}

/** The usable size of the open file `fd`, resizing or checking it against `wanted`. */
async function sizeOf(fd: number, file: string, wanted: number | undefined, mayResize: boolean, minIoSize: number, direct: boolean): Promise<number> {
  const st = await fstatAsync(fd);
  if (st.isBlockDevice()) {
    const dev = await blockDeviceInfo(fd, file);
    if (direct && dev.logicalSectorSize > minIoSize) {
      throw new InvalidArgumentError(
        `block device "${file}" has ${dev.logicalSectorSize}-byte logical sectors: O_DIRECT needs minIoSize ${dev.logicalSectorSize}, got ${minIoSize}`,
      );
    }
    if (wanted !== undefined && wanted !== dev.size) {
      throw new InvalidArgumentError(`block device "${file}" holds ${dev.size} bytes, not the ${wanted} asked by create; a block device cannot be resized`);
    }
    return dev.size;
  }
  if (!st.isFile()) {
    throw new InvalidArgumentError(`"${file}" is not a regular file or a block device: a file backend needs a raw image`);
  }
  let size = st.size;
  if (wanted !== undefined && size !== wanted) {
    if (!mayResize) {
      throw new InvalidArgumentError(
        `"${file}" exists with ${size} bytes, not the ${wanted} asked by create; pass resize: true to resize it (data past the new end is lost), or drop create to use it as it is`,
      );
    }
    await new Promise<void>((resolve, reject) => fs.ftruncate(fd, wanted, (err) => (err ? reject(openError(err, file, false, direct)) : resolve())));
    size = wanted;
  }
  if (size % SECTOR_SIZE !== 0) {
    const up = Math.ceil(size / SECTOR_SIZE) * SECTOR_SIZE;
    throw new InvalidArgumentError(
      `"${file}" holds ${size} bytes, which is not a multiple of 512: resize it to whole sectors (truncate -s ${up} '${file}', or open with create: { sizeBytes: ${up} } and resize: true)`,
    );
  }
  return size;
}

function fstatAsync(fd: number): Promise<fs.Stats> {
  return new Promise((resolve, reject) => fs.fstat(fd, (err, st) => (err ? reject(err) : resolve(st))));
}

/**
 * Size and logical sector size of a block device. On Linux from sysfs, by the device's
 * major:minor (`@ronomon/direct-io`'s getBlockDevice also asks for a SCSI serial number and
 * fails on loop and virtio devices); elsewhere from that addon.
 */
async function blockDeviceInfo(fd: number, file: string): Promise<{ size: number; logicalSectorSize: number }> {
  if (process.platform === 'linux') {
    const st = await new Promise<fs.BigIntStats>((resolve, reject) =>
      fs.fstat(fd, { bigint: true }, (err, s) => (err ? reject(err) : resolve(s))),
    );
    // glibc's gnu_dev_major/gnu_dev_minor.
    const major = ((st.rdev >> 8n) & 0xfffn) | ((st.rdev >> 32n) & ~0xfffn);
    const minor = (st.rdev & 0xffn) | ((st.rdev >> 12n) & ~0xffn);
    const sys = `/sys/dev/block/${major}:${minor}`;
    try {
      const sectors = Number((await fs.promises.readFile(`${sys}/size`, 'utf8')).trim());
      // A partition has no queue/ of its own: its disk's is one level up.
      const lbs = await fs.promises
        .readFile(`${sys}/queue/logical_block_size`, 'utf8')
        .catch(() => fs.promises.readFile(`${sys}/../queue/logical_block_size`, 'utf8'))
        .then((t) => Number(t.trim()))
        .catch(() => SECTOR_SIZE);
      return { size: sectors * SECTOR_SIZE, logicalSectorSize: lbs || SECTOR_SIZE };
    } catch (err) {
      throw new BlkError('EIO', `cannot read the size of block device "${file}" from ${sys}/size: ${(err as Error).message}`, { cause: err });
    }
  }
  const dio = requireDirectIo(`sizing block device "${file}"`);
  return new Promise((resolve, reject) =>
    dio.getBlockDevice(fd, (err, dev) => {
      if (err) reject(new BlkError('EIO', `cannot read the size of block device "${file}": ${err.message}`, { cause: err }));
      else resolve({ size: dev.size, logicalSectorSize: dev.logicalSectorSize || SECTOR_SIZE });
    }),
  );
}

/** A typed error for a failed open, saying what to do. */
function openError(err: unknown, file: string, readOnly: boolean, direct: boolean): BlkError {
  const e = err as NodeJS.ErrnoException;
  const code = typeof e?.code === 'string' ? e.code : 'EIO';
  const how = readOnly ? 'read-only' : 'read-write';
  switch (code) {
    case 'ENOENT': {
      const m = new NoSuchDeviceError(`no such file "${file}": create it, or open with create: { sizeBytes } to make a sparse image`);
      return withCause(m, err);
    }
    case 'EACCES':
    case 'EPERM':
    case 'EROFS':
      return new BlkError(code, `cannot open "${file}" ${how}: ${e.message}${readOnly ? '' : '; open it with readOnly: true'}`, { cause: err });
    case 'EISDIR':
      return withCause(new InvalidArgumentError(`"${file}" is a directory: a file backend needs a raw image file`), err);
    case 'EINVAL':
      if (direct) {
        return withCause(
          new NotSupportedError(`cannot open "${file}" with O_DIRECT: its filesystem does not support direct I/O (tmpfs does not); open without direct: true or keep the image elsewhere`),
          err,
        );
      }
      break;
    default:
      break;
  }
  return new BlkError(code, `cannot open "${file}" ${how}: ${e?.message ?? String(err)}`, { cause: err });
}

function withCause<E extends Error>(error: E, cause: unknown): E {
  Object.defineProperty(error, 'cause', { value: cause, configurable: true, writable: true, enumerable: false });
  return error;
}
