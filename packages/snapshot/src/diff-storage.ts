import fs from 'node:fs';
import path from 'node:path';
import { BlkError, InvalidArgumentError, inNoioScope } from '@blkfilter/bio';
import { DiffStorageIoError, DiffStorageOverflowError } from './errors.js';
import { DIFF_STORAGE_DEFAULT_STEP, DIFF_STORAGE_MAX_STEP, type DiffStorageOptions, type DiffStorageUsage } from './types.js';

/** {@link DiffStorage.alloc}: no slot free yet, a step is being added; call `wait`. */
export const ALLOC_WAIT = -1;
/** {@link DiffStorage.alloc}: no slot and none can be added; the owner was told (`onFailed`). */
export const ALLOC_FAILED = -2;

/** Something waiting for a slot: `slotReady(slot)` with a slot, or a negative number on failure. */
export interface SlotWaiter {
  /** The original device whose chunk needs the slot (named in the snapshot's `corrupted` event). */
  readonly deviceName: string;
  slotReady(slot: number): void;
}

/** What the storage tells its snapshot. */
export interface DiffStorageOwner {
  onLowSpace(usage: DiffStorageUsage, requestedBytes: number): void;
  onExtended(usage: DiffStorageUsage): void;
  /**
   * The storage cannot serve any more slots (limit reached or a file error): corrupt the
   * snapshot. `device` is the original device whose chunk needed the slot, when one did.
   */
  onFailed(error: BlkError, device: string | null): void;
}

type IoCallback = (error: BlkError | null) => void;

/** Most bytes one pre-fault job touches: one read of /dev/zero, or one turn of the event loop. */
const PREFAULT_JOB_BYTES = 1 << 20;
/** Memory steps are pre-faulted at most this far ahead of the slots in use (one default step). */
const PREFAULT_AHEAD_BYTES = 64 << 20;

/** Opens /dev/zero for the pre-fault jobs; -1 where there is none (they then run on this thread). */
function openZero(): Promise<number> {
  return new Promise((resolve) => fs.open('/dev/zero', 'r', (err, fd) => resolve(err === null ? fd : -1)));
}

/** One step: a memory buffer or a file. */
interface Area {
  readonly buf: Buffer | null;
  fd: number;
  readonly file: string | null;
  readonly slots: number;
}

/**
 * The diff storage of one snapshot: fixed-size slots of one chunk each, in steps (memory
 * buffers or files) added as it fills, up to a limit. Slots are never freed while the snapshot
 * lives (as in blksnap): a chunk is copied once. Memory slots are read and written in place;
 * file slots through the libuv threadpool.
 *
 * Memory steps are pre-faulted ahead of use. A step is zero-filled memory that the OS maps only
 * when it is first written, and that first write page-faults: the faults were most of the time
 * of a first write under a snapshot, all of it on the JavaScript thread. So the slots just
 * ahead of the ones in use (up to a step, at most 64 MiB) are touched in the background, 1 MiB
 * at a time, by reading /dev/zero into them on the libuv threadpool (another core), or where
 * there is no /dev/zero, by touching each page from a setImmediate. Memory still grows with
 * use, a step ahead at most; `create` returns once the first step is mapped so (the burst of
 * first writes after a take finds it ready). A write does not wait for this: slots that a job
 * is writing into are stepped over and handed out after it ends, and slots nobody pre-faulted yet
 * are used as they are (faulting on first write, as without pre-fault). Only when the last free
 * slots under the limit are in the job in flight does a slot wait for it (one job, 1 MiB at most).
 */
