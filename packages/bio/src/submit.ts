import type {
  Bio,
  BioVec} from './bio.js';
import {
  bioChain,
  bioEndioError,
  bioMarkSubmitted,
  bioSplit,
  BLK_QC_T_NONE,
  SECTOR_SHIFT,
  SECTOR_SIZE,
} from './bio.js';
import type { BlockDev, Disk } from './device.js';
import {
  BlkError,
  DeviceOfflineError,
  InvalidBioError,
  NotSupportedError,
  ReadOnlyDeviceError,
} from './errors.js';
import { isReqOp, opIsWrite, opName, ReqFlag, ReqOp } from './op.js';
import { BlkStatus } from './status.js';

// Bios submitted while a submission is running wait here and are handled by the outermost
// submitBio (the kernel's current->bio_list): a stack of devices or filters of any depth
// submits in a loop, never in nested frames.
let submitting = false;
const submitList: Bio[] = [];
let submitHead = 0;

const FLUSH_FLAGS = ReqFlag.PREFLUSH | ReqFlag.FUA;

/**
 * Submits `bio` to its device: the one way in for every front end. The bio is checked once
 * against the device (range, alignment, limits, read-only, removal); a bad bio completes with
 * INVAL, IOERR, NOTSUPP or OFFLINE and an error in `bio.error` that says why. Filters on the
 * partition and then on the whole disk see it; then it is dispatched to a hardware queue.
 * Never throws; the bio's end-io runs exactly once, possibly before this returns.
 */
export function submitBio(bio: Bio): void {
  if (submitting) {
    submitList.push(bio);
    return;
  }
  submitting = true;
  processBio(bio);
  while (submitHead < submitList.length) {
    const next = submitList[submitHead++] as Bio;
    processBio(next);
  }
  submitList.length = 0;
  submitHead = 0;
  submitting = false;
}

function processBio(bio: Bio): void {
  try {
    bioMarkSubmitted(bio);
    const bdev = bio.bdev;
    if (bio.checkedBdev !== bdev) {
      // Once per bio and device: a filter's resubmission to the same device is not checked again.
      const error = checkBio(bio);
      if (error !== null) {
        bioEndioError(bio, statusForError(error), error);
        return;
      }
      bio.checkedBdev = bdev;
    } else if (bdev.disk.removed) {
      bioEndioError(bio, BlkStatus.OFFLINE, new DeviceOfflineError(`"${bdev.name}" has been removed: ${opName(bio.op)} refused`));
      return;
    }
    if (bdev.filter !== null && bdev.filter.submitBio(bio)) return;
    if (bdev.partno !== 0) {
      // blk_partition_remap: the whole disk's filters see partition I/O too, so nothing on
      // the disk can be changed around a filter attached to it.
      const part0 = bdev.disk.part0;
      bio.sector += bdev.startSect;
      bio.bdev = part0;
      bio.checkedBdev = part0;
      bio.filterDepth = 0;
      if (part0.filter !== null && part0.filter.submitBio(bio)) return;
    }
    dispatch(bio, bio.bdev.disk);
  } catch (err) {
    // Only a broken filter or backend throws; keep the loop alive and the bio accounted for.
    if (!bio.completed) {
      bioEndioError(bio, BlkStatus.IOERR, new BlkError('EIO', `I/O failed: ${String(err)}`, { cause: err }));
    }
    queueMicrotask(() => {
      throw err;
    });
  }
}

function dispatch(bio: Bio, disk: Disk): void {
  let q = (bio.flags & ReqFlag.POLLED) !== 0 ? disk.nextPollQueue() : null;
  if (q !== null) {
    bio.cookie = q.index;
  } else {
    bio.flags &= ~ReqFlag.POLLED;
    bio.cookie = BLK_QC_T_NONE;
    q = disk.nextQueue();
  }
  bio.hwq = q;
  disk.inflight++;
  q.dispatched++;
  const backend = disk.backend;
  if (!backend.capabilities.writeCache) {
    // No volatile cache: there is nothing to flush (blk_flush_policy).
    if (bio.op === ReqOp.FLUSH) {
      q.complete(bio, BlkStatus.OK);
      return;
    }
    bio.flags &= ~FLUSH_FLAGS;
  }
  backend.queueBio(bio, q);
}

function statusForError(error: BlkError): BlkStatus {
  if (error instanceof InvalidBioError) return BlkStatus.INVAL;
  if (error instanceof DeviceOfflineError) return BlkStatus.OFFLINE;
  if (error instanceof NotSupportedError) return BlkStatus.NOTSUPP;
  return BlkStatus.IOERR;
}

/**
 * Checks `bio` against its device as `submitBio` does, without submitting it. Returns null
 * when it may be submitted, else the error it would complete with.
 */
