import { BlkError } from '@blkfilter/bio';

/** A CBT block size that is not a power of two at least the device's logical block size. */
export class CbtBlockSizeError extends BlkError {
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/**
 * The CBT state file could not be read or written where that is required (the dirty marker at
 * attach, the clean save at detach), or the tracker is being detached.
 */
export class CbtStateError extends BlkError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EIO', message, options);
  }
}

/** A query that needs a snapshot take (the frozen read map) was made before any take. */
export class CbtNoSnapshotError extends BlkError {
  constructor(message: string) {
    super('ENODATA', message);
  }
}
