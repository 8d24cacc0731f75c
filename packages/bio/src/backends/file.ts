import fs from 'node:fs';
import path from 'node:path';
import { AioContext, errnoName, nativeAvailable, nativeLoadError } from '@blkfilter/native';
import { requireDirectIo } from '../aligned.js';
import type { BackendCapabilities, BlockBackend, BlockStatusExtent } from '../backend.js';
import { describeBio, SECTOR_SIZE, type Bio, type CompletionSink } from '../bio.js';
import {
  BlkError,
  DeviceOfflineError,
  InvalidArgumentError,
  NoSuchDeviceError,
  NotSupportedError,
  ReadOnlyDeviceError,
} from '../errors.js';
import { opIsWrite, opName, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';
import { fileBlockStatus, nativeHoles, type NativeHoles } from './file-holes.js';
import { AIO_DEFAULT_DEPTH, AIO_MAX_DEPTH, type AioModule } from './file-aio.js';
import { defaultClock } from './file-inline.js';
import { FileEngine, type FileBackendStats, type FileEngineIo } from './file-request.js';

// The backend's face: options, opening and sizing the image, and the typed errors of a failed
// open. The data path is in file-request.ts (requests and their pools), file-inline.ts (small
// reads on this thread), file-aio.ts (O_DIRECT reads and writes through Linux native AIO),
// file-bounce.ts (O_DIRECT bounce buffers) and file-discard.ts.

export type { FileBackendStats } from './file-request.js';

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
  /**
   * How O_DIRECT reads and writes are issued. `'aio'` (the default): Linux native AIO through
   * `@blkfilter/native` (io_submit from this thread, completions on it, up to `aioDepth` in
   * the kernel at once), falling back to the threadpool where the addon did not load or
   * io_setup fails (`stats.ioEngineReason` says why). `'threadpool'`: fs.read/fs.write on
   * libuv's threadpool (4 threads unless UV_THREADPOOL_SIZE says more), for comparison and
   * tests. Without `direct` the threadpool is always used: Linux serves buffered AIO inside
   * io_submit, which would block the event loop. FLUSH, FUA and PREFLUSH (fdatasync) and
   * DISCARD stay on the threadpool either way.
   */
  readonly ioEngine?: 'aio' | 'threadpool';
  /**
   * Requests one O_DIRECT backend keeps in the kernel at once with AIO (default 128); more wait
   * for a free slot, in order. Each context counts against the system-wide fs.aio-max-nr
   * (65536 by default): a depth io_setup refuses falls back to the threadpool.
   */
  readonly aioDepth?: number;
  /**
   * Do buffered writes of up to 1 MiB on the JavaScript thread with pwritev2(RWF_NOWAIT)
   * (default true where `@blkfilter/native` loaded; never with `direct` or `sync`): the kernel
   * does a write now or refuses it at once where it would wait (a lock, the disk, dirty-page
   * throttling), and a refused write goes to the threadpool. XFS and btrfs take NOWAIT writes;
   * ext4 refuses them all (Linux 6.18), and after the first refusal none are tried (decision 0016).
   */
  readonly inlineWrites?: boolean;
  /**
   * Buffered writes of a regular file go to the threadpool in batches, one batch at a time,
   * run in order by one thread (default true where `@blkfilter/native` loaded): ext4 and XFS
   * run one buffered write of a file at a time anyway, so writes on threads of their own only
   * wait for each other, and each pays its own hand-off (decision 0015). `false`: an
   * `fs.write` per write. Not used with `direct` (AIO), with `sync` (each write waits for the
   * disk, and those waits should overlap), or for block devices.
   */
  readonly writeBatching?: boolean;
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
  /**
   * The millisecond clock the inline-read heuristic times reads with (default
   * `performance.now`). For tests: a clock of their own makes the backoff deterministic.
   */
  readonly inlineReadClock?: () => number;
  /**
   * How a read is known to be cached before it is done inline: `'nowait'` asks the kernel
   * (preadv2 with RWF_NOWAIT refuses at once what would wait for the disk; needs
   * @blkfilter/native), `'timing'` times each read and pauses inline reads after slow ones.
   * Default: `'nowait'` where the addon loaded and no `inlineReadClock` was given.
   */
  readonly inlineReadProbe?: 'nowait' | 'timing';
  /** Create a sparse file of `sizeBytes` (a multiple of 512) if the file does not exist. */
  readonly create?: { readonly sizeBytes: number };
  /**
   * With `create`: if the file exists with another size, truncate or extend it to
   * `create.sizeBytes` instead of refusing (data past the new end is lost).
   */
  readonly resize?: boolean;
}

