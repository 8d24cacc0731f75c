import type { BlockDev } from './device.js';
import { BioCompletedTwiceError, BioNeverCompletedError, InvalidArgumentError, type BlkError } from './errors.js';
import { opHasData, opName, ReqFlag, ReqOp } from './op.js';
import { BlkStatus } from './status.js';

/** A sector is 512 bytes, whatever the device's logical block size. */
export const SECTOR_SIZE = 512;
/** log2 of {@link SECTOR_SIZE}. */
export const SECTOR_SHIFT = 9;
/** The cookie of a bio that was not dispatched to a poll queue (the kernel's `BLK_QC_T_NONE`). */
export const BLK_QC_T_NONE = -1;

/**
 * One segment of a bio's data: `length` bytes of `buffer` from `offset` (the kernel's
 * `bio_vec`). Segments point into the submitter's buffers; nothing is copied until a backend
 * moves the data.
 */
export class BioVec {
  buffer: Uint8Array;
  offset: number;
  length: number;

  constructor(buffer: Uint8Array, offset = 0, length = buffer.length - offset) {
    this.buffer = buffer;
    this.offset = offset;
    this.length = length;
  }
}

/** Called once when a bio completes; `bio.status` tells how. Runs synchronously: must not block. */
export type BioEndIo = (bio: Bio) => void;

/** Something that takes a dispatched bio's completion (a hardware queue). */
export interface CompletionSink {
  /** Completes `bio` with `status`. Called exactly once per dispatched bio; never throws. */
  complete(bio: Bio, status: BlkStatus): void;
}

const STATE_IDLE = 0;
const STATE_SUBMITTED = 1;
const STATE_DONE = 2;

const NO_VECS: BioVec[] = [];

/**
 * A block I/O request: `size` bytes at `sector` of `bdev`, with data in `vecs` for READ and
 * WRITE. Completion runs `endIo` exactly once with `status` set. Every field is set in the
 * constructor so that all bios share one shape.
 */
export class Bio {
  /** What to do: a {@link ReqOp}. */
  op: ReqOp;
  /** Modifiers: an OR of {@link ReqFlag}. */
  flags: number;
  /** The device or partition addressed; remapped to the whole disk on submission. */
  bdev: BlockDev;
  /** First 512-byte sector. */
  sector: number;
  /** Bytes to transfer (or to discard/zero); 0 for FLUSH. */
  size: number;
  /** Data segments (READ fills them, WRITE takes from them); empty for other ops. */
  vecs: BioVec[];
  /** Completion status; OK until an error is set. The first error wins. */
  status: BlkStatus;
  /** Why the bio failed, when the block layer knows more than the status says (else null). */
  error: BlkError | null;
  /** Runs once on completion. */
  endIo: BioEndIo | null;
  /** The owner's data (the kernel's `bi_private`); the block layer never touches it. */
  private: unknown;
  /** Poll queue number written at dispatch for POLLED bios; else {@link BLK_QC_T_NONE}. */
  cookie: number;
  /** The bio this one is chained to ({@link bioChain}), or null. */
  parent: Bio | null;
  /** Completions still expected: 1 plus one per chained child not yet complete. */
  remaining: number;
  /** Index of the next filter of `bdev`'s stack to see this bio (owned by the filter registry). */
  filterDepth: number;
  /**
   * The device `submitBio` last validated this bio against, or null. A filter that sends the
   * bio on to the same device is trusted (validate once, at the boundary); one that aims it at
   * another device gets it checked again there.
   */
  checkedBdev: BlockDev | null;
  /** The queue that dispatched this bio (set at dispatch, for backends that complete later). */
  hwq: CompletionSink | null;
  /** The device whose in-flight count this bio holds from submission to completion. */
  acctBdev: BlockDev | null;
  /** Lifecycle: idle, submitted, done. */
  state: number;
  /** `performance.now()` at submission when its device keeps {@link BlockDev.stats}; else -1. */
  startTime: number;