export class DiffStorage {
  readonly kind: 'memory' | 'directory';
  readonly dir: string | null;
  readonly chunkSize: number;
  readonly stepBytes: number;
  readonly limitBytes: number;
  allocatedBytes = 0;
  usedSlots = 0;
  private totalSlots = 0;
  private readonly slotsPerStep: number;
  private readonly areas: Area[] = [];
  private readonly waiters: SlotWaiter[] = [];
  private growing = false;
  /** Settles when the step file being added (if any) is in the areas or removed again. */
  private growSettled: Promise<void> = Promise.resolve();
  /** /dev/zero for pre-fault jobs (memory kind), or -1. */
  private zeroFd = -1;
  /** The next slot never handed out (slots are handed out in order, but for `skip*`). */
  private nextSlot = 0;
  /** Slots `[skipStart, skipEnd)`, below `nextSlot`, were stepped over while being pre-faulted. */
  private skipStart = 0;
  private skipEnd = 0;
  /** Free slots from `nextSlot` up to this one are pre-faulted (memory kind). */
  private prefaulted = 0;
  /** The slots `[pfStart, pfEnd)` are being pre-faulted on the threadpool: not to be handed out. */
  private pfStart = 0;
  private pfEnd = 0;
  /** A pre-fault turn is queued with setImmediate (no /dev/zero). */
  private pfTurnQueued = false;
  private readonly prefaultAhead: number;
  private readonly prefaultJob: number;
  private readonly onPrefaulted: (err: NodeJS.ErrnoException | null) => void;
  private readonly prefaultTurn: () => void;
  /** close() waiting for the pre-fault job in flight. */
  private pfIdle: (() => void) | null = null;
  /** create() waiting until the slots a step ahead are pre-faulted (or that stopped). */
  private pfSettled: (() => void) | null = null;
  private closed = false;
  private failed = false;
  private readonly owner: DiffStorageOwner;
  private readonly filePrefix: string;

  private constructor(options: DiffStorageOptions, chunkSize: number, id: string, owner: DiffStorageOwner) {
    this.kind = options.kind;
    this.dir = options.kind === 'directory' ? path.resolve(options.path) : null;
    this.chunkSize = chunkSize;
    this.limitBytes = options.limitBytes;
    this.stepBytes = options.stepBytes ?? Math.max(DIFF_STORAGE_DEFAULT_STEP, chunkSize);
    this.slotsPerStep = this.stepBytes / chunkSize;
    this.owner = owner;
    this.filePrefix = `blkfilter-snapshot-${id}-`;
    this.prefaultAhead = Math.max(1, Math.floor(Math.min(this.stepBytes, PREFAULT_AHEAD_BYTES) / chunkSize));
    // A quarter of a step at most: free space (half a step or more, but near the limit) is then
    // rarely all inside the job in flight, which is the only time a slot has to wait for one.
    this.prefaultJob = Math.max(1, Math.floor(Math.min(PREFAULT_JOB_BYTES, this.stepBytes / 4) / chunkSize));
    this.onPrefaulted = this.prefaultDone.bind(this);
    this.prefaultTurn = this.prefaultOnThisThread.bind(this);
  }

  /**
   * Checks the options, creates the storage and allocates its first step (so that a bad
   * directory is reported at once, not at the first write). Throws InvalidArgumentError or
   * {@link DiffStorageIoError}.
   */
  static async create(options: DiffStorageOptions, chunkSize: number, id: string, owner: DiffStorageOwner): Promise<DiffStorage> {
    checkOptions(options, chunkSize);
    const storage = new DiffStorage(options, chunkSize, id, owner);
    if (storage.dir !== null) {
      try {
        await fs.promises.mkdir(storage.dir, { recursive: true });
      } catch (err) {
        throw ioError(err, `cannot create the diff storage directory "${storage.dir}"`);
      }
    }
    // Opened first: the first step's pre-fault then starts on the threadpool at once, not in a
    // setImmediate that a caller who never yields to the event loop would keep waiting.
    if (storage.dir === null) storage.zeroFd = await openZero();
    try {
      await new Promise<void>((resolve, reject) => storage.grow((err) => (err === null ? resolve() : reject(err)), false));
    } catch (err) {
      await storage.close();
      throw err;
    }
    // The first step is mapped before the snapshot is used: the burst of first writes that
    // usually follows a take finds its slots ready (up to a step, 64 MiB at most).
    if (storage.dir === null) {
      await new Promise<void>((resolve) => {
        storage.pfSettled = resolve;
        storage.prefault();
      });
    }
    return storage;
  }

