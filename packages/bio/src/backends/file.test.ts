import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { allocIoBuffer, isIoBufferAligned } from '../aligned.js';
import { Bio, BioVec, type CompletionSink } from '../bio.js';
import { createDisk, type Disk, type DiskOptions } from '../device.js';
import { BlkError, InvalidArgumentError, NoSuchDeviceError } from '../errors.js';
import { blkdevDiscard, blkdevFlush, blkdevRead, blkdevWrite, blkdevZeroout } from '../io.js';
import { ReqFlag, ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';
import { submitBio } from '../submit.js';
import { findDirectIoDir } from '../testing.js';
import { FileBackend, type FileBackendOptions } from './file.js';

const MiB = 1 << 20;

let tmp = '';
beforeAll(() => {
  tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-file-'));
});
afterAll(() => {
  fs.rmSync(tmp, { recursive: true, force: true });
});

let seq = 0;
const disks: Disk[] = [];
afterEach(async () => {
  for (const d of disks.splice(0)) await d.remove();
});

function imagePath(dir = tmp): string {
  return path.join(dir, `img${seq++}.raw`);
}

async function fileDisk(file: string, options: FileBackendOptions = {}, disk: Partial<DiskOptions> = {}): Promise<{ disk: Disk; backend: FileBackend }> {
  const backend = await FileBackend.open(file, options);
  const d = await createDisk({ name: `file${process.pid}-${seq++}`, backend, scanPartitions: false, ...disk });
  disks.push(d);
  return { disk: d, backend };
}

/** Submits `bio` and resolves with it once it completes, whatever its status. */
function run(bio: Bio): Promise<Bio> {
  return new Promise((resolve) => {
    bio.endIo = resolve;
    submitBio(bio);
  });
}

/**
 * Byte equality for large buffers: vitest's toEqual walks a Buffer element by element
 * (seconds per MiB); this compares natively and reports the first differing offset.
 */
function expectBytes(actual: Uint8Array, expected: Uint8Array): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(e)) return;
  let i = 0;
  while (i < a.length && i < e.length && a[i] === e[i]) i++;
  expect.fail(`buffers differ: lengths ${a.length} and ${e.length}, first difference at byte ${i}`);
}

function allocatedBytes(file: string): number {
  return fs.statSync(file).blocks * 512;
}

// O_DIRECT needs a filesystem that supports it; tmpfs does not (EINVAL at open). Probe the
// system temp dir, then a directory inside the package, which sits on the repository's disk.
const directDir = findDirectIoDir([os.tmpdir(), path.join(fileURLToPath(new URL('../../', import.meta.url)), '.test-tmp')]);
if (directDir === null) console.warn('skipping the FileBackend O_DIRECT tests: neither the temp dir nor the package dir supports O_DIRECT');

describe('allocIoBuffer and isIoBufferAligned', () => {
  it('gives zero-filled aligned buffers and recognises their aligned views', () => {
    const buf = allocIoBuffer(3 * 4096);
    expect(buf.length).toBe(3 * 4096);
    expect(buf.every((b) => b === 0)).toBe(true);
    expect(isIoBufferAligned(buf, 0, buf.length, 4096)).toBe(true);
    expect(isIoBufferAligned(buf, 4096, 8192, 4096)).toBe(true);
    expect(isIoBufferAligned(buf, 512, 4096, 4096)).toBe(false);
    expect(isIoBufferAligned(buf, 0, 1000, 4096)).toBe(false);
    expect(isIoBufferAligned(buf, 512, 512, 512)).toBe(true);
    // A view shares the ArrayBuffer: its own byteOffset counts.
    const view = buf.subarray(4096);
    expect(isIoBufferAligned(view, 0, 4096, 4096)).toBe(true);
    const off = buf.subarray(512);
    expect(isIoBufferAligned(off, 0, 4096, 4096)).toBe(false);
    expect(isIoBufferAligned(off, 3584, 4096, 4096)).toBe(true);
    expect(isIoBufferAligned(new Uint8Array(buf.buffer, buf.byteOffset + 8192, 4096), 0, 4096, 4096)).toBe(true);
  });

  it('does not vouch for ordinary buffers or for more alignment than was asked', () => {
    expect(isIoBufferAligned(Buffer.alloc(8192), 0, 4096, 4096)).toBe(false);
    expect(isIoBufferAligned(new Uint8Array(8192), 0, 4096, 512)).toBe(false);
    const small = allocIoBuffer(8192, 512);
    expect(isIoBufferAligned(small, 0, 4096, 512)).toBe(true);
    expect(isIoBufferAligned(small, 0, 4096, 4096)).toBe(false);
  });

  it('refuses bad sizes and alignments', () => {
    expect(() => allocIoBuffer(-1)).toThrow(InvalidArgumentError);
    expect(() => allocIoBuffer(4096, 3000)).toThrow(/power of two/);
    expect(allocIoBuffer(0).length).toBe(0);
  });
});