  constructor(op: ReqOp, bdev: BlockDev, sector: number, size: number, vecs: BioVec[] = NO_VECS) {
    this.op = op;
    this.flags = 0;
    this.bdev = bdev;
    this.sector = sector;
    this.size = size;
    this.vecs = vecs;
    this.status = BlkStatus.OK;
    this.error = null;
    this.endIo = null;
    this.private = null;
    this.cookie = BLK_QC_T_NONE;
    this.parent = null;
    this.remaining = 1;
    this.filterDepth = 0;
    this.checkedBdev = null;
    this.hwq = null;
    this.acctBdev = null;
    this.state = STATE_IDLE;
    this.startTime = -1;
  }

  /** A READ of `buffer.length` bytes at `sector` into `buffer`. */
  static read(bdev: BlockDev, sector: number, buffer: Uint8Array, flags = 0): Bio {
    const bio = new Bio(ReqOp.READ, bdev, sector, buffer.length, [new BioVec(buffer)]);
    bio.flags = flags;
    return bio;
  }

  /** A WRITE of `buffer` at `sector`. */
  static write(bdev: BlockDev, sector: number, buffer: Uint8Array, flags = 0): Bio {
    const bio = new Bio(ReqOp.WRITE, bdev, sector, buffer.length, [new BioVec(buffer)]);
    bio.flags = flags;
    return bio;
  }

  /** True once the bio's completion has run. */
  get completed(): boolean {
    return this.state === STATE_DONE;
  }

  /**
   * Makes a completed (or never submitted) bio reusable for another I/O, as `bio_reset` does:
   * status, error, cookie, chain and filter position are cleared; op, target and data are set anew.
   */
  reset(op: ReqOp, bdev: BlockDev, sector: number, size: number, vecs: BioVec[] = NO_VECS): this {
    if (this.state === STATE_SUBMITTED) {
      throw new InvalidArgumentError(`cannot reset ${describeBio(this)}: it is still in flight`);
    }
    this.op = op;
    this.flags = 0;
    this.bdev = bdev;
    this.sector = sector;
    this.size = size;
    this.vecs = vecs;
    this.status = BlkStatus.OK;
    this.error = null;
    this.cookie = BLK_QC_T_NONE;
    this.parent = null;
    this.remaining = 1;
    this.filterDepth = 0;
    this.checkedBdev = null;
    this.hwq = null;
    this.acctBdev = null;
    this.state = STATE_IDLE;
    this.startTime = -1;
    return this;
  }
}

/** `WRITE 4096 bytes at sector 8 of "disk0p1"`, for messages. */
export function describeBio(bio: Bio): string {
  const what = bio.op === ReqOp.FLUSH ? 'FLUSH' : `${opName(bio.op)} ${bio.size} bytes at sector ${bio.sector}`;
  return `${what} of "${bio.bdev.name}"`;
}

/** Marks a bio as in flight; the submit path calls it once per bio it accepts. */
export function bioMarkSubmitted(bio: Bio): void {
  if (bio.state === STATE_IDLE) {
    bio.state = STATE_SUBMITTED;
    const bdev = bio.bdev;
    bio.acctBdev = bdev;
    bdev.startIo();
    if (bdev.stats !== null || bdev.disk.part0.stats !== null) bio.startTime = performance.now();
    if (tracker !== null) tracker.onSubmit(bio);
  }
}

/**
 * Drops POLLED and the cookie: a bio that was split, cloned, deferred or remapped by a filter
 * completes by interrupt, so its completion can never be stranded on a poll ring.
 */
export function bioClearPolled(bio: Bio): void {
  bio.flags &= ~ReqFlag.POLLED;
  bio.cookie = BLK_QC_T_NONE;
}

// --- completion -------------------------------------------------------------------------------

// Completions that happen while another completion's end-io is running are queued here and run
// by the outermost bioEndio, so a stack of 10,000 remapping devices completes in a loop, not in
// 10,000 nested frames (the submit side does the same with its own list).
let completing = false;
const completionList: Bio[] = [];
let completionHead = 0;

