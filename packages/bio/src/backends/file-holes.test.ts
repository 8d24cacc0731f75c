import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { BlockStatusExtent } from '../backend.js';
import { createDisk, createDiskSync, type Disk } from '../device.js';
import { blkdevBlockStatus, blkdevDiscard, blkdevRead, blkdevWrite, blkdevZeroout } from '../io.js';
import { writeMbr } from '../testing.js';
import { FileBackend } from './file.js';
import { LinearBackend } from './linear.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const hole = (length: number): BlockStatusExtent => ({ length, hole: true });
const data = (length: number): BlockStatusExtent => ({ length, hole: false });

let tmp = '';
let seq = 0;
const disks: Disk[] = [];
// Whether this temp dir's filesystem keeps holes (tmpfs, ext4, xfs, btrfs do): the tests that
// need holes say so and skip rather than pass on nothing where it does not.
let holesKept = false;

beforeAll(async () => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-holes-'));
  const probe = path.join(tmp, 'probe.raw');
  const b = await FileBackend.open(probe, { create: { sizeBytes: MiB } });
  fs.writeSync(b.fd, Buffer.alloc(4 * KiB, 1), 0, 4 * KiB, 512 * KiB);
  holesKept = b.blockStatus?.(0, MiB)?.[0]?.hole === true;
  await b.close();
  if (!holesKept) console.warn(`FileBackend.blockStatus: ${tmp} keeps no holes, or @blkfilter/native did not load: hole tests skipped`);
});
afterEach(async () => {
  for (const d of disks.splice(0).reverse()) await d.remove();
});
afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

async function fileDisk(sizeBytes: number, logicalBlockSize: 512 | 4096 = 512): Promise<{ disk: Disk; backend: FileBackend; file: string }> {
  const file = path.join(tmp, `img${seq++}.raw`);
  const backend = await FileBackend.open(file, { create: { sizeBytes } });
  const disk = await createDisk({ name: `holes${process.pid}-${seq++}`, backend, scanPartitions: false, logicalBlockSize });
  disks.push(disk);
  return { disk, backend, file };
}

/** Every reported hole of `[0, size)` reads as zeros, and the extents tile the range. */
async function expectHolesReadZeros(d: Disk, extents: readonly BlockStatusExtent[]): Promise<void> {
  let pos = 0;
  for (const e of extents) {
    if (e.hole) expect((await blkdevRead(d.part0, pos, e.length)).every((b) => b === 0), `hole at ${pos} + ${e.length}`).toBe(true);
    pos += e.length;
  }
  expect(pos).toBe(d.part0.sizeBytes);
}

