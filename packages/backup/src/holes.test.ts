// A backup asks block status first and reads only the clusters that hold data: holes of a sparse
// file device (through a snapshot image) are stored as zeros without being read, and the result
// is the same chain, manifest and restore as if they had been read. Bytes read are counted at
// the backend, below every filter.
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import {
  blkdevDiscard,
  blkdevRead,
  blkdevWrite,
  createDiskSync,
  FileBackend,
  MemoryBackend,
  ReqOp,
  type Bio,
  type BlockBackend,
  type BlockStatusExtent,
  type CompletionSink,
  type Disk,
} from '@blkfilter/bio';
import { PassThroughBackend } from '@blkfilter/bio/testing';
import { registerCbtFilter } from '@blkfilter/cbt';
import { attachFilter, detachFilter, listFilters } from '@blkfilter/registry';
import { createSnapshot } from '@blkfilter/snapshot';
import { afterEach, describe, expect, it } from 'vitest';
import type { ImageEntry } from './manifest.js';
import { backupPoint, list, restore, verify } from './repository.js';
import { backupSnapshot, type BackupSnapshotOptions } from './snapshot-source.js';
import { cleanup, haveQemu, MiB, qemuImg, tmpDir } from './test-util.js';

const K = 1024;
const CLUSTER = 64 * K;

/** Counts the bytes of READ bios that reach the backend; may hold the first one while `beforeFirstRead` runs. */
class CountingBackend extends PassThroughBackend {
  readBytes = 0;
  beforeFirstRead: (() => Promise<void>) | null = null;
  readonly blockStatus?: (offset: number, length: number) => BlockStatusExtent[] | null;

  constructor(inner: BlockBackend) {
    super(inner, 'counting');
    const status = inner.blockStatus;
    if (status !== undefined) this.blockStatus = (offset, length) => status.call(inner, offset, length);
  }

  override queueBio(bio: Bio, sink: CompletionSink): void {
    if (bio.op === ReqOp.READ) {
      this.readBytes += bio.size;
      const hook = this.beforeFirstRead;
      if (hook !== null) {
        this.beforeFirstRead = null;
        void hook().then(() => this.inner.queueBio(bio, sink));
        return;
      }
    }
    this.inner.queueBio(bio, sink);
  }
}

let seq = 0;
const disks: Disk[] = [];
afterEach(async () => {
  for (const d of disks.splice(0)) {
    for (const f of listFilters(d.part0)) await detachFilter(d.part0, f.name).catch(() => {});
    await d.remove();
  }
  await cleanup();
});

/** A sparse file device with CBT, its reads counted. */
async function fileDevice(sizeBytes: number): Promise<{ disk: Disk; counter: CountingBackend; file: string; dir: string }> {
  registerCbtFilter();
  const dir = tmpDir();
  const file = path.join(dir, 'source.raw');
  const counter = new CountingBackend(await FileBackend.open(file, { create: { sizeBytes } }));
  const disk = createDiskSync({ name: `bh${process.pid}x${seq++}`, backend: counter, scanPartitions: false });
  disks.push(disk);
  await attachFilter(disk.part0, 'cbt', { options: { stateFile: false } });
  return { disk, counter, file, dir };
}

/** Takes a snapshot, backs its image up (counting the reads), reads back what the point must hold. */
async function snapAndBackup(d: Disk, counter: CountingBackend, repo: string, options: Partial<BackupSnapshotOptions> = {}): Promise<{ entry: ImageEntry; read: number; content: Buffer }> {
  const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 64 * MiB } });
  try {
    await s.addDevice(d.part0);
    await s.take();
    counter.readBytes = 0;
    const r = await backupSnapshot({ dir: repo, image: s.image(d.part0), ...options });
    const read = counter.readBytes;
    const content = await blkdevRead(s.image(d.part0), 0, d.part0.sizeBytes);
    return { entry: r.images[0]?.entry as ImageEntry, read, content };
  } finally {
    await s.destroy();
  }
}

/**
 * Restores point `at` and compares it with `content`; with qemu and a `source` (a raw file of
 * the same bytes), `qemu-img compare` checks the restored file and the point's qcow2 chain too.
 */
async function expectPoint(repo: string, at: number, content: Buffer, source: string | null): Promise<void> {
  const out = path.join(path.dirname(repo), `restored-${at}-${seq++}.raw`);
  await restore(repo, { at, to: out });
  expect(Buffer.compare(fs.readFileSync(out), content), `point ${at}`).toBe(0);
  if (haveQemu && source !== null) {
    qemuImg('compare', '-U', '-f', 'raw', '-F', 'raw', out, source);
    const image = (await list(repo)).manifest.points[at - 1]?.images[0]?.file as string;
    qemuImg('compare', '-U', '-f', 'qcow2', '-F', 'raw', path.join(repo, image), source);
  }
  fs.rmSync(out);
}

const sourceHoles = (d: Disk): boolean => d.backend.blockStatus !== undefined;