describe('FileBackend', () => {
  it('creates a sparse image; data written is data read back, also from the file itself', async () => {
    const file = imagePath();
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: 8 * MiB } });
    expect(backend.sizeBytes).toBe(8 * MiB);
    expect(disk.capacity).toBe((8 * MiB) / 512);
    expect(backend.description).toContain(file);
    expect(fs.statSync(file).size).toBe(8 * MiB);
    expect(allocatedBytes(file)).toBeLessThan(MiB);

    const data = randomBytes(192 * 1024);
    await blkdevWrite(disk.part0, 3 * MiB + 512, data);
    expectBytes(await blkdevRead(disk.part0, 3 * MiB + 512, data.length), data);
    expectBytes(await blkdevRead(disk.part0, 0, MiB), Buffer.alloc(MiB));

    const image = fs.readFileSync(file);
    expectBytes(image.subarray(3 * MiB + 512, 3 * MiB + 512 + data.length), data);
    expectBytes(image.subarray(0, 3 * MiB + 512), Buffer.alloc(3 * MiB + 512));

    // A bio larger than maxSectors is split by blkdevWrite and lands whole.
    const big = randomBytes(5 * MiB);
    await blkdevWrite(disk.part0, 2 * MiB, big);
    expectBytes(await blkdevRead(disk.part0, 2 * MiB, big.length), big);
  });

  it('reads and writes bios with several vecs, with offsets into their buffers', async () => {
    const { disk } = await fileDisk(imagePath(), { create: { sizeBytes: 4 * MiB } });
    const a = randomBytes(8192);
    const b = randomBytes(3 * 512);
    const c = randomBytes(4096 + 512);
    const wvecs = [new BioVec(a, 1024, 4096), new BioVec(b), new BioVec(c, 512, 4096), new BioVec(a, 0, 0)];
    const size = 4096 + 1536 + 4096;
    const w = await run(new Bio(ReqOp.WRITE, disk.part0, 64, size, wvecs));
    expect(w.status).toBe(BlkStatus.OK);
    const expected = Buffer.concat([a.subarray(1024, 5120), b, c.subarray(512, 4608)]);
    expectBytes(await blkdevRead(disk.part0, 64 * 512, size), expected);

    // Read it back through a different split of vecs.
    const r1 = Buffer.alloc(512);
    const r2 = Buffer.alloc(10000, 0xff);
    const r3 = Buffer.alloc(size - 512 - 6000);
    const r = await run(new Bio(ReqOp.READ, disk.part0, 64, size, [new BioVec(r1), new BioVec(r2, 100, 6000), new BioVec(r3)]));
    expect(r.status).toBe(BlkStatus.OK);
    expectBytes(Buffer.concat([r1, r2.subarray(100, 6100), r3]), expected);
    expectBytes(r2.subarray(0, 100), Buffer.alloc(100, 0xff));
    expectBytes(r2.subarray(6100), Buffer.alloc(10000 - 6100, 0xff));
  });

  it('completes FLUSH, and WRITE with PREFLUSH and FUA, with or without O_DSYNC, with one fdatasync per flush point', async () => {
    for (const sync of [false, true]) {
      const { disk, backend } = await fileDisk(imagePath(), { create: { sizeBytes: MiB }, sync });
      expect(backend.sync).toBe(sync);
      expect(disk.backend.capabilities.writeCache).toBe(true);
      /** fdatasync calls made for `bio` alone (the disk is otherwise idle). */
      const syncsOf = async (bio: Bio): Promise<number> => {
        const before = backend.stats.syncs;
        expect((await run(bio)).status).toBe(BlkStatus.OK);
        return backend.stats.syncs - before;
      };
      const data = randomBytes(4096);
      // A plain write is volatile: no sync. FUA syncs after the write, unless O_DSYNC made the write stable.
      expect(await syncsOf(Bio.write(disk.part0, 0, data))).toBe(0);
      expect(await syncsOf(Bio.write(disk.part0, 0, data, ReqFlag.FUA))).toBe(sync ? 0 : 1);
      // PREFLUSH syncs before the write, whatever the mode: earlier writes must be stable first.
      expect(await syncsOf(Bio.write(disk.part0, 16, data, ReqFlag.PREFLUSH))).toBe(1);
      expect(await syncsOf(Bio.write(disk.part0, 16, data, ReqFlag.PREFLUSH | ReqFlag.FUA))).toBe(sync ? 1 : 2);
      expect(await syncsOf(new Bio(ReqOp.FLUSH, disk.part0, 0, 0))).toBe(1);
      const before = backend.stats.syncs;
      await blkdevFlush(disk.part0);
      expect(backend.stats.syncs - before).toBe(1);
      expectBytes(await blkdevRead(disk.part0, 8192, 4096), data);
      // A punched hole is not covered by O_DSYNC: FUA syncs it in both modes.
      const discard = new Bio(ReqOp.DISCARD, disk.part0, 0, 4096);
      discard.flags = ReqFlag.FUA | ReqFlag.PREFLUSH;
      expect(await syncsOf(discard)).toBe(2);
      expectBytes(await blkdevRead(disk.part0, 0, 4096), Buffer.alloc(4096));
      // Reads never sync.
      expect(await syncsOf(new Bio(ReqOp.READ, disk.part0, 0, 4096, [new BioVec(Buffer.alloc(4096))]))).toBe(0);
    }
  });

  it('DISCARD punches a hole: blocks are freed, the size stays, reads return zeros', async () => {
    const file = imagePath();
    const { disk } = await fileDisk(file, { create: { sizeBytes: 4 * MiB } });
    await blkdevWrite(disk.part0, 0, randomBytes(4 * MiB));
    await blkdevFlush(disk.part0);
    const before = allocatedBytes(file);
    expect(before).toBeGreaterThanOrEqual(4 * MiB);

    await blkdevDiscard(disk.part0, MiB, 2 * MiB);
    expect(fs.statSync(file).size).toBe(4 * MiB);
    expect(allocatedBytes(file)).toBeLessThanOrEqual(before - 2 * MiB);
    expectBytes(await blkdevRead(disk.part0, MiB, 2 * MiB), Buffer.alloc(2 * MiB));
    expectBytes(fs.readFileSync(file).subarray(MiB, 3 * MiB), Buffer.alloc(2 * MiB));
    expect((disk.backend as FileBackend).stats.punchFallbacks).toBe(0);
  });

  it('WRITE_ZEROES punches a hole, or with NOUNMAP writes zeros and keeps the blocks', async () => {
    const file = imagePath();
    const { disk } = await fileDisk(file, { create: { sizeBytes: 8 * MiB } });
    await blkdevWrite(disk.part0, 0, randomBytes(8 * MiB));
    await blkdevFlush(disk.part0);
    const full = allocatedBytes(file);

    await blkdevZeroout(disk.part0, 512, 2 * MiB);
    await blkdevFlush(disk.part0);
    const punched = allocatedBytes(file);
    expect(punched).toBeLessThan(full - MiB);
    expectBytes(await blkdevRead(disk.part0, 512, 2 * MiB), Buffer.alloc(2 * MiB));

    // 3 MiB: more than one 1 MiB chunk of the shared zero buffer.
    await blkdevZeroout(disk.part0, 4 * MiB + 1024, 3 * MiB, { noUnmap: true });
    await blkdevFlush(disk.part0);
    expect(allocatedBytes(file)).toBeGreaterThanOrEqual(punched);
    expectBytes(await blkdevRead(disk.part0, 4 * MiB + 1024, 3 * MiB), Buffer.alloc(3 * MiB));

    const image = fs.readFileSync(file);
    expectBytes(image.subarray(512, 512 + 2 * MiB), Buffer.alloc(2 * MiB));
    expectBytes(image.subarray(4 * MiB + 1024, 7 * MiB + 1024), Buffer.alloc(3 * MiB));
    expect(image.subarray(7 * MiB + 1024).some((x) => x !== 0)).toBe(true);
    expect(fs.statSync(file).size).toBe(8 * MiB);
  });

  it('reads zeros past the end of a file shorter than the disk', async () => {
    const file = imagePath();
    const head = randomBytes(8192 + 1024);
    const { disk } = await fileDisk(file, { create: { sizeBytes: MiB } });
    await blkdevWrite(disk.part0, 0, Buffer.concat([head, Buffer.alloc(1024)]));
    // Truncated behind the backend's back, to a size that is not even a whole block.
    fs.truncateSync(file, head.length);
    const all = await blkdevRead(disk.part0, 0, MiB);
    expectBytes(all.subarray(0, head.length), head);
    expectBytes(all.subarray(head.length), Buffer.alloc(MiB - head.length));
    const r = Buffer.alloc(4096, 0xee);
    const bio = await run(new Bio(ReqOp.READ, disk.part0, 16, 8192, [new BioVec(r), new BioVec(Buffer.alloc(4096, 0xee))]));
    expect(bio.status).toBe(BlkStatus.OK);
    expectBytes(r.subarray(0, 1024), head.subarray(8192));
    expectBytes(r.subarray(1024), Buffer.alloc(3072));
  });

  it('reads small single-vec bios inline from the page cache, completing them later, never inside queueBio', async () => {
    // A stopped clock: every inline read takes 0 ms, so none counts as a miss however busy the machine.
    const { disk, backend } = await fileDisk(imagePath(), { create: { sizeBytes: 4 * MiB }, inlineReadClock: () => 0 });
    const data = randomBytes(256 * 1024);
    await blkdevWrite(disk.part0, MiB, data);
    expect(backend.stats.inlineReads).toBe(0);
    // Many at once, as an NBD server at QD32 submits them: each completes after submitBio returned.
    const bios: Bio[] = [];
    let returned = false;
    let early = 0;
    const done = Promise.all(
      Array.from({ length: 32 }, (_, i) => {
        const bio = new Bio(ReqOp.READ, disk.part0, (MiB + i * 4096) / 512, 4096, [new BioVec(Buffer.alloc(4096))]);
        bios.push(bio);
        return new Promise<void>((resolve) => {
          bio.endIo = () => {
            if (!returned) early++;
            resolve();
          };
        });
      }),
    );
    for (const bio of bios) submitBio(bio);
    returned = true;
    await done;
    expect(early).toBe(0);
    for (let i = 0; i < bios.length; i++) {
      const bio = bios[i] as Bio;
      expect(bio.status).toBe(BlkStatus.OK);
      expectBytes((bio.vecs[0] as BioVec).buffer, data.subarray(i * 4096, i * 4096 + 4096));
    }
    expect(backend.stats.inlineReads).toBe(32);
    // Up to 64 KiB inline; larger reads and several vecs still go to the threadpool.
    expectBytes(await blkdevRead(disk.part0, MiB, 64 * 1024), data.subarray(0, 64 * 1024));
    expect(backend.stats.inlineReads).toBe(33);
    expectBytes(await blkdevRead(disk.part0, MiB, 128 * 1024), data.subarray(0, 128 * 1024));
    const a = Buffer.alloc(4096);
    const b = Buffer.alloc(4096);
    expect((await run(new Bio(ReqOp.READ, disk.part0, MiB / 512, 8192, [new BioVec(a), new BioVec(b)]))).status).toBe(BlkStatus.OK);
    expectBytes(Buffer.concat([a, b]), data.subarray(0, 8192));
    expect(backend.stats.inlineReads).toBe(33);
    // Writes never go inline.
    await blkdevWrite(disk.part0, 0, randomBytes(4096));
    expect(backend.stats.inlineReads).toBe(33);
    expect(backend.stats.inlineMisses).toBe(0);
  });

  it('backs off inline reads after two slow ones, by the clock it was given', async () => {
    // Every reading of this clock is 1 ms after the last: each inline read seems to take 1 ms,
    // a disk read (over INLINE_MISS_MS), so the second one in a row pauses inline reads.
    let now = 0;
    const { disk, backend } = await fileDisk(imagePath(), { create: { sizeBytes: MiB }, inlineReadClock: () => ++now });
    await blkdevWrite(disk.part0, 0, randomBytes(8192));
    await blkdevRead(disk.part0, 0, 4096);
    expect(backend.stats).toMatchObject({ inlineReads: 1, inlineMisses: 0 });
    await blkdevRead(disk.part0, 4096, 4096);
    expect(backend.stats).toMatchObject({ inlineReads: 2, inlineMisses: 1 });
    // Paused (50 ms of this clock): the next reads go to the threadpool.
    for (let i = 0; i < 5; i++) await blkdevRead(disk.part0, 0, 4096);
    expect(backend.stats).toMatchObject({ inlineReads: 2, inlineMisses: 1 });
    // Once the clock passes the pause, one probe read goes inline, is slow again, and pauses again.
    now += 100;
    await blkdevRead(disk.part0, 0, 4096);
    await blkdevRead(disk.part0, 0, 4096);
    expect(backend.stats).toMatchObject({ inlineReads: 3, inlineMisses: 2 });
  });

  it('reads through the threadpool only with inlineReads: false', async () => {
    const file = imagePath();
    fs.writeFileSync(file, randomBytes(MiB));
    const { disk, backend } = await fileDisk(file, { inlineReads: false });
    expectBytes(await blkdevRead(disk.part0, 4096, 4096), fs.readFileSync(file).subarray(4096, 8192));
    expect(backend.stats.inlineReads).toBe(0);
  });

  it('refuses writes when opened read-only: the disk is read-only and bios fail with EROFS', async () => {
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(MiB, 7));
    const { disk, backend } = await fileDisk(file, { readOnly: true });
    expect(backend.readOnly).toBe(true);
    expect(disk.part0.readOnly).toBe(true);
    const bio = await run(Bio.write(disk.part0, 0, Buffer.alloc(512)));
    expect(bio.status).toBe(BlkStatus.IOERR);
    expect(bio.error?.code).toBe('EROFS');
    expect((await run(new Bio(ReqOp.DISCARD, disk.part0, 0, 512))).status).toBe(BlkStatus.IOERR);
    expectBytes(await blkdevRead(disk.part0, 0, 4096), Buffer.alloc(4096, 7));
    await blkdevFlush(disk.part0);
    expectBytes(fs.readFileSync(file), Buffer.alloc(MiB, 7));
  });

  it('throws a typed ENOENT error naming a missing file', async () => {
    const file = path.join(tmp, 'missing', 'nope.raw');
    const err = await FileBackend.open(file).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(NoSuchDeviceError);
    expect(BlkError.isInstance(err)).toBe(true);
    expect((err as BlkError).code).toBe('ENOENT');
    expect((err as BlkError).message).toContain(file);
  });

  it('refuses a file whose size is not a multiple of 512, saying how to fix it', async () => {
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(1000));
    const err = await FileBackend.open(file).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as BlkError).message).toContain(file);
    expect((err as BlkError).message).toMatch(/1000 bytes, which is not a multiple of 512.*truncate -s 1024/);
  });

  it('does not resize an existing image unless asked', async () => {
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(MiB, 1));
    const err = await FileBackend.open(file, { create: { sizeBytes: 2 * MiB } }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(InvalidArgumentError);
    expect((err as Error).message).toMatch(/exists with 1048576 bytes.*resize: true/);
    expect(fs.statSync(file).size).toBe(MiB);

    const same = await FileBackend.open(file, { create: { sizeBytes: MiB } });
    expect(same.sizeBytes).toBe(MiB);
    await same.close();

    const grown = await FileBackend.open(file, { create: { sizeBytes: 2 * MiB }, resize: true });
    expect(grown.sizeBytes).toBe(2 * MiB);
    expect(fs.statSync(file).size).toBe(2 * MiB);
    await grown.close();
    await grown.close();
    expect(grown.fd).toBe(-1);

    await expect(FileBackend.open(file, { resize: true })).rejects.toThrow(/needs create/);
    await expect(FileBackend.open(file, { create: { sizeBytes: 1000 } })).rejects.toThrow(/multiple of 512/);
    await expect(FileBackend.open(tmp)).rejects.toThrow(InvalidArgumentError);
  });

  it('completes bios after close with OFFLINE and never throws from queueBio', async () => {
    const file = imagePath();
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: MiB } });
    const done: Array<[Bio, BlkStatus]> = [];
    const sink: CompletionSink = { complete: (bio, status) => done.push([bio, status]) };

    // A buffer detached after the bio was checked: fs.read throws synchronously.
    const buf = new Uint8Array(4096);
    const bio = Bio.read(disk.part0, 0, buf);
    structuredClone(buf.buffer, { transfer: [buf.buffer] });
    expect(() => backend.queueBio(bio, sink)).not.toThrow();
    expect(done).toHaveLength(1);
    expect(done[0]?.[1]).toBe(BlkStatus.IOERR);
    expect(bio.error?.message).toContain(file);

    await backend.close();
    const late = Bio.read(disk.part0, 0, Buffer.alloc(512));
    backend.queueBio(late, sink);
    expect(done[1]?.[1]).toBe(BlkStatus.OFFLINE);
    expect(late.error?.code).toBe('ENODEV');
  });

  it('keeps 200 concurrent random 4 KiB writes straight, against an in-memory model', async () => {
    const blocks = 1024;
    const file = imagePath();
    const { disk } = await fileDisk(file, { create: { sizeBytes: blocks * 4096 } });
    const model = Buffer.alloc(blocks * 4096);
    for (let round = 0; round < 3; round++) {
      // Distinct blocks within a round: two writes to one block in flight at once have no order.
      const picked = new Set<number>();
      while (picked.size < 200) picked.add(Math.floor(Math.random() * blocks));
      const writes = [...picked].map((blk) => {
        const data = randomBytes(4096);
        data.copy(model, blk * 4096);
        return blkdevWrite(disk.part0, blk * 4096, data);
      });
      expect(disk.inflight).toBeGreaterThan(1);
      await Promise.all(writes);
      const reads = [...picked].map(async (blk) => {
        expectBytes(await blkdevRead(disk.part0, blk * 4096, 4096), model.subarray(blk * 4096, blk * 4096 + 4096));
      });
      await Promise.all(reads);
    }
    expectBytes(await blkdevRead(disk.part0, 0, model.length), model);
    expectBytes(fs.readFileSync(file), model);
  });
});

