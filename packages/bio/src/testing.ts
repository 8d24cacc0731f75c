import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allocIoBuffer } from './aligned.js';
import type { BackendCapabilities, BlockBackend } from './backend.js';
import { BioVec, copyFromBioVecs, describeBio, SECTOR_SIZE, type Bio, type CompletionSink } from './bio.js';
import type { BlockDev, Disk } from './device.js';
import { DeviceOfflineError, InvalidArgumentError } from './errors.js';
import { blkdevWrite } from './io.js';
import { ReqFlag, ReqOp } from './op.js';
import { BlkStatus } from './status.js';

/**
 * The byte at `offset` of a {@link PatternBackend}: each aligned 8-byte word holds its own
 * byte offset, big-endian (nbdkit's `pattern` plugin), so any misplaced read is visible.
 */
export function patternByte(offset: number): number {
  const word = offset - (offset % 8);
  const shift = 7 - (offset % 8);
  return Math.floor(word / 2 ** (8 * shift)) % 256;
}

/** Fills `buf` with the pattern as it would be read at device byte `offset`. */
export function fillPattern(buf: Uint8Array, offset: number): void {
  for (let i = 0; i < buf.length; i++) buf[i] = patternByte(offset + i);
}

const PATTERN_CAPS: BackendCapabilities = Object.freeze({ writeCache: false, discard: false, writeZeroes: false });

/**
 * A read-only backend of any size whose data is a pattern computed from the offset
 * ({@link patternByte}); holds no memory. For tests and benchmarks of read paths.
 */
export class PatternBackend implements BlockBackend {
  readonly description: string;
  readonly sizeBytes: number;
  readonly readOnly = true;
  readonly minIoSize = SECTOR_SIZE;
  readonly capabilities = PATTERN_CAPS;

  constructor(sizeBytes: number) {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes % SECTOR_SIZE !== 0) {
      throw new InvalidArgumentError(`pattern backend size ${sizeBytes} must be a positive multiple of 512`);
    }
    this.sizeBytes = sizeBytes;
    this.description = `pattern (${sizeBytes} bytes)`;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op !== ReqOp.READ) {
      sink.complete(bio, BlkStatus.NOTSUPP);
      return;
    }
    let pos = bio.sector * SECTOR_SIZE;
    for (const v of bio.vecs) {
      fillPattern(v.buffer.subarray(v.offset, v.offset + v.length), pos);
      pos += v.length;
    }
    sink.complete(bio, BlkStatus.OK);
  }

  async close(): Promise<void> {}
}

/** When a {@link FaultBackend} rule applies and what it does. */
export interface FaultRule {
  /** Only bios of this op (default: any). */
  readonly op?: ReqOp;
  /** Only bios overlapping these 512-byte sectors, `[first, end)` (default: any). */
  readonly sectors?: readonly [number, number];
  /** Complete with this status instead of doing the I/O (default: do the I/O). */
  readonly status?: BlkStatus;
  /** Apply to this many matching bios, then retire (default: forever). */
  readonly times?: number;
  /** Apply with this probability, 0..1 (default 1), drawn from the backend's seeded generator. */
  readonly probability?: number;
  /** Complete this many milliseconds later, from a timer (0: on the next macrotask). */
  readonly delayMs?: number;
  /**
   * For WRITE with `status`: write the first half of the bio before failing, as a device that
   * dies mid-request may (a torn write).
   */
  readonly torn?: boolean;
}

interface ActiveRule extends FaultRule {
  left: number;
}

/**
 * A backend that passes every bio to `inner` and answers every property from it: the base of
 * test doubles that change a few things about a backend (when it completes, what fails) and
 * leave the rest alone. Subclasses override `queueBio` and call `super.queueBio` (or
 * `this.inner.queueBio`) to pass a bio on.
 */
export class PassThroughBackend implements BlockBackend {
  readonly inner: BlockBackend;
  readonly description: string;

