import fs from 'node:fs/promises';
import path from 'node:path';
import zlib from 'node:zlib';
import {
  BlkError,
  blkdevDiscard,
  blkdevWrite,
  blkdevZeroout,
  BlkStatus,
  createDisk,
  createDiskSync,
  FileBackend,
  InvalidArgumentError,
  MemoryBackend,
  ReqOp,
} from '@blkfilter/bio';
import { FaultBackend, writeMbr } from '@blkfilter/bio/testing';
import { attachFilter, detachFilter, filterCtl, UnknownCtlCommandError } from '@blkfilter/registry';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { CbtBlockSizeError, CbtNoSnapshotError, CbtStateError } from './errors.js';
import { cbtInfo, cbtMap, changedExtents, markDirty, resetCbt } from './filter.js';
import { STATE_HEADER_SIZE } from './state.js';
import { cleanupDisks, cleanupTmpDirs, emitDirty, memDisk, registerTestFilters, take, TAKER, tmpDir, trackDisk } from './test-util.js';
import { CbtTracker } from './tracker.js';
import { CbtGenerationReason, FullCopyReason } from './types.js';

const MiB = 1 << 20;

beforeAll(registerTestFilters);
afterEach(cleanupDisks);
afterAll(async () => {
  await cleanupDisks();
  await cleanupTmpDirs();
});

async function setup(sizeBytes = 4 * MiB, blockSize = 4096, stateFile: string | false = false) {
  const d = memDisk(sizeBytes);
  await attachFilter(d.part0, 'cbt', { options: { blockSize, stateFile } });
  await attachFilter(d.part0, TAKER);
  return d;
}

describe('geometry', () => {
  it('defaults to 64 KiB, doubled while the map exceeds 2,097,152 blocks', async () => {
    const small = memDisk(64 * MiB);
    await attachFilter(small.part0, 'cbt');
    expect(await cbtInfo(small.part0)).toMatchObject({ blockSize: 65536, blockCount: 1024, capacity: 131072, changesNumber: 1, snapNumber: 0 });
    const big = memDisk(2 ** 40);
    await attachFilter(big.part0, 'cbt');
    expect(await cbtInfo(big.part0)).toMatchObject({ blockSize: 512 * 1024, blockCount: 2_097_152, memoryBytes: 2_097_152 });
    const odd = memDisk(64 * 1024 + 512);
    await attachFilter(odd.part0, 'cbt');
    expect(await cbtInfo(odd.part0)).toMatchObject({ blockSize: 65536, blockCount: 2 });
  });

  it('refuses a bad block size with a typed error that says what to do', async () => {
    const d = memDisk(MiB, 4096);
    for (const blockSize of [3000, 2048, 0, -4096, 2 ** 31, 'big']) {
      const p = attachFilter(d.part0, 'cbt', { options: { blockSize } });
      await expect(p).rejects.toBeInstanceOf(CbtBlockSizeError);
      await expect(attachFilter(d.part0, 'cbt', { options: { blockSize } })).rejects.toThrow(/power of two from its logical block size 4096/);
    }
    const e = await attachFilter(d.part0, 'cbt', { options: { blockSize: 3000 } }).catch((err: unknown) => err);
    expect(BlkError.isInstance(e) && e.code).toBe('EINVAL');
    const huge = memDisk(2 ** 40);
    await expect(attachFilter(huge.part0, 'cbt', { options: { blockSize: 512 } })).rejects.toThrow(/choose a larger blockSize/);
    await expect(attachFilter(d.part0, 'cbt', { options: { stateFile: 42 } })).rejects.toBeInstanceOf(InvalidArgumentError);
  });
});

