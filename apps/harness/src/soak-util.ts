// Shared pieces of the soak: a seeded generator, the byte-array model devices are checked
// against, a bio runner with a completion deadline, and the gate that pauses writers.
import fs from 'node:fs';
import { setImmediate as tick } from 'node:timers/promises';
import { BLK_QC_T_NONE, bioPoll, blkStatusName, describeBio, ReqFlag, SECTOR_SIZE, type Bio } from '@blkfilter/bio';

/** An invariant the soak checks did not hold: the run fails with this message. */
export class SoakFailure extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'SoakFailure';
  }
}

/**
 * A seeded pseudo-random generator (xorshift32). Every random choice of the soak comes from one
 * of these, derived from the run's seed, so a printed seed replays the same decisions.
 */
export class Rng {
  private state: number;

  constructor(seed: number) {
    this.state = seed >>> 0 || 0x9e3779b9;
  }

  /** The next 32-bit unsigned integer. */
  u32(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state;
  }

  /** A float in [0, 1). */
  float(): number {
    return this.u32() / 0x1_0000_0000;
  }

  /** An integer in [0, n). */
  int(n: number): number {
    return Math.floor(this.float() * n);
  }

  /** An integer in [lo, hi] (both included). */
  range(lo: number, hi: number): number {
    return lo + this.int(hi - lo + 1);
  }

  /** True with probability `p`. */
  chance(p: number): boolean {
    return this.float() < p;
  }

  /** One element of a non-empty array. */
  pick<T>(items: readonly T[]): T {
    return items[this.int(items.length)] as T;
  }

  /** An independent generator for `label`, so adding draws in one place does not shift others. */
  fork(label: string | number): Rng {
    return new Rng(deriveSeed(this.u32(), String(label)));
  }

  /** `len` random bytes. */
  bytes(len: number): Buffer {
    const buf = Buffer.allocUnsafe(len);
    let i = 0;
    for (; i + 4 <= len; i += 4) buf.writeUInt32LE(this.u32(), i);
    for (; i < len; i++) buf[i] = this.u32() & 0xff;
    return buf;
  }
}

/** Mixes labels into a seed (FNV-1a over the seed and the labels): one seed per scenario step. */
export function deriveSeed(seed: number, ...labels: Array<string | number>): number {
  let h = 0x811c9dc5 ^ (seed >>> 0);
  for (const label of labels) {
    for (const ch of `/${String(label)}`) {
      h ^= ch.charCodeAt(0);
      h = Math.imul(h, 0x01000193) >>> 0;
    }
  }
  return h >>> 0 || 1;
}

/**
 * What a device should hold: its bytes and, per 512-byte sector, whether they are known. A write
 * that failed leaves its sectors unknown (a torn write may have landed in part) until a later
 * write, discard or write-zeroes makes them known again.
 */
export class Model {
  readonly bytes: Uint8Array;
  /** 1 per sector whose content is known. */
  readonly known: Uint8Array;

  constructor(sizeBytes: number, from?: Model) {
    this.bytes = from === undefined ? new Uint8Array(sizeBytes) : from.bytes.slice();
    this.known = from === undefined ? new Uint8Array(sizeBytes / SECTOR_SIZE).fill(1) : from.known.slice();
  }

  /** A copy frozen at this instant (a snapshot's view of the device). */
  copy(): Model {
    return new Model(this.bytes.length, this);
  }

  /** Size in bytes of the device the model stands for. */
  get sizeBytes(): number {
    return this.bytes.length;
  }

  /** A successful WRITE of `data` at byte `offset`. */
  write(offset: number, data: Uint8Array): void {
    this.bytes.set(data, offset);
    this.known.fill(1, offset / SECTOR_SIZE, (offset + data.length) / SECTOR_SIZE);
  }

  /** A successful DISCARD or WRITE_ZEROES (the memory backend reads both back as zeros). */
  zero(offset: number, length: number): void {
    this.bytes.fill(0, offset, offset + length);
    this.known.fill(1, offset / SECTOR_SIZE, (offset + length) / SECTOR_SIZE);
  }

  /** A failed change: the range may hold old data, new data or some of each. */
  forget(offset: number, length: number): void {
    this.known.fill(0, offset / SECTOR_SIZE, (offset + length) / SECTOR_SIZE);
  }

  /** Sectors of the whole model that are unknown. */
  unknownSectors(): number {
    let n = 0;
    for (let i = 0; i < this.known.length; i++) if (this.known[i] === 0) n++;
    return n;
  }

