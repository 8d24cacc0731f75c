import type { BlockStatusExtent } from './backend.js';
import { Bio, BioVec, SECTOR_SIZE } from './bio.js';
import type { BlockDev } from './device.js';
import { BioIoError, InvalidArgumentError, statusMessage, type BlkError } from './errors.js';
import { opName, ReqFlag, ReqOp } from './op.js';
import { BlkStatus } from './status.js';
import { bioSplitToLimits, submitBio } from './submit.js';

/**
 * Submits `bio` and resolves when it completes (the kernel's `submit_bio_wait`); rejects with
 * the bio's error, or a {@link BioIoError} for its status. Replaces `bio.endIo` and
 * `bio.private`. A convenience for control paths: the data path uses end-io callbacks.
 */
export function submitBioWait(bio: Bio): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    bio.private = { resolve, reject };
    bio.endIo = endIoWait;
    submitBio(bio);
  });
}

function endIoWait(bio: Bio): void {
  const p = bio.private as { resolve: () => void; reject: (e: Error) => void };
  if (bio.status === BlkStatus.OK) p.resolve();
  else p.reject(bioError(bio));
}

/**
 * The error a failed bio stands for: its own `bio.error` when the block layer attached one,
 * else a {@link BioIoError} for its status. For front ends that turn completions into errors.
 */
export function bioError(bio: Bio): BlkError {
  return bio.error ?? new BioIoError(bio.status, statusMessage(bio.status, `${opName(bio.op)} of "${bio.bdev.name}"`));
}

/** Submits `bio`, split to the device's limits if needed, and waits for all of it. */
export function submitBioSplitWait(bio: Bio): Promise<void> {
  return new Promise<void>((resolve, reject) => {
    bio.private = { resolve, reject };
    bio.endIo = endIoWait;
    for (let split = bioSplitToLimits(bio); split !== null; split = bioSplitToLimits(bio)) submitBio(split);
    submitBio(bio);
  });
}

function checkByteRange(bdev: BlockDev, offset: number, length: number, what: string): void {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new InvalidArgumentError(`${what} of "${bdev.name}": offset ${offset} and length ${length} must be whole numbers >= 0`);
  }
  const lbs = bdev.disk.limits.logicalBlockSize;
  if (offset % lbs !== 0 || length % lbs !== 0) {
    throw new InvalidArgumentError(`${what} of "${bdev.name}": offset ${offset} and length ${length} must be multiples of its ${lbs}-byte logical block size`);
  }
}

/**
 * Reads `length` bytes at byte `offset` of `bdev` into a new buffer (or into `into`), split to
 * the device's limits. Offset and length must be multiples of the logical block size.
 */
export async function blkdevRead(bdev: BlockDev, offset: number, length: number, into?: Uint8Array): Promise<Buffer> {
  checkByteRange(bdev, offset, length, 'read');
  const buf = into === undefined ? Buffer.alloc(length) : Buffer.from(into.buffer, into.byteOffset, into.byteLength);
  if (buf.length < length) throw new InvalidArgumentError(`read of "${bdev.name}": buffer of ${buf.length} bytes is smaller than ${length}`);
  if (length === 0) return buf.subarray(0, 0);
  await submitBioSplitWait(new Bio(ReqOp.READ, bdev, offset / SECTOR_SIZE, length, [new BioVec(buf, 0, length)]));
  return buf.subarray(0, length);
}

/**
 * Which bytes of `[offset, offset + length)` of `bdev` are holes (unallocated, reading as
 * zeros) and which are data, from its backend's allocation map (`BlockBackend.blockStatus`); a
 * partition is remapped to its disk, a `LinearBackend` to its target. Advisory, like
 * `SEEK_HOLE`: a hole reads as zeros, data may also be zeros. Filters are not consulted:
 * allocation is a property of the backend (so a filter that changed what reads return would
 * make the answer wrong; CBT and the snapshot filter do not).
 *
 * Holes are whole logical blocks of the device: a block that the backend reports as partly data
 * (a file on a filesystem with smaller blocks than the device's) is data, so the answer never
 * splits a block. Synchronous and cheap (no bio; a file backend asks the filesystem with
 * `lseek`); the range itself is byte granular, so offset and length need not be block aligned.
 * Throws {@link InvalidArgumentError} when the range is not whole numbers >= 0 or runs past the
 * end of `bdev`.
 *
 * Returns extents covering exactly the range, merged, in order (`[]` for length 0), or null when
 * the backend cannot tell (no `blockStatus`: NBD client backends, a file backend without
 * `@blkfilter/native`; or the disk was removed) or its answer breaks the contract (extents that
 * do not tile the range with whole positive lengths): treat the range as data then, which is
 * correct, just not sparse. Callers may skip reading a hole, so a doubtful answer is no answer.
 */
