import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { nativeAvailable } from '@blkfilter/native';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { Bio, BioVec, enableBioDebug, type CompletionSink } from '../bio.js';
import { createDisk, type Disk } from '../device.js';
import { MemoryBackend } from './memory.js';
import { ReqFlag, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';
import { submitBio } from '../submit.js';
import { FileBackend, type FileBackendOptions } from './file.js';
import { FileEngine } from './file-request.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let tmp = '';
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-writes-'));
});
afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});
let seq = 0;
const disks: Disk[] = [];
afterEach(async () => {
  for (const d of disks.splice(0)) await d.remove();
});

/** A disk over a FileBackend on `file` (registered for removal after the test). */
async function fileDisk(file: string, options: FileBackendOptions): Promise<{ disk: Disk; backend: FileBackend }> {
  const backend = await FileBackend.open(file, options);
  const disk = await createDisk({ name: `writes${process.pid}-${seq++}`, backend, scanPartitions: false });
  disks.push(disk);
  return { disk, backend };
}

function run(bio: Bio): Promise<Bio> {
  return new Promise((resolve) => {
    bio.endIo = (b) => resolve(b);
    submitBio(bio);
  });
}

/** 4 KiB of a pattern that differs per (block, round). */
function block(i: number, round: number): Buffer {
  const b = Buffer.alloc(4 * KiB);
  for (let j = 0; j < b.length; j += 4) b.writeUInt32LE((i * 2654435761 + round * 40503 + j) >>> 0, j);
  return b;
}