describe('tracking and generations', () => {
  it('marks writes, discards and write-zeroes, and answers per take', async () => {
    const d = await setup();
    const info0 = await cbtInfo(d.part0);
    expect(await changedExtents(d.part0, { since: 0, generationId: info0.generationId })).toMatchObject({ kind: 'full-copy-needed', reason: FullCopyReason.NO_SNAPSHOT });
    await blkdevWrite(d.part0, 4096 * 3 + 512, Buffer.alloc(512, 1)); // block 3
    await blkdevDiscard(d.part0, 4096 * 10, 4096 * 2); // blocks 10, 11
    await blkdevZeroout(d.part0, 4096 * 12, 512); // block 12 (merges with 10-11)
    await take(d.part0, [d.part0], 'snap-1');
    const info1 = await cbtInfo(d.part0);
    expect(info1).toMatchObject({ generationId: info0.generationId, changesNumber: 2, snapNumber: 1, snapGenerationId: info0.generationId, snapshotId: 'snap-1' });
    const r1 = await changedExtents(d.part0, { since: 0, generationId: info0.generationId });
    expect(r1).toMatchObject({ kind: 'extents', snapNumber: 1, snapshotId: 'snap-1', extents: [{ sector: 24, sectors: 8 }, { sector: 80, sectors: 24 }] });
    expect(await changedExtents(d.part0, { since: 1, generationId: info0.generationId })).toMatchObject({ kind: 'extents', extents: [] });
    expect(await changedExtents(d.part0, { since: 2, generationId: info0.generationId })).toMatchObject({ kind: 'full-copy-needed', reason: FullCopyReason.SINCE_AHEAD });
    expect(await changedExtents(d.part0, { since: 0, generationId: '00000000-0000-4000-8000-000000000000' })).toMatchObject({
      kind: 'full-copy-needed',
      reason: FullCopyReason.GENERATION_CHANGED,
      generationId: info0.generationId,
      snapNumber: 1,
    });
    // A write after the take is in the active map only, until the next take.
    await blkdevWrite(d.part0, 0, Buffer.alloc(512));
    expect(await cbtMap(d.part0, { offset: 0, length: 4 })).toEqual(new Uint8Array([0, 0, 0, 1]));
    await take(d.part0, [d.part0]);
    expect(await cbtMap(d.part0, { offset: 0, length: 4 })).toEqual(new Uint8Array([2, 0, 0, 1]));
    expect(await changedExtents(d.part0, { since: 1, generationId: info0.generationId })).toMatchObject({ extents: [{ sector: 0, sectors: 8 }] });
  });

  it('counts a write that fails: marked at submission, never a false negative', async () => {
    const fault = new FaultBackend(new MemoryBackend({ sizeBytes: MiB }), { rules: [{ op: ReqOp.WRITE, status: BlkStatus.IOERR }] });
    const d = trackDisk(createDiskSync({ name: `cbtfault${process.pid}`, backend: fault }));
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096 } });
    await attachFilter(d.part0, TAKER);
    await expect(blkdevWrite(d.part0, 8192, Buffer.alloc(512))).rejects.toMatchObject({ code: 'EIO' });
    await take(d.part0, [d.part0]);
    const { generationId } = await cbtInfo(d.part0);
    expect(await changedExtents(d.part0, { since: 0, generationId })).toMatchObject({ extents: [{ sector: 16, sectors: 8 }] });
  });

  it('starts a new generation id when the changes number would pass 255, keeping the read map of the old one', async () => {
    const d = await setup(MiB);
    const g1 = (await cbtInfo(d.part0)).generationId;
    for (let i = 1; i <= 254; i++) await take(d.part0, [d.part0]);
    expect(await cbtInfo(d.part0)).toMatchObject({ generationId: g1, changesNumber: 255, snapNumber: 254 });
    await blkdevWrite(d.part0, 0, Buffer.alloc(512));
    await take(d.part0, [d.part0]); // take 255: the last of generation g1
    const info = await cbtInfo(d.part0);
    expect(info).toMatchObject({ changesNumber: 1, snapNumber: 255, snapGenerationId: g1, generationReason: CbtGenerationReason.OVERFLOW });
    expect(info.generationId).not.toBe(g1);
    expect(await changedExtents(d.part0, { since: 254, generationId: g1 })).toMatchObject({ kind: 'extents', extents: [{ sector: 0, sectors: 8 }] });
    await blkdevWrite(d.part0, 4096, Buffer.alloc(512));
    await take(d.part0, [d.part0]);
    expect(await changedExtents(d.part0, { since: 255, generationId: g1 })).toMatchObject({ kind: 'full-copy-needed', reason: FullCopyReason.GENERATION_CHANGED });
    expect(await changedExtents(d.part0, { since: 0, generationId: info.generationId })).toMatchObject({ kind: 'extents', snapNumber: 1, extents: [{ sector: 8, sectors: 8 }] });
  });

  it('resets on resize, detected at a query or at a take', async () => {
    const d = await setup(MiB);
    await take(d.part0, [d.part0]);
    const g1 = (await cbtInfo(d.part0)).generationId;
    d.part0.nrSects = 1024; // half the device (emulated: a Disk cannot really be resized)
    const r = await changedExtents(d.part0, { since: 0, generationId: g1 });
    expect(r).toMatchObject({ kind: 'full-copy-needed', reason: FullCopyReason.NO_SNAPSHOT });
    const info = await cbtInfo(d.part0);
    expect(info).toMatchObject({ capacity: 1024, blockCount: 128, generationReason: CbtGenerationReason.RESIZE, snapNumber: 0 });
    expect(info.generationId).not.toBe(g1);
    d.part0.nrSects = 2048;
    await take(d.part0, [d.part0]);
    const after = await cbtInfo(d.part0);
    expect(after).toMatchObject({ capacity: 2048, blockCount: 256, generationReason: CbtGenerationReason.RESIZE, snapNumber: 1, changesNumber: 2 });
    expect(after.generationId).not.toBe(info.generationId);
  });

  it('resets on request', async () => {
    const d = await setup(MiB);
    await blkdevWrite(d.part0, 0, Buffer.alloc(512));
    await take(d.part0, [d.part0]);
    const g1 = (await cbtInfo(d.part0)).generationId;
    const info = await resetCbt(d.part0);
    expect(info).toMatchObject({ changesNumber: 1, snapNumber: 0, snapGenerationId: null, generationReason: CbtGenerationReason.RESET });
    expect(await changedExtents(d.part0, { since: 0, generationId: g1 })).toMatchObject({ kind: 'full-copy-needed' });
  });

  it('tracks a partition in its own sectors, and partition writes on the whole disk', async () => {
    const d = trackDisk(await createDisk({ name: `cbtpart${process.pid}`, backend: new MemoryBackend({ sizeBytes: 4 * MiB }) }));
    await writeMbr(d, [[2048, 4096]]);
    const p1 = d.partition(1);
    if (p1 === undefined) throw new Error('no partition');
    await attachFilter(p1, 'cbt', { options: { blockSize: 4096 } });
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096 } });
    await attachFilter(d.part0, TAKER);
    await blkdevWrite(p1, 4096, Buffer.alloc(512));
    await take(d.part0, [d.part0, p1]);
    const gp = (await cbtInfo(p1)).generationId;
    const gd = (await cbtInfo(d.part0)).generationId;
    expect(await changedExtents(p1, { since: 0, generationId: gp })).toMatchObject({ extents: [{ sector: 8, sectors: 8 }] });
    // The MBR was written before the disk's CBT was attached: only the remapped partition write.
    expect(await changedExtents(d.part0, { since: 0, generationId: gd })).toMatchObject({ extents: [{ sector: 2056, sectors: 8 }] });
  });
});