/**
 * Completes `bio` (the kernel's `bio_endio`). If `status` is an error and the bio has none yet,
 * it becomes the bio's status: the first error wins. A bio with chained children completes
 * when the last of them has. Never throws for I/O errors; throws
 * {@link BioCompletedTwiceError} when the bio was already complete, which is always a bug.
 */
export function bioEndio(bio: Bio, status: BlkStatus = BlkStatus.OK): void {
  if (status !== BlkStatus.OK && bio.status === BlkStatus.OK) bio.status = status;
  let b = bio;
  for (;;) {
    if (b.state === STATE_DONE) throw completedTwice(b);
    if (b.remaining > 1) {
      b.remaining--;
      return;
    }
    b.remaining = 0;
    b.state = STATE_DONE;
    const acct = b.acctBdev;
    if (acct !== null) {
      b.acctBdev = null;
      acct.endIo();
      if (b.startTime >= 0) accountIo(acct, b);
    }
    if (tracker !== null) tracker.onComplete(b);
    const parent = b.parent;
    if (parent === null) break;
    // bio_chain_endio, inlined so that long chains complete without recursion.
    if (parent.status === BlkStatus.OK && b.status !== BlkStatus.OK) {
      parent.status = b.status;
      parent.error = b.error;
    }
    b = parent;
  }
  if (b.endIo === null) return;
  if (completing) {
    completionList.push(b);
    return;
  }
  completing = true;
  runEndIo(b);
  while (completionHead < completionList.length) {
    const next = completionList[completionHead++] as Bio;
    runEndIo(next);
  }
  completionList.length = 0;
  completionHead = 0;
  completing = false;
}

// Kept out of bioEndio so that the common path (accounting off) stays small.
function accountIo(acct: BlockDev, b: Bio): void {
  const ms = performance.now() - b.startTime;
  b.startTime = -1;
  if (acct.stats !== null) acct.stats.account(b.op, b.size, b.status, ms);
  if (acct.partno !== 0) {
    const disk = acct.disk.part0.stats;
    if (disk !== null) disk.account(b.op, b.size, b.status, ms);
  }
}

function runEndIo(bio: Bio): void {
  try {
    (bio.endIo as BioEndIo)(bio);
  } catch (err) {
    // An end-io that throws is the caller's bug; the block layer's state must stay consistent,
    // so the error is rethrown outside our loops, where it reaches uncaughtException.
    queueMicrotask(() => {
      throw err;
    });
  }
}

/** Completes `bio` with `status` and the `error` that explains it (first error wins). */
export function bioEndioError(bio: Bio, status: BlkStatus, error: BlkError | null): void {
  if (bio.status === BlkStatus.OK && error !== null) bio.error = error;
  bioEndio(bio, status);
}

function completedTwice(bio: Bio): BioCompletedTwiceError {
  const first = tracker?.firstCompletion(bio);
  return new BioCompletedTwiceError(
    `${describeBio(bio)} was completed twice: whoever completed it the second time has a bug` +
      (first ? `\nfirst completion:\n${first}` : ' (enable bio debug mode to see where it first completed)'),
  );
}

// --- chaining, splitting, cloning --------------------------------------------------------------

/**
 * Chains `child` to `parent` (the kernel's `bio_chain`): `parent` completes only after
 * `child` has, and the first error of either becomes the parent's status. `child` must have no
 * end-io of its own.
 */
export function bioChain(child: Bio, parent: Bio): void {
  if (child.endIo !== null || child.parent !== null) {
    throw new InvalidArgumentError(`cannot chain ${describeBio(child)}: it already has an end-io or a parent`);
  }
  if (parent.state === STATE_DONE) {
    throw new InvalidArgumentError(`cannot chain to ${describeBio(parent)}: it has already completed`);
  }
  child.parent = parent;
  parent.remaining++;
}