  /** Bytes of chunks stored. */
  get usedBytes(): number {
    return this.usedSlots * this.chunkSize;
  }

  /** Usage numbers, for info and events. */
  usage(): DiffStorageUsage {
    return { usedBytes: this.usedBytes, allocatedBytes: this.allocatedBytes, limitBytes: this.limitBytes };
  }

  /**
   * A new slot, or {@link ALLOC_WAIT} (a step is being added: `wait()` for it), or
   * {@link ALLOC_FAILED} (the limit is reached or the storage failed; the owner was told).
   */
  alloc(requester: SlotWaiter | null = null): number {
    if (this.failed || this.closed) return ALLOC_FAILED;
    if (this.usedSlots < this.totalSlots) return this.take();
    if (this.growing) return ALLOC_WAIT;
    if (this.growBytes() === 0) {
      this.fail(
        new DiffStorageOverflowError(
          `diff storage is full: ${this.usedBytes} of its ${this.limitBytes}-byte limit used and another ${this.chunkSize}-byte chunk must be saved; the snapshot is corrupted. Destroy it and give the next one a larger limitBytes`,
        ),
        requester,
      );
      return ALLOC_FAILED;
    }
    if (inNoioScope()) {
      // Never grow on the swap path itself: the step comes from a fresh macrotask.
      this.growSoon();
      return ALLOC_WAIT;
    }
    this.grow(null, true);
    // A memory step is added synchronously; a file step later.
    if (this.usedSlots < this.totalSlots) return this.take();
    return this.failed ? ALLOC_FAILED : ALLOC_WAIT;
  }

  /**
   * The next free slot (there is one): slots stepped over once their pre-fault ended, else the
   * next in order, stepping over a job in flight. ALLOC_WAIT when all that is free is in that job.
   */
  private take(): number {
    let slot: number;
    if (this.skipStart < this.skipEnd && !(this.skipStart < this.pfEnd && this.skipStart >= this.pfStart)) {
      slot = this.skipStart++;
    } else {
      if (this.nextSlot < this.pfEnd && this.nextSlot >= this.pfStart) {
        // A job writes zeros there now: its slots come next once it is done.
        this.skipStart = this.nextSlot;
        this.skipEnd = this.pfEnd;
        this.nextSlot = this.pfEnd;
      }
      if (this.nextSlot >= this.totalSlots) return ALLOC_WAIT;
      slot = this.nextSlot++;
    }
    this.usedSlots++;
    this.checkLowSpace();
    this.prefault();
    return slot;
  }

  /** Slots allocated and not used yet: the reserve a no-I/O write may draw on. */
  freeSlots(): number {
    return this.failed || this.closed ? 0 : this.totalSlots - this.usedSlots;
  }

  /**
   * Adds a step soon, from a fresh macrotask: outside whatever no-I/O scope asked for it, so
   * the allocation (and file creation) never runs on the swap path itself.
   */
  growSoon(): void {
    setImmediate(() => {
      if (this.failed || this.closed) return;
      this.checkLowSpace();
      // A memory step was added synchronously: nothing else would hand its slots to those waiting.
      this.serveWaiters();
    });
  }

  /** Bytes of free slots pre-faulted or being pre-faulted (memory kind), for tests. */
  get prefaultedBytes(): number {
    return (Math.max(0, this.prefaulted - this.nextSlot) + this.skipEnd - this.skipStart) * this.chunkSize;
  }

