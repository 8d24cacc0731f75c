import type { BackendCapabilities, BlockBackend } from './backend.js';
import { BioVec, SECTOR_SIZE, type Bio, type CompletionSink } from './bio.js';
import { InvalidArgumentError } from './errors.js';
import { ReqOp } from './op.js';
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
 * Wraps a backend and injects faults: error statuses, delays (asynchronous completion), torn
 * writes, on chosen ops and sectors, deterministically from a seed. Every bio still completes
 * exactly once. For tests and the harness.
 */
export class FaultBackend implements BlockBackend {
  readonly inner: BlockBackend;
  readonly description: string;
  /** Bios that completed with an injected status. */
  injected = 0;
  /** Bios completed later than the inner backend did. */
  delayed = 0;
  private rules: ActiveRule[] = [];
  private seed: number;

  constructor(inner: BlockBackend, options: { seed?: number; rules?: readonly FaultRule[] } = {}) {
    this.inner = inner;
    this.description = `fault(${inner.description})`;
    this.seed = (options.seed ?? 0x9e3779b9) >>> 0 || 1;
    for (const r of options.rules ?? []) this.addRule(r);
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

  queueBio(bio: Bio, sink: CompletionSink): void {
    const rule = this.match(bio);
    if (rule === null) {
      this.inner.queueBio(bio, sink);
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
      this.inner.queueBio(bio, relay);
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

  close(): Promise<void> {
    return this.inner.close();
  }
}