describe('mark-dirty and events', () => {
  it('marks the active map and the read map, as blksnap CBTDIRTY does', async () => {
    const d = await setup(MiB);
    const { generationId } = await cbtInfo(d.part0);
    await take(d.part0, [d.part0]);
    await markDirty(d.part0, [{ sector: 16, sectors: 1 }, { sector: 100, sectors: 0 }]);
    // In the read map: a backup in progress from take 1 copies block 2 too.
    expect(await changedExtents(d.part0, { since: 0, generationId })).toMatchObject({ extents: [{ sector: 16, sectors: 8 }] });
    await take(d.part0, [d.part0]);
    expect(await changedExtents(d.part0, { since: 1, generationId })).toMatchObject({ extents: [{ sector: 16, sectors: 8 }] });
    await expect(markDirty(d.part0, [{ sector: 2047, sectors: 2 }])).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(markDirty(d.part0, [{ sector: -1, sectors: 1 }])).rejects.toThrow(/within the 2048 sectors/);
  });

  it('marks ranges from ranges-changed events of its device only', async () => {
    const d = await setup(MiB);
    const other = await setup(MiB);
    const { generationId } = await cbtInfo(d.part0);
    await emitDirty(d.part0, [{ sector: 8, sectors: 8 }]);
    await emitDirty(other.part0, [{ sector: 0, sectors: 8 }]);
    await take(d.part0, [d.part0]);
    expect(await changedExtents(d.part0, { since: 0, generationId })).toMatchObject({ extents: [{ sector: 8, sectors: 8 }] });
  });

  it('never sees a malformed event (the registry refuses it at the emitter), and distrusts a take outside a freeze', async () => {
    const d = await setup(MiB);
    await take(d.part0, [d.part0]);
    const g = (await cbtInfo(d.part0)).generationId;
    await expect(emitDirty(d.part0, [{ sector: 4096, sectors: 8 }])).rejects.toBeInstanceOf(InvalidArgumentError); // past the end
    await expect(filterCtl(d.part0, TAKER, 'take', { devices: 'all' })).rejects.toBeInstanceOf(InvalidArgumentError);
    expect(await changedExtents(d.part0, { since: 0, generationId: g })).toMatchObject({ kind: 'extents' });
    await filterCtl(d.part0, TAKER, 'take', { devices: [d.part0.name] }); // not frozen
    expect(await changedExtents(d.part0, { since: 0, generationId: g })).toMatchObject({ kind: 'full-copy-needed' });
    expect((await cbtInfo(d.part0)).generationReason).toBe(CbtGenerationReason.CORRUPTED);
  });
});

