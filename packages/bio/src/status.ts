/**
 * Completion status of a bio, modelled on the kernel's `blk_status_t` (numbers as in
 * `include/linux/blk_types.h`). Every status has an errno-style name users recognise.
 */
export const BlkStatus = {
  OK: 0,
  NOTSUPP: 1,
  TIMEOUT: 2,
  NOSPC: 3,
  TRANSPORT: 4,
  TARGET: 5,
  MEDIUM: 7,
  PROTECTION: 8,
  RESOURCE: 9,
  IOERR: 10,
  AGAIN: 12,
  DEV_RESOURCE: 13,
  OFFLINE: 16,
  INVAL: 19,
} as const;

/** One of the numbers in {@link BlkStatus}. */
export type BlkStatus = (typeof BlkStatus)[keyof typeof BlkStatus];

interface StatusInfo {
  readonly name: string;
  readonly errno: string;
  readonly description: string;
}

const INFO: Record<number, StatusInfo> = {
  [BlkStatus.OK]: { name: 'OK', errno: 'OK', description: 'success' },
  [BlkStatus.NOTSUPP]: { name: 'NOTSUPP', errno: 'EOPNOTSUPP', description: 'operation not supported' },
  [BlkStatus.TIMEOUT]: { name: 'TIMEOUT', errno: 'ETIMEDOUT', description: 'timeout' },
  [BlkStatus.NOSPC]: { name: 'NOSPC', errno: 'ENOSPC', description: 'critical space allocation' },
  [BlkStatus.TRANSPORT]: { name: 'TRANSPORT', errno: 'ENOLINK', description: 'recoverable transport' },
  [BlkStatus.TARGET]: { name: 'TARGET', errno: 'EREMOTEIO', description: 'critical target' },
  [BlkStatus.MEDIUM]: { name: 'MEDIUM', errno: 'ENODATA', description: 'critical medium' },
  [BlkStatus.PROTECTION]: { name: 'PROTECTION', errno: 'EILSEQ', description: 'protection' },
  [BlkStatus.RESOURCE]: { name: 'RESOURCE', errno: 'ENOMEM', description: 'kernel resource' },
  [BlkStatus.IOERR]: { name: 'IOERR', errno: 'EIO', description: 'I/O' },
  [BlkStatus.AGAIN]: { name: 'AGAIN', errno: 'EAGAIN', description: 'nonblocking retry' },
  [BlkStatus.DEV_RESOURCE]: { name: 'DEV_RESOURCE', errno: 'EBUSY', description: 'device resource' },
  [BlkStatus.OFFLINE]: { name: 'OFFLINE', errno: 'ENODEV', description: 'device offline' },
  [BlkStatus.INVAL]: { name: 'INVAL', errno: 'EINVAL', description: 'invalid request' },
};

const UNKNOWN: StatusInfo = { name: 'UNKNOWN', errno: 'EIO', description: 'unknown status' };

/** `'IOERR'` for `BlkStatus.IOERR`; `'UNKNOWN'` for a number that is not a status. */
export function blkStatusName(status: number): string {
  return (INFO[status] ?? UNKNOWN).name;
}

/** The errno-style code of a status (`'EIO'` for `BlkStatus.IOERR`), as `blk_status_to_errno` maps it. */
export function blkStatusToErrno(status: number): string {
  return (INFO[status] ?? UNKNOWN).errno;
}

/** A short human description (`'I/O'`, `'device offline'`), as the kernel prints in `blk_print_req_error`. */
export function blkStatusDescription(status: number): string {
  return (INFO[status] ?? UNKNOWN).description;
}

/** True when `status` is one of the numbers in {@link BlkStatus}. */
export function isBlkStatus(status: number): status is BlkStatus {
  return INFO[status] !== undefined;
}

/**
 * True when retrying the same bio may succeed: the device was busy, out of resources, timed
 * out or lost its path (the kernel's `blk_path_error` set plus AGAIN). Media, target and
 * request errors are final.
 */
export function isRetryable(status: number): boolean {
  return (
    status === BlkStatus.AGAIN ||
    status === BlkStatus.RESOURCE ||
    status === BlkStatus.DEV_RESOURCE ||
    status === BlkStatus.TIMEOUT ||
    status === BlkStatus.TRANSPORT
  );
}
