import path from 'node:path';
import zlib from 'node:zlib';
import type { CbtMapState } from './map-state.js';
import type { CbtStateHandle, CbtStateIo } from './state-io.js';
import { CbtGenerationReason } from './types.js';

// The journal: the marks made since the checkpoint (the state file), so that a crash loses none.
// Layout, little-endian:
//   header, one 512-byte sector: magic 'BFCBTJNL' (8), version u32, epoch u32, CRC32 at 508
//   then frames, each starting on a 512-byte boundary, one per group commit:
//     magic 'BFJF' u32, sequence u32 (1, 2, 3 ...), payload length u32, CRC32 u32 (of the
//     frame with this field zero), payload: records; zero padding to the next boundary.
// A frame is written with one write and synced before the next is written, so after a power cut
// only the last frame can be torn; a bad frame followed by a good later one is damage.
const HEADER_MAGIC = Buffer.from('BFCBTJNL', 'latin1');
const JOURNAL_VERSION = 1;
/** Bytes of the journal header; frames start here. */
export const JOURNAL_HEADER_SIZE = 512;
const FRAME_MAGIC = 0x464a4642; // 'BFJF'
const FRAME_HEADER = 16;
const ALIGN = 512;
/**
 * The journal is allocated this much at a time (zeros, which never parse as a frame): a sync
 * after a write inside the file's allocated size need not journal a new size or new blocks,
 * which costs about a third more on ext4 here.
 */
const PREALLOCATE = 1024 * 1024;

/** Record kinds. */
const REC_MARK = 1;
const REC_MARK_BOTH = 2;
const REC_TAKE = 3;
const REC_NEWGEN = 4;

const REASONS: readonly CbtGenerationReason[] = Object.values(CbtGenerationReason);

function uuidBytes(uuid: string): Buffer {
  return Buffer.from(uuid.replace(/-/g, ''), 'hex');
}

