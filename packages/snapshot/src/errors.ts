import { BlkError } from '@blkfilter/bio';

/**
 * The device is already in a snapshot (blksnap's `EBUSY` on SNAPSHOT_ADD), or a snapshot image
 * name is taken. Destroy the other snapshot first, or choose another device or image name.
 */
export class SnapshotBusyError extends BlkError {
  constructor(message: string) {
    super('EBUSY', message);
  }
}

/**
 * The call does not fit the snapshot's state: `addDevice` after `take`, `take` twice, `take`
 * with no device, `image()` before `take`, anything after `destroy`.
 */
export class SnapshotStateError extends BlkError {
  constructor(message: string) {
    super('ERR_SNAPSHOT_STATE', message);
  }
}

/** No live snapshot has that id ({@link getSnapshot}). */
export class SnapshotNotFoundError extends BlkError {
  constructor(message: string) {
    super('ENOENT', message);
  }
}

/**
 * The diff storage reached its limit while a chunk still had to be saved: the snapshot is
 * corrupted (the `corrupted` event carries this error). Give the next snapshot a larger
 * `limitBytes`, or take it when fewer writes are expected.
 */
export class DiffStorageOverflowError extends BlkError {
  constructor(message: string) {
    super('ENOSPC', message);
  }
}

/**
 * The diff storage failed: a step file could not be created, written or read. `code` is the
 * file system's errno name (`ENOSPC`, `EACCES`, `EIO`, ...). The snapshot is corrupted.
 */
export class DiffStorageIoError extends BlkError {
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(code, message, options);
  }
}

/**
 * Set as `bio.error` on snapshot image bios that fail because the snapshot is corrupted; its
 * `cause` is the error that corrupted it (a {@link DiffStorageOverflowError}, for example).
 */
export class SnapshotCorruptedError extends BlkError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EIO', message, options);
  }
}

/**
 * Set as `bio.error` on a NOWAIT write, discard or write-zeroes that would have had to wait for
 * a chunk to be copied (it completes with `BlkStatus.AGAIN`); the copy has been started, so a
 * retry soon passes straight through.
 */
export class CowWouldBlockError extends BlkError {
  constructor(message: string) {
    super('EAGAIN', message);
  }
}

/**
 * A swap write (or one in a no-I/O scope) needed diff storage to grow, which it must not wait
 * for: the bio completes with RESOURCE (retryable) and the storage grows right after, outside
 * the scope, so a retry goes through.
 */
export class CowNoioReserveError extends BlkError {
  constructor(message: string) {
    super('ENOMEM', message);
  }
}
