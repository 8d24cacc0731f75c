// Shared by the tests (not exported by the package).
import fs from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { blkdevWrite, createDiskSync, FileBackend, MemoryBackend, ReqOp, SECTOR_SIZE, type Bio, type BlockBackend, type CompletionSink, type Disk } from '@blkfilter/bio';
import { FaultBackend, PassThroughBackend } from '@blkfilter/bio/testing';
import { detachFilter, listFilters } from '@blkfilter/registry';
import type { Snapshot } from './snapshot.js';

let seq = 0;
const disks: Disk[] = [];
const snapshots: Snapshot[] = [];
const dirs: string[] = [];
const holds: HoldReadsBackend[] = [];

/** A device name no other test (or test file running in parallel) uses. */
export function uniqueName(prefix: string): string {
  return `${prefix}${process.pid}x${seq++}`;
}

/** Options of {@link memDisk}. */
export interface TestDiskOptions {
  readonly logicalBlockSize?: 512 | 4096;
  /** Complete half of the bios on a later macrotask, so completions interleave. */
  readonly async?: boolean;
  readonly seed?: number;
}

function wrap(backend: BlockBackend, options: TestDiskOptions): BlockBackend {
  return options.async === true ? new FaultBackend(backend, { seed: options.seed ?? 7, rules: [{ delayMs: 0, probability: 0.5 }] }) : backend;
}

/** A memory disk with a unique name, removed by {@link cleanup}. */
export function memDisk(sizeBytes: number, options: TestDiskOptions = {}): Disk {
  const d = createDiskSync({
    name: uniqueName('snt'),
    backend: wrap(new MemoryBackend({ sizeBytes }), options),
    logicalBlockSize: options.logicalBlockSize ?? 512,
  });
  disks.push(d);
  return d;
}

/** A file-backed disk in `dir` with a unique name, removed by {@link cleanup}. */
export async function fileDisk(dir: string, sizeBytes: number, options: TestDiskOptions = {}): Promise<Disk> {
  const name = uniqueName('snf');
  const backend = await FileBackend.open(path.join(dir, `${name}.raw`), { create: { sizeBytes } });
  const d = createDiskSync({ name, backend: wrap(backend, options), logicalBlockSize: options.logicalBlockSize ?? 512 });
  disks.push(d);
  return d;
}

/** Registers a snapshot for {@link cleanup}. */
export function track(s: Snapshot): Snapshot {
  snapshots.push(s);
  return s;
}

/** A fresh temporary directory, removed by {@link cleanup}. */
export async function tmpDir(): Promise<string> {
  const d = await fs.mkdtemp(path.join(os.tmpdir(), 'blkfilter-snap-'));
  dirs.push(d);
  return d;
}

/** Destroys the test snapshots, detaches every filter from the test disks, removes them and the temp dirs. */
export async function cleanup(): Promise<void> {
  // A copy whose read is held would keep destroy waiting: a failed test leaves some.
  for (const b of holds.splice(0)) b.releaseAll();
  for (const s of snapshots.splice(0)) await s.destroy();
  for (const d of disks.splice(0)) {
    for (const b of [...d.partitions, d.part0]) for (const f of listFilters(b)) await detachFilter(b, f.name);
    await d.remove();
  }
  for (const d of dirs.splice(0)) await fs.rm(d, { recursive: true, force: true });
}

/**
 * Stamps every 512-byte sector of `buf` (which sits at byte `offset` of a device) with its own
 * device offset, a sequence number and a writer id, so a misplaced or stale sector is visible.
 */
export function stamp(buf: Buffer, offset: number, seqNo: number, writer: number): Buffer {
  for (let at = 0; at < buf.length; at += SECTOR_SIZE) {
    const off = offset + at;
    buf.writeUInt32LE(off % 2 ** 32, at);
    buf.writeUInt32LE(Math.floor(off / 2 ** 32), at + 4);
    buf.writeUInt32LE(seqNo >>> 0, at + 8);
    buf.writeUInt32LE(writer >>> 0, at + 12);
    // Never 0x55 0xAA at bytes 510-511 (the same byte twice): no accidental partition table.
    buf.fill((seqNo * 31 + writer * 7 + off / SECTOR_SIZE) & 0xff, at + 16, at + SECTOR_SIZE);
  }
  return buf;
}

