// The system calls blkfilter needs and Node.js does not expose, in one small N-API addon built
// from source at install (node-gyp; Node's headers and a C compiler). Loaded lazily: where it
// did not build, `nativeLoadError()` says why and the callers fall back (a file reports every
// range as data), so nothing is ever wrong, only slower.
import { createRequire } from 'node:module';

/** An AIO context of the addon (an external: opaque to JavaScript). */
type AioHandle = object;
/** A write batch of the addon (an external). */
type BatchHandle = object;

/** The addon's raw functions (src/*.c). */
interface Addon {
  seek(fd: number, offset: number, whence: 0 | 1): number;
  preadNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
  pwriteNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
  aioOpen(depth: number, kernelEvents: number, onComplete: (count: number) => void, results: Int32Array): AioHandle;
  aioQueue(
    ctx: AioHandle,
    id: number,
    op: number,
    fd: number,
    buffers: ArrayBufferView | readonly ArrayBufferView[] | null,
    bufferOffset: number,
    length: number,
    position: number,
    submit: boolean,
  ): void;
  aioSubmit(ctx: AioHandle): void;
  aioStats(ctx: AioHandle, out: Float64Array): void;
  aioClose(ctx: AioHandle, done?: () => void): void;
  errnoName(errno: number): [string, string] | null;
  batchOpen(capacity: number, onDone: (count: number) => void): [BatchHandle, Float64Array];
  batchAdd(batch: BatchHandle, fd: number, buf: Uint8Array, offset: number, length: number, position: number): number;
  batchSubmit(batch: BatchHandle): number;
  batchClose(batch: BatchHandle): void;
}

let addon: Addon | null | undefined;
let loadError: string | null = null;

function load(): Addon | null {
  if (addon !== undefined) return addon;
  try {
    // build/ sits beside src/ and dist/, so one relative path serves the tests and the build.
    addon = createRequire(import.meta.url)('../build/Release/blkfilter_native.node') as Addon;
  } catch (err) {
    addon = null;
    loadError = `the native addon of @blkfilter/native did not load (${(err as Error).message}); rebuild it with \`npm rebuild @blkfilter/native\` (needs python3, make and a C compiler)`;
  }
  return addon;
}

/** Why the addon is not available, or null when it is. */
export function nativeLoadError(): string | null {
  load();
  return loadError;
}

/** Is the addon loaded (seekData/seekHole and AIO usable)? */
export function nativeAvailable(): boolean {
  return load() !== null;
}

/** Thrown when a function of the addon is called where it did not load. */
export class NativeUnavailableError extends Error {
  readonly code = 'ENOSYS';
  constructor(what: string) {
    super(`${what}: ${nativeLoadError() ?? 'unavailable'}`);
    this.name = 'NativeUnavailableError';
  }
}

function required(what: string): Addon {
  const a = load();
  if (a === null) throw new NativeUnavailableError(what);
  return a;
}

/**
 * `lseek(fd, offset, SEEK_DATA)`: the first offset at or after `offset` that holds data, or
 * -1 when none does (ENXIO: only a hole up to the end, or `offset` at or past the end). Other
 * errors throw with the errno's name in `code`. Filesystems without extent maps report the
 * whole file as data, which is always correct.
 */
export function seekData(fd: number, offset: number): number {
  return required('seekData').seek(fd, offset, 0);
}

/**
 * `lseek(fd, offset, SEEK_HOLE)`: the first offset at or after `offset` in a hole (the end of
 * the file counts as a hole), or -1 when `offset` is at or past the end (ENXIO).
 */
export function seekHole(fd: number, offset: number): number {
  return required('seekHole').seek(fd, offset, 1);
}

/** One run of a file's map: `length` bytes from `offset`, data or hole. */
export interface FileExtent {
  offset: number;
  length: number;
  hole: boolean;
}

/**
 * The data and hole runs of `[offset, offset + length)` of an open file of `size` bytes, in
 * order and covering the range (bytes past the end of the file are reported as a hole). Two
 * lseeks per data run: cheap, but a caller maps what it is about to read, not a whole disk.
 * A file written while it is mapped may report a hole that has just been written: callers
 * that need a stable answer map a file nobody writes, or hold off its writers.
 */
