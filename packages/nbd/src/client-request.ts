// The client's per-request bookkeeping: a bio in flight (ClientIo) and the NBD requests it
// became (Slot, whose index and generation form the cookie), and the narrow interface a
// connection's reply parser uses to hand replies back to the backend.
import { BlkStatus, type BlkError, type Bio, type CompletionSink } from '@blkfilter/bio';
import { NBD_REQUEST_SIZE, NbdErrno } from './protocol.js';

/** Largest TRIM/WRITE_ZEROES request: 2 GiB, far below 2^32 and block aligned. */
export const TRIM_ZERO_MAX = 0x80000000;

/** A bio on its way through one or more NBD requests. */
export class ClientIo {
  bio: Bio | null = null;
  sink: CompletionSink | null = null;
  /** Requests sent (or waiting to be replayed) for this bio and not answered yet. */
  outstanding = 0;
  status: BlkStatus = BlkStatus.OK;
  error: BlkError | null = null;
  /** 0: preflush pending, 1: main requests, 2: FUA emulation flush. */
  stage = 0;
  /** Byte range the bio changes (WRITE, WRITE_ZEROES, DISCARD), for the per-range order. */
  start = 0;
  end = 0;
  /** In the list of changes that later overlapping changes wait for. */
  ordered = false;
  /** Held back until an earlier change to an overlapping range completes. */
  blocked = false;
}

/** One NBD request in flight; its index is the low half of the cookie. */
export class Slot {
  readonly index: number;
  gen = 0;
  io: ClientIo | null = null;
  cmd = 0;
  /** Command flags (FUA, NO_HOLE), kept for a replay. */
  flags = 0;
  /** Byte offset on the export. */
  offset = 0;
  length = 0;
  /** Position of `offset` inside the bio's data. */
  bioPos = 0;
  errno = 0;
  message = '';
  /** The connection it was sent on; -1 while it waits to be (re)sent. */
  conn = -1;
  /** The connection it should go to (FLUSH goes to each), or -1 for any. */
  target = -1;
  /** Order of first submission: replays go out in this order. */
  seq = 0;
  readonly hdr = Buffer.alloc(NBD_REQUEST_SIZE);

  constructor(index: number) {
    this.index = index;
  }
}

/** What a connection's reply parser needs from the backend (type-only, so no import cycle). */
export interface SlotTable {
  /** The slot named by a reply's cookie on connection `conn`, or null if none is in flight there. */
  lookup(conn: number, gen: number, index: number): Slot | null;
  /** Every reply chunk of `slot` arrived. */
  slotDone(slot: Slot): void;
}

/** Reply parser state: at a header. */
export const R_HEADER = 0;
/** Reply parser state: inside the data of an OFFSET_DATA chunk or simple READ reply. */
export const R_DATA = 1;

/** The bio status for an NBD error a server answered with. */
export function statusForErrno(errno: number): BlkStatus {
  switch (errno) {
    case NbdErrno.ENOSPC:
      return BlkStatus.NOSPC;
    case NbdErrno.ENOTSUP:
      return BlkStatus.NOTSUPP;
    case NbdErrno.ENOMEM:
      return BlkStatus.RESOURCE;
    default:
      return BlkStatus.IOERR;
  }
}
