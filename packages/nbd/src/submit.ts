import { BlkStatus, bioSplitToLimits, submitBio, type Bio } from '@blkfilter/bio';
import { NbdErrno } from './protocol.js';

/** Size of the shared zero buffer that WRITE_ZEROES without a WRITE_ZEROES below writes from. */
export const ZERO_CHUNK = 1024 * 1024;
let zeroBuffer: Buffer | null = null;

/** One shared, never written, 1 MiB buffer of zeros. */
export function zeros(): Buffer {
  return (zeroBuffer ??= Buffer.alloc(ZERO_CHUNK));
}

/** Submits `bio` split to its device's limits (the pieces chained to it). */
export function submitSplit(bio: Bio): void {
  for (let s = bioSplitToLimits(bio); s !== null; s = bioSplitToLimits(bio)) submitBio(s);
  submitBio(bio);
}

/** Maps a failed bio to the NBD error a client sees. */
export function errnoForBio(bio: Bio): number {
  switch (bio.status) {
    case BlkStatus.NOSPC:
      return NbdErrno.ENOSPC;
    case BlkStatus.INVAL:
      return NbdErrno.EINVAL;
    case BlkStatus.NOTSUPP:
      return NbdErrno.ENOTSUP;
    case BlkStatus.RESOURCE:
      return NbdErrno.ENOMEM;
    case BlkStatus.OFFLINE:
      return NbdErrno.ESHUTDOWN;
    default: {
      const code = bio.error?.code;
      if (code === 'EROFS' || code === 'EPERM') return NbdErrno.EPERM;
      return NbdErrno.EIO;
    }
  }
}