export function fileExtents(fd: number, offset: number, length: number, size: number): FileExtent[] {
  const a = required('fileExtents');
  const end = offset + length;
  const out: FileExtent[] = [];
  const push = (o: number, n: number, hole: boolean): void => {
    if (n <= 0) return;
    const last = out[out.length - 1];
    if (last !== undefined && last.hole === hole && last.offset + last.length === o) last.length += n;
    else out.push({ offset: o, length: n, hole });
  };
  let pos = offset;
  const dataEnd = Math.min(end, size);
  while (pos < dataEnd) {
    const data = a.seek(fd, pos, 0);
    if (data < 0 || data >= dataEnd) {
      push(pos, dataEnd - pos, true);
      pos = dataEnd;
      break;
    }
    push(pos, data - pos, true);
    const hole = a.seek(fd, data, 1);
    const stop = hole < 0 ? dataEnd : Math.min(hole, dataEnd);
    push(data, stop - data, false);
    pos = stop;
  }
  push(pos, end - pos, true);
  return out;
}

/** `-EAGAIN`: a NOWAIT call that would have waited. */
export const NOWAIT_AGAIN = -11;
/** `-EOPNOTSUPP`: the file or filesystem does not take RWF_NOWAIT for this kind of I/O. */
export const NOWAIT_UNSUPPORTED = -95;

/**
 * `preadv2(fd, [buf[offset, offset + length)], position, RWF_NOWAIT)`: bytes read (0 at the end
 * of the file), or -errno: {@link NOWAIT_AGAIN} when the data is not all in the page cache
 * (nothing waited), {@link NOWAIT_UNSUPPORTED} where NOWAIT is not offered. Never throws for
 * I/O; throws TypeError for bad arguments, and NativeUnavailableError without the addon.
 */
export function preadNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  return required('preadNowait').preadNowait(fd, buf, offset, length, position);
}

/**
 * `pwritev2(..., RWF_NOWAIT)`: bytes written or -errno, as {@link preadNowait}. Buffered writes
 * take NOWAIT only on some filesystems (ext4 on Linux 6.x answers EOPNOTSUPP).
 */
export function pwriteNowait(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
  return required('pwriteNowait').pwriteNowait(fd, buf, offset, length, position);
}

/**
 * The name (`code`, as Node's errors have it) and description of a positive errno, from the C
 * library: it knows errnos that libuv, and so `util.getSystemErrorName`, does not (EDQUOT,
 * EREMOTEIO, ENODATA, which block devices return). Null for a number it has no name for.
 */
export function errnoName(errno: number): { code: string; message: string } | null {
  const r = required('errnoName').errnoName(errno);
  return r === null ? null : { code: r[0], message: r[1] };
}

// --- Linux native AIO -----------------------------------------------------------------------

const AIO_READ = 0;
const AIO_WRITE = 1;
const AIO_FDSYNC = 2;

/** Options of {@link AioContext.open}. */
export interface AioOptions {
  /**
   * Events asked of io_setup (default `depth`). For tests: fewer than `depth` makes io_submit
   * refuse with EAGAIN while the ring is full, which exercises the resubmission path.
   */
  readonly kernelEvents?: number;
}

/** Counters of an {@link AioContext}. */
export interface AioStats {
  /** Requests queued and not yet given to io_submit (held back by EAGAIN, or waiting for `submit`). */
  readonly queued: number;
  /** Requests in the kernel. */
  readonly inFlight: number;
  /** io_submit calls. */
  readonly submits: number;
  /** Wakeups of the eventfd that delivered completions (one `onComplete` call each). */
  readonly wakeups: number;
  /** io_submit calls refused with EAGAIN (the ring was full). */
  readonly eagains: number;
}

