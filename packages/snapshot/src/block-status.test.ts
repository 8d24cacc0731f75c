// Block status of a snapshot image: chunks saved in diff storage are data, chunks not saved are
// what the original device reports (its content is the image's while the chunk is not saved),
// on a memory original and on a sparse file (lseek through @blkfilter/native).
import { blkdevBlockStatus, blkdevDiscard, blkdevRead, blkdevWrite, type BlockStatusExtent, type Disk } from '@blkfilter/bio';
import { detachFilter } from '@blkfilter/registry';
import { afterEach, describe, expect, it } from 'vitest';
import { createSnapshot } from './snapshot.js';
import { cleanup, fileDisk, memDisk, tmpDir, track } from './test-util.js';
import { SNAPSHOT_FILTER_NAME } from './types.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const CHUNK = 64 * KiB;
const hole = (length: number): BlockStatusExtent => ({ length, hole: true });
const data = (length: number): BlockStatusExtent => ({ length, hole: false });

afterEach(cleanup);

/** Every hole of `extents` (covering the whole device) reads as zeros. */
async function expectHolesReadZeros(dev: Disk['part0'], extents: readonly BlockStatusExtent[]): Promise<void> {
  let pos = 0;
  for (const e of extents) {
    if (e.hole) expect((await blkdevRead(dev, pos, e.length)).every((b) => b === 0), `hole at ${pos} + ${e.length}`).toBe(true);
    pos += e.length;
  }
  expect(pos).toBe(dev.sizeBytes);
}

const originals: Array<[string, () => Promise<Disk>]> = [
  ['a memory device', () => Promise.resolve(memDisk(MiB, { logicalBlockSize: 4096 }))],
  ['a sparse file', async () => fileDisk(await tmpDir(), MiB, { logicalBlockSize: 4096 })],
];

describe('snapshot image block status', () => {
  for (const [what, make] of originals) {
    it(`is the original's for chunks not saved and data for saved ones, on ${what}`, async (ctx) => {
      const d = await make();
      if (d.backend.blockStatus === undefined) {
        console.warn(`skipped on ${what}: its backend reports no holes here (@blkfilter/native did not load?)`);
        ctx.skip();
      }
      // Chunk 0: 4 KiB of data; chunk 3: 4 KiB inside it; the rest never written.
      await blkdevWrite(d.part0, 0, Buffer.alloc(4 * KiB, 1));
      await blkdevWrite(d.part0, 3 * CHUNK + 8 * KiB, Buffer.alloc(4 * KiB, 2));
      const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 4 * MiB }, chunkSize: CHUNK }));
      await s.addDevice(d.name);
      await s.take();
      const img = s.image(d.name);
      const atTake = [data(4 * KiB), hole(3 * CHUNK + 4 * KiB), data(4 * KiB), hole(MiB - 3 * CHUNK - 12 * KiB)];
      expect(blkdevBlockStatus(d.part0, 0, MiB)).toEqual(atTake);
      expect(blkdevBlockStatus(img, 0, MiB)).toEqual(atTake);

      // Discard chunk 0 on the original: it is saved first, so the image keeps its data (and
      // says data) while the original now has a hole there.
      await blkdevDiscard(d.part0, 0, CHUNK);
      // A write into a hole of chunk 5: saved first (zeros), then data in the image's view.
      await blkdevWrite(d.part0, 5 * CHUNK, Buffer.alloc(4 * KiB, 3));
      // A write to the image itself, in chunk 7.
      await blkdevWrite(img, 7 * CHUNK + 4 * KiB, Buffer.alloc(4 * KiB, 4));
      expect(blkdevBlockStatus(d.part0, 0, 8 * CHUNK)).toEqual([hole(3 * CHUNK + 8 * KiB), data(4 * KiB), hole(2 * CHUNK - 12 * KiB), data(4 * KiB), hole(3 * CHUNK - 4 * KiB)]);
      const now = blkdevBlockStatus(img, 0, MiB) as BlockStatusExtent[];
      expect(now).toEqual([data(CHUNK), hole(2 * CHUNK + 8 * KiB), data(4 * KiB), hole(2 * CHUNK - 12 * KiB), data(CHUNK), hole(CHUNK), data(CHUNK), hole(MiB - 8 * CHUNK)]);
      expect((await blkdevRead(img, 0, 4 * KiB)).every((b) => b === 1)).toBe(true);
      expect((await blkdevRead(img, 5 * CHUNK, CHUNK)).every((b) => b === 0)).toBe(true);
      await expectHolesReadZeros(img, now);
      // Ranges inside chunks, across a saved and an unsaved one.
      expect(blkdevBlockStatus(img, CHUNK - 4 * KiB, 12 * KiB)).toEqual([data(4 * KiB), hole(8 * KiB)]);
      expect(blkdevBlockStatus(img, 3 * CHUNK + 8 * KiB, 4 * KiB)).toEqual([data(4 * KiB)]);
    });
  }

  it('says nothing (all data) once copy-on-write has stopped', async () => {
    const d = memDisk(MiB);
    const s = track(await createSnapshot({ storage: { kind: 'memory', limitBytes: 4 * MiB }, chunkSize: CHUNK }));
    await s.addDevice(d.name);
    await s.take();
    const img = s.image(d.name);
    expect(blkdevBlockStatus(img, 0, MiB)).toEqual([hole(MiB)]);
    await detachFilter(d.part0, SNAPSHOT_FILTER_NAME);
    // The image no longer reads (corrupted): its old answer cannot be vouched for.
    expect(blkdevBlockStatus(img, 0, MiB)).toBeNull();
  });
});