/**
 * Splits the first `sectors` sectors off `bio` (the kernel's `bio_split`): returns a new bio for
 * them and advances `bio` past them. Data is shared, not copied. Both lose POLLED, since the
 * pieces may reach different queues. The caller usually chains the split to `bio` and submits
 * both: `bioChain(split, bio); submitBio(split); submitBio(bio)`.
 */
export function bioSplit(bio: Bio, sectors: number): Bio {
  const bytes = sectors * SECTOR_SIZE;
  if (!Number.isInteger(sectors) || sectors <= 0 || bytes >= bio.size) {
    throw new InvalidArgumentError(
      `cannot split ${sectors} sectors off ${describeBio(bio)}: expected a whole number of sectors between 1 and ${Math.ceil(bio.size / SECTOR_SIZE) - 1}`,
    );
  }
  bioClearPolled(bio);
  const split = new Bio(bio.op, bio.bdev, bio.sector, bytes);
  split.flags = bio.flags;
  split.filterDepth = bio.filterDepth;
  // A piece of a validated bio is within what was validated.
  split.checkedBdev = bio.checkedBdev;
  if (opHasData(bio.op)) {
    const [head, tail] = splitVecs(bio.vecs, bytes);
    split.vecs = head;
    bio.vecs = tail;
  }
  bio.sector += sectors;
  bio.size -= bytes;
  return split;
}

function splitVecs(vecs: BioVec[], bytes: number): [BioVec[], BioVec[]] {
  const head: BioVec[] = [];
  let left = bytes;
  let i = 0;
  for (; i < vecs.length && left > 0; i++) {
    const v = vecs[i] as BioVec;
    if (v.length <= left) {
      head.push(v);
      left -= v.length;
    } else {
      head.push(new BioVec(v.buffer, v.offset, left));
      const rest = new BioVec(v.buffer, v.offset + left, v.length - left);
      return [head, [rest, ...vecs.slice(i + 1)]];
    }
  }
  return [head, vecs.slice(i)];
}

/**
 * A new bio for the same I/O as `bio` (the kernel's `bio_alloc_clone`): same op, flags,
 * sector, size and data segments, aimed at `bdev` (default: the same device). The clone has no
 * end-io, no parent, and no POLLED flag.
 */
export function bioClone(bio: Bio, bdev: BlockDev = bio.bdev): Bio {
  const clone = new Bio(bio.op, bdev, bio.sector, bio.size, bio.vecs.length === 0 ? NO_VECS : bio.vecs.slice());
  clone.flags = bio.flags & ~ReqFlag.POLLED;
  return clone;
}

/**
 * Copies `length` bytes of `src` (from `srcOffset`) into the data of `vecs`, starting `pos`
 * bytes into it (the kernel's `memcpy_to_bvec` over a whole bio). A read completion's copy.
 */
export function copyToBioVecs(vecs: readonly BioVec[], pos: number, src: Uint8Array, srcOffset: number, length: number): void {
  let skip = pos;
  let left = length;
  let at = srcOffset;
  for (let i = 0; i < vecs.length && left > 0; i++) {
    const v = vecs[i] as BioVec;
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    const n = Math.min(v.length - skip, left);
    v.buffer.set(src.subarray(at, at + n), v.offset + skip);
    at += n;
    left -= n;
    skip = 0;
  }
}

/** Copies `length` bytes of the data of `vecs`, from `pos` bytes into it, into `dst` at `dstOffset`. */
export function copyFromBioVecs(vecs: readonly BioVec[], pos: number, dst: Uint8Array, dstOffset: number, length: number): void {
  let skip = pos;
  let left = length;
  let at = dstOffset;
  for (let i = 0; i < vecs.length && left > 0; i++) {
    const v = vecs[i] as BioVec;
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    const n = Math.min(v.length - skip, left);
    dst.set(v.buffer.subarray(v.offset + skip, v.offset + skip + n), at);
    at += n;
    left -= n;
    skip = 0;
  }
}