  /** `name` prefixes the inner backend's description: `name(memory (4096 bytes))`. */
  constructor(inner: BlockBackend, name = 'pass-through') {
    this.inner = inner;
    this.description = `${name}(${inner.description})`;
  }

  get sizeBytes(): number {
    return this.inner.sizeBytes;
  }
  get readOnly(): boolean {
    return this.inner.readOnly;
  }
  get minIoSize(): number {
    return this.inner.minIoSize;
  }
  get capabilities(): BackendCapabilities {
    return this.inner.capabilities;
  }

  queueBio(bio: Bio, sink: CompletionSink): void {
    this.inner.queueBio(bio, sink);
  }

  close(): Promise<void> {
    return this.inner.close();
  }
}

/** Options of {@link FaultBackend}. */
export interface FaultBackendOptions {
  /** Seed of the generator that draws rule probabilities (default fixed): replay a run by its seed. */
  readonly seed?: number;
  /** Rules, in order ({@link FaultBackend.addRule}). */
  readonly rules?: readonly FaultRule[];
  /**
   * Emulate a volatile write cache that a power cut empties ({@link FaultBackend.powerCut}):
   * the backend then reports `writeCache: true`, so FLUSH, PREFLUSH and FUA reach it, and it
   * keeps a copy of every completed write until the cut. For tests of modest size.
   */
  readonly powerCut?: boolean;
}

/** A write as the power-cut log keeps it: its data (null for zeros) and its completion order. */
interface LoggedWrite {
  readonly seq: number;
  readonly offset: number;
  readonly data: Buffer | null;
  readonly size: number;
  readonly fua: boolean;
}

/**
 * What survives a power cut: a write survives when it completed with FUA, or when a FLUSH (or a
 * bio with PREFLUSH) that was issued after it completed, completed OK. A flush covers only the
 * writes completed before it was issued (the kernel's rule, and the one file systems rely on):
 * a write that completes while a flush is in flight is not covered by it.
 */
class PowerCutLog {
  on = true;
  /** Completed writes, in completion order. */
  readonly writes: LoggedWrite[] = [];
  /** Writes with `seq` below this were covered by a completed flush. */
  flushedBelow = 0;

  /** The mark of a bio issued now: the writes completed so far. */
  mark(): number {
    return this.writes.length;
  }

  completed(bio: Bio, op: ReqOp, flags: number, mark: number): void {
    if (op === ReqOp.FLUSH || (flags & ReqFlag.PREFLUSH) !== 0) this.flushedBelow = Math.max(this.flushedBelow, mark);
    if (op !== ReqOp.WRITE && op !== ReqOp.DISCARD && op !== ReqOp.WRITE_ZEROES) return;
    let data: Buffer | null = null;
    if (op === ReqOp.WRITE) {
      data = Buffer.alloc(bio.size);
      copyFromBioVecs(bio.vecs, 0, data, 0, bio.size);
    }
    // A discarded range reads as zeros on our backends: after the cut it holds zeros or, if the
    // discard was lost, the old data, like a write of zeros.
    this.writes.push({ seq: this.writes.length, offset: bio.sector * SECTOR_SIZE, data, size: bio.size, fua: (flags & ReqFlag.FUA) !== 0 });
  }

  durable(w: LoggedWrite): boolean {
    return w.fua || w.seq < this.flushedBelow;
  }
}

/**
 * Wraps a backend and injects faults: error statuses, delays (asynchronous completion), torn
 * writes, on chosen ops and sectors, deterministically from a seed; and with `powerCut`, the
 * loss of every write not yet made durable when the power goes. Every bio still completes
 * exactly once. For tests and the harness.
 */
export class FaultBackend extends PassThroughBackend {
  /** Bios that completed with an injected status. */
  injected = 0;
  /** Bios completed later than the inner backend did. */
  delayed = 0;
  private rules: ActiveRule[] = [];
  private seed: number;
  private readonly power: PowerCutLog | null;
  private readonly powerCaps: BackendCapabilities | null;

