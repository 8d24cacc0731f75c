// blksnap's "boundary" test: the first and last blocks of chunks and writes across chunk
// borders, on the original and on the image, at unaligned (but logical-block-aligned) offsets,
// on a device whose size is not a multiple of the chunk size.
import { blkdevRead, blkdevWrite, blkdevZeroout, disableBioDebug, enableBioDebug, SECTOR_SIZE } from '@blkfilter/bio';
import { afterEach, describe, expect, it } from 'vitest';
import { createSnapshot } from './snapshot.js';
import { cleanup, fillDevice, firstDiff, memDisk, stamp, track } from './test-util.js';

const KiB = 1024;
const CHUNK = 64 * KiB;

afterEach(async () => {
  disableBioDebug();
  await cleanup();
});

/** [offset, length] pairs around every chunk border, plus the device's tail. */
function boundaryRanges(size: number, lbs: number): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (let b = CHUNK; b < size; b += CHUNK) {
    out.push([b - lbs, lbs]); // last block of a chunk
    out.push([b, lbs]); // first block of the next
    out.push([b - 3 * lbs, 5 * lbs]); // across the border, unaligned on both sides
  }
  out.push([size - lbs, lbs]); // last block of the device (in the short last chunk)
  out.push([CHUNK + lbs, 2 * CHUNK]); // over three chunks from an unaligned start
  out.push([size - (size % CHUNK) - 2 * lbs, (size % CHUNK) + 2 * lbs]); // into and through the short last chunk
  return out;
}

function check(got: Buffer, want: Buffer, what: string): void {
  const i = firstDiff(got, want);
  expect(Buffer.compare(got, want), `${what}: first difference at byte ${i} (chunk ${Math.floor(i / CHUNK)}, +${i % CHUNK})`).toBe(0);
}

describe('boundary', () => {
  for (const lbs of [512, 4096] as const) {
    it(`is exact at chunk borders and in a short last chunk (${lbs}-byte blocks)`, async () => {
      const tracker = enableBioDebug({ captureStacks: false });
      const size = 16 * CHUNK + 12 * KiB; // 17 chunks, the last 12 KiB
      const d = memDisk(size, { logicalBlockSize: lbs, async: true });
      const before = await fillDevice(d);
      const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 4 << 20, stepBytes: 1 << 20 }, chunkSize: CHUNK }));
      await s.addDevice(d.name);
      await s.take();
      const img = s.image(d.name);
      expect(img.disk.limits.logicalBlockSize).toBe(lbs);
      expect(img.nrSects).toBe(d.capacity);
      expect(s.info().devices[0]?.chunks).toBe(17);

      // The original: every write saves the old chunk first; the image stays at the instant.
      const model = Buffer.from(before);
      let seq = 1;
      for (const [off, len] of boundaryRanges(size, lbs)) {
        if (seq % 7 === 0) {
          await blkdevZeroout(d.part0, off, len);
          model.fill(0, off, off + len);
        } else {
          const data = stamp(Buffer.alloc(len), off, seq, 1);
          await blkdevWrite(d.part0, off, data);
          data.copy(model, off);
        }
        seq++;
        check(await blkdevRead(img, 0, size), before, `image after writing ${len} bytes at ${off} of the original`);
      }
      check(await blkdevRead(d.part0, 0, size), model, 'original');
      expect(s.info().devices[0]?.copiedChunks).toBe(17);

      // The image: writes land in diff storage, exactly, and the original does not change.
      const imageModel = Buffer.from(before);
      for (const [off, len] of boundaryRanges(size, lbs)) {
        const data = stamp(Buffer.alloc(len), off, seq++, 2);
        await blkdevWrite(img, off, data);
        data.copy(imageModel, off);
        // Read back around the border, unaligned.
        const from = Math.max(0, off - lbs);
        const to = Math.min(size, off + len + lbs);
        check(await blkdevRead(img, from, to - from), imageModel.subarray(from, to), `image read back ${from}..${to}`);
      }
      check(await blkdevRead(img, 0, size), imageModel, 'image after image writes');
      check(await blkdevRead(d.part0, 0, size), model, 'original after image writes');
      tracker.assertAllCompleted();
    });
  }

  it('copies image-written chunks of a fresh snapshot without reading them twice', async () => {
    const size = 4 * CHUNK + 4 * KiB;
    const d = memDisk(size);
    const before = await fillDevice(d);
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 1 << 20, stepBytes: 256 * KiB }, chunkSize: CHUNK }));
    await s.addDevice(d.name);
    await s.take();
    const img = s.image(d.name);
    // An image write into an uncopied chunk saves it first, then the original's next write
    // to that chunk passes straight through (one slot, not two).
    const data = stamp(Buffer.alloc(SECTOR_SIZE), 2 * CHUNK + 512, 9, 9);
    await blkdevWrite(img, 2 * CHUNK + 512, data);
    await blkdevWrite(d.part0, 2 * CHUNK, Buffer.alloc(CHUNK, 0x31));
    expect(s.info().storage.usedBytes).toBe(CHUNK);
    const want = Buffer.from(before);
    data.copy(want, 2 * CHUNK + 512);
    check(await blkdevRead(img, 0, size), want, 'image');
  });
});
