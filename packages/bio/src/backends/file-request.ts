import fs from 'node:fs';
import { errnoName, nativeAvailable, NOWAIT_AGAIN, NOWAIT_UNSUPPORTED, preadNowait, pwriteNowait } from '@blkfilter/native';
import { BioVec, copyFromBioVecs, copyToBioVecs, describeBio, SECTOR_SIZE, type Bio, type CompletionSink } from '../bio.js';
import { BlkError } from '../errors.js';
import { ReqFlag, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';
import { aioError, AioQueue, nameErrno, type AioModule, type AioRequest } from './file-aio.js';
import { BouncePool } from './file-bounce.js';
import { isPunchUnsupported, loadFsExt, zeros, type FsNativeExtensions } from './file-discard.js';
import { InlineReads, type Clock } from './file-inline.js';
import { WriteBatcher, type BatchedWrite } from './file-writes.js';

// The data path of a FileBackend: a pooled request per bio in flight, and the engine its
// requests share. Cost model (INTEROP.md): every fs.read/fs.write/fs.fdatasync is a libuv
// threadpool round trip, ~40 us here, and the pool has 4 threads unless UV_THREADPOOL_SIZE says
// otherwise, so a deep queue of small bios is bounded by the pool, not by the disk; a server
// that wants more should raise UV_THREADPOOL_SIZE before the first fs call. We use the callback
// API, not fs/promises: a Promise per bio costs ~65 ns plus a microtask, and the callbacks here
// are bound once per pooled FileRequest, so the data path allocates nothing per single-vec bio.
// Small reads, and writes the kernel takes with RWF_NOWAIT, may skip the threadpool: see
// file-inline.ts. With O_DIRECT, reads and writes (not syncs or discards) go through Linux
// native AIO where @blkfilter/native loaded and io_setup worked: see file-aio.ts. Buffered
// writes of a regular file go to the threadpool in batches, run in order by one thread: see
// file-writes.ts.

/** Counters of a {@link FileBackend}, for tests and tuning. */
export interface FileBackendStats {
  /** READ/WRITE bios copied through a bounce buffer because their vecs were not aligned (O_DIRECT). */
  bouncedBios: number;
  /** DISCARD/WRITE_ZEROES bios that wrote zeros because the filesystem cannot punch holes. */
  punchFallbacks: number;
  /** Reads done on the JavaScript thread because the page cache held their data. */
  inlineReads: number;
  /**
   * Small reads the page cache could not serve: refused by a NOWAIT probe (and sent to the
   * threadpool), or, without @blkfilter/native, inline reads slow enough to have gone to the
   * disk (each pauses inline reads for a while).
   */
  inlineMisses: number;
  /**
   * Writes done on the JavaScript thread: pwritev2(RWF_NOWAIT) took them (XFS, btrfs; ext4
   * refuses NOWAIT writes, and then none are tried).
   */
  inlineWrites: number;
  /** NOWAIT writes the kernel refused because they would have waited (sent to the threadpool). */
  inlineWriteMisses: number;
  /**
   * fdatasync calls issued: one for a FLUSH, one for a PREFLUSH, one for a FUA write (none
   * with O_DSYNC, where the write itself is stable), one for a FUA discard or write-zeroes.
   */
  syncs: number;
  /**
   * How READ and WRITE are issued: `'aio'` (Linux native AIO, O_DIRECT only: io_submit from the
   * JavaScript thread, completions polled there) or `'threadpool'` (fs.read/fs.write on libuv's
   * threadpool, and inline reads).
   */
  ioEngine: 'aio' | 'threadpool';
  /**
   * Why an O_DIRECT backend uses the threadpool (`ioEngine: 'threadpool'` asked, the addon did
   * not load, io_setup failed and with which errno); null when it uses AIO or is not O_DIRECT.
   */
  ioEngineReason: string | null;
  /** AIO: slots of the context (requests in flight at once); 0 on the threadpool. */
  aioDepth: number;
  /** AIO: io_submit calls (one per transfer, and again for those the full ring held back). */
  aioSubmits: number;
  /** AIO: eventfd wakeups that delivered completions (one batch each). */
  aioWakeups: number;
  /** AIO: transfers that waited for a free slot (more than `aioDepth` in flight). */
  aioWaits: number;
  /** Batches of buffered writes given to the threadpool (0 where writes are not batched). */
  writeBatches: number;
  /** Writes in those batches: `batchedWrites / writeBatches` is the mean batch size. */
  batchedWrites: number;
}

/** Free requests kept per backend; more are dropped to the GC. */
const REQUEST_POOL_MAX = 256;

const NO_VECS: BioVec[] = [];
const EMPTY = Buffer.alloc(0);

type ErrnoCallback = (err: NodeJS.ErrnoException | null) => void;
type IoCallback = (err: NodeJS.ErrnoException | null, bytes: number) => void;

/** The C library's errno names, for the errors libuv cannot name. */
const LIBC = { errnoName: (errno: number) => errnoName(errno) };

/**
 * The errno name of an fs error. libuv calls some errnos UNKNOWN (EDQUOT, EREMOTEIO, ENODATA):
 * the C library names them (through @blkfilter/native), so a full quota completes with NOSPC,
 * as on the AIO path, not IOERR. Anything unnamed is EIO.
 */
export function errnoCode(e: NodeJS.ErrnoException | null): string {
  const code = e?.code;
  if (typeof code === 'string' && /^E[A-Z0-9]+$/.test(code)) return code;
  const errno = e?.errno;
  if (code === 'UNKNOWN' && typeof errno === 'number' && nativeAvailable()) return nameErrno(Math.abs(errno), LIBC)?.code ?? 'EIO';
  return 'EIO';
}

/** The status a bio completes with for an fs error (the kernel's `errno_to_blk_status`). */
export function statusForErrno(code: string | undefined): BlkStatus {
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
export class FileRequest implements AioRequest, BatchedWrite {
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
  /** The AIO slot of the transfer in the kernel, -1 when none. */
  aioId: number;

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
    this.aioId = -1;
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
      if (b.direct && !b.bounces.vecsAligned(bio.vecs)) {
        b.stats.bouncedBios++;
        const bounce = b.bounces.get(bio.size);
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

  /** Issues the next read or write of the main stage (again, when an AIO slot frees). */
  issueIo(): void {
    const fd = this.engine.fd;
    const main = this.main;
    const aio = this.engine.aio;
    if (aio !== null) {
      this.issueAio(aio, fd, main);
      return;
    }
    try {
      const writes = this.engine.writes;
      if (main === MAIN_ZERO) {
        const z = zeros();
        if (writes !== null) writes.add(this, z, 0, Math.min(this.left, z.length), this.pos);
        else fs.write(fd, z, 0, Math.min(this.left, z.length), this.pos, this.onIo);
        return;
      }
      const vecs = this.vecs;
      const v = vecs[this.vi] as BioVec;
      const rest = v.length - this.vo;
      if (rest >= this.left) {
        // The common case, one vec: no view, no array.
        if (main === MAIN_READ) {
          if (this.engine.inline.mayRead(this.left)) this.readInline(fd, v.buffer, v.offset + this.vo);
          else fs.read(fd, v.buffer, v.offset + this.vo, this.left, this.pos, this.onIo);
        } else if (this.engine.inline.mayWrite(this.left) && (writes === null || writes.idle)) {
          // Not past writes still waiting for the threadpool: those go first.
          this.writeInline(fd, v.buffer, v.offset + this.vo);
        } else {
          this.writeQueued(fd, v.buffer, v.offset + this.vo);
        }
        return;
      }
      const iov = this.iovFrom(vecs, v);
      if (main === MAIN_READ) fs.readv(fd, iov, this.pos, this.onIo);
      else fs.writev(fd, iov, this.pos, this.onIo);
    } catch (err) {
      // Only argument validation throws synchronously (a detached buffer, a closed backend).
      this.fail(err);
    }
  }

  /** The next read or write on the AIO context; the outcome goes to `aioDone`. */
  private issueAio(aio: AioQueue, fd: number, main: number): void {
    if (!aio.admit(this)) return;
    const ctx = aio.ctx;
    const id = this.aioId;
    try {
      if (main === MAIN_ZERO) {
        const z = zeros();
        ctx.write(id, fd, z, 0, Math.min(this.left, z.length), this.pos);
        return;
      }
      const vecs = this.vecs;
      const v = vecs[this.vi] as BioVec;
      const rest = v.length - this.vo;
      if (rest >= this.left) {
        if (main === MAIN_READ) ctx.read(id, fd, v.buffer, v.offset + this.vo, this.left, this.pos);
        else ctx.write(id, fd, v.buffer, v.offset + this.vo, this.left, this.pos);
        return;
      }
      const iov = this.iovFrom(vecs, v);
      if (main === MAIN_READ) ctx.readv(id, fd, iov, this.pos);
      else ctx.writev(id, fd, iov, this.pos);
    } catch (err) {
      // Only misuse throws (a detached buffer): the slot was never used.
      aio.release(this);
      this.fail(err);
    }
  }

  /** @internal the result of a batched write: bytes written, or -errno. */
  batchedDone(res: number): void {
    if (res >= 0) {
      this.ioDone(null, res);
      return;
    }
    const code = nameErrno(-res, LIBC)?.code ?? 'EIO';
    this.fail(Object.assign(new Error(`${code}: pwrite of ${this.left} bytes at ${this.pos}`), { errno: res, code, syscall: 'pwrite' }));
  }

  /** @internal a batched write the addon refused before any I/O (as fs.write would throw). */
  batchedFailed(err: unknown): void {
    this.fail(err);
  }

  /** @internal the kernel's result of the AIO transfer: bytes moved, or -errno. */
  aioDone(res: number): void {
    if (res < 0) this.fail(aioError(-res, this.main === MAIN_READ ? 'read' : 'write', (this.engine.aio as AioQueue).native));
    else this.ioDone(null, res);
  }

  /** The reused iovec array for the vecs from `vecs[vi]` at `vo` (`v` is `vecs[vi]`). */
  private iovFrom(vecs: BioVec[], v: BioVec): Uint8Array[] {
    const iov = this.iov;
    iov.length = 0;
    iov.push(v.buffer.subarray(v.offset + this.vo, v.offset + v.length));
    for (let i = this.vi + 1; i < vecs.length; i++) {
      const w = vecs[i] as BioVec;
      iov.push(w.offset === 0 && w.length === w.buffer.length ? w.buffer : w.buffer.subarray(w.offset, w.offset + w.length));
    }
    return iov;
  }

  /** Reads on this thread; the outcome goes to `ioDone` from the engine's setImmediate. */
  private readInline(fd: number, buf: Uint8Array, offset: number): void {
    const inline = this.engine.inline;
    if (inline.nowait) {
      const r = preadNowait(fd, buf, offset, this.left, this.pos);
      if (r >= 0) {
        this.inlineErr = null;
        this.inlineBytes = r;
        inline.done(this, r, 0);
      } else if (r === NOWAIT_AGAIN || r === NOWAIT_UNSUPPORTED) {
        inline.refused(r === NOWAIT_UNSUPPORTED);
        fs.read(fd, buf, offset, this.left, this.pos, this.onIo);
      } else {
        const code = nameErrno(-r, LIBC)?.code ?? 'EIO';
        this.inlineErr = Object.assign(new Error(`${code}: preadv2 of ${this.left} bytes at ${this.pos}`), { errno: r, code, syscall: 'preadv2' });
        this.inlineBytes = 0;
        inline.done(this, 0, 0);
      }
      return;
    }
    const t0 = inline.clock();
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
    this.inlineErr = err;
    this.inlineBytes = n;
    inline.done(this, n, inline.clock() - t0);
  }

  /** A single-buffer write to the threadpool: batched where the engine batches writes. */
  private writeQueued(fd: number, buf: Uint8Array, offset: number): void {
    const writes = this.engine.writes;
    if (writes !== null) writes.add(this, buf, offset, this.left, this.pos);
    else fs.write(fd, buf, offset, this.left, this.pos, this.onIo);
  }

  /**
   * Writes on this thread with RWF_NOWAIT: the kernel does it now or refuses it at once (it
   * would wait for a lock, the disk or dirty-page throttling), and a refused write is queued.
   * The outcome goes to `ioDone` from the drain, as for inline reads.
   */
  private writeInline(fd: number, buf: Uint8Array, offset: number): void {
    const inline = this.engine.inline;
    const r = pwriteNowait(fd, buf, offset, this.left, this.pos);
    if (r >= 0) {
      this.inlineErr = null;
      this.inlineBytes = r;
    } else if (r === NOWAIT_AGAIN || r === NOWAIT_UNSUPPORTED) {
      inline.refusedWrite(r === NOWAIT_UNSUPPORTED);
      this.writeQueued(fd, buf, offset);
      return;
    } else {
      const code = nameErrno(-r, LIBC)?.code ?? 'EIO';
      this.inlineErr = Object.assign(new Error(`${code}: pwritev2 of ${this.left} bytes at ${this.pos}`), { errno: r, code, syscall: 'pwritev2' });
      this.inlineBytes = 0;
    }
    inline.wrote(this, this.inlineBytes);
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
    this.engine.stats.syncs++;
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
    const code = errnoCode(e);
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
      b.bounces.put(this.bounce);
      this.bounce = null;
      (this.bounceVecs[0] as BioVec).buffer = EMPTY;
    }
    this.bio = null;
    this.sink = null;
    this.vecs = NO_VECS;
    // Setting an array's length calls into the runtime: not for the single-vec bios that never used it.
    if (this.iov.length !== 0) this.iov.length = 0;
    b.putRequest(this);
    sink.complete(bio, status);
  }
}

/** How a FileEngine issues O_DIRECT reads and writes, as {@link FileBackend.open} settled it. */
export interface FileEngineIo {
  /** The native module, where it loaded and AIO is wanted (O_DIRECT, not forced off). */
  readonly native: AioModule | null;
  /** Slots of the AIO context. */
  readonly depth: number;
  /** Why AIO is not used when it could have been (null: it is tried, or not O_DIRECT). */
  readonly reason: string | null;
  /** Batch buffered writes (a regular file without O_DIRECT, where the addon loaded). */
  readonly batchWrites: boolean;
  /** Try buffered writes inline with RWF_NOWAIT (no O_DIRECT, no O_DSYNC, the addon loaded). */
  readonly inlineWrites: boolean;
}

/**
 * What a {@link FileBackend}'s requests share: the fd, the mode, the pools. Kept apart from the
 * backend so that pooling stays out of the backend's public type.
 */
export class FileEngine {
  readonly path: string;
  readonly description: string;
  readonly direct: boolean;
  readonly sync: boolean;
  readonly minIoSize: number;
  readonly stats: FileBackendStats;
  readonly bounces: BouncePool;
  readonly inline: InlineReads<FileRequest>;
  /** The AIO context of an O_DIRECT file, or null: then everything goes to the threadpool. */
  readonly aio: AioQueue | null;
  /** Buffered single-buffer writes, batched; null: each write is an fs.write of its own. */
  readonly writes: WriteBatcher<FileRequest> | null;
  /** The open file; valid until the requests in flight at close have completed. */
  readonly fd: number;
  /** Closing or closed: new bios are refused. */
  closed: boolean;
  private canPunch: boolean;
  private readonly requests: FileRequest[];
  /** Requests started and not finished. */
  private active: number;
  private onIdle: (() => void) | null;

  constructor(
    file: string,
    description: string,
    fd: number,
    direct: boolean,
    sync: boolean,
    minIoSize: number,
    inlineReads: boolean,
    clock: Clock,
    nowait: boolean,
    io: FileEngineIo,
  ) {
    this.path = file;
    this.description = description;
    this.fd = fd;
    this.direct = direct;
    this.sync = sync;
    this.minIoSize = minIoSize;
    this.stats = {
      bouncedBios: 0,
      punchFallbacks: 0,
      inlineReads: 0,
      inlineMisses: 0,
      inlineWrites: 0,
      inlineWriteMisses: 0,
      syncs: 0,
      ioEngine: 'threadpool',
      ioEngineReason: io.reason,
      aioDepth: 0,
      aioSubmits: 0,
      aioWakeups: 0,
      aioWaits: 0,
      writeBatches: 0,
      batchedWrites: 0,
    };
    let aio: AioQueue | null = null;
    if (direct && io.native !== null) {
      try {
        aio = new AioQueue(io.native, io.depth);
        this.stats.ioEngine = 'aio';
        this.stats.aioDepth = io.depth;
      } catch (err) {
        const e = err as NodeJS.ErrnoException;
        this.stats.ioEngineReason = `io_setup for ${io.depth} requests failed (${e.code ?? 'EIO'}: ${e.message}${e.code === 'EAGAIN' ? '; fs.aio-max-nr is exhausted' : ''})`;
      }
    }
    this.aio = aio;
    this.writes = aio === null && io.batchWrites ? new WriteBatcher<FileRequest>(fd, this.stats) : null;
    this.bounces = new BouncePool(minIoSize);
    this.inline = new InlineReads<FileRequest>(inlineReads && !direct, clock, this.stats, nowait, io.inlineWrites);
    this.canPunch = true;
    this.requests = [];
    this.closed = false;
    this.active = 0;
    this.onIdle = null;
  }

  /** Starts `bio` on a pooled request. */
  start(bio: Bio, sink: CompletionSink): void {
    this.active++;
    (this.requests.pop() ?? new FileRequest(this)).start(bio, sink);
  }

  putRequest(req: FileRequest): void {
    if (this.requests.length < REQUEST_POOL_MAX && !this.closed) this.requests.push(req);
    if (--this.active === 0 && this.onIdle !== null) {
      const idle = this.onIdle;
      this.onIdle = null;
      idle();
    }
  }

  /** The stats, with the AIO counters brought up to date. */
  currentStats(): FileBackendStats {
    const aio = this.aio;
    if (aio !== null) {
      const s = aio.ctx.stats();
      this.stats.aioSubmits = s.submits;
      this.stats.aioWakeups = s.wakeups;
      this.stats.aioWaits = aio.waits;
    }
    return this.stats;
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

  /**
   * Refuses new bios, waits until every request in flight has completed (the kernel may write
   * into their buffers until then, and they use the fd), then destroys the AIO context. The
   * caller closes the fd after.
   */
  async close(): Promise<void> {
    this.closed = true;
    this.requests.length = 0;
    if (this.active > 0) await new Promise<void>((resolve) => (this.onIdle = resolve));
    this.currentStats();
    this.bounces.close();
    this.writes?.close();
    if (this.aio !== null) await this.aio.close();
  }
}