  constructor(inner: BlockBackend, options: FaultBackendOptions = {}) {
    super(inner, 'fault');
    this.seed = (options.seed ?? 0x9e3779b9) >>> 0 || 1;
    this.power = options.powerCut === true ? new PowerCutLog() : null;
    this.powerCaps = options.powerCut === true ? Object.freeze({ ...inner.capabilities, writeCache: true }) : null;
    for (const r of options.rules ?? []) this.addRule(r);
  }

  override get capabilities(): BackendCapabilities {
    return this.powerCaps ?? this.inner.capabilities;
  }

  /**
   * Cuts the power (needs `powerCut: true`): returns the content the device holds when it comes
   * back, `base` (the content when this backend was made, default all zeros as on a fresh
   * memory backend or sparse file) with every durable write applied in completion order, and
   * none of the others. From then on every bio, including those still in flight, completes
   * with OFFLINE: an acknowledgement that never arrived.
   */
  powerCut(base?: Uint8Array): Buffer {
    const power = this.power;
    if (power === null) throw new InvalidArgumentError(`${this.description} was made without powerCut: true: it cannot cut the power`);
    if (base !== undefined && base.length !== this.sizeBytes) {
      throw new InvalidArgumentError(`power-cut base of ${base.length} bytes does not match ${this.description} (${this.sizeBytes} bytes)`);
    }
    power.on = false;
    const image = base === undefined ? Buffer.alloc(this.sizeBytes) : Buffer.from(base);
    for (const w of power.writes) {
      if (!power.durable(w)) continue;
      if (w.data === null) image.fill(0, w.offset, w.offset + w.size);
      else w.data.copy(image, w.offset);
    }
    return image;
  }

  /** With `powerCut`: completed writes that a power cut now would lose. */
  get volatileWrites(): number {
    const power = this.power;
    if (power === null) return 0;
    let n = 0;
    for (const w of power.writes) if (!power.durable(w)) n++;
    return n;
  }

  /** Adds a rule; the first rule that matches a bio decides what happens to it. */
  addRule(rule: FaultRule): void {
    const p = rule.probability ?? 1;
    if (!(p >= 0 && p <= 1)) throw new InvalidArgumentError(`fault probability ${p} must be between 0 and 1`);
    this.rules.push({ ...rule, left: rule.times ?? Infinity });
  }

  /** Removes every rule: the backend passes everything through again. */
  clearRules(): void {
    this.rules = [];
  }

  override queueBio(bio: Bio, to: CompletionSink): void {
    let sink = to;
    const power = this.power;
    if (power !== null) {
      if (!power.on) {
        offline(bio, to, this.description);
        return;
      }
      const op = bio.op;
      const flags = bio.flags;
      const mark = power.mark();
      sink = {
        complete: (b, status) => {
          if (!power.on) {
            offline(b, to, this.description);
            return;
          }
          if (status === BlkStatus.OK) power.completed(b, op, flags, mark);
          to.complete(b, status);
        },
      };
    }
    const rule = this.match(bio);
    if (rule === null) {
      this.toInner(bio, sink);
      return;
    }
    if (rule.status !== undefined) {
      this.injected++;
      const status = rule.status;
      if (rule.torn === true && bio.op === ReqOp.WRITE && bio.size >= 2 * SECTOR_SIZE) {
        this.tornWrite(bio, sink, status, rule.delayMs);
        return;
      }
      this.later(rule.delayMs, () => sink.complete(bio, status));
      return;
    }
    if (rule.delayMs !== undefined) {
      this.delayed++;
      const relay: CompletionSink = { complete: (b, s) => this.later(rule.delayMs, () => sink.complete(b, s)) };
      this.toInner(bio, relay);
      return;
    }
    this.toInner(bio, sink);
  }

  private toInner(bio: Bio, sink: CompletionSink): void {
    if (bio.op === ReqOp.FLUSH && this.power !== null && !this.inner.capabilities.writeCache) {
      // The inner backend has no cache of its own (it may not even know FLUSH): the cache is ours.
      sink.complete(bio, BlkStatus.OK);
      return;
    }
    this.inner.queueBio(bio, sink);
  }