/** BioVecs for `length` bytes of the data of `vecs` from byte `pos` (buffers shared, not copied). */
export function sliceBioVecs(vecs: readonly BioVec[], pos: number, length: number): BioVec[] {
  const out: BioVec[] = [];
  let skip = pos;
  let left = length;
  for (let i = 0; i < vecs.length && left > 0; i++) {
    const v = vecs[i] as BioVec;
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    const n = Math.min(v.length - skip, left);
    out.push(new BioVec(v.buffer, v.offset + skip, n));
    left -= n;
    skip = 0;
  }
  return out;
}

/** Zeroes `length` bytes of the data of `vecs` from `pos` bytes into it (the kernel's `zero_fill_bio`, ranged). */
export function zeroBioVecs(vecs: readonly BioVec[], pos: number, length: number): void {
  let skip = pos;
  let left = length;
  for (let i = 0; i < vecs.length && left > 0; i++) {
    const v = vecs[i] as BioVec;
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    const n = Math.min(v.length - skip, left);
    v.buffer.fill(0, v.offset + skip, v.offset + skip + n);
    left -= n;
    skip = 0;
  }
}

/** Total bytes of `vecs`. */
export function bvecBytes(vecs: readonly BioVec[]): number {
  let n = 0;
  for (let i = 0; i < vecs.length; i++) n += (vecs[i] as BioVec).length;
  return n;
}

// --- debug tracking ---------------------------------------------------------------------------

/**
 * Counts submissions and completions while bio debug mode is on ({@link enableBioDebug}):
 * a bio completed twice fails with the stack of its first completion, and
 * {@link BioTracker.assertAllCompleted} names every bio still outstanding.
 */
export class BioTracker {
  submitted = 0;
  completed = 0;
  private readonly outstanding = new Set<Bio>();
  private readonly firstStacks = new WeakMap<Bio, string>();
  private readonly captureStacks: boolean;

  constructor(captureStacks: boolean) {
    this.captureStacks = captureStacks;
  }

  /** @internal */
  onSubmit(bio: Bio): void {
    this.submitted++;
    this.outstanding.add(bio);
  }

  /** @internal */
  onComplete(bio: Bio): void {
    this.completed++;
    this.outstanding.delete(bio);
    if (this.captureStacks) this.firstStacks.set(bio, new Error('first completion').stack ?? '');
  }

  /** @internal */
  firstCompletion(bio: Bio): string | undefined {
    return this.firstStacks.get(bio);
  }

  /** Bios submitted and not yet completed. */
  get inFlight(): number {
    return this.outstanding.size;
  }

  /** The outstanding bios, for inspection. */
  outstandingBios(): Bio[] {
    return [...this.outstanding];
  }

  /** Throws {@link BioNeverCompletedError} naming the bios still outstanding, if any. */
  assertAllCompleted(): void {
    if (this.outstanding.size === 0) return;
    const names = [...this.outstanding].slice(0, 10).map(describeBio);
    throw new BioNeverCompletedError(
      `${this.outstanding.size} bio(s) were submitted and never completed: ${names.join('; ')}${this.outstanding.size > 10 ? '; ...' : ''}`,
    );
  }
}

let tracker: BioTracker | null = null;

/**
 * Turns bio debug mode on: every submission and completion is counted, a double completion
 * reports where the first one happened, and `assertAllCompleted()` finds bios never
 * completed. Costs a Set insert per bio (and a stack trace per completion with
 * `captureStacks`): for tests and the harness, not production. Returns the tracker.
 */
export function enableBioDebug(options: { captureStacks?: boolean } = {}): BioTracker {
  tracker = new BioTracker(options.captureStacks ?? true);
  return tracker;
}

/** Turns bio debug mode off. */
export function disableBioDebug(): void {
  tracker = null;
}

/** The active tracker, or null when debug mode is off. */
export function bioDebugTracker(): BioTracker | null {
  return tracker;
}