describe('FileBackend.blockStatus', () => {
  it('reports the holes and the data of a sparse file, at block edges, as the device sees them', async (ctx) => {
    if (!holesKept) ctx.skip();
    const { disk, backend } = await fileDisk(4 * MiB, 4096);
    expect(blkdevBlockStatus(disk.part0, 0, 4 * MiB)).toEqual([hole(4 * MiB)]);
    // Data from one block edge to the next, and a single block at the very end.
    await blkdevWrite(disk.part0, 64 * KiB, Buffer.alloc(8 * KiB, 1));
    await blkdevWrite(disk.part0, 4 * MiB - 4 * KiB, Buffer.alloc(4 * KiB, 2));
    const all = blkdevBlockStatus(disk.part0, 0, 4 * MiB) as BlockStatusExtent[];
    expect(all).toEqual([hole(64 * KiB), data(8 * KiB), hole(4 * MiB - 76 * KiB), data(4 * KiB)]);
    await expectHolesReadZeros(disk, all);
    // Ranges that start or end inside a run are clipped to the request, byte for byte.
    expect(blkdevBlockStatus(disk.part0, 64 * KiB - 512, 1024)).toEqual([hole(512), data(512)]);
    expect(blkdevBlockStatus(disk.part0, 72 * KiB - 100, 200)).toEqual([data(100), hole(100)]);
    expect(blkdevBlockStatus(disk.part0, 4 * MiB - 4 * KiB - 1, 2)).toEqual([hole(1), data(1)]);
    // The backend itself answers in bytes of the file.
    expect(backend.blockStatus?.(60 * KiB, 8 * KiB)).toEqual([hole(4 * KiB), data(4 * KiB)]);

    // DISCARD and WRITE_ZEROES punch holes; WRITE_ZEROES with NOUNMAP keeps data (zeros).
    await blkdevDiscard(disk.part0, 64 * KiB, 4 * KiB);
    await blkdevZeroout(disk.part0, 4 * MiB - 4 * KiB, 4 * KiB, { noUnmap: true });
    const after = blkdevBlockStatus(disk.part0, 0, 4 * MiB) as BlockStatusExtent[];
    expect(after).toEqual([hole(68 * KiB), data(4 * KiB), hole(4 * MiB - 76 * KiB), data(4 * KiB)]);
    await blkdevZeroout(disk.part0, 0, 4 * MiB);
    expect(blkdevBlockStatus(disk.part0, 0, 4 * MiB)).toEqual([hole(4 * MiB)]);
    await expectHolesReadZeros(disk, after);
  });

  it('is the same through a partition and a linear device, and null once the disk is gone', async (ctx) => {
    if (!holesKept) ctx.skip();
    const { disk } = await fileDisk(8 * MiB);
    const [part] = await writeMbr(disk, [[2048, 8192]]); // 1 MiB + 4 MiB
    if (part === undefined) throw new Error('no partition');
    await blkdevWrite(part, 128 * KiB, Buffer.alloc(4 * KiB, 3));
    expect(blkdevBlockStatus(part, 0, 4 * MiB)).toEqual([hole(128 * KiB), data(4 * KiB), hole(4 * MiB - 132 * KiB)]);
    const lin = createDiskSync({ name: `holeslin${process.pid}-${seq++}`, backend: new LinearBackend(part, { startSect: 128 }), scanPartitions: false });
    disks.push(lin);
    expect(blkdevBlockStatus(lin.part0, 0, lin.part0.sizeBytes)).toEqual([hole(64 * KiB), data(4 * KiB), hole(4 * MiB - 132 * KiB)]);
    await lin.remove();
    disks.pop();
    await disk.remove();
    disks.pop();
    expect(blkdevBlockStatus(disk.part0, 0, MiB)).toBeNull();
  });

  it('answers null, never throws, once the backend is closed', async (ctx) => {
    if (!holesKept) ctx.skip();
    const file = path.join(tmp, `img${seq++}.raw`);
    const backend = await FileBackend.open(file, { create: { sizeBytes: MiB } });
    expect(backend.blockStatus?.(0, MiB)).toEqual([hole(MiB)]);
    await backend.close();
    expect(backend.blockStatus?.(0, MiB)).toBeNull();
  });
});

describe('FileBackend without @blkfilter/native', () => {
  afterEach(() => {
    vi.doUnmock('@blkfilter/native');
    vi.resetModules();
  });

  // A fresh copy of bio's modules with the addon package replaced: the loader is per module.
  async function openWith(factory: () => Record<string, unknown>): Promise<FileBackend> {
    vi.resetModules();
    vi.doMock('@blkfilter/native', factory);
    const fresh: { FileBackend: typeof FileBackend } = await import('./file.js');
    return fresh.FileBackend.open(path.join(tmp, `img${seq++}.raw`), { create: { sizeBytes: MiB } });
  }

  it('has no blockStatus (every range is data) where the addon did not build', async () => {
    const backend = await openWith(() => ({
      nativeAvailable: () => false,
      fileExtents: () => {
        throw new Error('unavailable');
      },
    }));
    try {
      expect(backend.blockStatus).toBeUndefined();
      const d = createDiskSync({ name: `holesnone${process.pid}-${seq++}`, backend, scanPartitions: false });
      disks.push(d);
      expect(blkdevBlockStatus(d.part0, 0, MiB)).toBeNull();
    } finally {
      await backend.close();
    }
  });
});
