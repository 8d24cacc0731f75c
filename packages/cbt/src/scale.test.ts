import { performance } from 'node:perf_hooks';
import { blkdevWrite } from '@blkfilter/bio';
import { attachFilter } from '@blkfilter/registry';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cbtInfo, changedExtents, markDirty } from './filter.js';
import { cleanupDisks, memDisk, registerTestFilters, take, TAKER } from './test-util.js';
import type { CbtSectorRange } from './types.js';

beforeAll(registerTestFilters);
afterEach(cleanupDisks);

describe('a 1 TiB device', () => {
  it('holds a ~4 MiB map with its frozen copy and lists 1% scattered changes quickly', async () => {
    const d = memDisk(2 ** 40);
    await attachFilter(d.part0, 'cbt');
    await attachFilter(d.part0, TAKER);
    const before = await cbtInfo(d.part0);
    expect(before).toMatchObject({ blockSize: 512 * 1024, blockCount: 2_097_152, memoryBytes: 2 * 1024 * 1024 });

    // 1% of the blocks, scattered (a fixed LCG): most through markDirty, some as real writes.
    const blocks = new Set<number>();
    let seed = 12345;
    while (blocks.size < before.blockCount / 100) {
      seed = (Math.imul(seed, 1103515245) + 12345) >>> 0;
      blocks.add(seed % before.blockCount);
    }
    const sectorsPerBlock = before.blockSize / 512;
    const ranges: CbtSectorRange[] = [];
    let i = 0;
    for (const b of blocks) {
      if (i++ % 20 === 0) await blkdevWrite(d.part0, b * before.blockSize + 4096, Buffer.alloc(512, 1));
      else ranges.push({ sector: b * sectorsPerBlock, sectors: 1 });
    }
    await markDirty(d.part0, ranges);
    await take(d.part0, [d.part0]);
    const info = await cbtInfo(d.part0);
    expect(info.memoryBytes).toBe(4 * 1024 * 1024);

    const times: number[] = [];
    let extents = 0;
    for (let run = 0; run < 5; run++) {
      const t0 = performance.now();
      const r = await changedExtents(d.part0, { since: 0, generationId: info.generationId });
      times.push(performance.now() - t0);
      if (r.kind !== 'extents') throw new Error(r.message);
      extents = r.extents.length;
      const covered = r.extents.reduce((n, e) => n + e.sectors / sectorsPerBlock, 0);
      expect(covered).toBe(blocks.size);
    }
    const best = Math.min(...times);
    console.log(
      `cbt 1 TiB: ${info.blockCount} blocks of ${info.blockSize / 1024} KiB, map + copy ${info.memoryBytes / 2 ** 20} MiB; ` +
        `changedExtents, ${blocks.size} changed blocks in ${extents} extents: best ${best.toFixed(1)} ms, first ${(times[0] as number).toFixed(1)} ms`,
    );
    expect(best).toBeLessThan(2000);
  });
});