describe.runIf(nativeAvailable())('batched buffered writes', () => {
  it('writes what was asked, in batches, with every bio completed once', async () => {
    const tracker = enableBioDebug();
    const file = path.join(tmp, `img${seq++}.raw`);
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: 4 * MiB } });
    const blocks = 1024;
    const expected = Buffer.alloc(4 * MiB);
    // Rounds of 64 writes in flight at once, to blocks that repeat across rounds (and within
    // one: the later write of a block in a round is issued later, so it wins), plus a zeroing.
    for (let round = 0; round < 8; round++) {
      const bios: Array<Promise<Bio>> = [];
      for (let k = 0; k < 64; k++) {
        const i = (k * 37 + round * 11) % blocks;
        const data = block(i, round * 64 + k);
        const bio = Bio.write(disk.part0, (i * 4 * KiB) / 512, data);
        if (k % 16 === 0) bio.flags |= ReqFlag.FUA;
        bios.push(run(bio));
        data.copy(expected, i * 4 * KiB);
      }
      const zeroAt = ((round * 53) % blocks) * 4 * KiB;
      const zero = new Bio(ReqOp.WRITE_ZEROES, disk.part0, zeroAt / 512, 8 * KiB, []);
      zero.flags = ReqFlag.NOUNMAP;
      bios.push(run(zero));
      expected.fill(0, zeroAt, zeroAt + 8 * KiB);
      for (const b of await Promise.all(bios)) expect(b.status).toBe(BlkStatus.OK);
    }
    // Then writes that arrive on their own, as a server's requests do, a few per event-loop
    // turn whatever completes: many arrive while a batch runs and must go in the batch after.
    const total = 2000;
    await new Promise<void>((resolve, reject) => {
      let issued = 0;
      let completed = 0;
      const produce = (): void => {
        for (let n = 0; n < 5 && issued < total; n++) {
          const k = issued++;
          const i = (k * 7919) % blocks;
          const data = block(i, 1000 + k);
          data.copy(expected, i * 4 * KiB);
          const bio = Bio.write(disk.part0, (i * 4 * KiB) / 512, data);
          bio.endIo = (b) => {
            if (b.status !== BlkStatus.OK) reject(new Error(`write ${k} failed: ${b.status}`));
            if (++completed === total) resolve();
          };
          submitBio(bio);
        }
        if (issued < total) setImmediate(produce);
      };
      produce();
    });
    const s = backend.stats;
    expect(s.batchedWrites).toBe(8 * 65 + total);
    // Batching happened: far fewer batches than writes.
    expect(s.writeBatches).toBeLessThan(s.batchedWrites / 2);
    await disk.remove();
    disks.length = 0;
    expect(fs.readFileSync(file).equals(expected)).toBe(true);
    tracker.assertAllCompleted();
  });

  it('keeps thousands of writes in flight at once in order, with the queue compacted as it goes', async () => {
    const tracker = enableBioDebug();
    const file = path.join(tmp, `img${seq++}.raw`);
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: 4 * MiB } });
    const expected = Buffer.alloc(4 * MiB);
    const bios: Array<Promise<Bio>> = [];
    // 3,000 at once: batches of 256 leave thousands waiting, past the point where the queue's
    // submitted prefix is dropped. Blocks repeat: the later write of a block must win. (A period
    // that is not a power of two, so a queue shifted by the 1,024 dropped entries misplaces them.)
    for (let k = 0; k < 3000; k++) {
      const i = (k * 7) % 1021;
      const data = block(i, k);
      data.copy(expected, i * 4 * KiB);
      bios.push(run(Bio.write(disk.part0, (i * 4 * KiB) / 512, data)));
    }
    for (const b of await Promise.all(bios)) expect(b.status).toBe(BlkStatus.OK);
    expect(backend.stats.batchedWrites).toBe(3000);
    expect(backend.stats.writeBatches).toBeGreaterThanOrEqual(12);
    await disk.remove();
    disks.length = 0;
    expect(fs.readFileSync(file).equals(expected)).toBe(true);
    tracker.assertAllCompleted();
  });

  it('fails alone a write whose buffer was detached before its batch went, and completes the others', async () => {
    const file = path.join(tmp, `img${seq++}.raw`);
    const { disk } = await fileDisk(file, { create: { sizeBytes: MiB } });
    const good = Buffer.alloc(4 * KiB, 0x61);
    const gone = Buffer.alloc(4 * KiB, 0x62);
    const a = run(Bio.write(disk.part0, 0, good));
    const b = run(Bio.write(disk.part0, 8, gone));
    // A caller's bug: the buffer is transferred away while its write is queued.
    structuredClone(gone.buffer, { transfer: [gone.buffer] });
    const [ra, rb] = await Promise.all([a, b]);
    expect(ra.status).toBe(BlkStatus.OK);
    expect(rb.status).not.toBe(BlkStatus.OK);
    expect(rb.error?.message).toMatch(/bad arguments/);
    expect(fs.readFileSync(file).subarray(0, 4 * KiB).equals(good)).toBe(true);
  });

  it('sends a multi-vec write to the threadpool, and batches nothing with writeBatching: false or sync', async () => {
    const file = path.join(tmp, `img${seq++}.raw`);
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: MiB }, writeBatching: false });
    const a = Buffer.alloc(4 * KiB, 0xa1);
    const b = Buffer.alloc(4 * KiB, 0xb2);
    const w = new Bio(ReqOp.WRITE, disk.part0, 0, 8 * KiB, [new BioVec(a, 0, a.length), new BioVec(b, 0, b.length)]);
    expect((await run(w)).status).toBe(BlkStatus.OK);
    expect((await run(Bio.write(disk.part0, 16, Buffer.alloc(4 * KiB, 0xc3)))).status).toBe(BlkStatus.OK);
    expect(backend.stats.writeBatches).toBe(0);
    await disk.remove();
    disks.length = 0;
    const got = fs.readFileSync(file);
    expect(got.subarray(0, 4 * KiB).every((x) => x === 0xa1) && got.subarray(4 * KiB, 8 * KiB).every((x) => x === 0xb2)).toBe(true);
    expect(got.subarray(8 * KiB, 12 * KiB).every((x) => x === 0xc3)).toBe(true);
    // O_DSYNC: every write waits for the disk, and those waits overlap only on threads of their own.
    const { disk: d2, backend: synced } = await fileDisk(file, { sync: true });
    expect((await run(Bio.write(d2.part0, 0, Buffer.alloc(4 * KiB, 0xd4)))).status).toBe(BlkStatus.OK);
    expect(synced.stats.writeBatches).toBe(0);
  });

  it('fails each write the kernel refuses with IOERR and its errno', async () => {
    const mem = await createDisk({ name: `writes-mem${seq++}`, backend: new MemoryBackend({ sizeBytes: MiB }), scanPartitions: false });
    disks.push(mem);
    const file = path.join(tmp, `img${seq++}.raw`);
    fs.writeFileSync(file, Buffer.alloc(MiB));
    // Read-only: every pwrite fails with EBADF, as a write to a full or broken disk would fail.
    const fd = fs.openSync(file, 'r');
    const engine = new FileEngine(file, `file:${file}`, fd, false, false, 512, false, () => 0, false, { native: null, depth: 1, reason: null, batchWrites: true, inlineWrites: false });
    const outcomes = await Promise.all(
      [0, 1, 2].map(
        (i) =>
          new Promise<[BlkStatus, string | undefined, string | undefined]>((resolve) => {
            const sink: CompletionSink = { complete: (bio, status) => resolve([status, bio.error?.code, bio.error?.message]) };
            engine.start(Bio.write(mem.part0, i * 8, Buffer.alloc(4 * KiB, 1)), sink);
          }),
      ),
    );
    await engine.close();
    fs.closeSync(fd);
    for (const [status, code, message] of outcomes) {
      expect(status).toBe(BlkStatus.IOERR);
      expect(code).toBe('EBADF');
      expect(message).toContain(file);
    }
    expect(engine.stats.batchedWrites).toBe(3);
  });
});
