// blksnap's "corrupt" test: fill a device with sectors that carry their own offset, take a
// snapshot, overwrite random ranges from concurrent writers while readers check the image, then
// verify the whole image against the instant of take and the original against a model.
import { blkdevDiscard, blkdevRead, blkdevWrite, blkdevZeroout, disableBioDebug, enableBioDebug, SECTOR_SIZE, type Disk } from '@blkfilter/bio';
import { afterEach, describe, expect, it } from 'vitest';
import { createSnapshot } from './snapshot.js';
import { cleanup, fileDisk, fillDevice, firstDiff, lateReadDisk, memDisk, rng, stamp, tmpDir, track } from './test-util.js';
import type { DiffStorageOptions } from './types.js';

const KiB = 1024;
const MiB = 1024 * 1024;

afterEach(async () => {
  disableBioDebug();
  await cleanup();
});

async function corruptRun(d: Disk, storage: DiffStorageOptions, seed: number): Promise<void> {
  const tracker = enableBioDebug({ captureStacks: false });
  const size = d.capacity * SECTOR_SIZE;
  const before = await fillDevice(d);
  const s = track(await createSnapshot({ storage })); // default 256 KiB chunks
  await s.addDevice(d.name);
  await s.take();
  const img = s.image(d.name);
  const chunk = s.chunkSize;
  const model = Buffer.from(before);
  const touched = new Set<number>();
  // Writes in flight never overlap, so the model is exact whatever order they complete in;
  // non-overlapping writes still meet in the same chunks and wait for the same copies.
  const inflight: Array<[number, number]> = [];
  const r = rng(seed);
  let writersLeft = 4;
  let imageChecks = 0;

  const writer = async (w: number): Promise<void> => {
    for (let i = 1; i <= 100; i++) {
      let off = 0;
      let len = 0;
      for (;;) {
        len = (1 + r(256)) * SECTOR_SIZE; // up to 128 KiB: some straddle chunks
        off = r((size - len) / SECTOR_SIZE + 1) * SECTOR_SIZE;
        if (!inflight.some(([a, b]) => off < b && a < off + len)) break;
      }
      const range: [number, number] = [off, off + len];
      inflight.push(range);
      const kind = r(10);
      if (kind === 0) {
        await blkdevZeroout(d.part0, off, len);
        model.fill(0, off, off + len);
      } else if (kind === 1) {
        await blkdevDiscard(d.part0, off, len);
        model.fill(0, off, off + len);
      } else {
        const data = stamp(Buffer.alloc(len), off, i, w + 1);
        await blkdevWrite(d.part0, off, data);
        data.copy(model, off);
      }
      inflight.splice(inflight.indexOf(range), 1);
      for (let c = Math.floor(off / chunk); c <= Math.floor((off + len - 1) / chunk); c++) touched.add(c);
    }
    writersLeft--;
  };
  const reader = async (): Promise<void> => {
    while (writersLeft > 0) {
      const len = (1 + r(128)) * SECTOR_SIZE;
      const off = r((size - len) / SECTOR_SIZE + 1) * SECTOR_SIZE;
      const got = await blkdevRead(img, off, len);
      const want = before.subarray(off, off + len);
      if (Buffer.compare(got, want) !== 0) {
        throw new Error(`image read of ${len} bytes at ${off} differs from the instant of take at byte ${off + firstDiff(got, want)}`);
      }
      imageChecks++;
    }
  };
  await Promise.all([writer(0), writer(1), writer(2), writer(3), reader(), reader()]);

  const image = await blkdevRead(img, 0, size);
  const i = firstDiff(image, before);
  expect(Buffer.compare(image, before), `image differs from the instant of take at byte ${i} (sector ${Math.floor(i / 512)})`).toBe(0);
  const orig = await blkdevRead(d.part0, 0, size);
  const j = firstDiff(orig, model);
  expect(Buffer.compare(orig, model), `original differs from the model at byte ${j} (sector ${Math.floor(j / 512)})`).toBe(0);
  expect(imageChecks).toBeGreaterThan(10);
  // One copy per chunk written, no more, no fewer.
  const info = s.info();
  expect(info.devices[0]?.copiedChunks).toBe(touched.size);
  expect(info.storage.usedBytes).toBe(touched.size * chunk);
  expect(info.state).toBe('taken');
  await s.destroy();
  tracker.assertAllCompleted();
}