const CAPABILITIES: BackendCapabilities = Object.freeze({ writeCache: true, discard: true, writeZeroes: true });

/** How an O_DIRECT backend will issue reads and writes, from its options. */
function engineIo(direct: boolean, options: FileBackendOptions, file: string): FileEngineIo {
  const depth = options.aioDepth ?? AIO_DEFAULT_DEPTH;
  if (!Number.isSafeInteger(depth) || depth < 1 || depth > AIO_MAX_DEPTH) {
    throw new InvalidArgumentError(`aioDepth ${String(depth)} for "${file}" must be a whole number from 1 to ${AIO_MAX_DEPTH}`);
  }
  // With O_DSYNC each write waits for the disk after the inode lock is released: writes on
  // threads of their own overlap those waits (and share journal commits), one thread would not.
  const batchWrites = !direct && options.sync !== true && options.writeBatching !== false && nativeAvailable();
  const inlineWrites = !direct && options.sync !== true && options.inlineWrites !== false && nativeAvailable();
  const engine = options.ioEngine ?? 'aio';
  if (engine !== 'aio' && engine !== 'threadpool') {
    throw new InvalidArgumentError(`ioEngine ${String(engine)} for "${file}" is not supported: use 'aio' or 'threadpool'`);
  }
  if (!direct) return { native: null, depth, reason: null, batchWrites, inlineWrites };
  if (engine === 'threadpool') return { native: null, depth, reason: "ioEngine: 'threadpool' was asked", batchWrites, inlineWrites };
  if (process.platform !== 'linux') return { native: null, depth, reason: `Linux native AIO is not available on ${process.platform}`, batchWrites, inlineWrites };
  const why = nativeLoadError();
  if (why !== null) return { native: null, depth, reason: why, batchWrites, inlineWrites };
  const native: AioModule = { AioContext, errnoName };
  return { native, depth, reason: null, batchWrites, inlineWrites };
}

const openAsync = (p: string, flags: number): Promise<number> =>
  new Promise((resolve, reject) => fs.open(p, flags, 0o666, (err, fd) => (err ? reject(err) : resolve(fd))));

