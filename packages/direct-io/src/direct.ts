import {
  Bio,
  bioError,
  bioPoll,
  bioSplitToLimits,
  BioVec,
  BLK_QC_T_NONE,
  BlkStatus,
  getBlockDevice,
  isIoBufferAligned,
  memallocNoioRestore,
  memallocNoioSave,
  opName,
  ReqFlag,
  ReqOp,
  SECTOR_SIZE,
  submitBio,
  type BlockDev,
} from '@blkfilter/bio';
import { HandleClosedError, MisalignedIoError } from './errors.js';

/** Options of {@link openDirect}. */
export interface DirectOptions {
  /** Never wait: I/O that would block (a frozen device, a chunk not yet copied) fails with EAGAIN. */
  readonly nowait?: boolean;
  /**
   * Reap completions by polling the bio's queue (io_uring's IOPOLL) instead of waiting for the
   * interrupt. When a filter split, cloned, deferred or remapped the bio, its cookie is gone and
   * the handle waits for the interrupt completion instead.
   */
  readonly poll?: boolean;
  /** Writes are stable when they complete (O_DSYNC): they carry FUA. */
  readonly dsync?: boolean;
  /**
   * Swap I/O: bios carry ReqFlag.SWAP and are submitted in a no-I/O scope, so filters serve
   * them from reserves rather than allocating in ways that need I/O.
   */
  readonly swap?: boolean;
  /**
   * Require buffers whose memory is aligned to the logical block size, as O_DIRECT does
   * (allocate them with `allocIoBuffer`). Default true; false accepts any buffer.
   */
  readonly alignedBuffers?: boolean;
}

/** Counters of a handle, for tests and tuning. */
export interface DirectStats {
  /** Requests whose completion was reaped by polling. */
  polled: number;
  /** Polled requests that lost their cookie (split, cloned, deferred, remapped) and completed by interrupt. */
  pollFallbacks: number;
  /** Poll attempts that found nothing (each followed by a yield to the event loop). */
  emptyPolls: number;
  /** Requests completed by interrupt, polled or not. */
  interrupts: number;
}

interface Request {
  resolve: (bytes: number) => void;
  reject: (err: Error) => void;
  bio: Bio;
  handle: DirectHandle;
  /** Bytes asked for (the bio itself shrinks when split). */
  size: number;
  /** Submitted to be reaped by polling. */
  polled: boolean;
}

/**
 * An O_DIRECT-style handle on a block device: aligned reads and writes straight to bios, with no
 * cache in between, always through `submitBio` (so every filter sees them). Requests larger than
 * the device's limits are split into chained bios. Open with {@link openDirect}.
 */
export class DirectHandle {
  readonly bdev: BlockDev;
  readonly logicalBlockSize: number;
  readonly stats: DirectStats = { polled: 0, pollFallbacks: 0, emptyPolls: 0, interrupts: 0 };
  private readonly flags: number;
  private readonly writeFlags: number;
  private readonly poll: boolean;
  private readonly swap: boolean;
  private readonly alignedBuffers: boolean;
  private closed = false;
  private inflight = 0;
  private idle: Array<() => void> = [];

  /** @internal use {@link openDirect}. */
  constructor(bdev: BlockDev, options: DirectOptions) {
    this.bdev = bdev;
    this.logicalBlockSize = bdev.disk.limits.logicalBlockSize;
    this.poll = options.poll === true;
    this.swap = options.swap === true;
    this.alignedBuffers = options.alignedBuffers !== false;
    this.flags =
      ReqFlag.SYNC | (options.nowait === true ? ReqFlag.NOWAIT : 0) | (this.poll ? ReqFlag.POLLED : 0) | (this.swap ? ReqFlag.SWAP : 0);
    this.writeFlags = this.flags | (options.dsync === true ? ReqFlag.FUA : 0);
  }

  /** Reads `buffer.length` bytes at byte `offset` into `buffer`; resolves with the byte count. */
  read(buffer: Uint8Array, offset: number): Promise<number> {
    return this.submit(ReqOp.READ, [buffer], offset);
  }

  /** Writes `buffer` at byte `offset`; resolves with the byte count. */
  write(buffer: Uint8Array, offset: number): Promise<number> {
    return this.submit(ReqOp.WRITE, [buffer], offset);
  }

  /** Reads into several buffers, back to back from `offset` (preadv). */
  readv(buffers: readonly Uint8Array[], offset: number): Promise<number> {
    return this.submit(ReqOp.READ, buffers, offset);
  }

  /** Writes several buffers, back to back from `offset` (pwritev). */
  writev(buffers: readonly Uint8Array[], offset: number): Promise<number> {
    return this.submit(ReqOp.WRITE, buffers, offset);
  }

  /** Flushes the device's volatile cache (fdatasync). */
  flush(): Promise<number> {
    return this.submit(ReqOp.FLUSH, [], 0);
  }

