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
    await new Promise<void>((resolve, reject) => storage.grow((err) => (err === null ? resolve() : reject(err)), false));
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
    if (this.usedSlots < this.totalSlots) {
      const slot = this.usedSlots++;
      this.checkLowSpace();
      return slot;
    }
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
    if (this.usedSlots < this.totalSlots) {
      const slot = this.usedSlots++;
      this.checkLowSpace();
      return slot;
    }
    return this.failed ? ALLOC_FAILED : ALLOC_WAIT;
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
