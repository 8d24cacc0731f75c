import { createHash, randomBytes, type Hash } from 'node:crypto';
import fs from 'node:fs/promises';
import path from 'node:path';
import {
  BlkError,
  blkdevFlush,
  blkdevWrite,
  blkdevZeroout,
  InvalidArgumentError,
  ReadOnlyDeviceError,
  type BlockDev,
} from '@blkfilter/bio';
import { composeChain, isZero, openChain, openView, type OpenedImage } from './chain.js';
import { TargetExistsError } from './errors.js';
import { fsyncDir, lockFolder } from './fsutil.js';
import type { BackupPoint, ImageEntry, Manifest } from './manifest.js';
import { closeAll, pick, refuseStale } from './points.js';
import { openImage, type ImageReader } from './reader.js';

/** Options of {@link restore}. */
export interface RestoreOptions {
  /** Where to write: a raw image file to create, or a device (at least as large). */
  readonly to: string | BlockDev;
  /** 1-based position in the chain (default: the newest point). */
  readonly at?: number;
  /** Which device of a folder that holds several. */
  readonly device?: string;
  /** Replace an existing target file. */
  readonly force?: boolean;
  /** Also compute the SHA-256 of the restored disk (one more pass over the bytes in memory). */
  readonly hash?: boolean;
  readonly onProgress?: (done: number, total: number) => void;
}

/** What {@link restore} wrote. */
export interface RestoreResult {
  readonly position: number;
  readonly point: BackupPoint;
  readonly image: ImageEntry;
  readonly bytes: number;
  /** SHA-256 of the restored disk when `hash` was asked for, else null. */
  readonly sha256: string | null;
}

/**
 * Writes a device as it was at a point. Every image of the point's chain is checked first
 * (size, header, structure as `qemu-img check`, cluster map against the manifest), and every
 * data extent against its digest as it is read; nothing wrong is ever written out with
 * success. A file target is written under a temporary name next to it and renamed at the end
 * (fsync, rename, fsync of the folder); on any error nothing is left behind. A device target
 * cannot be swapped in, so the whole chain is checked in a first pass before anything is
 * written to it.
 */
export async function restore(dir: string, options: RestoreOptions): Promise<RestoreResult> {
  const lock = await lockFolder(dir, 'shared').catch((err: NodeJS.ErrnoException) => {
    if (err.code === 'ENOENT') throw new BlkError('ENOENT', `${dir}: the backup folder does not exist`);
    throw err;
  });
  try {
    const view = await openView(dir);
    if (options.at === undefined) await refuseStale(view);
    const { position, deviceIndex, point } = pick(view, options.at, options.device);
    const dev = view.manifest.devices[deviceIndex] as Manifest['devices'][number];
    const image = point.images[deviceIndex] as ImageEntry;
    const span = view.manifest.digestSpan;
    const hash = options.hash === true ? createHash('sha256') : null;
    const chain = await openChain(view, deviceIndex, position);
    try {
      if (typeof options.to !== 'string') {
        const target = options.to;
        if (target.readOnly) throw new ReadOnlyDeviceError(`cannot restore to "${target.name}": the device is read-only (EROFS)`);
        if (target.sizeBytes < dev.virtualSize) throw new InvalidArgumentError(`cannot restore ${dev.virtualSize} bytes to "${target.name}": it holds only ${target.sizeBytes}`);
        await composeChain(chain, dev.virtualSize, span, async () => {}, (d, t) => options.onProgress?.(d / 2, t), true);
        await composeChain(
          chain,
          dev.virtualSize,
          span,
          async (offset, data, zero) => {
            hash?.update(data); // synchronously, so in window order
            if (zero) await blkdevZeroout(target, offset, data.length);
            else await blkdevWrite(target, offset, data);
          },
          (d, t) => options.onProgress?.(t / 2 + d / 2, t),
          true,
        );
        await blkdevFlush(target);
      } else {
        await restoreToFile(chain, dev.virtualSize, span, options.to, options.force === true, hash, options.onProgress);
      }
    } finally {
      await closeAll(chain);
    }
    return { position, point, image, bytes: dev.virtualSize, sha256: hash?.digest('hex') ?? null };
  } finally {
    await lock.release();
  }
}

/** Bytes written to a restore target between background datasyncs. */
const WRITEBACK_BYTES = 64 << 20;
/** Zero runs of at least this many bytes (aligned to it) are left as holes in a new target. */
const HOLE_GRAIN = 64 << 10;

/**
 * Writes the parts of `data` (at `offset` of a new sparse file) that are not zero, in runs of
 * `grain`-aligned pieces; zero pieces stay holes. The runs are written at the same time (they
 * do not overlap), so the window costs about one round trip to the I/O threads rather than one
 * per run; it resolves (or rejects with the first error) only once every write has ended.
 * Returns the bytes written.
 */
