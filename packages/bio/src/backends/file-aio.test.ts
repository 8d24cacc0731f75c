import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { AioContext, errnoName, nativeLoadError } from '@blkfilter/native';
import { aioResources } from '@blkfilter/native/testing';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { allocIoBuffer } from '../aligned.js';
import { Bio, BioVec, disableBioDebug, enableBioDebug, type CompletionSink } from '../bio.js';
import { createDisk, type Disk } from '../device.js';
import { InvalidArgumentError } from '../errors.js';
import { blkdevRead, blkdevWrite } from '../io.js';
import { ReqOp } from '../op.js';
import { BlkStatus } from '../status.js';
import { submitBio } from '../submit.js';
import { findDirectIoDir } from '../testing.js';
import { MemoryBackend } from './memory.js';
import { aioError, type AioModule } from './file-aio.js';
import { FileEngine, statusForErrno, type FileEngineIo } from './file-request.js';
import { FileBackend, type FileBackendOptions } from './file.js';

// O_DIRECT reads and writes through Linux native AIO (file-aio.ts). They need a filesystem that
// takes O_DIRECT and the native addon; where either is missing the suite is skipped and says why.

const KiB = 1024;
const MiB = 1 << 20;

const directDir = findDirectIoDir([os.tmpdir(), path.join(fileURLToPath(new URL('../../', import.meta.url)), '.test-tmp')]);
const native: AioModule = { AioContext, errnoName };
const skipReason =
  process.platform !== 'linux'
    ? `Linux native AIO is Linux only (${process.platform})`
    : directDir === null
      ? 'neither the temp dir nor the package dir supports O_DIRECT'
      : nativeLoadError();
if (skipReason !== null) console.warn(`skipping the FileBackend AIO tests: ${skipReason}`);

let dir = '';
let seq = 0;
const disks: Disk[] = [];
const backends: FileBackend[] = [];

beforeAll(() => {
  if (directDir !== null) dir = fs.mkdtempSync(path.join(directDir, 'blkfilter-aio-'));
});
afterEach(async () => {
  disableBioDebug();
  for (const d of disks.splice(0)) await d.remove();
  for (const b of backends.splice(0)) await b.close();
});
afterAll(() => {
  if (dir !== '') fs.rmSync(dir, { recursive: true, force: true });
});

function imagePath(): string {
  return path.join(dir, `img${seq++}.raw`);
}

async function fileDisk(file: string, options: FileBackendOptions = {}, maxSectors?: number): Promise<{ disk: Disk; backend: FileBackend }> {
  const backend = await FileBackend.open(file, { direct: true, ...options });
  const disk = await createDisk({
    name: `aio${process.pid}-${seq++}`,
    backend,
    logicalBlockSize: 4096,
    scanPartitions: false,
    ...(maxSectors === undefined ? {} : { limits: { maxSectors } }),
  });
  disks.push(disk);
  return { disk, backend };
}

/** Submits `bio` and resolves with it once it completes, whatever its status. */
function run(bio: Bio): Promise<Bio> {
  return new Promise((resolve) => {
    bio.endIo = resolve;
    submitBio(bio);
  });
}

/** Byte equality reporting the first differing offset (toEqual on large buffers is slow). */
function expectBytes(actual: Uint8Array, expected: Uint8Array, what = ''): void {
  const a = Buffer.from(actual.buffer, actual.byteOffset, actual.byteLength);
  const e = Buffer.from(expected.buffer, expected.byteOffset, expected.byteLength);
  if (a.equals(e)) return;
  let i = 0;
  while (i < a.length && i < e.length && a[i] === e[i]) i++;
  expect.fail(`${what} bytes differ at offset ${i} (lengths ${a.length} and ${e.length})`);
}

/**
 * The vecs of a bio of `size` bytes over `data`, in one of three shapes: one aligned buffer,
 * several aligned buffers (preadv/pwritev), or unaligned buffers (bounced).
 */
function vecsOf(data: Buffer, shape: 'one' | 'multi' | 'unaligned'): BioVec[] {
  if (shape === 'one') {
    const b = allocIoBuffer(data.length);
    data.copy(b);
    return [new BioVec(b)];
  }
  const vecs: BioVec[] = [];
  // One to three units each, at most ~16 vecs (a bio has at most 256 segments).
  const unit = Math.max(4096, Math.ceil(data.length / 8 / 4096) * 4096);
  for (let off = 0; off < data.length; ) {
    const len = Math.min(data.length - off, unit * (1 + (vecs.length % 3)));
    if (shape === 'multi') {
      const b = allocIoBuffer(len + 8192);
      data.copy(b, 4096, off, off + len);
      vecs.push(new BioVec(b, 4096, len));
    } else {
      const b = Buffer.alloc(len + 7);
      data.copy(b, 7, off, off + len);
      vecs.push(new BioVec(b, 7, len));
    }
    off += len;
  }
  return vecs;
}

