import { BlkError } from '@blkfilter/bio';

/** No filter registered under that name, or none attached to the device under that name. */
export class FilterNotFoundError extends BlkError {
  constructor(message: string) {
    super('ENOENT', message);
  }
}

/** The filter is already attached to the device (or already registered). */
export class FilterAlreadyAttachedError extends BlkError {
  constructor(message: string) {
    super('EALREADY', message);
  }
}

/** Another filter holds that altitude on the device, or the filter is still attached somewhere. */
export class FilterBusyError extends BlkError {
  constructor(message: string) {
    super('EBUSY', message);
  }
}

/** The filter was built for a filter API version this registry does not support. */
export class FilterApiVersionError extends BlkError {
  constructor(message: string) {
    super('EPROTONOSUPPORT', message);
  }
}

/** The filter has no control command of that name (an unknown ioctl is ENOTTY). */
export class UnknownCtlCommandError extends BlkError {
  constructor(message: string) {
    super('ENOTTY', message);
  }
}

/** In-flight bios did not drain within the freeze timeout; the device was thawed unchanged. */
export class FreezeTimeoutError extends BlkError {
  constructor(message: string) {
    super('ETIMEDOUT', message);
  }
}

/** A filter of that name is already registered. */
export class FilterExistsError extends BlkError {
  constructor(message: string) {
    super('EEXIST', message);
  }
}

/** A NOWAIT bio reached a frozen device: it completes with AGAIN instead of waiting. */
export class DeviceFrozenError extends BlkError {
  constructor(message: string) {
    super('EAGAIN', message);
  }
}
