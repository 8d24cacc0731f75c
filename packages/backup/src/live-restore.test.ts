import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { blkdevFlush, blkdevRead, blkdevWrite, createDisk, type Disk } from '@blkfilter/bio';
import { afterAll, describe, expect, it } from 'vitest';
import { LIVE_MAP_SUFFIX, startLiveRestore } from './live-restore.js';
import { cleanup, MiB, scribble, snapAndBackup, tmpDir, trackedDisk } from './test-util.js';

afterAll(cleanup);
let n = 0;

async function chain(): Promise<{ dir: string; raw: string }> {
  const src = await trackedDisk(8 * MiB);
  const dir = tmpDir();
  const raws = tmpDir();
  let raw = '';
  for (let p = 0; p < 3; p++) {
    await scribble(src, p === 0 ? 30 : 5, p);
    raw = (await snapAndBackup([src], dir, raws)).taken[0]?.raw as string;
  }
  return { dir, raw };
}

/** Guest writes at pseudo-random places, recorded into `expected`. */
async function guestWrites(disk: Disk, expected: Buffer, count: number, salt: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const at = (((i + 1) * 104729 * (salt + 1)) % (expected.length / 512 - 64)) * 512;
    const data = randomBytes(512 * (1 + (i % 40)));
    await blkdevWrite(disk.part0, at, data);
    data.copy(expected, at);
  }
}

describe('live restore', () => {
  it('serves at once; the final image is the point plus exactly the writes made meanwhile', async () => {
    const { dir, raw } = await chain();
    const image = path.join(tmpDir(), 'live.raw');
    const live = await startLiveRestore(dir, { to: image, step: 256 * 1024 });
    const disk = await createDisk({ name: `lr${process.pid}x${n++}`, backend: live.backend, scanPartitions: false });
    const expected = fs.readFileSync(raw);
    try {
      // Reads before anything was copied come from the backup.
      expect(Buffer.compare(await blkdevRead(disk.part0, 0, 1 * MiB), expected.subarray(0, 1 * MiB))).toBe(0);
      const copy = live.run(disk.part0);
      await guestWrites(disk, expected, 60, 1); // while the background copy runs
      await copy;
      await guestWrites(disk, expected, 10, 2); // after: a plain device on the image
      expect(live.progress().done).toBe(live.progress().total);
      expect(Buffer.compare(await blkdevRead(disk.part0, 0, expected.length), expected)).toBe(0);
      await blkdevFlush(disk.part0);
    } finally {
      await disk.remove();
    }
    expect(Buffer.compare(fs.readFileSync(image), expected)).toBe(0);
    expect(fs.existsSync(image + LIVE_MAP_SUFFIX)).toBe(false);
  });

  it('resumes after a crash mid-way: flushed writes are kept, never overwritten by the copy', async () => {
    const { dir, raw } = await chain();
    const image = path.join(tmpDir(), 'live.raw');
    const expected = fs.readFileSync(raw);
    const first = await startLiveRestore(dir, { to: image, step: 128 * 1024 });
    const d1 = await createDisk({ name: `lr${process.pid}x${n++}`, backend: first.backend, scanPartitions: false });
    await guestWrites(d1, expected, 40, 3);
    const copy = first.run(d1.part0, (done, total) => {
      if (done > total / 3) first.stop(); // "kill -9" a third of the way
    });
    await copy;
    await blkdevFlush(d1.part0);
    expect(first.progress().done).toBeLessThan(first.progress().total);
    await d1.remove(); // the process is gone; the map and the image stay
    expect(fs.existsSync(image + LIVE_MAP_SUFFIX)).toBe(true);

    const again = await startLiveRestore(dir, { to: image });
    expect(again.resumed).toBe(true);
    const d2 = await createDisk({ name: `lr${process.pid}x${n++}`, backend: again.backend, scanPartitions: false });
    try {
      const copy2 = again.run(d2.part0);
      await guestWrites(d2, expected, 20, 4);
      await copy2;
      await blkdevFlush(d2.part0);
    } finally {
      await d2.remove();
    }
    expect(Buffer.compare(fs.readFileSync(image), expected)).toBe(0);
  });

  it('refuses an existing image that is not an interrupted live restore', async () => {
    const { dir } = await chain();
    const image = path.join(tmpDir(), 'there.raw');
    fs.writeFileSync(image, 'x');
    await expect(startLiveRestore(dir, { to: image })).rejects.toThrow(/EEXIST/);
  });
});