function gather(vecs: readonly BioVec[]): Buffer {
  return Buffer.concat(vecs.map((v) => v.buffer.subarray(v.offset, v.offset + v.length)));
}

describe.skipIf(nativeLoadError() !== null)('AIO errors', () => {
  it('map -errno to the status and error the threadpool gives (errno_to_blk_status)', () => {
    const cases: Array<[number, string, BlkStatus]> = [
      [28, 'ENOSPC', BlkStatus.NOSPC],
      [122, 'EDQUOT', BlkStatus.NOSPC],
      [11, 'EAGAIN', BlkStatus.AGAIN],
      [12, 'ENOMEM', BlkStatus.RESOURCE],
      [5, 'EIO', BlkStatus.IOERR],
      [9, 'EBADF', BlkStatus.IOERR],
      [30, 'EROFS', BlkStatus.IOERR],
      [121, 'EREMOTEIO', BlkStatus.IOERR],
    ];
    for (const [errno, code, status] of cases) {
      const e = aioError(errno, 'write', native);
      expect(e.code, code).toBe(code);
      expect(e.errno).toBe(-errno);
      expect(e.message).toMatch(new RegExp(`^${code}: .+, write$`));
      expect(e.message).not.toMatch(/errno \d/);
      expect(statusForErrno(e.code), code).toBe(status);
    }
  });
});