describe('bad input', () => {
  it('names the known commands for an unknown one', async () => {
    const d = await setup(MiB);
    await expect(filterCtl(d.part0, 'cbt', 'explode')).rejects.toBeInstanceOf(UnknownCtlCommandError);
    await expect(filterCtl(d.part0, 'cbt', 'explode')).rejects.toThrow(/commands: extents, info, map, mark-dirty, reset/);
  });

  it('refuses bad map ranges and extents queries, and a map before any take', async () => {
    const d = await setup(MiB);
    await expect(cbtMap(d.part0, { offset: 0, length: 1 })).rejects.toBeInstanceOf(CbtNoSnapshotError);
    await take(d.part0, [d.part0]);
    await expect(cbtMap(d.part0, { offset: 250, length: 7 })).rejects.toThrow(/within its 256 blocks/);
    await expect(changedExtents(d.part0, { since: 256, generationId: 'x' })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(filterCtl(d.part0, 'cbt', 'extents', { since: 0 })).rejects.toThrow(/generationId/);
    expect(await changedExtents(d.part0, { since: 0, generationId: 'not-a-generation' })).toMatchObject({ kind: 'full-copy-needed', reason: 'generation-changed' });
  });
});

describe('persistence', () => {
  it('resumes after a clean detach, keeping generation, numbers and maps', async () => {
    const dir = await tmpDir();
    const stateFile = path.join(dir, 'd.cbt');
    const d = await setup(MiB, 4096, stateFile);
    await blkdevWrite(d.part0, 0, Buffer.alloc(512));
    await take(d.part0, [d.part0]);
    await blkdevWrite(d.part0, 8192, Buffer.alloc(512));
    const before = await cbtInfo(d.part0);
    expect(before.generationReason).toBe(CbtGenerationReason.NEW);
    await detachFilter(d.part0, 'cbt');
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile } });
    const after = await cbtInfo(d.part0);
    expect(after).toMatchObject({ generationId: before.generationId, changesNumber: 2, snapNumber: 1, generationReason: CbtGenerationReason.RESUMED });
    await take(d.part0, [d.part0]);
    expect(await changedExtents(d.part0, { since: 1, generationId: before.generationId })).toMatchObject({ extents: [{ sector: 16, sectors: 8 }] });
    expect(await changedExtents(d.part0, { since: 0, generationId: before.generationId })).toMatchObject({ extents: [{ sector: 0, sectors: 8 }, { sector: 16, sectors: 8 }] });
  });

  it('marks the file dirty at attach; after an unclean stop the same generation resumes from the checkpoint and journal', async () => {
    const dir = await tmpDir();
    const stateFile = path.join(dir, 'd.cbt');
    const d = await setup(MiB, 4096, stateFile);
    const whileAttached = await fs.readFile(stateFile);
    expect(whileAttached.readUInt32LE(20) & 1).toBe(0); // clean flag off while attached
    const g1 = (await cbtInfo(d.part0)).generationId;
    await take(d.part0, [d.part0]);
    await blkdevWrite(d.part0, 8 * 4096, Buffer.alloc(4096, 1)); // block 8, after take 1
    const crashedState = await fs.readFile(stateFile);
    const crashedJournal = await fs.readFile(`${stateFile}.journal`);
    await blkdevWrite(d.part0, 9 * 4096, Buffer.alloc(4096, 1)); // block 9: not in the copies
    await detachFilter(d.part0, 'cbt');
    expect((await fs.readFile(stateFile)).readUInt32LE(20) & 1).toBe(1);
    await expect(fs.stat(`${stateFile}.journal`)).rejects.toThrow(/ENOENT/); // a clean stop needs no journal
    // As if the process had died after the write to block 8.
    await fs.writeFile(stateFile, crashedState);
    await fs.writeFile(`${stateFile}.journal`, crashedJournal);
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile } });
    const info = await cbtInfo(d.part0);
    expect(info).toMatchObject({ generationId: g1, generationReason: CbtGenerationReason.RESUMED_AFTER_CRASH, snapNumber: 1, changesNumber: 2 });
    expect(info.generationDetail).toMatch(/replayed \d+ record/);
    await take(d.part0, [d.part0]);
    expect(await changedExtents(d.part0, { since: 1, generationId: g1 })).toMatchObject({ kind: 'extents', extents: [{ sector: 64, sectors: 8 }] });
  });

  it('treats a dirty state file of the journal-less format as an unclean shutdown: new generation', async () => {
    const dir = await tmpDir();
    const stateFile = path.join(dir, 'd.cbt');
    const d = await setup(MiB, 4096, stateFile);
    const g1 = (await cbtInfo(d.part0)).generationId;
    const v1 = Buffer.from(await fs.readFile(stateFile)); // dirty while attached
    await detachFilter(d.part0, 'cbt');
    v1.writeUInt32LE(1, 8); // format version 1
    v1.writeUInt32LE(0, 88);
    v1.writeUInt32LE(0, 84);
    v1.writeUInt32LE(zlib.crc32(v1), 84);
    await fs.writeFile(stateFile, v1);
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile } });
    const info = await cbtInfo(d.part0);
    expect(info.generationReason).toBe(CbtGenerationReason.UNCLEAN_SHUTDOWN);
    expect(info.generationId).not.toBe(g1);
  });

  it('starts anew for a corrupted file or another geometry', async () => {
    const dir = await tmpDir();
    const stateFile = path.join(dir, 'd.cbt');
    const d = await setup(MiB, 4096, stateFile);
    await detachFilter(d.part0, 'cbt');
    const good = await fs.readFile(stateFile);
    const bad = Buffer.from(good);
    bad[STATE_HEADER_SIZE + 3] = 7; // a map byte: the CRC no longer matches
    await fs.writeFile(stateFile, bad);
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile } });
    expect((await cbtInfo(d.part0)).generationReason).toBe(CbtGenerationReason.STATE_INVALID);
    await detachFilter(d.part0, 'cbt');
    await fs.writeFile(stateFile, good.subarray(0, 100));
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 4096, stateFile } });
    expect((await cbtInfo(d.part0)).generationReason).toBe(CbtGenerationReason.STATE_INVALID);
    await detachFilter(d.part0, 'cbt');
    await attachFilter(d.part0, 'cbt', { options: { blockSize: 8192, stateFile } });
    expect((await cbtInfo(d.part0)).generationReason).toBe(CbtGenerationReason.GEOMETRY_CHANGED);
  });

  it('does not save a clean file when the map changed during the save', async () => {
    const dir = await tmpDir();
    const stateFile = path.join(dir, 'd.cbt');
    const d = memDisk(MiB);
    const tracker = new CbtTracker(d.part0, 4096, stateFile);
    await tracker.load();
    const saving = tracker.detach(); // encodes the map, then awaits the file system
    tracker.onRangesChanged([{ sector: 0, sectors: 1 }]);
    await saving;
    expect((await fs.readFile(stateFile)).readUInt32LE(20) & 1).toBe(0);
  });

  it('fails the attach when the dirty marker cannot be written', async () => {
    const d = memDisk(MiB);
    const p = attachFilter(d.part0, 'cbt', { options: { stateFile: '/nonexistent-dir/cbt/d.cbt' } });
    await expect(p).rejects.toBeInstanceOf(CbtStateError);
    await expect(attachFilter(d.part0, 'cbt', { options: { stateFile: '/nonexistent-dir/cbt/d.cbt' } })).rejects.toThrow(/stateFile: false/);
  });

  it('keeps the state next to a file-backed image by default', async () => {
    const dir = await tmpDir();
    const image = path.join(dir, 'disk.raw');
    const d = trackDisk(await createDisk({ name: `cbtfile${process.pid}`, backend: await FileBackend.open(image, { create: { sizeBytes: MiB } }) }));
    await attachFilter(d.part0, 'cbt');
    expect((await cbtInfo(d.part0)).stateFile).toBe(`${image}.cbt`);
    await expect(fs.stat(`${image}.cbt`)).resolves.toBeDefined();
    const mem = memDisk(MiB);
    await attachFilter(mem.part0, 'cbt');
    expect((await cbtInfo(mem.part0)).stateFile).toBeNull();
  });
});