  /** Starts pre-faulting the next slots ahead of use, unless a job runs or enough are ready. */
  private prefault(): void {
    // One job at a time: its end calls back here.
    if (this.pfEnd > this.pfStart || this.pfTurnQueued) return;
    const start = Math.max(this.prefaulted, this.nextSlot);
    if (this.dir !== null || this.closed || this.failed || start >= Math.min(this.totalSlots, this.nextSlot + this.prefaultAhead)) {
      const settled = this.pfSettled;
      this.pfSettled = null;
      if (settled !== null) settled();
      return;
    }
    if (this.zeroFd < 0) {
      this.pfTurnQueued = true;
      setImmediate(this.prefaultTurn);
      return;
    }
    const [area, off, end] = this.prefaultRange(start);
    this.pfStart = start;
    this.pfEnd = end;
    fs.read(this.zeroFd, area.buf as Buffer, off, (end - start) * this.chunkSize, null, this.onPrefaulted);
  }

  /** The area of slot `start`, its byte offset there, and the end of the job that starts with it. */
  private prefaultRange(start: number): [Area, number, number] {
    const i = Math.floor(start / this.slotsPerStep);
    const area = this.areas[i] as Area;
    const end = Math.min(start + this.prefaultJob, this.nextSlot + this.prefaultAhead, i * this.slotsPerStep + area.slots);
    return [area, (start - i * this.slotsPerStep) * this.chunkSize, end];
  }

  /** A /dev/zero job ended: its slots may be handed out. */
  private prefaultDone(err: NodeJS.ErrnoException | null): void {
    // A short or failed read leaves pages to fault on first use: slower, never wrong.
    this.prefaulted = Math.max(this.prefaulted, this.pfEnd);
    this.pfStart = this.pfEnd = 0;
    if (err !== null && this.zeroFd >= 0) {
      fs.close(this.zeroFd, () => {});
      this.zeroFd = -1;
    }
    if (this.pfIdle !== null) {
      this.pfIdle();
      this.pfIdle = null;
      return;
    }
    // Those waiting (all that was free was in this job) take its slots.
    this.serveWaiters();
    this.prefault();
  }

  /** One job on this thread, where there is no /dev/zero: off the write path, not off the thread. */
  private prefaultOnThisThread(): void {
    this.pfTurnQueued = false;
    const start = Math.max(this.prefaulted, this.nextSlot);
    if (this.closed || this.failed || start >= Math.min(this.totalSlots, this.nextSlot + this.prefaultAhead)) {
      this.prefault();
      return;
    }
    const [area, off, end] = this.prefaultRange(start);
    const buf = area.buf as Buffer;
    // A write per page maps it (4 KiB or larger pages); the bytes are zero already.
    for (let at = off, stop = off + (end - start) * this.chunkSize; at < stop; at += 4096) buf[at] = 0;
    this.prefaulted = end;
    this.prefault();
  }

  /** Queues `waiter` for the step being added; it gets a slot (or a negative number) later. */
  wait(waiter: SlotWaiter): void {
    this.waiters.push(waiter);
  }

  /** The slot's bytes, for the memory kind (read and written in place); null for files. */
  memory(slot: number): Buffer | null {
    const area = this.areas[Math.floor(slot / this.slotsPerStep)] as Area;
    if (area.buf === null) return null;
    const off = (slot % this.slotsPerStep) * this.chunkSize;
    return area.buf.subarray(off, off + this.chunkSize);
  }

  /** Reads `length` bytes at `offset` of `slot` into `into` (file kind); `cb` once. */
  read(slot: number, offset: number, into: Buffer, length: number, cb: IoCallback): void {
    this.io(false, slot, offset, into, length, cb);
  }

  /** Writes `length` bytes of `from` at `offset` of `slot` (file kind); `cb` once. */
  write(slot: number, offset: number, from: Buffer, length: number, cb: IoCallback): void {
    this.io(true, slot, offset, from, length, cb);
  }