describe.skipIf(skipReason !== null)(`FileBackend O_DIRECT through Linux native AIO (in ${directDir ?? 'nowhere'})`, () => {
  it('moves data through AIO: random offsets, one vec, several vecs, unaligned vecs (bounced), 4 MiB bios; the file agrees', async () => {
    const size = 16 * MiB;
    const file = imagePath();
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: size } });
    expect(backend.stats.ioEngine).toBe('aio');
    expect(backend.stats.ioEngineReason).toBeNull();
    expect(backend.stats.aioDepth).toBe(128);
    const model = Buffer.alloc(size);
    const shapes = ['one', 'multi', 'unaligned'] as const;
    for (let i = 0; i < 60; i++) {
      const blocks = i % 10 === 9 ? 1024 : 1 + Math.floor(Math.random() * 24);
      const block = Math.floor(Math.random() * (size / 4096 - blocks));
      const data = randomBytes(blocks * 4096);
      const w = await run(new Bio(ReqOp.WRITE, disk.part0, (block * 4096) / 512, data.length, vecsOf(data, shapes[i % 3] as (typeof shapes)[number])));
      expect(w.status, `write ${i}`).toBe(BlkStatus.OK);
      data.copy(model, block * 4096);
      const readShape = shapes[(i + 1) % 3] as (typeof shapes)[number];
      const vecs = vecsOf(Buffer.alloc(data.length), readShape);
      const r = await run(new Bio(ReqOp.READ, disk.part0, (block * 4096) / 512, data.length, vecs));
      expect(r.status, `read ${i}`).toBe(BlkStatus.OK);
      expectBytes(gather(vecs), data, `read ${i} (${readShape})`);
    }
    // 8 MiB through the helper: two 4 MiB bios (the default limit), each one iocb.
    const big = randomBytes(8 * MiB);
    await blkdevWrite(disk.part0, 4 * MiB, big);
    big.copy(model, 4 * MiB);
    expectBytes(await blkdevRead(disk.part0, 0, size), model, 'whole disk');
    expectBytes(fs.readFileSync(file), model, 'file');
    const s = backend.stats;
    expect(s.ioEngine).toBe('aio');
    expect(s.aioSubmits).toBeGreaterThan(100);
    expect(s.aioWakeups).toBeGreaterThan(100);
    expect(s.bouncedBios).toBeGreaterThan(0);
    expect(s.inlineReads).toBe(0);
  });

  it('keeps 256 bios in flight on a context of 8: the others wait their turn, all complete once, data straight', async () => {
    const tracker = enableBioDebug();
    const file = imagePath();
    const { disk, backend } = await fileDisk(file, { create: { sizeBytes: 4 * MiB }, aioDepth: 8 });
    expect(backend.stats.aioDepth).toBe(8);
    const datas = Array.from({ length: 256 }, () => randomBytes(4096));
    const writes = datas.map((d, i) => run(new Bio(ReqOp.WRITE, disk.part0, (i * 4096) / 512, 4096, vecsOf(d, i % 2 === 0 ? 'one' : 'multi'))));
    expect(disk.inflight).toBe(256);
    for (const w of await Promise.all(writes)) expect(w.status).toBe(BlkStatus.OK);
    const bufs = datas.map(() => allocIoBuffer(4096));
    const reads = bufs.map((b, i) => run(Bio.read(disk.part0, (i * 4096) / 512, b)));
    for (const r of await Promise.all(reads)) expect(r.status).toBe(BlkStatus.OK);
    for (let i = 0; i < 256; i++) expectBytes(bufs[i] as Buffer, datas[i] as Buffer, `block ${i}`);
    expect(backend.stats.aioWaits).toBeGreaterThanOrEqual(2 * (256 - 8));
    tracker.assertAllCompleted();
  });

  it('reads zeros past the end of a file shorter than the disk, and up to an unaligned end, as the threadpool does', async () => {
    const file = imagePath();
    const content = randomBytes(MiB);
    fs.writeFileSync(file, content);
    const viaAio = await fileDisk(file);
    const viaPool = await fileDisk(file, { ioEngine: 'threadpool' });
    expect(viaAio.backend.stats.ioEngine).toBe('aio');
    expect(viaPool.backend.stats.ioEngine).toBe('threadpool');
    // Shrunk behind the backends' backs, to an end that is not a multiple of 4096.
    const end = 512 * KiB + 512;
    fs.truncateSync(file, end);
    for (const { disk } of [viaAio, viaPool]) {
      const across = allocIoBuffer(64 * KiB).fill(0xee);
      const r = await run(Bio.read(disk.part0, (480 * KiB) / 512, across));
      expect(r.status).toBe(BlkStatus.OK);
      expectBytes(across.subarray(0, end - 480 * KiB), content.subarray(480 * KiB, end), 'before the end');
      expectBytes(across.subarray(end - 480 * KiB), Buffer.alloc(480 * KiB + 64 * KiB - end), 'after the end');
      const past = allocIoBuffer(8192).fill(0xee);
      expect((await run(Bio.read(disk.part0, (768 * KiB) / 512, past))).status).toBe(BlkStatus.OK);
      expectBytes(past, Buffer.alloc(8192), 'past the end');
    }
  });

  it('fails a bio the kernel refuses (a bad fd) with IOERR and EBADF, as the threadpool does', async () => {
    const mem = await createDisk({ name: `aio-mem${seq++}`, backend: new MemoryBackend({ sizeBytes: MiB }), logicalBlockSize: 4096, scanPartitions: false });
    disks.push(mem);
    const outcomes: Array<[string, BlkStatus, string | undefined]> = [];
    for (const io of [
      { native, depth: 4, reason: null, batchWrites: false, inlineWrites: false },
      { native: null, depth: 4, reason: 'test', batchWrites: false, inlineWrites: false },
    ] satisfies FileEngineIo[]) {
      // An fd number no process can have open (RLIMIT_NOFILE is far lower).
      const engine = new FileEngine('/nowhere', 'file:/nowhere', 1 << 29, true, false, 4096, false, () => 0, false, io);
      expect(engine.stats.ioEngine).toBe(io.native === null ? 'threadpool' : 'aio');
      const done = new Promise<[Bio, BlkStatus]>((resolve) => {
        const sink: CompletionSink = { complete: (bio, status) => resolve([bio, status]) };
        engine.start(Bio.read(mem.part0, 0, allocIoBuffer(4096)), sink);
      });
      const [bio, status] = await done;
      outcomes.push([engine.stats.ioEngine, status, bio.error?.code]);
      expect(bio.error?.message).toContain('/nowhere');
      await engine.close();
    }
    expect(outcomes).toEqual([
      ['aio', BlkStatus.IOERR, 'EBADF'],
      ['threadpool', BlkStatus.IOERR, 'EBADF'],
    ]);
  });

  it('on close with bios in flight completes each exactly once, then frees the context; 40 cycles leak nothing', async () => {
    const tracker = enableBioDebug();
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(4 * MiB, 0x5a));
    const before = aioResources();
    for (let cycle = 0; cycle < 40; cycle++) {
      const backend = await FileBackend.open(file, { direct: true, aioDepth: 16 });
      expect(backend.stats.ioEngine).toBe('aio');
      const disk = await createDisk({ name: `aio-close${seq++}`, backend, logicalBlockSize: 4096, scanPartitions: false });
      const completions = new Map<Bio, number>();
      const bios: Bio[] = [];
      for (let i = 0; i < 64; i++) {
        const buf = allocIoBuffer(8192);
        const bio = i % 4 === 0 ? Bio.write(disk.part0, (i * 8192) / 512, buf.fill(0x5a)) : Bio.read(disk.part0, (i * 8192) / 512, buf);
        bio.endIo = (b) => completions.set(b, (completions.get(b) ?? 0) + 1);
        bios.push(bio);
        submitBio(bio);
      }
      // Straight to the backend, not through the disk (which would drain first).
      await backend.close();
      expect(bios.every((b) => completions.get(b) === 1 && b.status === BlkStatus.OK)).toBe(true);
      const late = Bio.read(disk.part0, 0, allocIoBuffer(4096));
      expect((await run(late)).status).toBe(BlkStatus.OFFLINE);
      await disk.remove();
    }
    tracker.assertAllCompleted();
    expect(aioResources()).toEqual(before);
  });

  it('falls back to the threadpool when asked, or when io_setup fails, saying why in stats', async () => {
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(MiB));
    const asked = await fileDisk(file, { ioEngine: 'threadpool' });
    expect(asked.backend.stats.ioEngine).toBe('threadpool');
    expect(asked.backend.stats.ioEngineReason).toMatch(/ioEngine: 'threadpool'/);
    const data = allocIoBuffer(8192).fill(0x42);
    await blkdevWrite(asked.disk.part0, 4096, data);
    expectBytes(await blkdevRead(asked.disk.part0, 4096, 8192), data);
    expect(asked.backend.stats.aioSubmits).toBe(0);

    // More events than fs.aio-max-nr allows in all: io_setup refuses with EAGAIN.
    const max = Number(fs.readFileSync('/proc/sys/fs/aio-max-nr', 'utf8'));
    if (max < 1 << 20) {
      const refused = await fileDisk(file, { aioDepth: max + 1 });
      expect(refused.backend.stats.ioEngine).toBe('threadpool');
      expect(refused.backend.stats.ioEngineReason).toMatch(/io_setup .*EAGAIN.*fs\.aio-max-nr/);
      expectBytes(await blkdevRead(refused.disk.part0, 4096, 8192), data);
    } else {
      console.warn(`io_setup refusal not tried: fs.aio-max-nr is ${max}`);
    }

    // Buffered files never use AIO (io_submit would do the copy on this thread).
    const buffered = await FileBackend.open(file);
    backends.push(buffered);
    expect(buffered.stats.ioEngine).toBe('threadpool');
    expect(buffered.stats.ioEngineReason).toBeNull();

    await expect(FileBackend.open(file, { direct: true, aioDepth: 0 })).rejects.toBeInstanceOf(InvalidArgumentError);
    await expect(FileBackend.open(file, { direct: true, ioEngine: 'uring' as 'aio' })).rejects.toBeInstanceOf(InvalidArgumentError);
  });

  it('delivers the rest of a batch, each once, when a completion throws (reported as uncaught)', async () => {
    const mem = await createDisk({ name: `aio-mem${seq++}`, backend: new MemoryBackend({ sizeBytes: MiB }), logicalBlockSize: 4096, scanPartitions: false });
    disks.push(mem);
    const file = imagePath();
    fs.writeFileSync(file, Buffer.alloc(MiB, 1));
    const fd = fs.openSync(file, fs.constants.O_RDONLY | (fs.constants.O_DIRECT as number));
    const engine = new FileEngine(file, `file:${file}`, fd, true, false, 4096, false, () => 0, false, { native, depth: 32, reason: null, batchWrites: false, inlineWrites: false });
    const counts = new Map<Bio, number>();
    let uncaught = 0;
    const sink: CompletionSink = {
      complete: (bio) => {
        counts.set(bio, (counts.get(bio) ?? 0) + 1);
        throw new Error('end-io bug');
      },
    };
    // Our handler alone while this runs: an uncaught error would otherwise fail the test run.
    const saved = process.listeners('uncaughtException');
    process.removeAllListeners('uncaughtException');
    process.on('uncaughtException', (err) => {
      if (err.message === 'end-io bug') uncaught++;
      else throw err;
    });
    try {
      const bios = Array.from({ length: 32 }, (_, i) => Bio.read(mem.part0, (i * 4096) / 512, allocIoBuffer(4096)));
      for (const bio of bios) engine.start(bio, sink);
      const deadline = Date.now() + 10_000;
      while (uncaught < 32 && Date.now() < deadline) await new Promise((resolve) => setTimeout(resolve, 5));
      await new Promise((resolve) => setTimeout(resolve, 20));
      expect(uncaught).toBe(32);
      expect(bios.map((b) => counts.get(b))).toEqual(bios.map(() => 1));
    } finally {
      process.removeAllListeners('uncaughtException');
      for (const l of saved) process.on('uncaughtException', l);
      await engine.close();
      fs.closeSync(fd);
    }
  });
});
