import { Bio, BioVec, createDiskSync, MemoryBackend, ReqOp, submitBio } from '@blkfilter/bio';
import { cbtInfo, changedExtents, registerCbtFilter } from '@blkfilter/cbt';
import { registerTakerFilter, takeSnapshot } from '@blkfilter/cbt/testing';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import type { Bench } from 'tinybench';
import { randomWriteTask } from './bench-registry.js';
import { compare, randomBlocks, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;
const TiB = 1024 ** 4;

/** Extra figures that are not ratios (times, sizes). */
export interface Figure {
  readonly name: string;
  readonly value: number;
  readonly unit: string;
  readonly target?: string;
}

/**
 * CBT cost: 4 KiB random writes with the cbt filter attached vs the same disk setup without;
 * and the time of changedExtents on a 1 TiB map with 1% of its blocks changed.
 */
export async function runCbtCases(makeBench: () => Bench, quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  registerCbtFilter();
  // A stand-in for the snapshot filter: emits the take event at a frozen instant.
  const taker = registerTakerFilter();
  const size = 64 * MiB;
  const batch = quick ? 2048 : 8192;
  const bare = createDiskSync({ name: 'bench-cbt0', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
  const tracked = createDiskSync({ name: 'bench-cbt1', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
  await attachFilter(tracked.part0, 'cbt', { options: { stateFile: false } });
  const results = [
    await compare(makeBench, 'cbt attached, 4KiB rand write', 4096, 16, batch, randomWriteTask(tracked, batch, 16, size), 'no filter attached', randomWriteTask(bare, batch, 16, size)),
  ];
  await detachFilter(tracked.part0, 'cbt');
  await tracked.remove();
  await bare.remove();

  // 1 TiB: 2,097,152 blocks of 512 KiB; 1% of them written once each, scattered.
  const big = createDiskSync({ name: 'bench-cbt-1t', backend: new MemoryBackend({ sizeBytes: TiB }), scanPartitions: false });
  await attachFilter(big.part0, 'cbt', { options: { stateFile: false } });
  await attachFilter(big.part0, taker, { altitude: 1 });
  const take = (): Promise<void> => takeSnapshot(big.part0, [big.part0]);
  await take();
  const info = await cbtInfo(big.part0);
  const changed = Math.round(info.blockCount / 100);
  const blocks = randomBlocks(changed, info.blockCount, 4242);
  const buf = Buffer.alloc(4096, 7);
  for (let i = 0; i < changed; i++) {
    const bio = new Bio(ReqOp.WRITE, big.part0, ((blocks[i] as number) * info.blockSize) / 512, 4096, [new BioVec(buf)]);
    submitBio(bio);
  }
  await take();
  const times: number[] = [];
  let extents = 0;
  for (let r = 0; r < 5; r++) {
    const t0 = performance.now();
    const res = await changedExtents(big.part0, { since: info.snapNumber, generationId: info.generationId });
    times.push(performance.now() - t0);
    if (res.kind !== 'extents') throw new Error(`changedExtents answered ${res.kind}`);
    extents = res.extents.length;
  }
  const after = await cbtInfo(big.part0);
  for (const f of [taker, 'cbt']) await detachFilter(big.part0, f);
  await big.remove();
  times.sort((a, b) => a - b);
  return {
    results,
    figures: [
      { name: `cbt changedExtents, 1 TiB map (${info.blockCount} blocks of ${info.blockSize / 1024} KiB), 1% changed -> ${extents} extents, median of 5`, value: Math.round((times[2] as number) * 100) / 100, unit: 'ms', target: '< 100 ms' },
      { name: 'cbt map memory for 1 TiB (map + frozen copy)', value: after.memoryBytes, unit: 'bytes' },
    ],
  };
}