function bytesUuid(buf: Buffer, offset: number): string {
  const h = buf.toString('hex', offset, offset + 16);
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

/** Blocks `[first, end)` changed in changes number `value`. 12 bytes. */
export function markRecord(first: number, end: number, value: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt8(REC_MARK, 0);
  b.writeUInt8(value, 1);
  b.writeUInt16LE(0, 2);
  b.writeUInt32LE(first, 4);
  b.writeUInt32LE(end, 8);
  return b;
}

/** Blocks `[first, end)` marked in the active and the read map (`markBoth`). 12 bytes. */
export function markBothRecord(first: number, end: number): Buffer {
  const b = markRecord(first, end, 0);
  b.writeUInt8(REC_MARK_BOTH, 0);
  return b;
}

/** A snapshot take; `overflowId` is the generation id drawn if the take overflows. */
export function takeRecord(snapshotId: string | null, overflowId: string): Buffer {
  const id = Buffer.from(snapshotId ?? '', 'utf8').subarray(0, 255);
  const b = Buffer.alloc(20 + id.length);
  b.writeUInt8(REC_TAKE, 0);
  b.writeUInt8(snapshotId === null ? 0 : 1, 1);
  b.writeUInt8(id.length, 2);
  uuidBytes(overflowId).copy(b, 4);
  id.copy(b, 20);
  return b;
}

/** A new generation: its reason, id and geometry. */
export function newGenerationRecord(reason: CbtGenerationReason, generationId: string, blockSize: number, blockCount: number, capacity: number): Buffer {
  const b = Buffer.alloc(36);
  b.writeUInt8(REC_NEWGEN, 0);
  b.writeUInt8(Math.max(0, REASONS.indexOf(reason)), 1);
  b.writeUInt32LE(blockSize, 4);
  b.writeUInt32LE(blockCount, 8);
  b.writeBigUInt64LE(BigInt(capacity), 12);
  uuidBytes(generationId).copy(b, 20);
  return b;
}

/** The journal header for `epoch` (the checkpoint it continues). */
export function journalHeader(epoch: number): Buffer {
  const h = Buffer.alloc(JOURNAL_HEADER_SIZE);
  HEADER_MAGIC.copy(h, 0);
  h.writeUInt32LE(JOURNAL_VERSION, 8);
  h.writeUInt32LE(epoch, 12);
  h.writeUInt32LE(zlib.crc32(h.subarray(0, JOURNAL_HEADER_SIZE - 4)), JOURNAL_HEADER_SIZE - 4);
  return h;
}

/** One frame holding `records`, padded to the sector boundary. */
export function encodeFrame(seq: number, records: readonly Buffer[]): Buffer {
  let len = 0;
  for (const r of records) len += r.length;
  const total = Math.ceil((FRAME_HEADER + len) / ALIGN) * ALIGN;
  const f = Buffer.alloc(total);
  f.writeUInt32LE(FRAME_MAGIC, 0);
  f.writeUInt32LE(seq, 4);
  f.writeUInt32LE(len, 8);
  let pos = FRAME_HEADER;
  for (const r of records) {
    r.copy(f, pos);
    pos += r.length;
  }
  f.writeUInt32LE(zlib.crc32(f.subarray(0, FRAME_HEADER + len)), 12);
  return f;
}

/** What replaying a journal found. */
export type ReplayResult =
  | { readonly kind: 'replayed'; readonly frames: number; readonly records: number; readonly end: number }
  | { readonly kind: 'stale' }
  | { readonly kind: 'damaged'; readonly detail: string };

interface Frame {
  readonly seq: number;
  readonly payload: Buffer;
}

function frameAt(buf: Buffer, pos: number): Frame | null {
  if (pos + FRAME_HEADER > buf.length || buf.readUInt32LE(pos) !== FRAME_MAGIC) return null;
  const len = buf.readUInt32LE(pos + 8);
  if (pos + FRAME_HEADER + len > buf.length) return null;
  const copy = Buffer.from(buf.subarray(pos, pos + FRAME_HEADER + len));
  const crc = copy.readUInt32LE(12);
  copy.writeUInt32LE(0, 12);
  if (zlib.crc32(copy) !== crc) return null;
  return { seq: buf.readUInt32LE(pos + 4), payload: buf.subarray(pos + FRAME_HEADER, pos + FRAME_HEADER + len) };
}

/**
 * Applies the journal `buf` to `state` (loaded from the checkpoint of `epoch`). A journal of an
 * older epoch is stale (its marks are in the checkpoint); a torn last frame is ignored (its
 * writes never went down: they wait for the frame's sync); anything else wrong is damage.
 */
export function replayJournal(buf: Buffer, epoch: number, state: CbtMapState): ReplayResult {
  if (buf.length < JOURNAL_HEADER_SIZE || !buf.subarray(0, 8).equals(HEADER_MAGIC)) {
    return { kind: 'damaged', detail: `the journal has no valid header (${buf.length} bytes)` };
  }
  if (buf.readUInt32LE(JOURNAL_HEADER_SIZE - 4) !== zlib.crc32(buf.subarray(0, JOURNAL_HEADER_SIZE - 4))) {
    return { kind: 'damaged', detail: 'the journal header fails its CRC32' };
  }
  if (buf.readUInt32LE(8) !== JOURNAL_VERSION) return { kind: 'damaged', detail: `journal format version ${buf.readUInt32LE(8)}, expected ${JOURNAL_VERSION}` };
  const jEpoch = buf.readUInt32LE(12);
  if (jEpoch < epoch) return { kind: 'stale' };
  if (jEpoch > epoch) return { kind: 'damaged', detail: `the journal continues checkpoint ${jEpoch}, but the state file is checkpoint ${epoch}` };
  let pos = JOURNAL_HEADER_SIZE;
  let seq = 0;
  let records = 0;
  for (;;) {
    const frame = frameAt(buf, pos);
    if (frame === null || frame.seq !== seq + 1) break;
    const problem = applyRecords(frame.payload, state);
    if (problem !== null) return { kind: 'damaged', detail: `journal frame ${frame.seq} at byte ${pos}: ${problem}` };
    records += countRecords(frame.payload);
    seq = frame.seq;
    pos += Math.ceil((FRAME_HEADER + frame.payload.length) / ALIGN) * ALIGN;
  }
  // Whatever follows the last good frame must be the torn tail of the next one, nothing later.
  for (let p = pos + ALIGN; p + FRAME_HEADER <= buf.length; p += ALIGN) {
    const later = frameAt(buf, p);
    if (later !== null && later.seq > seq + 1) {
      return { kind: 'damaged', detail: `journal frame ${seq + 1} at byte ${pos} is unreadable but frame ${later.seq} at byte ${p} follows it` };
    }
  }
  return { kind: 'replayed', frames: seq, records, end: pos };
}

function countRecords(payload: Buffer): number {
  let n = 0;
  for (let p = 0; p < payload.length; p += recordLength(payload, p)) n++;
  return n;
}

function recordLength(payload: Buffer, p: number): number {
  const kind = payload.readUInt8(p);
  if (kind === REC_MARK || kind === REC_MARK_BOTH) return 12;
  if (kind === REC_TAKE) return 20 + payload.readUInt8(p + 2);
  if (kind === REC_NEWGEN) return 36;
  return payload.length; // unknown: caught by applyRecords
}

/** Applies one frame's records; null when all were valid, else what is wrong. */
function applyRecords(payload: Buffer, s: CbtMapState): string | null {
  let p = 0;
  while (p < payload.length) {
    const kind = payload.readUInt8(p);
    const len = kind === REC_MARK || kind === REC_MARK_BOTH ? 12 : kind === REC_TAKE ? (p + 3 <= payload.length ? 20 + payload.readUInt8(p + 2) : 0) : kind === REC_NEWGEN ? 36 : 0;
    if (len === 0 || p + len > payload.length) return `a record of kind ${kind} at ${p} does not fit`;
    if (kind === REC_MARK || kind === REC_MARK_BOTH) {
      const value = payload.readUInt8(p + 1);
      const first = payload.readUInt32LE(p + 4);
      const end = payload.readUInt32LE(p + 8);
      if (first >= end || end > s.blockCount) return `a mark of blocks ${first}..${end} outside the ${s.blockCount} blocks`;
      if (kind === REC_MARK_BOTH) s.markBoth(first, end);
      else if (value !== s.active) return `a mark with changes number ${value} while ${s.active} is active`;
      else s.markBlocks(first, end, value);
    } else if (kind === REC_TAKE) {
      const hasId = payload.readUInt8(p + 1) === 1;
      const idLen = payload.readUInt8(p + 2);
      const snapshotId = hasId ? payload.toString('utf8', p + 20, p + 20 + idLen) : null;
      s.take(snapshotId, bytesUuid(payload, p + 4));
    } else {
      const reason = REASONS[payload.readUInt8(p + 1)] ?? CbtGenerationReason.RESET;
      const blockSize = payload.readUInt32LE(p + 4);
      const blockCount = payload.readUInt32LE(p + 8);
      const capacity = Number(payload.readBigUInt64LE(p + 12));
      if (blockSize < 512 || blockCount < 1) return `a new generation with ${blockCount} blocks of ${blockSize} bytes`;
      s.newGeneration(reason, bytesUuid(payload, p + 20), { blockSize, blockCount }, capacity);
    }
    p += len;
  }
  return null;
}

/** Told by the journal when a group commit ended. */
export interface JournalOwner {
  /** The frame with every record appended before it was cut is durable. */
  committed(batch: number): void;
  /** The journal could not be written or synced: the state on disk may now be behind. */
  failed(err: Error): void;
}

/**
 * The journal writer: records appended while no commit runs are written and synced at once;
 * records appended during a commit wait and go together in the next (group commit, as a
 * database's log does), so N first touches in flight cost about one sync.
 */
export class CbtJournal {
  readonly file: string;
  private readonly io: CbtStateIo;
  private readonly owner: JournalOwner;
  private handle: CbtStateHandle | null;
  private end: number;
  /** Bytes of the file written so far (frames, then zeros). */
  private allocated: number;
  private seq: number;
  private pending: Buffer[];
  private pendingBytes: number;
  /** Commits started so far; `committed(n)` says frame n is durable. */
  private batches: number;
  private committing: boolean;
  /** Appends queue but no commit starts (a checkpoint is replacing the journal). */
  private paused: boolean;
  private broken: Error | null;
  private idleWaiters: Array<(err: Error | null) => void>;

  private constructor(io: CbtStateIo, file: string, handle: CbtStateHandle, owner: JournalOwner, batchBase: number) {
    this.io = io;
    this.file = file;
    this.handle = handle;
    this.owner = owner;
    this.end = JOURNAL_HEADER_SIZE;
    this.allocated = PREALLOCATE;
    this.seq = 0;
    this.pending = [];
    this.pendingBytes = 0;
    this.batches = batchBase;
    this.committing = false;
    this.paused = false;
    this.broken = null;
    this.idleWaiters = [];
  }

  /**
   * Starts an empty journal for checkpoint `epoch`, durably (replacing any old one), and opens
   * it. Commit numbers continue from `batchBase` (the journal it replaces), so waiters can
   * compare them across a checkpoint.
   */
  static async create(io: CbtStateIo, file: string, epoch: number, owner: JournalOwner, batchBase = 0): Promise<CbtJournal> {
    const tmp = `${file}.new`;
    const h = await io.create(tmp);
    try {
      const first = Buffer.alloc(PREALLOCATE);
      journalHeader(epoch).copy(first, 0);
      await h.write(first, 0);
      await h.sync();
    } finally {
      await h.close();
    }
    await io.rename(tmp, file);
    await io.syncDir(path.dirname(file));
    return new CbtJournal(io, file, await io.openForWrite(file, { dsync: true }), owner, batchBase);
  }

  /** Commits started so far (the base for a journal that replaces this one). */
  get batchCount(): number {
    return this.batches;
  }

  /** Records waiting for a commit. */
  get pendingCount(): number {
    return this.pending.length;
  }

  /** True while a commit is being written or synced. */
  get busy(): boolean {
    return this.committing;
  }

  /** Stops starting commits; appends queue until {@link resume} or {@link takePending}. */
  pause(): void {
    this.paused = true;
  }

  /** Starts committing again (at once, if records wait). */
  resume(): void {
    this.paused = false;
    if (!this.committing && this.pending.length > 0) this.commit();
  }

  /** Removes and returns the records not yet written (to move them to a new journal). */
  takePending(): Buffer[] {
    const p = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    return p;
  }

  /** Bytes written so far (header included): when it grows past a bound, checkpoint. */
  get size(): number {
    return this.end + this.pendingBytes;
  }

  /** The number of the commit that will carry a record appended now. */
  get nextBatch(): number {
    return this.batches + 1;
  }

  /** Queues `record` for the next group commit, which starts now if none runs. */
  append(record: Buffer): void {
    if (this.broken !== null) return;
    this.pending.push(record);
    this.pendingBytes += record.length;
    if (!this.committing && !this.paused) this.commit();
  }

  /** Resolves when every record appended so far is durable; rejects if the journal broke. */
  idle(): Promise<void> {
    if (this.broken !== null) return Promise.reject(this.broken);
    if (!this.committing && (this.pending.length === 0 || this.paused)) return Promise.resolve();
    return new Promise((resolve, reject) => this.idleWaiters.push((err) => (err === null ? resolve() : reject(err))));
  }

  /** Closes the file after the commits in flight (the state on disk stays as it is). */
  async close(): Promise<void> {
    await this.idle().catch(() => {});
    const h = this.handle;
    this.handle = null;
    if (h !== null) await h.close().catch(() => {});
  }

  private commit(): void {
    const h = this.handle;
    if (h === null || this.pending.length === 0) return;
    this.committing = true;
    const records = this.pending;
    this.pending = [];
    this.pendingBytes = 0;
    let frame = encodeFrame(++this.seq, records);
    const batch = ++this.batches;
    const at = this.end;
    this.end += frame.length;
    if (this.end > this.allocated) {
      // Past the allocated size: the frame and the next stretch of zeros in one write.
      const grown = Buffer.alloc(frame.length + PREALLOCATE);
      frame.copy(grown, 0);
      frame = grown;
      this.allocated = at + grown.length;
    }
    h.writeDurable(frame, at).then(
        () => this.done(batch, null),
        (err: unknown) => this.done(batch, err instanceof Error ? err : new Error(String(err))),
      );
  }

  private done(batch: number, err: Error | null): void {
    if (err !== null) {
      this.committing = false;
      this.broken = err;
      this.pending = [];
      this.owner.failed(err);
      for (const w of this.idleWaiters.splice(0)) w(err);
      return;
    }
    // Still "committing" while the owner runs: what it appends waits for the next commit.
    this.owner.committed(batch);
    this.committing = false;
    if (this.pending.length > 0 && !this.paused) {
      this.commit();
      return;
    }
    for (const w of this.idleWaiters.splice(0)) w(null);
  }
}
