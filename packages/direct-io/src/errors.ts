import { BlkError } from '@blkfilter/bio';

/** An offset, length or buffer that O_DIRECT-style I/O cannot take as it is. */
export class MisalignedIoError extends BlkError {
  constructor(message: string) {
    super('EINVAL', message);
  }
}

/** The handle was closed; no new I/O is accepted. */
export class HandleClosedError extends BlkError {
  constructor(message: string) {
    super('EBADF', message);
  }
}
