import fs from 'node:fs/promises';
import path from 'node:path';
import { fc, test } from '@fast-check/vitest';
import { blkdevDiscard, blkdevWrite, blkdevZeroout, SECTOR_SIZE, type BlockDev, type Disk } from '@blkfilter/bio';
import { buildMbr } from '@blkfilter/bio/testing';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import { afterAll, afterEach, beforeAll, describe, expect } from 'vitest';
import { cbtInfo, changedExtents, markDirty } from './filter.js';
import { blocksOf, cleanupDisks, cleanupTmpDirs, extentBlocks, memDisk, registerTestFilters, take, TAKER, tmpDir } from './test-util.js';
import { CbtGenerationReason } from './types.js';

// The model: per generation, the set of blocks changed while each changes number was active.
// After every take, the extents since each earlier take of the generation must be exactly the
// union of the epochs after it (exact here: every write succeeds and nothing else marks), and
// every earlier generation id must get full-copy-needed, through clean restarts (resume),
// unclean restarts (resumed after crash from checkpoint + journal) and resizes (new generation).

const DISK_SECTORS = 4096; // 2 MiB
const PART = { start: 1024, size: 2048 };
const SHRUNK_SECTORS = 3584;

const mbr = (): Buffer => buildMbr([[PART.start, PART.size]]);

const ioArb = fc.record({
  kind: fc.constant('io' as const),
  op: fc.constantFrom('write', 'write', 'discard', 'zero'),
  viaPartition: fc.boolean(),
  startFrac: fc.double({ min: 0, max: 1, noNaN: true }),
  sectors: fc.integer({ min: 1, max: 80 }),
});
const stepArb = fc.oneof(
  { weight: 8, arbitrary: ioArb },
  { weight: 3, arbitrary: fc.constant({ kind: 'take' as const }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('dirty' as const), startFrac: fc.double({ min: 0, max: 1, noNaN: true }), sectors: fc.integer({ min: 0, max: 40 }) }) },
  // Every 2nd or 3rd block: single-block gaps between extents.
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('stripes' as const), startFrac: fc.double({ min: 0, max: 1, noNaN: true }), every: fc.integer({ min: 2, max: 3 }), count: fc.integer({ min: 1, max: 12 }) }) },
  { weight: 2, arbitrary: fc.constant({ kind: 'query' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'clean-restart' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'unclean-restart' as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: 'resize' as const }) },
);

beforeAll(registerTestFilters);
afterEach(cleanupDisks);
afterAll(async () => {
  await cleanupDisks();
  await cleanupTmpDirs();
});

describe('CBT against a model of changed blocks', () => {
  test.prop([fc.constantFrom(512, 4096, 16384), fc.array(stepArb, { minLength: 1, maxLength: 40 })], { numRuns: 100 })(
    'never misses a changed block, and never trusts a map it cannot vouch for',
    async (blockSize, steps) => {
      const dir = await tmpDir();
      const stateFile = path.join(dir, 'model.cbt');
      const d = memDisk(DISK_SECTORS * SECTOR_SIZE);
      await blkdevWrite(d.part0, 0, mbr());
      await d.rescanPartitions();
      const part = d.partition(1) as BlockDev;
      const attach = () => attachFilter(d.part0, 'cbt', { options: { blockSize, stateFile } });
      try {
        await run(d, part, attach, stateFile, steps, blockSize);
      } finally {
        // One vitest test holds every run: free each run's disk and files before the next.
        await cleanupDisks();
        await fs.rm(dir, { recursive: true, force: true });
      }
    },
  );
});

type Step = typeof stepArb extends fc.Arbitrary<infer T> ? T : never;

