import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { MemoryBackend } from './backends/memory.js';
import { Bio } from './bio.js';
import { createDisk, type Disk } from './device.js';
import { InvalidArgumentError } from './errors.js';
import { blkdevDiscard, blkdevFlush, blkdevRead, blkdevWrite } from './io.js';
import { ReqFlag, ReqOp } from './op.js';
import { readPartitionTable } from './partitions/index.js';
import { BlkStatus } from './status.js';
import { submitBio } from './submit.js';
import { buildMbr, FaultBackend, findDirectIoDir, PassThroughBackend, writeMbr } from './testing.js';

const KiB = 1024;
const SIZE = 64 * KiB;

let n = 0;
const disks: Disk[] = [];
afterEach(async () => {
  for (const d of disks.splice(0)) await d.remove();
});

async function diskOn(backend: MemoryBackend | FaultBackend | PassThroughBackend): Promise<Disk> {
  const d = await createDisk({ name: `tst${process.pid}x${n++}`, backend, scanPartitions: false });
  disks.push(d);
  return d;
}

const block = (v: number): Buffer => Buffer.alloc(4 * KiB, v);
const at = (image: Buffer, i: number): number => image[i * 4 * KiB] as number;

/** Submits a bio and resolves when it completes, with its status. */
function submit(bio: Bio): Promise<BlkStatus> {
  return new Promise((resolve) => {
    bio.endIo = (b) => resolve(b.status);
    submitBio(bio);
  });
}

describe('FaultBackend power cut', () => {
  it('keeps FUA writes and drops plain ones', async () => {
    const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true });
    expect(fb.capabilities.writeCache).toBe(true);
    const d = await diskOn(fb);
    await blkdevWrite(d.part0, 0, block(1), ReqFlag.FUA);
    await blkdevWrite(d.part0, 4 * KiB, block(2));
    // Before the cut the device shows both.
    expect((await blkdevRead(d.part0, 4 * KiB, 512))[0]).toBe(2);
    expect(fb.volatileWrites).toBe(1);
    const image = fb.powerCut();
    expect([at(image, 0), at(image, 1)]).toEqual([1, 0]);
  });

  it('keeps the writes a completed FLUSH covers, and PREFLUSH covers those before its bio only', async () => {
    const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true });
    const d = await diskOn(fb);
    await blkdevWrite(d.part0, 0, block(1));
    await blkdevWrite(d.part0, 4 * KiB, block(2));
    await blkdevFlush(d.part0);
    expect(fb.volatileWrites).toBe(0);
    await blkdevWrite(d.part0, 8 * KiB, block(3));
    await blkdevWrite(d.part0, 12 * KiB, block(4), ReqFlag.PREFLUSH); // makes block 2 durable, not itself
    await blkdevWrite(d.part0, 0, block(5)); // overwrites durable data, volatile
    const image = fb.powerCut();
    expect([0, 1, 2, 3].map((i) => at(image, i))).toEqual([1, 2, 3, 0]);
  });

  it('does not count a write that completed while the flush was in flight', async () => {
    // Every bio completes on the next macrotask: W is issued, then F; W completes, then F.
    const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true, rules: [{ delayMs: 0 }] });
    const d = await diskOn(fb);
    const w = submit(Bio.write(d.part0, 0, block(7)));
    let wDone = false;
    void w.then(() => (wDone = true));
    const f = submit(new Bio(ReqOp.FLUSH, d.part0, 0, 0));
    expect(await f).toBe(BlkStatus.OK);
    expect(wDone).toBe(true); // W completed before F did, but after F was issued
    expect(await w).toBe(BlkStatus.OK);
    expect(at(fb.powerCut(), 0)).toBe(0);
  });

  it('applies durable writes in completion order onto the base, zeros for a FUA discard', async () => {
    const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true });
    const d = await diskOn(fb);
    await blkdevWrite(d.part0, 0, Buffer.concat([block(1), block(1)]), ReqFlag.FUA);
    await blkdevWrite(d.part0, 0, block(2), ReqFlag.FUA);
    const discard = new Bio(ReqOp.DISCARD, d.part0, 8, 4 * KiB);
    discard.flags = ReqFlag.FUA;
    expect(await submit(discard)).toBe(BlkStatus.OK);
    await blkdevDiscard(d.part0, 8 * KiB, 4 * KiB); // volatile: the base shows through
    const base = Buffer.alloc(SIZE, 9);
    const image = fb.powerCut(base);
    expect([0, 1, 2, 3].map((i) => at(image, i))).toEqual([2, 0, 9, 9]);
    expect(() => fb.powerCut(Buffer.alloc(512))).toThrow(InvalidArgumentError);
  });

  it('fails every bio after the cut, and the ones in flight, with OFFLINE', async () => {
    const fb = new FaultBackend(new MemoryBackend({ sizeBytes: SIZE }), { powerCut: true, rules: [{ delayMs: 0 }] });
    const d = await diskOn(fb);
    const inFlight = submit(Bio.write(d.part0, 0, block(1), ReqFlag.FUA));
    const image = fb.powerCut();
    expect(await inFlight).toBe(BlkStatus.OFFLINE);
    expect(at(image, 0)).toBe(0);
    expect(await submit(Bio.write(d.part0, 0, block(1)))).toBe(BlkStatus.OFFLINE);
    expect(() => new FaultBackend(new MemoryBackend({ sizeBytes: SIZE })).powerCut()).toThrow(/without powerCut: true/);
  });
});