describe.skipIf(directDir === null)(`FileBackend with O_DIRECT (in ${directDir ?? 'no directory supporting O_DIRECT'})`, () => {
  let dir = '';
  beforeAll(() => {
    dir = fs.mkdtempSync(path.join(directDir as string, 'blkfilter-direct-'));
  });
  afterAll(() => {
    fs.rmSync(dir, { recursive: true, force: true });
    if (directDir !== os.tmpdir()) {
      try {
        fs.rmdirSync(directDir as string);
      } catch {
        // not empty: another run is using it
      }
    }
  });

  function oDirectSet(fd: number): boolean {
    if (process.platform !== 'linux') return true;
    const flags = /flags:\s+([0-7]+)/.exec(fs.readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))?.[1] ?? '0';
    return (parseInt(flags, 8) & (fs.constants.O_DIRECT as number)) !== 0;
  }

  it('uses aligned buffers as they are and bounces unaligned ones, on a 4096-byte disk', async () => {
    const file = path.join(dir, 'd4k.raw');
    const { disk, backend } = await fileDisk(file, { direct: true, create: { sizeBytes: 8 * MiB } }, { logicalBlockSize: 4096 });
    expect(backend.direct).toBe(true);
    expect(backend.minIoSize).toBe(4096);
    expect(disk.limits.logicalBlockSize).toBe(4096);
    expect(oDirectSet(backend.fd)).toBe(true);

    // Aligned: straight to the kernel.
    const src = allocIoBuffer(64 * 1024);
    randomBytes(src.length).copy(src);
    await blkdevWrite(disk.part0, MiB, src);
    const dst = allocIoBuffer(64 * 1024);
    await blkdevRead(disk.part0, MiB, dst.length, dst);
    expectBytes(dst, src);
    const multi = allocIoBuffer(3 * 4096);
    const r = await run(new Bio(ReqOp.READ, disk.part0, MiB / 512, 8192, [new BioVec(multi, 8192, 4096), new BioVec(multi, 0, 4096)]));
    expect(r.status).toBe(BlkStatus.OK);
    expectBytes(multi.subarray(8192), src.subarray(0, 4096));
    expectBytes(multi.subarray(0, 4096), src.subarray(4096, 8192));
    expect(backend.stats.bouncedBios).toBe(0);
    // O_DIRECT reads always go to the disk: never inline.
    expect(backend.stats.inlineReads).toBe(0);

    // Unaligned: an ordinary buffer, a misaligned view of an aligned one, a mix of vecs.
    const plain = randomBytes(8192);
    await blkdevWrite(disk.part0, 0, plain);
    expectBytes(await blkdevRead(disk.part0, 0, 8192), plain);
    const mis = allocIoBuffer(4096 + 512 + 16384).subarray(512);
    await blkdevRead(disk.part0, MiB, 16384, mis);
    expectBytes(mis.subarray(0, 16384), src.subarray(0, 16384));
    const mixed = [new BioVec(allocIoBuffer(4096)), new BioVec(Buffer.alloc(4096 + 3), 3, 4096)];
    const w = await run(new Bio(ReqOp.WRITE, disk.part0, 2 * (MiB / 512), 8192, mixed));
    expect(w.status).toBe(BlkStatus.OK);
    const bounced = backend.stats.bouncedBios;
    expect(bounced).toBe(4);

    // A bio bigger than any before grows the bounce buffers.
    const large = randomBytes(2 * MiB);
    await blkdevWrite(disk.part0, 4 * MiB, large);
    expectBytes(await blkdevRead(disk.part0, 4 * MiB, large.length), large);
    expect(backend.stats.bouncedBios).toBeGreaterThan(bounced);

    // Zeroing through the shared aligned zero buffer, and punching.
    await blkdevZeroout(disk.part0, 4 * MiB, MiB, { noUnmap: true });
    await blkdevDiscard(disk.part0, 5 * MiB, 4096);
    await blkdevFlush(disk.part0);
    const image = fs.readFileSync(file);
    expectBytes(image.subarray(MiB, MiB + src.length), src);
    expectBytes(image.subarray(0, 8192), plain);
    expectBytes(image.subarray(2 * MiB + 4096, 2 * MiB + 8192), Buffer.alloc(4096));
    expectBytes(image.subarray(4 * MiB, 5 * MiB + 4096), Buffer.alloc(MiB + 4096));
    expectBytes(image.subarray(5 * MiB + 4096, 6 * MiB), large.subarray(MiB + 4096));
  });

  it('works with 512-byte alignment on a 512-byte disk', async () => {
    const file = path.join(dir, 'd512.raw');
    const { disk, backend } = await fileDisk(file, { direct: true, minIoSize: 512, create: { sizeBytes: MiB } });
    expect(disk.limits.logicalBlockSize).toBe(512);
    const aligned = allocIoBuffer(1536, 512);
    randomBytes(1536).copy(aligned);
    await blkdevWrite(disk.part0, 512, aligned);
    const back = allocIoBuffer(2048, 512).subarray(512);
    await blkdevRead(disk.part0, 512, 1536, back);
    expectBytes(back, aligned);
    expect(backend.stats.bouncedBios).toBe(0);
    const odd = randomBytes(1024);
    await blkdevWrite(disk.part0, 4096, odd);
    expectBytes(await blkdevRead(disk.part0, 4096, 1024), odd);
    expect(backend.stats.bouncedBios).toBe(2);
  });

  it('refuses a 512-byte disk over a 4096-aligned O_DIRECT backend', async () => {
    const backend = await FileBackend.open(path.join(dir, 'refuse.raw'), { direct: true, create: { sizeBytes: MiB } });
    await expect(createDisk({ name: `file${process.pid}-${seq++}`, backend, logicalBlockSize: 512, scanPartitions: false })).rejects.toThrow(
      /smaller than its backend's minimum I\/O size 4096/,
    );
    await backend.close();
  });
});