async function run(d: Disk, part: BlockDev, attach: () => Promise<unknown>, stateFile: string, steps: Step[], blockSize: number): Promise<void> {
  await attach();
  await attachFilter(d.part0, TAKER);

  let gen = (await cbtInfo(d.part0)).generationId;
  let epochs: Array<Set<number>> = [new Set()];
  let takes = 0;
  const oldGens: string[] = [];
  const newGeneration = (id: string) => {
    expect(id).not.toBe(gen);
    oldGens.push(gen);
    gen = id;
    epochs = [new Set()];
    takes = 0;
  };

  const check = async () => {
    const info = await cbtInfo(d.part0);
    for (let since = 0; since <= takes; since++) {
      const r = await changedExtents(d.part0, { since, generationId: gen });
      if (takes === 0) {
        expect(r).toMatchObject({ kind: 'full-copy-needed', reason: 'no-snapshot' });
        continue;
      }
      const want = new Set<number>();
      for (let e = since; e < takes; e++) for (const b of epochs[e] as Set<number>) want.add(b);
      const got = extentBlocks(r, info.blockSize, info.capacity);
      // No false negative, ever; and here no false positive either.
      for (const b of want) expect(got.has(b), `block ${b} changed after take ${since} but is not reported`).toBe(true);
      expect([...got].sort((a, b) => a - b)).toEqual([...want].sort((a, b) => a - b));
    }
    if (takes > 0) expect(await changedExtents(d.part0, { since: takes + 1, generationId: gen })).toMatchObject({ kind: 'full-copy-needed' });
    for (const old of oldGens) {
      expect(await changedExtents(d.part0, { since: 0, generationId: old })).toMatchObject({ kind: 'full-copy-needed' });
    }
  };

  for (const step of steps) {
    const current = epochs[epochs.length - 1] as Set<number>;
    switch (step.kind) {
      case 'io': {
        const target = step.viaPartition ? part : d.part0;
        const sectors = Math.min(step.sectors, target.nrSects);
        const start = Math.floor(step.startFrac * (target.nrSects - sectors));
        if (step.op === 'write') await blkdevWrite(target, start * SECTOR_SIZE, Buffer.alloc(sectors * SECTOR_SIZE, 0xa5));
        else if (step.op === 'discard') await blkdevDiscard(target, start * SECTOR_SIZE, sectors * SECTOR_SIZE);
        else await blkdevZeroout(target, start * SECTOR_SIZE, sectors * SECTOR_SIZE);
        for (const b of blocksOf(start + target.startSect, sectors, blockSize)) current.add(b);
        break;
      }
      case 'stripes': {
        const blocks = Math.ceil(d.part0.nrSects / (blockSize / SECTOR_SIZE));
        const first = Math.floor(step.startFrac * Math.max(0, blocks - step.every * step.count));
        for (let i = 0; i < step.count && first + i * step.every < blocks; i++) {
          const b = first + i * step.every;
          await blkdevWrite(d.part0, b * blockSize, Buffer.alloc(512, 1));
          current.add(b);
        }
        break;
      }
      case 'query': {
        // Writes after the last take must not show until the next one: the read map is frozen.
        await check();
        break;
      }
      case 'take': {
        await take(d.part0, [d.part0]);
        takes++;
        epochs.push(new Set());
        const info = await cbtInfo(d.part0);
        expect(info).toMatchObject({ snapNumber: takes, changesNumber: takes + 1, snapGenerationId: gen, generationId: gen });
        await check();
        break;
      }
      case 'dirty': {
        const start = Math.floor(step.startFrac * (d.part0.nrSects - step.sectors));
        await markDirty(d.part0, [{ sector: start, sectors: step.sectors }]);
        if (step.sectors > 0) {
          for (const b of blocksOf(start, step.sectors, blockSize)) {
            current.add(b);
            // Also in the read map: counted in the epoch the last take closed.
            if (takes > 0) (epochs[takes - 1] as Set<number>).add(b);
          }
        }
        await check();
        break;
      }
      case 'clean-restart': {
        await detachFilter(d.part0, 'cbt');
        await attach();
        const info = await cbtInfo(d.part0);
        expect(info).toMatchObject({ generationId: gen, generationReason: CbtGenerationReason.RESUMED, snapNumber: takes, changesNumber: takes + 1 });
        await check();
        break;
      }
      case 'unclean-restart': {
        // The checkpoint and journal as they are while attached (every write here completed,
        // so its mark is durable), as kill -9 would leave them: the generation goes on.
        const crashed = await fs.readFile(stateFile);
        const journal = await fs.readFile(`${stateFile}.journal`);
        await detachFilter(d.part0, 'cbt');
        await fs.writeFile(stateFile, crashed);
        await fs.writeFile(`${stateFile}.journal`, journal);
        await attach();
        const info = await cbtInfo(d.part0);
        expect(info).toMatchObject({ generationId: gen, generationReason: CbtGenerationReason.RESUMED_AFTER_CRASH, snapNumber: takes, changesNumber: takes + 1 });
        await check();
        break;
      }
      case 'resize': {
        // A Disk cannot really be resized: change the capacity the block layer checks against.
        d.part0.nrSects = d.part0.nrSects === DISK_SECTORS ? SHRUNK_SECTORS : DISK_SECTORS;
        const info = await cbtInfo(d.part0);
        expect(info).toMatchObject({ capacity: d.part0.nrSects, generationReason: CbtGenerationReason.RESIZE, snapNumber: 0 });
        newGeneration(info.generationId);
        await check();
        break;
      }
    }
  }
  await take(d.part0, [d.part0]);
  takes++;
  epochs.push(new Set());
  await check();
}
