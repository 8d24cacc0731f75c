import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { backupSnapshot, type ImageEntry } from '@blkfilter/backup';
import { blkdevDiscard, blkdevWrite, createDiskSync, FileBackend, ReqOp, type Bio, type BlockStatusExtent, type CompletionSink, type Disk } from '@blkfilter/bio';
import { PassThroughBackend } from '@blkfilter/bio/testing';
import { registerCbtFilter } from '@blkfilter/cbt';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import { createSnapshot, type Snapshot } from '@blkfilter/snapshot';
import type { Figure } from './bench-cbt.js';
import { CLUSTER, run } from './bench-disks.js';
import type { CaseResult } from './bench-util.js';

// Issue 19, "read only what holds data", without a kernel mount: a file device with CBT is
// filled, backed up, then 798/1024 of it is discarded in free-extent-sized runs (what fstrim
// does after mkfs) and ~42/1024 written in file-sized pieces (files, plus metadata updates in
// the kept parts), and backed up again: incremental, and full. Each backup of the second take
// runs on the same snapshot, into copies of the same chain (the base image hard-linked: a backup
// only reads its backing file), with the file's holes hidden (the old behaviour: every changed
// byte read) and with them reported (lseek through @blkfilter/native), in rounds that alternate
// which goes first; times are medians.

const MiB = 1 << 20;

/** Counts the bytes read from the file; reports its holes only while `holes` is on. */
class HoleSwitch extends PassThroughBackend {
  holes = true;
  readBytes = 0;
  readonly blockStatus: (offset: number, length: number) => BlockStatusExtent[] | null;

  constructor(inner: FileBackend) {
    super(inner, 'bench-holes');
    this.blockStatus = (offset, length) => (this.holes ? (inner.blockStatus?.(offset, length) ?? null) : null);
  }

  override queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op === ReqOp.READ) this.readBytes += bio.size;
    this.inner.queueBio(bio, sink);
  }
}

/** A small seeded generator (LCG), so every run discards and writes the same places. */
function rng(seed: number): (n: number) => number {
  let s = seed >>> 0 || 1;
  return (n) => {
    s = (Math.imul(s, 1103515245) + 12345) >>> 0;
    return Math.floor((s / 2 ** 32) * n);
  };
}

interface Measured {
  readonly entry: ImageEntry;
  readonly read: number;
  readonly seconds: number;
}

function median(xs: readonly number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
}

/** A copy of backup folder `from` at `to`, its images hard-linked (backups never change an image). */
function cloneRepo(from: string, to: string): void {
  fs.mkdirSync(to);
  for (const f of fs.readdirSync(from)) {
    if (f.endsWith('.qcow2')) fs.linkSync(path.join(from, f), path.join(to, f));
    else fs.copyFileSync(path.join(from, f), path.join(to, f));
  }
}

const mib = (n: number): number => Math.round((n / MiB) * 10) / 10;
const ratio = (a: number, b: number): number => (b === 0 ? 0 : Math.round((a / b) * 1000) / 1000);