describe('corrupt', () => {
  it('keeps the image exact under concurrent asynchronous writers (memory backend, memory storage)', async () => {
    const d = memDisk(32 * MiB, { async: true, seed: 11 });
    await corruptRun(d, { kind: 'memory', limitBytes: 64 * MiB, stepBytes: 8 * MiB }, 1234);
  });

  it('keeps the image exact under concurrent asynchronous writers (file backend, directory storage)', async () => {
    const dir = await tmpDir();
    const d = await fileDisk(dir, 32 * MiB, { async: true, seed: 12 });
    await corruptRun(d, { kind: 'directory', path: `${dir}/diff`, limitBytes: 64 * MiB, stepBytes: 8 * MiB }, 4321);
  });

  it('keeps a 4 KiB-sector device exact with small chunks', async () => {
    const d = memDisk(8 * MiB, { async: true, seed: 13, logicalBlockSize: 4096 });
    const tracker = enableBioDebug({ captureStacks: false });
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 16 * MiB, stepBytes: MiB }, chunkSize: 4 * KiB }));
    await s.addDevice(d.name);
    await s.take();
    const r = rng(77);
    const model = Buffer.from(before);
    await Promise.all(
      [0, 1, 2].map(async (w) => {
        for (let i = 1; i <= 60; i++) {
          // Each writer owns every third 4 KiB block: no overlap, many shared neighbours.
          const block = r(2048 / 3) * 3 + w;
          const n = Math.min(1 + r(4), 2048 - block);
          const data = stamp(Buffer.alloc(n * 4096), block * 4096, i, w + 1);
          for (let k = 0; k < n; k++) if ((block + k) % 3 !== w) data.fill(0xcc, k * 4096, (k + 1) * 4096);
          // Write only the owned blocks, one bio each.
          for (let k = 0; k < n; k++) {
            if ((block + k) % 3 !== w) continue;
            await blkdevWrite(d.part0, (block + k) * 4096, data.subarray(k * 4096, (k + 1) * 4096));
            data.copy(model, (block + k) * 4096, k * 4096, (k + 1) * 4096);
          }
        }
      }),
    );
    expect(Buffer.compare(await blkdevRead(s.image(d.name), 0, 8 * MiB), before)).toBe(0);
    expect(Buffer.compare(await blkdevRead(d.part0, 0, 8 * MiB), model)).toBe(0);
    tracker.assertAllCompleted();
  });
});

describe('image reads racing first writes', () => {
  it('returns the old data when a read of the original is overtaken by a first write to its chunk', async () => {
    const tracker = enableBioDebug({ captureStacks: false });
    const CHUNK = 16 * KiB;
    const size = 64 * CHUNK;
    const d = lateReadDisk(size, 5);
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 4 * MiB, stepBytes: MiB }, chunkSize: CHUNK }));
    await s.addDevice(d.name);
    await s.take();
    const img = s.image(d.name);
    // For every chunk: start an image read, then (before it is performed) a first write.
    const jobs: Array<Promise<void>> = [];
    for (let c = 0; c < 64; c++) {
      const off = c * CHUNK + 4 * KiB;
      jobs.push(
        blkdevRead(img, off, 8 * KiB).then((got) => {
          expect(Buffer.compare(got, before.subarray(off, off + 8 * KiB)), `image read of chunk ${c}`).toBe(0);
        }),
      );
      jobs.push(blkdevWrite(d.part0, c * CHUNK, Buffer.alloc(CHUNK, 0xd0)));
    }
    await Promise.all(jobs);
    expect(Buffer.compare(await blkdevRead(img, 0, size), before)).toBe(0);
    tracker.assertAllCompleted();
  });
});
