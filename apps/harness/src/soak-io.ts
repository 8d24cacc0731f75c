// One random bio against a region a worker owns, checked against the model when it completes.
import { Bio, BioVec, BLK_QC_T_NONE, BlkStatus, blkdevRead, blkStatusName, opName, ReqFlag, ReqOp, SECTOR_SIZE, type BlockDev } from '@blkfilter/bio';
import type { StepContext } from './soak-context.js';
import { randomExtent, statusName, type Model, type Rng } from './soak-util.js';

/** A range of a device that one worker owns, and where it lies in the model. */
export interface Region {
  readonly dev: BlockDev;
  /** Byte offset in the model of the device's byte 0 (partition start, linear offset, ...). */
  readonly modelBase: number;
  /** First byte of the region on the device. */
  readonly start: number;
  readonly bytes: number;
}

/** How a worker builds bios and what it accepts back. */
export interface IoPolicy {
  /** Largest bio in bytes. */
  readonly maxBytes: number;
  /** Alignment of offsets and sizes (the logical block size, or coarser). */
  readonly align?: number;
  /** Add random FUA, PREFLUSH, SYNC, POLLED and NOWAIT flags. */
  readonly flags: boolean;
  /** Ops and their weights (default: a mix of all five). */
  readonly ops?: ReadonlyArray<readonly [ReqOp, number]>;
  /**
   * What a failed bio means: `fail` (nothing may fail here, except AGAIN for NOWAIT, which
   * must have done nothing), or `forget` (injected faults: a failed write's range becomes
   * unknown, a failed read is not compared).
   */
  readonly onError: 'fail' | 'forget';
  /**
   * Told of every data-changing bio before it is submitted, in model bytes (CBT's view). May
   * return an undo, called when the bio was refused with AGAIN for NOWAIT: refused at a frozen
   * device's gate, it never reached a filter and changed nothing.
   */
  readonly onChange?: (modelOffset: number, length: number) => (() => void) | void;
  /** Submits the bio (default: `submitBio`). */
  readonly submit?: (bio: Bio) => void;
}

const DEFAULT_OPS: ReadonlyArray<readonly [ReqOp, number]> = [
  [ReqOp.READ, 36],
  [ReqOp.WRITE, 38],
  [ReqOp.DISCARD, 9],
  [ReqOp.WRITE_ZEROES, 9],
  [ReqOp.FLUSH, 8],
];

function pickOp(rng: Rng, ops: ReadonlyArray<readonly [ReqOp, number]>): ReqOp {
  let total = 0;
  for (const [, w] of ops) total += w;
  let r = rng.float() * total;
  for (const [op, w] of ops) {
    if ((r -= w) < 0) return op;
  }
  return (ops[ops.length - 1] as readonly [ReqOp, number])[0];
}

function randomFlags(rng: Rng, op: ReqOp): number {
  let flags = 0;
  if (rng.chance(0.15)) flags |= ReqFlag.NOWAIT;
  if (rng.chance(0.2)) flags |= ReqFlag.SYNC;
  if (op === ReqOp.READ || op === ReqOp.WRITE) {
    if (rng.chance(0.3)) flags |= ReqFlag.POLLED;
  }
  if (op === ReqOp.WRITE) {
    if (rng.chance(0.2)) flags |= ReqFlag.FUA;
    if (rng.chance(0.1)) flags |= ReqFlag.PREFLUSH;
  }
  return flags;
}

/** Splits `buf` into 1 to 3 segments at sector boundaries, so bios carry several vecs. */
function vecsOf(rng: Rng, buf: Buffer): BioVec[] {
  const sectors = buf.length / SECTOR_SIZE;
  if (sectors < 2 || rng.chance(0.6)) return [new BioVec(buf)];
  const cut = rng.range(1, sectors - 1) * SECTOR_SIZE;
  return [new BioVec(buf, 0, cut), new BioVec(buf, cut, buf.length - cut)];
}

/**
 * Runs one random bio on `region` and checks it: reads must equal the model's known bytes,
 * successful writes, discards and write-zeroes update the model. Throws a SoakFailure when
 * the bio fails where nothing may fail, or reads wrong data.
 */
export async function randomIo(ctx: StepContext, rng: Rng, region: Region, model: Model, policy: IoPolicy): Promise<void> {
  const op = pickOp(rng, policy.ops ?? DEFAULT_OPS);
  const flags = policy.flags ? randomFlags(rng, op) : 0;
  const align = policy.align ?? region.dev.disk.limits.logicalBlockSize;
  let bio: Bio;
  let data: Buffer | null = null;
  let offset = 0;
  let length = 0;
  let undo: (() => void) | void = undefined;
  if (op === ReqOp.FLUSH) {
    bio = new Bio(ReqOp.FLUSH, region.dev, 0, 0);
  } else {
    ({ offset, length } = randomExtent(rng, region.start, region.bytes, policy.maxBytes, align));
    if (op === ReqOp.WRITE) data = rng.bytes(length);
    else if (op === ReqOp.READ) data = Buffer.alloc(length, 0xee);
    bio = new Bio(op, region.dev, offset / SECTOR_SIZE, length, data === null ? [] : vecsOf(rng, data));
    if (op !== ReqOp.READ) undo = policy.onChange?.(region.modelBase + offset, length);
  }
  bio.flags = flags;
  await ctx.bio(bio, policy.submit);
  if ((flags & ReqFlag.POLLED) !== 0) ctx.count(bio.cookie !== BLK_QC_T_NONE ? 'polled:reaped' : 'polled:by-interrupt');
  const at = region.modelBase + offset;
  const where = () => `${opName(op)} of ${length} bytes at byte ${offset} of "${region.dev.name}"`;
  if (bio.status !== BlkStatus.OK) {
    ctx.count(`status:${blkStatusName(bio.status)}`);
    if (bio.status === BlkStatus.AGAIN && (flags & ReqFlag.NOWAIT) !== 0) {
      undo?.();
      if (policy.onError === 'fail') return; // did nothing
    }
    if (policy.onError === 'fail') ctx.check(false, () => `${where()} failed with ${statusName(bio)} where nothing may fail`);
    if (op !== ReqOp.READ && op !== ReqOp.FLUSH) model.forget(at, length);
    return;
  }
  switch (op) {
    case ReqOp.READ: {
      const diff = model.diff(at, data as Buffer);
      ctx.check(diff === null, () => `${where()} read wrong data: ${diff}`);
      return;
    }
    case ReqOp.WRITE:
      model.write(at, data as Buffer);
      return;
    case ReqOp.DISCARD:
    case ReqOp.WRITE_ZEROES:
      model.zero(at, length);
      return;
    default:
  }
}

/**
 * Reads `length` bytes at `offset` of `dev` (split to its limits) and checks them against the
 * model at `modelBase + offset`, in pieces of at most 1 MiB.
 */
export async function verifyRange(ctx: StepContext, dev: BlockDev, offset: number, length: number, model: Model, modelBase: number, what: string): Promise<void> {
  const piece = 1 << 20;
  for (let pos = offset; pos < offset + length; pos += piece) {
    const n = Math.min(piece, offset + length - pos);
    const got = await blkdevRead(dev, pos, n);
    const diff = model.diff(modelBase + pos, got);
    ctx.check(diff === null, () => `${what}: "${dev.name}" at byte ${pos}: ${diff}`);
  }
}