/** Runs the section; throws (the bench records why) where @blkfilter/native did not load. */
export async function runHolesCases(quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  const size = (quick ? 256 : 1024) * MiB;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-bench-holes-'));
  registerCbtFilter();
  const file = await FileBackend.open(path.join(dir, 'src.raw'), { create: { sizeBytes: size } });
  if (file.blockStatus === undefined) {
    await file.close();
    fs.rmSync(dir, { recursive: true, force: true });
    throw new Error('holes section skipped: FileBackend reports no holes here (@blkfilter/native did not load)');
  }
  const backend = new HoleSwitch(file);
  const disk: Disk = createDiskSync({ name: `bench-holes-${process.pid}`, backend, scanPartitions: false });
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  try {
    await attachFilter(disk.part0, 'cbt', { options: { stateFile: false } });
    // A full disk: 4 MiB writes of random data.
    const fill = randomBytes(4 * MiB);
    for (let pos = 0; pos < size; pos += fill.length) await blkdevWrite(disk.part0, pos, fill);

    /** Backs the image of `s` up into `repo` with the holes reported or hidden, measured alone. */
    const backUp = async (s: Snapshot, repo: string, holes: boolean, mode: 'auto' | 'full'): Promise<Measured> => {
      backend.holes = holes;
      backend.readBytes = 0;
      try {
        const t0 = performance.now();
        const r = await backupSnapshot({ dir: repo, image: s.image(disk.part0), mode });
        return { entry: r.images[0]?.entry as ImageEntry, read: backend.readBytes, seconds: (performance.now() - t0) / 1000 };
      } finally {
        backend.holes = true;
      }
    };
    const take = async (): Promise<Snapshot> => {
      const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 64 * MiB } });
      await s.addDevice(disk.part0);
      await s.take();
      return s;
    };

    const base = path.join(dir, 'base');
    const first = await take();
    try {
      await backUp(first, base, true, 'auto');
    } finally {
      await first.destroy();
    }

    // fstrim after mkfs: each 8 MiB "block group" keeps its head (metadata, a few files) and
    // discards the rest, 798/1024 of the disk in all, in runs of up to 4 MiB.
    const r = rng(19);
    const group = 8 * MiB;
    const keep = group - Math.round((group * 798) / 1024 / CLUSTER) * CLUSTER;
    let trimmed = 0;
    const free: Array<[number, number]> = [];
    for (let g = 0; g < size; g += group) {
      const shift = (r(9) - 4) * CLUSTER; // not every group alike
      const from = g + keep + shift;
      free.push([from, g + group]);
      for (let pos = from; pos < g + group; pos += 4 * MiB) {
        const n = Math.min(4 * MiB, g + group - pos);
        await blkdevDiscard(disk.part0, pos, n);
        trimmed += n;
      }
    }
    // New files in the free space (4 KiB to 1 MiB each, 40/1024 of the disk), and metadata
    // updates (bitmaps, inode tables, the journal) in the kept heads, 2/1024.
    let written = 0;
    const filesBytes = Math.round((size * 40) / 1024);
    while (written < filesBytes) {
      const [a, b] = free[r(free.length)] as [number, number];
      const n = Math.min((1 + r(256)) * 4096, b - a);
      const at = a + r((b - a - n) / 4096 + 1) * 4096;
      await blkdevWrite(disk.part0, at, fill.subarray(0, n));
      written += n;
    }
    const metaBytes = Math.round((size * 2) / 1024);
    for (let m = 0; m < metaBytes; m += 4096) {
      const g = r(size / group) * group;
      await blkdevWrite(disk.part0, g + r(keep / 4096 - 1) * 4096, fill.subarray(0, 4096));
      written += 4096;
    }

    // The incremental (the story), then full backups of the same sparse take.
    const rounds = quick ? 1 : 3;
    const runs: Record<'incOff' | 'incOn' | 'fullOff' | 'fullOn', Measured[]> = { incOff: [], incOn: [], fullOff: [], fullOn: [] };
    // qemu compares two chains guest byte by guest byte: every backup must hold the same disk.
    const same = (a: string, b: string): Promise<string> => run('qemu-img', ['compare', '-q', '-f', 'qcow2', '-F', 'qcow2', a, b]);
    let reference: string | null = null;
    const second = await take();
    try {
      for (let round = 0; round < rounds; round++) {
        for (const holes of round % 2 === 0 ? [false, true] : [true, false]) {
          const inc = path.join(dir, `inc-${round}-${holes ? 'on' : 'off'}`);
          cloneRepo(base, inc);
          const i = await backUp(second, inc, holes, 'auto');
          if (i.entry.kind !== 'incremental') throw new Error(`the second backup was ${i.entry.kind}, not incremental`);
          const full = path.join(dir, `full-${round}-${holes ? 'on' : 'off'}`);
          const f = await backUp(second, full, holes, 'full');
          (holes ? runs.incOn : runs.incOff).push(i);
          (holes ? runs.fullOn : runs.fullOff).push(f);
          await same(path.join(full, f.entry.file), path.join(inc, i.entry.file));
          if (reference === null) {
            reference = path.join(full, f.entry.file); // kept for the others to compare with
            continue;
          }
          await same(path.join(inc, i.entry.file), reference);
          fs.rmSync(inc, { recursive: true });
          fs.rmSync(full, { recursive: true });
        }
      }
    } finally {
      await second.destroy();
    }
    // The median round, as a Measured (bytes are the same every round).
    const pick = (ms: readonly Measured[]): Measured => ({ ...(ms[0] as Measured), seconds: median(ms.map((m) => m.seconds)) });
    const incOff = pick(runs.incOff);
    const incOn = pick(runs.incOn);
    const fullOff = pick(runs.fullOff);
    const fullOn = pick(runs.fullOn);

    const line = (what: string, m: Measured): string =>
      `${what}: read ${mib(m.read)} MiB, stored ${mib(m.entry.bytesWritten)} MiB (${ratio(m.read, m.entry.bytesWritten)}x), changed ${mib(m.entry.changedBytes)} MiB, median ${Math.round(m.seconds * 1000)} ms of ${rounds}`;
    process.stderr.write(`holes: ${mib(size)} MiB disk, ${mib(trimmed)} MiB discarded, ${mib(written)} MiB written after the full backup\n`);
    for (const [what, m] of [
      ['incremental, holes hidden (before)', incOff],
      ['incremental, holes reported (after)', incOn],
      ['full of the sparse take, holes hidden (before)', fullOff],
      ['full of the sparse take, holes reported (after)', fullOn],
    ] as const) {
      process.stderr.write(`holes: ${line(what, m)}\n`);
    }
    const timeCase = (name: string, ours: Measured, base: Measured): CaseResult => ({
      name,
      blockSize: CLUSTER,
      queueDepth: 1,
      ours: { opsPerSec: ratio(1, ours.seconds), mbPerSec: Math.round(size / ours.seconds / 1e6), rmePercent: 0 },
      baseline: { what: 'the same backup with the holes hidden (every changed byte read)', opsPerSec: ratio(1, base.seconds), mbPerSec: Math.round(size / base.seconds / 1e6), rmePercent: 0 },
      ratio: ratio(base.seconds, ours.seconds),
    });
    results.push(timeCase(`holes: incremental after fstrim, ${mib(size)} MiB disk`, incOn, incOff));
    results.push(timeCase(`holes: full backup of the sparse take, ${mib(size)} MiB disk`, fullOn, fullOff));
    figures.push(
      { name: 'holes: incremental after fstrim, bytes read / stored (after)', value: ratio(incOn.read, incOn.entry.bytesWritten), unit: 'x', target: '<= 1.1' },
      { name: 'holes: incremental after fstrim, bytes read / stored (before)', value: ratio(incOff.read, incOff.entry.bytesWritten), unit: 'x' },
      { name: 'holes: incremental after fstrim, MiB read (after)', value: mib(incOn.read), unit: 'MiB' },
      { name: 'holes: incremental after fstrim, MiB read (before)', value: mib(incOff.read), unit: 'MiB' },
      { name: 'holes: incremental after fstrim, MiB stored', value: mib(incOn.entry.bytesWritten), unit: 'MiB' },
      { name: 'holes: full backup of the sparse take, bytes read / stored (after)', value: ratio(fullOn.read, fullOn.entry.bytesWritten), unit: 'x', target: '<= 1.1' },
      { name: 'holes: full backup of the sparse take, bytes read / stored (before)', value: ratio(fullOff.read, fullOff.entry.bytesWritten), unit: 'x' },
    );
  } finally {
    await detachFilter(disk.part0, 'cbt').catch(() => {});
    await disk.remove();
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { results, figures };
}