export function checkBio(bio: Bio): BlkError | null {
  const bdev = bio.bdev;
  const disk = bdev.disk;
  if (disk.removed) return new DeviceOfflineError(`"${bdev.name}" has been removed: ${opName(bio.op)} refused`);
  const op = bio.op;
  if (!isReqOp(op)) return new NotSupportedError(`op ${String(op)} is not a ReqOp (expected READ, WRITE, FLUSH, DISCARD or WRITE_ZEROES)`);
  const { sector, size } = bio;
  if (!Number.isSafeInteger(sector) || sector < 0 || !Number.isSafeInteger(size) || size < 0) {
    return new InvalidBioError(`bio sector ${sector} and size ${size} of "${bdev.name}" must be whole numbers >= 0`);
  }
  if (op === ReqOp.FLUSH) {
    if (size !== 0 || bio.vecs.length !== 0) {
      return new InvalidBioError(`a FLUSH of "${bdev.name}" carries no data: got size ${size} and ${bio.vecs.length} segment(s)`);
    }
    return null;
  }
  if (opIsWrite(op) && bdev.readOnly) {
    return new ReadOnlyDeviceError(`${opName(op)} to read-only device "${bdev.name}" refused; make it writable or write elsewhere`);
  }
  const lbs = disk.limits.logicalBlockSize;
  if (size === 0) return new InvalidBioError(`${opName(op)} of 0 bytes to "${bdev.name}": a bio covers at least one ${lbs}-byte block`);
  if (size % lbs !== 0 || ((sector * SECTOR_SIZE) % lbs) !== 0) {
    return new InvalidBioError(
      `${opName(op)} at sector ${sector} + ${size} bytes is not aligned to the ${lbs}-byte logical block size of "${bdev.name}"`,
    );
  }
  const sectors = size / SECTOR_SIZE;
  if (sector + sectors > bdev.nrSects) {
    return new InvalidBioError(
      `bio sector ${sector} + ${sectors} sectors is past the end of "${bdev.name}" (capacity ${bdev.nrSects} sectors)`,
    );
  }
  const limits = disk.limits;
  if (op === ReqOp.READ || op === ReqOp.WRITE) {
    if (sectors > limits.maxSectors) {
      return new InvalidBioError(
        `${opName(op)} of ${sectors} sectors to "${bdev.name}" is over its limit of ${limits.maxSectors} sectors per bio; split it (bioSplitToLimits)`,
      );
    }
    const vecs = bio.vecs;
    if (vecs.length > limits.maxSegments) {
      return new InvalidBioError(
        `${opName(op)} with ${vecs.length} segments to "${bdev.name}" is over its limit of ${limits.maxSegments} segments per bio; split it (bioSplitToLimits)`,
      );
    }
    let total = 0;
    for (let i = 0; i < vecs.length; i++) {
      const v = vecs[i] as BioVec;
      if (!(v.offset >= 0 && v.length >= 0 && v.offset + v.length <= v.buffer.length)) {
        return new InvalidBioError(`segment ${i} of ${opName(op)} to "${bdev.name}" (offset ${v.offset}, length ${v.length}) lies outside its ${v.buffer.length}-byte buffer`);
      }
      total += v.length;
    }
    if (total !== size) {
      return new InvalidBioError(`${opName(op)} to "${bdev.name}" says ${size} bytes but its segments hold ${total}`);
    }
    return null;
  }
  if (bio.vecs.length !== 0) {
    return new InvalidBioError(`${opName(op)} to "${bdev.name}" carries no data: got ${bio.vecs.length} segment(s)`);
  }
  const max = op === ReqOp.DISCARD ? limits.maxDiscardSectors : limits.maxWriteZeroesSectors;
  if (max === 0) {
    return new NotSupportedError(`"${bdev.name}" does not support ${opName(op)} (backend ${disk.backend.description})`);
  }
  if (sectors > max) {
    return new InvalidBioError(`${opName(op)} of ${sectors} sectors to "${bdev.name}" is over its limit of ${max} sectors per bio; split it (bioSplitToLimits)`);
  }
  return null;
}

/**
 * If `bio` is over its device's limits, splits off (and returns) the largest leading piece
 * that fits, chained to `bio`, which is advanced past it; returns null once `bio` fits. Submit
 * every piece, then `bio` itself:
 * `for (let s; (s = bioSplitToLimits(bio)) !== null; ) submitBio(s); submitBio(bio);`
 */
export function bioSplitToLimits(bio: Bio): Bio | null {
  const sectors = maxSectorsFor(bio.bdev, bio);
  if (sectors <= 0 || sectors * SECTOR_SIZE >= bio.size) return null;
  const split = bioSplit(bio, sectors);
  bioChain(split, bio);
  return split;
}

function maxSectorsFor(bdev: BlockDev, bio: Bio): number {
  const limits = bdev.disk.limits;
  const lbsSectors = limits.logicalBlockSize >>> SECTOR_SHIFT;
  let max: number;
  if (bio.op === ReqOp.DISCARD) max = limits.maxDiscardSectors;
  else if (bio.op === ReqOp.WRITE_ZEROES) max = limits.maxWriteZeroesSectors;
  else if (bio.op === ReqOp.READ || bio.op === ReqOp.WRITE) {
    max = limits.maxSectors;
    if (bio.vecs.length > limits.maxSegments) {
      let bytes = 0;
      for (let i = 0; i < limits.maxSegments; i++) bytes += (bio.vecs[i] as BioVec).length;
      max = Math.min(max, Math.floor(bytes / SECTOR_SIZE));
    }
  } else return 0;
  return max - (max % lbsSectors);
}