export async function writeDataRuns(fh: fs.FileHandle, offset: number, data: Buffer, grain: number): Promise<number> {
  const writes: Array<Promise<void>> = [];
  let written = 0;
  let runStart = -1;
  const end = data.length;
  for (let pos = 0; pos <= end; ) {
    const next = pos === end ? end : Math.min(end, (Math.floor((offset + pos) / grain) + 1) * grain - offset);
    const zero = pos === end || isZero(data.subarray(pos, next));
    if (!zero && runStart < 0) runStart = pos;
    if (zero && runStart >= 0) {
      writes.push(writeAll(fh, data, runStart, pos, offset));
      written += pos - runStart;
      runStart = -1;
    }
    if (pos === end) break;
    pos = next;
  }
  for (const r of await Promise.allSettled(writes)) if (r.status === 'rejected') throw r.reason;
  return written;
}

async function writeAll(fh: fs.FileHandle, data: Buffer, from: number, to: number, offset: number): Promise<void> {
  let done = from;
  while (done < to) done += (await fh.write(data, done, to - done, offset + done)).bytesWritten;
}

async function restoreToFile(
  chain: readonly OpenedImage[],
  size: number,
  span: number,
  to: string,
  force: boolean,
  hash: Hash | null,
  onProgress?: (done: number, total: number) => void,
): Promise<void> {
  const target = path.resolve(to);
  if (!force) {
    const there = await fs.lstat(target).then(
      () => true,
      () => false,
    );
    if (there) throw new TargetExistsError(`${target} exists (EEXIST): choose another name, or pass --force (force: true) to overwrite it`);
  }
  const tmp = path.join(path.dirname(target), `.${path.basename(target)}.${process.pid}.${randomBytes(4).toString('hex')}.restoring`);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(tmp, 'wx');
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    throw new BlkError(e.code ?? 'EIO', `cannot create the restore target in ${path.dirname(target)}: ${e.message}`, { cause: err });
  }
  try {
    await fh.truncate(size);
    // The target is a new sparse file: zero runs inside a window are left as holes rather than
    // written (less to write back), and writeback starts while later windows are read and
    // hashed (a datasync in the background every WRITEBACK_BYTES), so the final fsync has
    // little left to do instead of all of it.
    let unsynced = 0;
    let writeback: Promise<void> | null = null;
    let writebackError: unknown = null;
    await composeChain(
      chain,
      size,
      span,
      async (offset, data, zero) => {
        hash?.update(data); // synchronously, so in window order
        if (zero) return; // a hole in the sparse file
        const written = await writeDataRuns(fh, offset, data, HOLE_GRAIN);
        unsynced += written;
        if (unsynced >= WRITEBACK_BYTES && writeback === null) {
          unsynced = 0;
          writeback = fh.datasync().then(
            () => {
              writeback = null;
            },
            (err: unknown) => {
              writebackError = err;
              writeback = null;
            },
          );
        }
      },
      onProgress,
      true,
    );
    if (writeback !== null) await writeback;
    if (writebackError !== null) throw writebackError;
    await fh.sync();
    await fh.close();
    await fs.rename(tmp, target);
    await fsyncDir(path.dirname(target));
  } catch (err) {
    await fh.close().catch(() => {});
    await fs.rm(tmp, { force: true }).catch(() => {});
    throw err;
  }
}

/**
 * Compares a point with an image (raw, or qcow2 with its chain), byte for byte, reading the
 * point through the same checks as {@link restore}. Resolves with the first differing offset.
 */
export async function verifyAgainst(
  dir: string,
  against: string,
  options: { readonly at?: number; readonly device?: string; readonly onProgress?: (done: number, total: number) => void } = {},
): Promise<{ equal: boolean; firstDifference: number | null; bytes: number }> {
  const view = await openView(dir);
  if (options.at === undefined) await refuseStale(view);
  const { position, deviceIndex } = pick(view, options.at, options.device);
  const dev = view.manifest.devices[deviceIndex] as Manifest['devices'][number];
  const chain = await openChain(view, deviceIndex, position);
  let other: ImageReader | null = null;
  try {
    other = await openImage(against);
    const b = other;
    if (b.virtualSize !== dev.virtualSize) return { equal: false, firstDifference: Math.min(b.virtualSize, dev.virtualSize), bytes: dev.virtualSize };
    const y = Buffer.alloc(view.manifest.digestSpan);
    let first: number | null = null;
    await composeChain(
      chain,
      dev.virtualSize,
      view.manifest.digestSpan,
      async (offset, data) => {
        if (first !== null) return;
        await b.read(offset, data.length, y);
        if (Buffer.compare(data, y.subarray(0, data.length)) !== 0) {
          let i = 0;
          while (data[i] === y[i]) i++;
          first = offset + i;
        }
      },
      options.onProgress,
    );
    return { equal: first === null, firstDifference: first, bytes: dev.virtualSize };
  } finally {
    await closeAll(chain);
    await other?.close();
  }
}