/**
 * A Linux native AIO context (io_setup) for files opened with O_DIRECT, whose completions arrive
 * on the JavaScript thread with no threadpool hop: the kernel signals an eventfd that libuv
 * polls, and each wakeup calls `onComplete(count)` once, with `count` (id, result) pairs in
 * {@link AioContext.results} (`results[2 * i]` the id, `results[2 * i + 1]` the byte count or
 * -errno). The caller names each request by an id from 0 to `depth - 1` that is not in flight,
 * and must keep its buffers alive and untouched until its completion (the kernel reads and
 * writes them until then). If `onComplete` throws, the error is reported as uncaught and
 * `onComplete` is called again with the same count: keep a cursor so that each pair is handled
 * once. Buffered files are served synchronously by Linux AIO (io_submit blocks): use it for
 * O_DIRECT files. Linux only; {@link nativeAvailable} says whether the addon loaded.
 */
export class AioContext {
  /** Requests that may be in flight at once (ids 0 to depth - 1). */
  readonly depth: number;
  /** The (id, result) pairs of the current `onComplete` call; reused, overwritten by the next. */
  readonly results: Int32Array;
  private readonly addon: Addon;
  private readonly handle: AioHandle;
  private readonly counters: Float64Array;
  private closing: Promise<void> | null;

  private constructor(addon: Addon, depth: number, results: Int32Array, handle: AioHandle) {
    this.addon = addon;
    this.depth = depth;
    this.results = results;
    this.handle = handle;
    this.counters = new Float64Array(6);
    this.closing = null;
  }

  /**
   * Creates a context for `depth` requests in flight (io_setup, an eventfd, a libuv poll
   * handle that keeps the process alive only while requests are in flight). Throws
   * {@link NativeUnavailableError} where the addon did not load, and an `Error` whose `code`
   * is io_setup's errno otherwise: EAGAIN when fs.aio-max-nr is exhausted, ENOSYS or EPERM where
   * AIO is compiled out or forbidden (seccomp); callers fall back to the threadpool.
   */
  static open(depth: number, onComplete: (count: number) => void, options: AioOptions = {}): AioContext {
    const a = required('AioContext.open');
    const results = new Int32Array(2 * depth);
    const handle = a.aioOpen(depth, options.kernelEvents ?? depth, onComplete, results);
    return new AioContext(a, depth, results, handle);
  }

  /**
   * Queues a pread of `length` bytes at file `position` into `buffer` from `bufferOffset`, as
   * request `id`; with `submit` (default) io_submit runs now, else at the next {@link submit}.
   * Throws only for misuse (a bad id or range, a closed context); I/O errors, including a bad
   * fd, arrive as completions.
   */
  read(id: number, fd: number, buffer: ArrayBufferView, bufferOffset: number, length: number, position: number, submit = true): void {
    this.addon.aioQueue(this.handle, id, AIO_READ, fd, buffer, bufferOffset, length, position, submit);
  }

  /** Queues a pwrite: as {@link read}, from `buffer`. */
  write(id: number, fd: number, buffer: ArrayBufferView, bufferOffset: number, length: number, position: number, submit = true): void {
    this.addon.aioQueue(this.handle, id, AIO_WRITE, fd, buffer, bufferOffset, length, position, submit);
  }

  /** Queues a preadv into `buffers` (1 to 1024, each read whole), back to back from `position`. */
  readv(id: number, fd: number, buffers: readonly ArrayBufferView[], position: number, submit = true): void {
    this.addon.aioQueue(this.handle, id, AIO_READ, fd, buffers, 0, 0, position, submit);
  }

  /** Queues a pwritev of `buffers`, back to back from `position`. */
  writev(id: number, fd: number, buffers: readonly ArrayBufferView[], position: number, submit = true): void {
    this.addon.aioQueue(this.handle, id, AIO_WRITE, fd, buffers, 0, 0, position, submit);
  }

  /**
   * Queues an fdatasync (IOCB_CMD_FDSYNC, Linux 4.18+; an older kernel completes it with
   * -EINVAL). The kernel runs it on a worker of its own, not in the order of other requests.
   */
  fdsync(id: number, fd: number, submit = true): void {
    this.addon.aioQueue(this.handle, id, AIO_FDSYNC, fd, null, 0, 0, 0, submit);
  }

  /** Gives every queued request to the kernel (one io_submit for all of them). */
  submit(): void {
    this.addon.aioSubmit(this.handle);
  }