describe('backup reads only what holds data', () => {
  it('a full backup of a sparse file device reads and stores only its data clusters, and restores byte for byte', async (ctx) => {
    const { disk, counter, file, dir } = await fileDevice(64 * MiB);
    if (!sourceHoles(disk)) ctx.skip();
    await blkdevWrite(disk.part0, MiB, Buffer.alloc(MiB, 1)); // 16 clusters
    await blkdevWrite(disk.part0, 10 * MiB + 100 * K, Buffer.alloc(4 * K, 2)); // inside one cluster
    await blkdevWrite(disk.part0, 20 * MiB - 4 * K, Buffer.alloc(8 * K, 3)); // across two clusters
    await blkdevWrite(disk.part0, 64 * MiB - 4 * K, Buffer.alloc(4 * K, 4)); // the last cluster
    const repo = path.join(dir, 'repo');
    const { entry, read, content } = await snapAndBackup(disk, counter, repo);
    expect(entry.kind).toBe('full');
    expect(read).toBe(20 * CLUSTER);
    expect(entry.bytesRead).toBe(20 * CLUSTER);
    expect(entry.bytesWritten).toBe(20 * CLUSTER);
    expect((await verify(repo)).ok).toBe(true);
    await expectPoint(repo, 1, content, file);
  });

  it('an incremental after a discard (fstrim) and a small write reads about what it stores', async (ctx) => {
    const { disk, counter, file, dir } = await fileDevice(64 * MiB);
    if (!sourceHoles(disk)) ctx.skip();
    for (let i = 0; i < 48; i++) await blkdevWrite(disk.part0, i * MiB, Buffer.alloc(MiB, i + 1));
    const repo = path.join(dir, 'repo');
    const first = await snapAndBackup(disk, counter, repo);
    expect(first.read).toBe(48 * MiB);
    // Free 40 MiB as fstrim does, then write 4 MiB and 4 KiB into what was freed.
    await blkdevDiscard(disk.part0, 4 * MiB, 40 * MiB);
    await blkdevWrite(disk.part0, 10 * MiB, randomBytes(4 * MiB));
    await blkdevWrite(disk.part0, 30 * MiB + 8 * K, Buffer.alloc(4 * K, 0xee));
    const second = await snapAndBackup(disk, counter, repo);
    expect(second.entry.kind).toBe('incremental');
    expect(second.entry.changedBytes).toBeGreaterThanOrEqual(40 * MiB);
    expect(second.read).toBe(4 * MiB + CLUSTER);
    expect(second.entry.bytesRead).toBe(second.read);
    expect(second.entry.bytesWritten).toBe(4 * MiB + CLUSTER);
    expect(second.read / second.entry.bytesWritten).toBeLessThanOrEqual(1.1);
    // The freed clusters hide the first point's data: the zeros are recorded, the chain is right.
    expect(second.entry.zeros.reduce((n, [, l]) => n + l, 0)).toBe(40 * MiB - 4 * MiB - CLUSTER);
    expect((await verify(repo)).ok).toBe(true);
    await expectPoint(repo, 1, first.content, null);
    await expectPoint(repo, 2, second.content, file);
  });

  it('keeps the instant of take when writes and discards race the backup of a live snapshot', async (ctx) => {
    // 160 MiB: three block-status windows of 64 MiB, so some are asked before the writes
    // below and some after.
    const size = 160 * MiB;
    const { disk, counter, dir } = await fileDevice(size);
    if (!sourceHoles(disk)) ctx.skip();
    const atTake = Buffer.alloc(size);
    for (const [at, fill] of [
      [8 * MiB, 1],
      [70 * MiB, 2],
      [130 * MiB, 3],
    ] as const) {
      await blkdevWrite(disk.part0, at, Buffer.alloc(MiB, fill));
      atTake.fill(fill, at, at + MiB);
    }
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 32 * MiB } });
    try {
      await s.addDevice(disk.part0);
      await s.take();
      // The backup's first read waits until the original has changed: data discarded in a window
      // not asked about yet (70 MiB: the image must still say data), holes written in a window
      // already asked (20 MiB: the answer "hole" must stay right) and in one not asked (80 MiB).
      counter.beforeFirstRead = async (): Promise<void> => {
        await blkdevDiscard(disk.part0, 70 * MiB, MiB);
        await blkdevWrite(disk.part0, 20 * MiB, Buffer.alloc(MiB, 6));
        await blkdevWrite(disk.part0, 80 * MiB, Buffer.alloc(MiB, 5));
        await blkdevWrite(disk.part0, 130 * MiB, Buffer.alloc(MiB, 7));
      };
      const repo = path.join(dir, 'repo');
      await backupSnapshot({ dir: repo, image: s.image(disk.part0) });
      expect(counter.beforeFirstRead).toBeNull();
      await expectPoint(repo, 1, atTake, null);
    } finally {
      await s.destroy();
    }
  });

  it('reads everything when the block status cannot be trusted', async () => {
    const size = 4 * MiB;
    const content = randomBytes(size);
    const lies: Array<[string, (offset: number, length: number) => BlockStatusExtent[] | null]> = [
      ['throws', () => {
        throw new Error('the backend broke');
      }],
      ['cannot tell', () => null],
      ['a hole that is not `true`', (_o, length) => [{ length, hole: 1 as unknown as boolean }]],
      ['a short answer', (_o, length) => [{ length: length - CLUSTER, hole: true }]],
    ];
    for (const [what, status] of lies) {
      const backend = new MemoryBackend({ sizeBytes: size });
      backend.blockStatus = status as (offset: number, length: number) => BlockStatusExtent[];
      const d = createDiskSync({ name: `bhl${process.pid}x${seq++}`, backend, scanPartitions: false });
      disks.push(d);
      await blkdevWrite(d.part0, 0, content);
      const repo = path.join(tmpDir(), 'repo');
      const r = await backupPoint({ dir: repo, sources: [{ name: 'd', image: d.part0 }] });
      expect(r.images[0]?.entry.bytesRead, what).toBe(size);
      await expectPoint(repo, 1, content, null);
    }
  });
});