  /**
   * Compares `data`, read at byte `offset`, with the known sectors of the model. Returns null when
   * they match, else a description of the first sector that differs.
   */
  diff(offset: number, data: Uint8Array): string | null {
    for (let pos = 0; pos < data.length; pos += SECTOR_SIZE) {
      const at = offset + pos;
      if (this.known[at / SECTOR_SIZE] === 0) continue;
      const want = this.bytes.subarray(at, at + SECTOR_SIZE);
      const got = data.subarray(pos, pos + SECTOR_SIZE);
      if (!Buffer.from(want.buffer, want.byteOffset, want.length).equals(got)) {
        let b = 0;
        while (b < SECTOR_SIZE && want[b] === got[b]) b++;
        return `byte ${at + b} (sector ${at / SECTOR_SIZE}) reads 0x${hex(got[b])}, the model says 0x${hex(want[b])}`;
      }
    }
    return null;
  }
}

function hex(n: number | undefined): string {
  return (n ?? 0).toString(16).padStart(2, '0');
}

/** Options of {@link runBio}. */
export interface RunBioOptions {
  /** Fail when the bio has not completed by then. */
  readonly timeoutMs: number;
}

/**
 * Submits `bio` through `submit` and resolves with it once its end-io ran. A POLLED bio is reaped
 * with `bioPoll` while it has a cookie; once it has none (split, deferred, taken by a filter) it
 * must complete by interrupt, which is what this waits for then. Rejects with a
 * {@link SoakFailure} naming the bio when it never completes or completes twice.
 */
export async function runBio(bio: Bio, submit: (bio: Bio) => void, options: RunBioOptions): Promise<Bio> {
  let calls = 0;
  bio.endIo = () => {
    calls++;
  };
  const polled = (bio.flags & ReqFlag.POLLED) !== 0;
  submit(bio);
  const deadline = Date.now() + options.timeoutMs;
  let spins = 0;
  while (calls === 0) {
    if (polled && bio.cookie !== BLK_QC_T_NONE) bioPoll(bio);
    if (calls > 0) break;
    if (Date.now() > deadline) {
      throw new SoakFailure(
        `bio never completed: ${describeBio(bio)}${polled ? ` (POLLED, cookie ${bio.cookie})` : ''} still outstanding after ${options.timeoutMs} ms`,
      );
    }
    // Spin on the event loop first (completions usually come within a tick), then back off
    // to timers so a deferred completion does not cost a busy loop.
    if (spins++ < 64) await tick();
    else await sleep(1);
  }
  // bioEndio itself refuses a second completion (BioCompletedTwiceError, caught by the runner
  // as an uncaught error); this catches an end-io run twice by anything that bypassed it.
  if (calls !== 1) throw new SoakFailure(`bio completed ${calls} times: ${describeBio(bio)}`);
  return bio;
}

/** `OK`, `IOERR`, ... for messages. */
export function statusName(bio: Bio): string {
  return blkStatusName(bio.status) + (bio.error !== null ? ` (${bio.error.message})` : '');
}

/** Resolves after `ms` milliseconds. */
export function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Open file descriptors of this process (Linux); -1 where /proc is not there. */
export function fdCount(): number {
  try {
    return fs.readdirSync('/proc/self/fd').length;
  } catch {
    return -1;
  }
}

/**
 * Lets writers run until someone needs the devices still: `pause()` stops new operations and
 * resolves once every writer is between operations, `resume()` lets them go on. Used to know
 * the exact instant of a snapshot take.
 */
export class Gate {
  private active = 0;
  private paused: Promise<void> | null = null;
  private release: (() => void) | null = null;
  private idleWaiters: Array<() => void> = [];

  /** Waits while paused, then counts the caller as active until {@link Gate.leave}. */
  async enter(): Promise<void> {
    while (this.paused !== null) await this.paused;
    this.active++;
  }

  /** Ends the operation {@link Gate.enter} counted. */
  leave(): void {
    this.active--;
    if (this.active === 0) for (const w of this.idleWaiters.splice(0)) w();
  }

  /** Stops new operations and waits for those running. */
  async pause(): Promise<void> {
    if (this.paused === null) this.paused = new Promise((resolve) => (this.release = resolve));
    if (this.active > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
  }

  /** Lets operations start again after {@link Gate.pause}. */
  resume(): void {
    const r = this.release;
    this.paused = null;
    this.release = null;
    r?.();
  }
}

/** A random aligned I/O inside a region: `[offset, offset + length)` in bytes. */
export function randomExtent(rng: Rng, regionStart: number, regionBytes: number, maxBytes: number, align = SECTOR_SIZE): { offset: number; length: number } {
  const units = regionBytes / align;
  // Mostly small I/O, sometimes large: small ones interleave more, large ones cross chunks.
  const maxUnits = Math.max(1, Math.min(units, maxBytes / align));
  const n = rng.chance(0.8) ? rng.range(1, Math.min(maxUnits, 16)) : rng.range(1, maxUnits);
  const start = rng.int(units - n + 1);
  return { offset: regionStart + start * align, length: n * align };
}
