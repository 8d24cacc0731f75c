import { blkStatusDescription, blkStatusName, blkStatusToErrno, type BlkStatus } from './status.js';

const MARKER = Symbol.for('blkfilter.error');

/**
 * Base of every error blkfilter throws or attaches to a bio. `code` is an errno-style string
 * (`'EINVAL'`, `'EROFS'`, ...) or an `ERR_*` name for API misuse. Recognised across duplicate
 * installs through {@link BlkError.isInstance}.
 */
export class BlkError extends Error {
  readonly code: string;
  readonly [MARKER] = true;

  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.code = code;
    this.name = new.target.name;
  }

  /** True for any blkfilter error, even one made by another copy of this package. */
  static isInstance(value: unknown): value is BlkError {
    return typeof value === 'object' && value !== null && (value as Record<symbol, unknown>)[MARKER] === true;
  }
}

/** A bio that cannot be served as built: out of range, misaligned, over the queue limits. */
export class InvalidBioError extends BlkError {
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/** A write, discard or write-zeroes to a read-only device or partition. */
export class ReadOnlyDeviceError extends BlkError {
  constructor(message: string) {
    super('EROFS', message);
  }
}

/** The device was removed (or is being removed): new bios complete with `BlkStatus.OFFLINE`. */
export class DeviceOfflineError extends BlkError {
  constructor(message: string) {
    super('ENODEV', message);
  }
}

/** The op or feature is not implemented by this device, backend or filter. */
export class NotSupportedError extends BlkError {
  constructor(message: string) {
    super('EOPNOTSUPP', message);
  }
}

/** A device of that name already exists. */
export class DeviceExistsError extends BlkError {
  constructor(message: string) {
    super('EEXIST', message);
  }
}

/** No device, partition or file of that name. */
export class NoSuchDeviceError extends BlkError {
  constructor(message: string) {
    super('ENOENT', message);
  }
}

/** A bad argument or configuration given to the API (not a bio: those complete with a status). */
export class InvalidArgumentError extends BlkError {
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/** The partition table on the device is malformed (bad signature, CRC, overlapping entries). */
export class PartitionTableError extends BlkError {
  constructor(message: string, options?: { cause?: unknown }) {
    super('EBADPT', message, options);
  }
}

/** A bio's completion ran a second time: a bug in whoever completed it. Always fatal. */
export class BioCompletedTwiceError extends BlkError {
  constructor(message: string) {
    super('ERR_BIO_COMPLETED_TWICE', message);
  }
}

/** Bios that were submitted but never completed, found by the debug tracker. */
export class BioNeverCompletedError extends BlkError {
  constructor(message: string) {
    super('ERR_BIO_NEVER_COMPLETED', message);
  }
}

/**
 * A bio completed with an error status, surfaced by the promise helpers (`submitBioWait`,
 * `blkdevRead`, ...). `status` is the bio's `BlkStatus`; `code` its errno name.
 */
export class BioIoError extends BlkError {
  readonly status: BlkStatus;

  constructor(status: BlkStatus, message: string, options?: { cause?: unknown }) {
    super(blkStatusToErrno(status), message, options);
    this.status = status;
  }
}

/** The message used when a bio fails without a more specific error attached. */
export function statusMessage(status: number, what: string): string {
  return `${what} failed: ${blkStatusDescription(status)} error (BlkStatus.${blkStatusName(status)}, ${blkStatusToErrno(status)})`;
}

/** The device is in use in a way that forbids the request (a filter attached, a rescan running). */
export class DeviceBusyError extends BlkError {
  constructor(message: string) {
    super('EBUSY', message);
  }
}
