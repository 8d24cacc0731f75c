import { blkdevWrite } from '@blkfilter/bio';
import { attachFilter } from '@blkfilter/registry';
import { afterEach, beforeAll, describe, expect, it } from 'vitest';
import { cbtInfo, changedExtents, markDirty } from './filter.js';
import { cleanupDisks, memDisk, registerTestFilters, take, TAKER } from './test-util.js';
import type { CbtSectorRange } from './types.js';

beforeAll(registerTestFilters);
afterEach(cleanupDisks);

describe('a 1 TiB device', () => {
  it('holds a ~4 MiB map with its frozen copy and lists 1% scattered changes exactly', async () => {
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

    // How fast this is, is measured by `npm run bench` (bench-cbt.ts), not asserted here.
    const r = await changedExtents(d.part0, { since: 0, generationId: info.generationId });
    if (r.kind !== 'extents') throw new Error(r.message);
    const found = new Set<number>();
    for (const e of r.extents) for (let s = e.sector; s < e.sector + e.sectors; s += sectorsPerBlock) found.add(s / sectorsPerBlock);
    expect(found.size).toBe(blocks.size);
    for (const b of blocks) if (!found.has(b)) expect.fail(`block ${b} changed but is not in the extents`);
  });
});