describe('PassThroughBackend', () => {
  it('answers from its inner backend and passes bios on', async () => {
    const inner = new MemoryBackend({ sizeBytes: SIZE });
    const pt = new PassThroughBackend(inner, 'probe');
    expect(pt).toMatchObject({ description: `probe(${inner.description})`, sizeBytes: SIZE, readOnly: false, minIoSize: 512, capabilities: inner.capabilities });
    const d = await diskOn(pt);
    await blkdevWrite(d.part0, 512, Buffer.alloc(512, 3));
    expect((await blkdevRead(d.part0, 512, 512))[0]).toBe(3);
  });
});

describe('buildMbr and writeMbr', () => {
  it('builds a table the partition reader accepts, and gives a disk its partitions', async () => {
    const mbr = buildMbr([[64, 32], { start: 96, sectors: 16, type: 0x07, bootable: true }], { diskSignature: 0xfeedbeef });
    expect(mbr.length).toBe(512);
    const d = await diskOn(new MemoryBackend({ sizeBytes: SIZE }));
    const parts = await writeMbr(d, [[64, 32], { start: 96, sectors: 16, type: 0x07, bootable: true }]);
    expect(parts.map((p) => [p.startSect, p.nrSects])).toEqual([
      [64, 32],
      [96, 16],
    ]);
    await blkdevWrite(d.part0, 0, mbr);
    const table = await readPartitionTable(d.part0);
    expect(table).toMatchObject({ label: 'dos', id: '0xfeedbeef' });
    expect(table?.partitions.map((p) => [p.start, p.size, p.bootable])).toEqual([
      [64, 32, false],
      [96, 16, true],
    ]);
    expect(() => buildMbr([[1, 1], [2, 1], [3, 1], [4, 1], [5, 1]])).toThrow(InvalidArgumentError);
    expect(() => buildMbr([[2 ** 32, 1]])).toThrow(/not a 32-bit sector number/);
  });
});

describe('findDirectIoDir', () => {
  it('passes over a candidate that cannot be a directory', () => {
    const file = path.join(os.tmpdir(), `blkfilter-not-a-dir-${process.pid}`);
    fs.writeFileSync(file, '');
    try {
      expect(findDirectIoDir([path.join(file, 'sub')])).toBeNull();
    } finally {
      fs.rmSync(file, { force: true });
    }
  });

  const tmpDirect = findDirectIoDir([os.tmpdir()]);
  it.skipIf(tmpDirect === null)('answers a directory where O_DIRECT opens work', () => {
    const probe = path.join(tmpDirect as string, `blkfilter-direct-${process.pid}`);
    fs.writeFileSync(probe, Buffer.alloc(4096));
    try {
      fs.closeSync(fs.openSync(probe, fs.constants.O_RDONLY | (fs.constants.O_DIRECT as number)));
    } finally {
      fs.rmSync(probe);
    }
  });
});