  /** Stops accepting I/O and resolves when the I/O in flight has completed. */
  async close(): Promise<void> {
    this.closed = true;
    if (this.inflight === 0) return;
    await new Promise<void>((resolve) => this.idle.push(resolve));
  }

  private submit(op: ReqOp, buffers: readonly Uint8Array[], offset: number): Promise<number> {
    if (this.closed) return Promise.reject(new HandleClosedError(`direct handle on "${this.bdev.name}" is closed`));
    let vecs: BioVec[];
    let size = 0;
    try {
      vecs = this.check(op, buffers, offset);
      for (const v of vecs) size += v.length;
    } catch (err) {
      return Promise.reject(err as Error);
    }
    const bio = new Bio(op, this.bdev, offset / SECTOR_SIZE, size, vecs);
    bio.flags = op === ReqOp.WRITE ? this.writeFlags : this.flags;
    this.inflight++;
    return new Promise<number>((resolve, reject) => {
      const req: Request = { resolve, reject, bio, handle: this, size, polled: this.poll && op !== ReqOp.FLUSH };
      bio.private = req;
      bio.endIo = directEndIo;
      const token = this.swap ? memallocNoioSave() : -1;
      try {
        for (let s = bioSplitToLimits(bio); s !== null; s = bioSplitToLimits(bio)) submitBio(s);
        submitBio(bio);
      } finally {
        if (token >= 0) memallocNoioRestore(token);
      }
      if (req.polled) pollRequest(req);
    });
  }

  private check(op: ReqOp, buffers: readonly Uint8Array[], offset: number): BioVec[] {
    const lbs = this.logicalBlockSize;
    if (op === ReqOp.FLUSH) return [];
    if (!Number.isSafeInteger(offset) || offset < 0 || offset % lbs !== 0) {
      throw new MisalignedIoError(`${this.what(op)}: offset ${offset} must be a multiple of the ${lbs}-byte logical block size`);
    }
    if (buffers.length === 0) throw new MisalignedIoError(`${this.what(op)}: no buffers given`);
    const vecs: BioVec[] = [];
    for (let i = 0; i < buffers.length; i++) {
      const b = buffers[i] as Uint8Array;
      if (b.length === 0 || b.length % lbs !== 0) {
        throw new MisalignedIoError(`${this.what(op)}: buffer ${i} is ${b.length} bytes; lengths must be non-zero multiples of the ${lbs}-byte logical block size`);
      }
      if (this.alignedBuffers && !isIoBufferAligned(b, 0, b.length, lbs)) {
        throw new MisalignedIoError(
          `${this.what(op)}: buffer ${i} is not aligned to ${lbs} bytes in memory; allocate it with allocIoBuffer(size, ${lbs}) (or open with alignedBuffers: false)`,
        );
      }
      vecs.push(new BioVec(b));
    }
    return vecs;
  }

  /** The request named in a refusal: built only then, since a string per request is measurable. */
  private what(op: ReqOp): string {
    return `${opName(op)} on "${this.bdev.name}"`;
  }

  /** @internal */
  finished(): void {
    if (--this.inflight === 0 && this.idle.length > 0) {
      const idle = this.idle;
      this.idle = [];
      for (const f of idle) f();
    }
  }
}

function directEndIo(bio: Bio): void {
  const req = bio.private as Request;
  const handle = req.handle;
  // Counted when the bio completes, not when its poller next looks: a poll reaps every
  // completion on its queue's ring, other requests' too, and they may resolve first.
  if (bio.cookie !== BLK_QC_T_NONE) handle.stats.polled++;
  else {
    handle.stats.interrupts++;
    if (req.polled) handle.stats.pollFallbacks++;
  }
  handle.finished();
  if (bio.status === BlkStatus.OK) req.resolve(req.size);
  else req.reject(bioError(bio));
}

/**
 * Spins on the bio's cookie, yielding to the event loop between polls so that timers, sockets
 * and other work still run (a busy loop would starve them). Without a cookie the bio completes
 * by interrupt, and nothing is left to do.
 */
function pollRequest(req: Request): void {
  const bio = req.bio;
  if (bio.completed || bio.cookie === BLK_QC_T_NONE) return;
  if (bioPoll(bio) > 0 && bio.completed) return;
  req.handle.stats.emptyPolls++;
  setImmediate(pollRequest, req);
}

/**
 * Opens an O_DIRECT-style handle on a device (by name or BlockDev). Offsets, lengths and (by
 * default) buffer addresses must be aligned to the device's logical block size; requests over
 * its limits are split into chained bios. Never bypasses the filters.
 */
export async function openDirect(device: string | BlockDev, options: DirectOptions = {}): Promise<DirectHandle> {
  const bdev = typeof device === 'string' ? getBlockDevice(device) : device;
  return new DirectHandle(bdev, options);
}
