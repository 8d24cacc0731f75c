import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { blkdevWrite } from '@blkfilter/bio';
import { afterAll, describe, expect, it } from 'vitest';
import { composeChain, openChain, openView } from './chain.js';
import { closeAll } from './points.js';
import { restore, writeDataRuns } from './restore.js';
import { cleanup, MiB, scribble, sha256File, snapAndBackup, tmpDir, trackedDisk } from './test-util.js';

afterAll(cleanup);

const K = 1024;

/** Allocated bytes of a file (st_blocks), to see which parts were left as holes. */
function allocated(file: string): number {
  return fs.statSync(file).blocks * 512;
}

describe('writeDataRuns (restore into a new sparse file)', () => {
  it('writes every non-zero grain, leaves zero grains as holes, whatever the offset', async () => {
    const dir = tmpDir();
    // Grains of 64 KiB at a window offset that is a grain boundary, and one that is not
    // (the last window of an odd-sized disk): data at the very start and end, zero runs between.
    for (const offset of [0, 4 * 64 * K, 3 * 64 * K + 4 * K]) {
      const file = path.join(dir, `t-${offset}.raw`);
      const data = Buffer.alloc(8 * 64 * K);
      data.fill(0xa1, 0, 100); // first grain (partial)
      data.fill(0xb2, 3 * 64 * K + 7, 3 * 64 * K + 9); // a few bytes inside grain 3
      data.fill(0xc3, data.length - 1); // the last byte
      const fh = await fsp.open(file, 'w+');
      try {
        await fh.truncate(offset + data.length);
        const written = await writeDataRuns(fh, offset, data, 64 * K);
        const back = Buffer.alloc(data.length);
        await fh.read(back, 0, data.length, offset);
        expect(Buffer.compare(back, data)).toBe(0);
        expect(written).toBeGreaterThan(0);
        expect(written).toBeLessThanOrEqual(4 * 64 * K); // at most the grains touched: never the zero runs
      } finally {
        await fh.close();
      }
      expect(allocated(file)).toBeLessThan(data.length / 2);
    }
  });

  it('writes nothing for an all-zero window and everything for a full one', async () => {
    const dir = tmpDir();
    const file = path.join(dir, 'z.raw');
    const fh = await fsp.open(file, 'w+');
    try {
      await fh.truncate(1 << 20);
      expect(await writeDataRuns(fh, 0, Buffer.alloc(512 * K), 64 * K)).toBe(0);
      const full = Buffer.alloc(512 * K, 7);
      expect(await writeDataRuns(fh, 512 * K, full, 64 * K)).toBe(512 * K);
      const back = Buffer.alloc(1 << 20);
      await fh.read(back, 0, back.length, 0);
      expect(back.subarray(0, 512 * K).every((b) => b === 0)).toBe(true);
      expect(Buffer.compare(back.subarray(512 * K), full)).toBe(0);
    } finally {
      await fh.close();
    }
  });

  it('writes the runs of a window at the same time, and ends (or fails) only once every write ended', async () => {
    // A file handle whose writes end after a while; one run's write can fail.
    const started: number[] = [];
    let running = 0;
    let maxRunning = 0;
    let failAt = -1;
    const fake = {
      write: async (_b: Buffer, from: number, length: number, position: number) => {
        started.push(position);
        running++;
        maxRunning = Math.max(maxRunning, running);
        await new Promise((r) => setTimeout(r, 20 + (started.length % 3) * 10));
        running--;
        if (position === failAt) throw Object.assign(new Error('EIO test'), { code: 'EIO' });
        return { bytesWritten: length, buffer: _b, from };
      },
    } as unknown as fsp.FileHandle;
    const data = Buffer.alloc(8 * 64 * K);
    for (const g of [0, 2, 4, 6]) data.fill(1, g * 64 * K, (g + 1) * 64 * K); // four runs, holes between
    expect(await writeDataRuns(fake, 0, data, 64 * K)).toBe(4 * 64 * K);
    expect(started).toHaveLength(4);
    expect(maxRunning).toBe(4);
    expect(running).toBe(0);
    started.length = 0;
    maxRunning = 0;
    failAt = 0; // the first run fails at once-ish; the others are still running then
    await expect(writeDataRuns(fake, 0, data, 64 * K)).rejects.toThrow(/EIO test/);
    expect(running, 'no write still running when it rejects').toBe(0);
  });
});

describe('restore of a chain', () => {
  it('is exact when the newer images of a window hold more than a window of data (the scratch area grows)', async () => {
    const disk = await trackedDisk(8 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    await scribble(disk, 20, 5);
    await snapAndBackup([disk], dir, raws);
    await blkdevWrite(disk.part0, 0, randomBytes(4 * MiB)); // all of the first window
    await snapAndBackup([disk], dir, raws);
    await blkdevWrite(disk.part0, MiB, randomBytes(MiB)); // part of it again
    const p3 = await snapAndBackup([disk], dir, raws);
    const out = path.join(raws, 'out.raw');
    await restore(dir, { to: out });
    expect(sha256File(out)).toBe(p3.taken[0]?.sha);
  });

  it('hashes and hands on a window only once its reads have landed, however slow the reads are', async () => {
    const disk = await trackedDisk(12 * MiB);
    const dir = tmpDir();
    const raws = tmpDir();
    let last = null as Awaited<ReturnType<typeof snapAndBackup>> | null;
    for (let p = 0; p < 3; p++) {
      await scribble(disk, p === 0 ? 40 : 8, p + 41);
      last = await snapAndBackup([disk], dir, raws);
    }
    const want = fs.readFileSync(last?.taken[0]?.raw as string);
    const view = await openView(dir);
    for (const overlap of [true, false]) {
      const chain = await openChain(view, 0, 3);
      try {
        for (const { reader } of chain) {
          const real = reader.readHostv.bind(reader);
          reader.readHostv = async (parts, host, what) => {
            await new Promise((r) => setTimeout(r, 15));
            await real(parts, host, what);
          };
        }
        const got = Buffer.alloc(want.length);
        await composeChain(chain, want.length, view.manifest.digestSpan, async (offset, data) => void data.copy(got, offset), undefined, overlap);
        expect(Buffer.compare(got, want), `overlap ${overlap}`).toBe(0);
      } finally {
        await closeAll(chain);
      }
    }
  });
});