  private tornWrite(bio: Bio, sink: CompletionSink, status: BlkStatus, delayMs: number | undefined): void {
    // Write whole sectors of the first half through a private bio-like view, then fail.
    const half = Math.floor(bio.size / 2 / SECTOR_SIZE) * SECTOR_SIZE;
    const saved = { size: bio.size, vecs: bio.vecs };
    const vecs: BioVec[] = [];
    let left = half;
    for (const v of bio.vecs) {
      if (left === 0) break;
      const n = Math.min(left, v.length);
      vecs.push(new BioVec(v.buffer, v.offset, n));
      left -= n;
    }
    bio.size = half;
    bio.vecs = vecs;
    this.inner.queueBio(bio, {
      complete: (b) => {
        b.size = saved.size;
        b.vecs = saved.vecs;
        this.later(delayMs, () => sink.complete(b, status));
      },
    });
  }

  private later(delayMs: number | undefined, fn: () => void): void {
    if (delayMs === undefined) fn();
    else if (delayMs === 0) setImmediate(fn);
    else setTimeout(fn, delayMs);
  }

  private match(bio: Bio): ActiveRule | null {
    for (const r of this.rules) {
      if (r.left <= 0) continue;
      if (r.op !== undefined && r.op !== bio.op) continue;
      if (r.sectors !== undefined) {
        const end = bio.sector + Math.max(1, bio.size / SECTOR_SIZE);
        if (end <= r.sectors[0] || bio.sector >= r.sectors[1]) continue;
      }
      if (r.probability !== undefined && r.probability < 1 && this.random() >= r.probability) continue;
      r.left--;
      return r;
    }
    return null;
  }

  // xorshift32: deterministic for a seed, so a failing run can be replayed.
  private random(): number {
    let x = this.seed;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.seed = x >>> 0;
    return this.seed / 0x1_0000_0000;
  }
}

function offline(bio: Bio, sink: CompletionSink, description: string): void {
  if (bio.error === null) bio.error = new DeviceOfflineError(`${describeBio(bio)} lost: the power of ${description} was cut`);
  sink.complete(bio, BlkStatus.OFFLINE);
}

/** A primary partition of {@link buildMbr}: first sector and length in 512-byte sectors. */
export interface MbrPartitionSpec {
  readonly start: number;
  readonly sectors: number;
  /** The partition type byte (default 0x83, Linux). */
  readonly type?: number;
  /** Set the boot indicator (0x80). */
  readonly bootable?: boolean;
}

/**
 * A 512-byte MBR sector with up to four primary partitions (CHS fields left zero, as
 * util-linux does past 8 GiB) and the 0x55AA signature: what tests write to sector 0 of a disk
 * to give it partitions. `[start, sectors]` pairs are accepted for brevity. Throws
 * InvalidArgumentError for more than four partitions or fields that do not fit in 32 bits.
 */
export function buildMbr(partitions: ReadonlyArray<MbrPartitionSpec | readonly [number, number]>, options: { readonly diskSignature?: number } = {}): Buffer {
  if (partitions.length > 4) throw new InvalidArgumentError(`an MBR holds 4 primary partitions, not ${partitions.length}`);
  const mbr = Buffer.alloc(SECTOR_SIZE);
  if (options.diskSignature !== undefined) mbr.writeUInt32LE(options.diskSignature >>> 0, 440);
  partitions.forEach((p, i) => {
    const spec: MbrPartitionSpec = Array.isArray(p) ? { start: p[0] as number, sectors: p[1] as number } : (p as MbrPartitionSpec);
    for (const v of [spec.start, spec.sectors]) {
      if (!Number.isInteger(v) || v < 0 || v > 0xffffffff) throw new InvalidArgumentError(`MBR partition ${i + 1}: ${v} is not a 32-bit sector number`);
    }
    const e = 446 + 16 * i;
    mbr[e] = spec.bootable === true ? 0x80 : 0;
    mbr[e + 4] = spec.type ?? 0x83;
    mbr.writeUInt32LE(spec.start, e + 8);
    mbr.writeUInt32LE(spec.sectors, e + 12);
  });
  mbr[510] = 0x55;
  mbr[511] = 0xaa;
  return mbr;
}