  private io(isWrite: boolean, slot: number, offset: number, buf: Buffer, length: number, cb: IoCallback): void {
    const area = this.areas[Math.floor(slot / this.slotsPerStep)] as Area;
    const base = (slot % this.slotsPerStep) * this.chunkSize + offset;
    let done = 0;
    const step = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (err !== null || (n === 0 && done < length)) {
        const what = `${isWrite ? 'write' : 'read'} of ${length} bytes at ${base} of diff storage file "${area.file ?? ''}"`;
        cb(ioError(err ?? Object.assign(new Error('short transfer'), { code: 'EIO' }), `${what} failed`));
        return;
      }
      done += n;
      if (done >= length) {
        cb(null);
        return;
      }
      issue();
    };
    const issue = (): void => {
      if (area.fd < 0) {
        cb(new DiffStorageIoError('EBADF', `diff storage file "${area.file ?? ''}" is closed (snapshot destroyed)`));
        return;
      }
      if (isWrite) fs.write(area.fd, buf, done, length - done, base + done, step);
      else fs.read(area.fd, buf, done, length - done, base + done, step);
    };
    issue();
  }

  /** Bytes the next step adds: a step, capped by the limit, in whole chunks; 0 when full. */
  private growBytes(): number {
    const room = Math.max(0, this.limitBytes - this.allocatedBytes);
    const bytes = Math.min(this.stepBytes, room);
    return bytes - (bytes % this.chunkSize);
  }

  /** blksnap raises low-space when free space falls under half of the minimum step. */
  private checkLowSpace(): void {
    if (this.growing) return;
    if (inNoioScope()) {
      // On the swap path: grow from a fresh macrotask instead (see growSoon).
      this.growSoon();
      return;
    }
    const free = (this.totalSlots - this.usedSlots) * this.chunkSize;
    if (free >= this.stepBytes / 2) return;
    const bytes = this.growBytes();
    if (bytes === 0) return;
    this.owner.onLowSpace(this.usage(), bytes);
    this.grow(null, true);
  }

  /** Adds one step; `cb` (for the first step) or the waiters learn the result. */
  private grow(cb: IoCallback | null, announce: boolean): void {
    const bytes = this.growBytes();
    const slots = bytes / this.chunkSize;
    if (this.dir === null) {
      let buf: Buffer;
      try {
        // Zero-filled, so the OS maps pages only as chunks are written into them.
        buf = Buffer.alloc(bytes);
      } catch (err) {
        const e = new DiffStorageIoError('ENOMEM', `cannot allocate a ${bytes}-byte diff storage step in memory: ${(err as Error).message}`, { cause: err });
        if (cb !== null) cb(e);
        else this.fail(e);
        return;
      }
      this.added({ buf, fd: -1, file: null, slots }, bytes, announce);
      if (cb !== null) cb(null);
      return;
    }
    this.growing = true;
    // close() waits for this: a step file created after the snapshot was destroyed would
    // otherwise outlive it (found by the soak under load).
    let settle!: () => void;
    this.growSettled = new Promise<void>((resolve) => (settle = resolve));
    const file = path.join(this.dir, `${this.filePrefix}${this.areas.length}.diff`);
    fs.open(file, 'wx+', 0o600, (err, fd) => {
      if (err !== null) {
        this.growFailed(ioError(err, `cannot create diff storage file "${file}"`), cb);
        settle();
        return;
      }
      fs.ftruncate(fd, bytes, (err2) => {
        if (err2 !== null || this.closed) {
          fs.close(fd, () => fs.unlink(file, () => settle()));
          if (err2 !== null) this.growFailed(ioError(err2, `cannot size diff storage file "${file}" to ${bytes} bytes`), cb);
          else this.growing = false;
          return;
        }
        this.growing = false;
        this.added({ buf: null, fd, file, slots }, bytes, announce);
        settle();
        if (cb !== null) cb(null);
        this.serveWaiters();
      });
    });
  }

  private growFailed(error: BlkError, cb: IoCallback | null): void {
    this.growing = false;
    if (this.closed && cb === null) return;
    if (cb !== null) cb(error);
    else this.fail(error);
  }

  private added(area: Area, bytes: number, announce: boolean): void {
    this.areas.push(area);
    this.allocatedBytes += bytes;
    this.totalSlots += area.slots;
    if (announce) this.owner.onExtended(this.usage());
    this.prefault();
  }

  private serveWaiters(): void {
    while (this.waiters.length > 0) {
      const slot = this.alloc(this.waiters[0] ?? null);
      if (slot === ALLOC_WAIT) return;
      // A failed alloc has already answered (and emptied) the waiters.
      const waiter = this.waiters.shift();
      if (waiter === undefined) return;
      waiter.slotReady(slot);
    }
  }

  /** `requester` needed a slot when it failed; else the first waiter did (a step it waited for failed). */
  private fail(error: BlkError, requester: SlotWaiter | null = null): void {
    if (this.failed) return;
    this.failed = true;
    this.owner.onFailed(error, (requester ?? this.waiters[0])?.deviceName ?? null);
    this.dropWaiters();
  }

  /** Answers every waiter with a failure (the snapshot is corrupted or going away). */
  dropWaiters(): void {
    const waiters = this.waiters.splice(0);
    for (const w of waiters) w.slotReady(ALLOC_FAILED);
  }

  /** Frees everything: memory steps are dropped, files closed and removed. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    this.dropWaiters();
    // A step being added finishes first: it is then either in the areas (removed below) or
    // already removed by its own callback, which saw `closed`.
    await this.growSettled;
    // So does a pre-fault job: until it ends, the threadpool writes into (and holds) its step.
    if (this.pfEnd > this.pfStart) await new Promise<void>((resolve) => (this.pfIdle = resolve));
    if (this.zeroFd >= 0) {
      const fd = this.zeroFd;
      this.zeroFd = -1;
      await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
    }
    const areas = this.areas.splice(0);
    this.totalSlots = 0;
    await Promise.all(
      areas.map(async (a) => {
        if (a.file === null) return;
        const fd = a.fd;
        a.fd = -1;
        await new Promise<void>((resolve) => fs.close(fd, () => resolve()));
        await fs.promises.rm(a.file, { force: true });
      }),
    );
  }
}

function checkOptions(options: DiffStorageOptions, chunkSize: number): void {
  if (typeof options !== 'object' || options === null || (options.kind !== 'memory' && options.kind !== 'directory')) {
    throw new InvalidArgumentError(
      `diff storage options ${JSON.stringify(options)} are not valid: expected { kind: 'memory', limitBytes } or { kind: 'directory', path, limitBytes }`,
    );
  }
  const { limitBytes, stepBytes } = options;
  if (!Number.isSafeInteger(limitBytes) || limitBytes < chunkSize) {
    throw new InvalidArgumentError(
      `diff storage limitBytes ${String(limitBytes)} is too small: expected a whole number of bytes >= the chunk size (${chunkSize})`,
    );
  }
  if (stepBytes !== undefined && (!Number.isSafeInteger(stepBytes) || stepBytes < chunkSize || stepBytes % chunkSize !== 0 || stepBytes > DIFF_STORAGE_MAX_STEP)) {
    throw new InvalidArgumentError(
      `diff storage stepBytes ${String(stepBytes)} is not valid: expected a multiple of the chunk size (${chunkSize}) up to ${DIFF_STORAGE_MAX_STEP}; for example ${Math.max(chunkSize, Math.round((stepBytes ?? 0) / chunkSize) * chunkSize)}`,
    );
  }
  if (options.kind === 'directory' && (typeof options.path !== 'string' || options.path.length === 0)) {
    throw new InvalidArgumentError(`directory diff storage needs a path: got ${JSON.stringify(options.path)}`);
  }
}

function ioError(err: unknown, what: string): BlkError {
  if (BlkError.isInstance(err)) return err;
  const e = err as NodeJS.ErrnoException | null;
  const code = typeof e?.code === 'string' && /^E[A-Z0-9]+$/.test(e.code) ? e.code : 'EIO';
  return new DiffStorageIoError(code, `${what}: ${e?.message ?? String(err)}`, { cause: err });
}