export function blkdevBlockStatus(bdev: BlockDev, offset: number, length: number): BlockStatusExtent[] | null {
  if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0) {
    throw new InvalidArgumentError(`block status of "${bdev.name}": offset ${offset} and length ${length} must be whole numbers >= 0`);
  }
  const size = bdev.nrSects * SECTOR_SIZE;
  if (offset + length > size) {
    throw new InvalidArgumentError(
      `block status of "${bdev.name}": bytes ${offset} + ${length} run past its end (${size} bytes); ask for at most ${Math.max(0, size - offset)} bytes at that offset`,
    );
  }
  const disk = bdev.disk;
  const backend = disk.backend;
  if (disk.removed || backend.blockStatus === undefined) return null;
  if (length === 0) return [];
  const lbs = disk.limits.logicalBlockSize;
  const start = offset + bdev.startSect * SECTOR_SIZE;
  const end = start + length;
  // Ask for whole blocks, so that a hole at either edge is known to cover its block.
  const from = start - (start % lbs);
  const to = end % lbs === 0 ? end : end - (end % lbs) + lbs;
  const extents = backend.blockStatus(from, to - from);
  if (extents === null) return null;
  return holesToBlocks(extents, from, to, lbs, start, end);
}

/**
 * `extents` (the answer for `[from, to)`, both multiples of `blockSize`) with every hole shrunk
 * to the whole blocks it covers (what it leaves of a block is data), merged, clipped to
 * `[start, end)`; null when the answer does not tile `[from, to)` with whole positive lengths.
 * The common answer, already block aligned and asked for aligned, is returned as it is.
 */
function holesToBlocks(extents: readonly BlockStatusExtent[], from: number, to: number, blockSize: number, start: number, end: number): BlockStatusExtent[] | null {
  let aligned = from === start && to === end;
  let pos = from;
  for (let i = 0; i < extents.length; i++) {
    const n = (extents[i] as BlockStatusExtent).length;
    if (!Number.isSafeInteger(n) || n <= 0) return null;
    pos += n;
    if (pos % blockSize !== 0) aligned = false;
  }
  if (pos !== to) return null;
  if (aligned) return extents as BlockStatusExtent[];
  const out: BlockStatusExtent[] = [];
  const push = (a: number, b: number, hole: boolean): void => {
    const lo = Math.max(a, start);
    const hi = Math.min(b, end);
    if (hi <= lo) return;
    const last = out[out.length - 1];
    if (last !== undefined && last.hole === hole) out[out.length - 1] = { length: last.length + hi - lo, hole };
    else out.push({ length: hi - lo, hole });
  };
  pos = from;
  for (let i = 0; i < extents.length; i++) {
    const e = extents[i] as BlockStatusExtent;
    const a = pos;
    const b = pos + e.length;
    pos = b;
    const ha = Math.ceil(a / blockSize) * blockSize;
    const hb = Math.floor(b / blockSize) * blockSize;
    if (!e.hole || hb <= ha) {
      push(a, b, false);
      continue;
    }
    push(a, ha, false);
    push(ha, hb, true);
    push(hb, b, false);
  }
  return out;
}

/** Writes `data` at byte `offset` of `bdev`, split to the device's limits; `flags` may add FUA. */
export async function blkdevWrite(bdev: BlockDev, offset: number, data: Uint8Array, flags = 0): Promise<void> {
  checkByteRange(bdev, offset, data.length, 'write');
  if (data.length === 0) return;
  const bio = new Bio(ReqOp.WRITE, bdev, offset / SECTOR_SIZE, data.length, [new BioVec(data)]);
  bio.flags = flags;
  await submitBioSplitWait(bio);
}

/** Flushes `bdev`'s volatile cache (the kernel's `blkdev_issue_flush`). */
export function blkdevFlush(bdev: BlockDev): Promise<void> {
  return submitBioWait(new Bio(ReqOp.FLUSH, bdev, 0, 0));
}

/** Discards `length` bytes at `offset` (the kernel's `blkdev_issue_discard`); reads then return zeros. */
export async function blkdevDiscard(bdev: BlockDev, offset: number, length: number): Promise<void> {
  checkByteRange(bdev, offset, length, 'discard');
  if (length === 0) return;
  await submitBioSplitWait(new Bio(ReqOp.DISCARD, bdev, offset / SECTOR_SIZE, length));
}

/**
 * Zeroes `length` bytes at `offset` (the kernel's `blkdev_issue_zeroout`) with WRITE_ZEROES;
 * `noUnmap` keeps the blocks allocated. Falls back to writing zero buffers when the device
 * does not support WRITE_ZEROES.
 */
export async function blkdevZeroout(bdev: BlockDev, offset: number, length: number, options: { noUnmap?: boolean } = {}): Promise<void> {
  checkByteRange(bdev, offset, length, 'zeroout');
  if (length === 0) return;
  if (bdev.disk.limits.maxWriteZeroesSectors > 0) {
    const bio = new Bio(ReqOp.WRITE_ZEROES, bdev, offset / SECTOR_SIZE, length);
    if (options.noUnmap === true) bio.flags |= ReqFlag.NOUNMAP;
    await submitBioSplitWait(bio);
    return;
  }
  const chunk = Math.min(length, 1 << 20);
  const zeros = Buffer.alloc(chunk);
  for (let done = 0; done < length; done += chunk) {
    const n = Math.min(chunk, length - done);
    await blkdevWrite(bdev, offset + done, n === chunk ? zeros : zeros.subarray(0, n));
  }
}
