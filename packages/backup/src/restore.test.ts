import fs from 'node:fs';
import fsp from 'node:fs/promises';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeDataRuns } from './restore.js';
import { cleanup, tmpDir } from './test-util.js';

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
});