/**
 * Writes {@link buildMbr}'s sector to sector 0 of `disk` and rescans, so the disk gets its
 * `p1`, `p2`, ... devices as a user's would. Returns the partitions found.
 */
export async function writeMbr(disk: Disk, partitions: ReadonlyArray<MbrPartitionSpec | readonly [number, number]>): Promise<readonly BlockDev[]> {
  await blkdevWrite(disk.part0, 0, buildMbr(partitions));
  await disk.rescanPartitions();
  return disk.partitions;
}

/**
 * The first of `candidates` (directories, created if missing) where a file opened with O_DIRECT
 * can be read, or null: some filesystems refuse O_DIRECT (tmpfs before Linux 6.6), so a test
 * of it needs one that takes it. Probes synchronously with a 4 KiB file it removes, and removes
 * a candidate it created that stays empty (never the system temp dir). For
 * `it.skipIf(dir === null)`.
 */
export function findDirectIoDir(candidates: readonly string[]): string | null {
  const oDirect = fs.constants.O_DIRECT as number | undefined;
  if (oDirect === undefined) return null;
  for (const dir of candidates) {
    const probe = path.join(dir, `.odirect-probe-${process.pid}`);
    let fd = -1;
    try {
      fs.mkdirSync(dir, { recursive: true });
      fs.writeFileSync(probe, Buffer.alloc(4096));
      fd = fs.openSync(probe, fs.constants.O_RDONLY | oDirect);
      if (fs.readSync(fd, allocIoBuffer(4096), 0, 4096, 0) === 4096) return dir;
    } catch {
      // Not here: try the next one.
    } finally {
      if (fd >= 0) fs.closeSync(fd);
      try {
        fs.rmSync(probe, { force: true });
      } catch {
        // the candidate is not a directory at all
      }
    }
    try {
      if (path.resolve(dir) !== path.resolve(os.tmpdir()) && fs.readdirSync(dir).length === 0) fs.rmdirSync(dir);
    } catch {
      // best effort
    }
  }
  return null;
}

/** A filesystem on a loop device, mounted by {@link mountLoopFs}. */
export interface LoopFs {
  /** Where it is mounted. */
  readonly mnt: string;
  /** Unmounts it (the loop device goes with it). */
  unmount(): void;
}

/**
 * Makes a `type` filesystem (`mkfs.<type>`) in a sparse image of `sizeBytes` under `dir` and
 * mounts it with `mount -o loop` at `dir/mnt`: for tests and benchmarks of what one
 * filesystem does and another does not (XFS takes buffered RWF_NOWAIT writes, ext4 refuses
 * them). Needs root, the mkfs tool and a loop device; `{ why }` says which was missing.
 */
export function mountLoopFs(dir: string, type: string, sizeBytes: number): LoopFs | { readonly why: string } {
  if (process.getuid?.() !== 0) return { why: 'mounting a loop device needs root' };
  const image = path.join(dir, `${type}.img`);
  const mnt = path.join(dir, 'mnt');
  try {
    fs.mkdirSync(mnt, { recursive: true });
    fs.writeFileSync(image, '');
    fs.truncateSync(image, sizeBytes);
    execFileSync(`mkfs.${type}`, type === 'xfs' ? ['-q', '-f', image] : ['-q', '-F', image], { stdio: 'pipe' });
    execFileSync('mount', ['-o', 'loop', image, mnt], { stdio: 'pipe' });
  } catch (err) {
    return { why: `no ${type} on a loop device here: ${(err as Error).message.split('\n')[0] ?? ''}` };
  }
  return { mnt, unmount: () => execFileSync('umount', [mnt], { stdio: 'pipe' }) };
}