/**
 * A backend over a raw image file (or a block device): sector `s` of the disk is byte
 * `s * 512` of the file. Unwritten parts of a sparse file read as zeros, and so does anything
 * past its end. DISCARD and WRITE_ZEROES punch holes (fallocate PUNCH_HOLE|KEEP_SIZE on
 * Linux), falling back to writing zeros where the filesystem cannot; WRITE_ZEROES with NOUNMAP
 * writes zeros. FLUSH, PREFLUSH and FUA map to fdatasync. Open with {@link FileBackend.open};
 * every bio completes later, never inside `queueBio`: from a libuv threadpool callback, or for
 * a small read the page cache answered on this thread, from a `setImmediate`.
 *
 * A regular file reports its holes ({@link FileBackend.blockStatus}) where `@blkfilter/native`
 * loaded; elsewhere, and for block devices, `blockStatus` is undefined and every range is data.
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
  /**
   * Holes and data of `[offset, offset + length)` from the filesystem's extent map
   * (`lseek(SEEK_DATA/SEEK_HOLE)`, see {@link BlockBackend.blockStatus}): a hole was never
   * written, was punched by DISCARD or WRITE_ZEROES, or is allocated but unwritten, and reads as
   * zeros. Byte granular as the filesystem answers (`blkdevBlockStatus` rounds holes to the
   * device's blocks). A syscall or two per data run on this thread (microseconds while the
   * filesystem's extent map is cached; a cold map is read from disk). Null once closed or when
   * lseek fails. Undefined where `@blkfilter/native` is missing or did not build, and for block
   * devices: every range is then data.
   */
  readonly blockStatus?: (offset: number, length: number) => BlockStatusExtent[] | null;
  private readonly engine: FileEngine;
  private closing: Promise<void> | null = null;

  private constructor(
    file: string,
    fd: number,
    sizeBytes: number,
    readOnly: boolean,
    direct: boolean,
    sync: boolean,
    minIoSize: number,
    inlineReads: boolean,
    clock: () => number,
    nowait: boolean,
    holes: NativeHoles | null,
    io: FileEngineIo,
  ) {
    const mode = [readOnly ? 'ro' : 'rw', direct ? 'direct' : '', sync ? 'dsync' : ''].filter(Boolean).join(',');
    this.description = `file:${file} (${mode})`;
    this.path = file;
    this.sizeBytes = sizeBytes;
    this.readOnly = readOnly;
    this.direct = direct;
    this.sync = sync;
    this.minIoSize = minIoSize;
    const engine = new FileEngine(file, this.description, fd, direct, sync, minIoSize, inlineReads, clock, nowait, io);
    this.engine = engine;
    // An own property only when it can answer, so that "no blockStatus" keeps meaning "all data"
    // for every caller (NBD's sparse reads and base:allocation, backups).
    if (holes !== null) this.blockStatus = (offset, length) => fileBlockStatus(holes, engine.closed ? -1 : engine.fd, offset, length, sizeBytes);
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
    const io = engineIo(direct, options, abs);
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
      const { sizeBytes, regular } = await sizeOf(fd, abs, create?.sizeBytes, created || options.resize === true, minIoSize, direct);
      // A clock of the caller's own is for the timing probe; else NOWAIT wherever the addon is.
      const probe = options.inlineReadProbe ?? (options.inlineReadClock === undefined && nativeAvailable() ? 'nowait' : 'timing');
      if (probe === 'nowait' && !nativeAvailable()) throw new InvalidArgumentError(`inlineReadProbe 'nowait' needs @blkfilter/native: ${nativeLoadError() ?? ''}`);
      // A block device has no holes to report (lseek there calls everything data).
      const holes = regular ? nativeHoles() : null;
      return new FileBackend(abs, fd, sizeBytes, readOnly, direct, sync, minIoSize, options.inlineReads !== false, options.inlineReadClock ?? defaultClock, probe === 'nowait', holes, regular ? io : { ...io, batchWrites: false });
    } catch (err) {
      fs.closeSync(fd);
      throw err;
    }
  }

  /** The file descriptor (-1 once closing): for inspection such as fstat, not for I/O. */
  get fd(): number {
    return this.engine.closed ? -1 : this.engine.fd;
  }

  /** Counters, for tests and tuning; `ioEngine` says how reads and writes are issued. */
  get stats(): Readonly<FileBackendStats> {
    return this.engine.currentStats();
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    const op = bio.op;
    if (this.engine.closed) {
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
    this.engine.start(bio, sink);
  }

  /**
   * Closes the file. New bios complete with OFFLINE at once; bios in flight complete first
   * (the disk drains its bios before calling this, but a backend driven directly may have some),
   * then the AIO context is destroyed and the fd closed. A second call returns the first's promise.
   */
  close(): Promise<void> {
    this.closing ??= this.engine.close().then(
      () => new Promise<void>((resolve, reject) => fs.close(this.engine.fd, (err) => (err ? reject(err) : resolve()))),
    );
    return this.closing;
  }
}

/** The usable size of the open file `fd`, resizing or checking it against `wanted`, and whether it is a regular file. */
async function sizeOf(fd: number, file: string, wanted: number | undefined, mayResize: boolean, minIoSize: number, direct: boolean): Promise<{ sizeBytes: number; regular: boolean }> {
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
    return { sizeBytes: dev.size, regular: false };
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
  return { sizeBytes: size, regular: true };
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