/** Fills the whole device with stamped sectors (sequence 0) and returns the expected content. */
export async function fillDevice(d: Disk): Promise<Buffer> {
  const size = d.capacity * SECTOR_SIZE;
  const content = stamp(Buffer.alloc(size), 0, 0, 0);
  const step = 4 << 20;
  for (let off = 0; off < size; off += step) await blkdevWrite(d.part0, off, content.subarray(off, Math.min(size, off + step)));
  return content;
}

/**
 * Resolves once `cond()` holds, checking it after each turn of the event loop: a wait on what
 * the test is waiting for, not on a time. Throws naming `what` after `turns` turns.
 */
export async function until(cond: () => boolean, what: string, turns = 200_000): Promise<void> {
  for (let i = 0; i < turns; i++) {
    if (cond()) return;
    await new Promise((r) => setImmediate(r));
  }
  throw new Error(`gave up waiting for ${what} after ${turns} event-loop turns`);
}

/** A small seeded generator (LCG), so a failing run can be replayed. */
export function rng(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n: number) => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return Math.floor((s / 2 ** 32) * n);
  };
}

/** Index of the first differing byte, or -1 (for messages; compare with Buffer.compare first). */
export function firstDiff(a: Buffer, b: Buffer): number {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return i;
  return a.length === b.length ? -1 : n;
}

/**
 * Wraps a backend so that READs are performed (not just completed) 0-3 event-loop turns later,
 * in an order drawn from `seed`, while writes go at once: a read of the original that is not
 * protected by the chunk lock would then see a write that was submitted after it.
 */
export class LateReadBackend extends PassThroughBackend {
  private readonly random: (n: number) => number;

  constructor(inner: BlockBackend, seed: number) {
    super(inner, 'late-read');
    this.random = rng(seed);
  }

  override queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op !== ReqOp.READ) {
      this.inner.queueBio(bio, sink);
      return;
    }
    const later = (turns: number): void => {
      if (turns === 0) this.inner.queueBio(bio, sink);
      else setImmediate(later, turns - 1);
    };
    later(this.random(4));
  }
}

/**
 * Wraps a backend so that, while `holding`, READs wait until the test performs them
 * ({@link releaseOne}, oldest first); counts the most that waited at once. Writes go at once.
 * The snapshot's copies read the old chunk this way, so `held` is the copies in flight.
 */
export class HoldReadsBackend extends PassThroughBackend {
  holding = false;
  readonly held: Array<[Bio, CompletionSink]> = [];
  maxHeld = 0;
  /** Sector of every READ held, in arrival order. */
  readonly heldSectors: number[] = [];

  constructor(inner: BlockBackend) {
    super(inner, 'hold-reads');
  }

  override queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op !== ReqOp.READ || !this.holding) {
      this.inner.queueBio(bio, sink);
      return;
    }
    this.held.push([bio, sink]);
    this.heldSectors.push(bio.sector);
    this.maxHeld = Math.max(this.maxHeld, this.held.length);
  }

  /** Performs the oldest held read (its completion may bring the next ones in). */
  releaseOne(): void {
    const next = this.held.shift();
    if (next === undefined) throw new Error('no read is held');
    this.inner.queueBio(next[0], next[1]);
  }

  /** Stops holding and performs every held read. */
  releaseAll(): void {
    this.holding = false;
    while (this.held.length > 0) this.releaseOne();
  }
}

/** A memory disk whose reads can be held ({@link HoldReadsBackend}). */
export function holdDisk(sizeBytes: number): { disk: Disk; backend: HoldReadsBackend } {
  const backend = new HoldReadsBackend(new MemoryBackend({ sizeBytes }));
  const disk = createDiskSync({ name: uniqueName('snh'), backend });
  disks.push(disk);
  holds.push(backend);
  return { disk, backend };
}

/** A memory disk whose reads are performed late ({@link LateReadBackend}). */
export function lateReadDisk(sizeBytes: number, seed: number): Disk {
  const d = createDiskSync({ name: uniqueName('snl'), backend: new LateReadBackend(new MemoryBackend({ sizeBytes }), seed) });
  disks.push(d);
  return d;
}