  /** Counters, read from the addon on each call. */
  stats(): AioStats {
    const c = this.counters;
    this.addon.aioStats(this.handle, c);
    return { queued: c[0] as number, inFlight: (c[1] as number) + (c[2] as number), submits: c[3] as number, wakeups: c[4] as number, eagains: c[5] as number };
  }

  /**
   * Destroys the context: the poll handle and eventfd closed, io_destroy on the threadpool (it
   * waits for an RCU grace period, tens of milliseconds, which the event loop should not).
   * Throws (`code` EBUSY) while requests are queued or in flight: every completion must have
   * arrived first. Resolves when the kernel's context is gone; a second call returns the same
   * promise.
   */
  close(): Promise<void> {
    if (this.closing === null) {
      let done: () => void = () => undefined;
      const closed = new Promise<void>((resolve) => (done = resolve));
      this.addon.aioClose(this.handle, done);
      this.closing = closed;
    }
    return this.closing;
  }
}

// --- Batches of pwrite on the threadpool ----------------------------------------------------

/**
 * Batches of pwrite(2) run in the order added by one libuv threadpool thread, one batch at a
 * time, and completed on the JavaScript thread with one `onDone(count)` call per batch: the
 * result of write `i` of the batch (bytes written, or -errno) is `results[i]`. For buffered
 * writes of one file, which ext4 and XFS run one at a time anyway (the inode lock): the writes
 * that queued while a batch ran share one hand-off to a thread and back, instead of each
 * taking a thread of its own to wait on the lock.
 *
 * Add writes with {@link WriteBatch.add}, start them with {@link WriteBatch.submit}; nothing may
 * be added while a batch runs (`busy`). The caller keeps every buffer alive and unchanged until
 * `onDone` (the thread reads them until then). If `onDone` throws, the error is reported as
 * uncaught; the batch is idle again either way. A short write is the caller's to finish.
 */
export class WriteBatch {
  /** Writes one batch may hold. */
  readonly capacity: number;
  /** Results of the batch that completed last, by the order of `add` (valid during `onDone`). */
  readonly results: Float64Array;
  private readonly addon: Addon;
  private readonly handle: BatchHandle;
  private added: number;
  private running: boolean;
  private closed: boolean;

  private constructor(addon: Addon, capacity: number, handle: BatchHandle, results: Float64Array) {
    this.addon = addon;
    this.capacity = capacity;
    this.handle = handle;
    this.results = results;
    this.added = 0;
    this.running = false;
    this.closed = false;
  }

  /**
   * A batch of up to `capacity` writes (1 to 65536) whose completions call `onDone(count)`.
   * Throws {@link NativeUnavailableError} where the addon did not load.
   */
  static open(capacity: number, onDone: (count: number) => void): WriteBatch {
    const a = required('WriteBatch.open');
    let batch: WriteBatch | null = null;
    const [handle, results] = a.batchOpen(capacity, (count) => {
      (batch as WriteBatch).running = false;
      onDone(count);
    });
    batch = new WriteBatch(a, capacity, handle, results);
    return batch;
  }

  /** A batch runs on the threadpool: nothing may be added or submitted until `onDone`. */
  get busy(): boolean {
    return this.running;
  }

  /** Writes added since the last submit. */
  get size(): number {
    return this.added;
  }

  /**
   * Adds a pwrite of `length` bytes of `buf` from `offset` at file `position`; returns its index
   * in the batch. Throws for misuse: bad arguments, a running or full batch, a closed one.
   */
  add(fd: number, buf: Uint8Array, offset: number, length: number, position: number): number {
    const i = this.addon.batchAdd(this.handle, fd, buf, offset, length, position);
    this.added++;
    return i;
  }

  /** Runs the writes added, in order, on the threadpool. Throws when none were added or one runs. */
  submit(): void {
    this.addon.batchSubmit(this.handle);
    this.added = 0;
    this.running = true;
  }

  /** Frees the batch. Throws (`code` EBUSY) while one runs; a second call does nothing. */
  close(): void {
    if (this.closed) return;
    this.addon.batchClose(this.handle);
    this.closed = true;
  }
}
