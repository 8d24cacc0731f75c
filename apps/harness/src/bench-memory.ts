import { performance } from 'node:perf_hooks';
import { Bio, BioVec, blkdevBlockStatus, blkdevDiscard, blkdevWrite, createDiskSync, MemoryBackend, ReqOp, SECTOR_SIZE } from '@blkfilter/bio';
import type { Bench } from 'tinybench';
import type { Figure } from './bench-cbt.js';
import { compare, pooledBioTask, randomBlocks, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;

/**
 * Memory backend: submitBio on a disk vs the same bios handed straight to the backend's
 * queueBio (what the block layer adds: validation, remap, queue selection, completion).
 */
export async function runMemoryCases(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const size = 256 * MiB;
  const backend = new MemoryBackend({ sizeBytes: size });
  const disk = createDiskSync({ name: 'bench-mem', backend });
  const results: CaseResult[] = [];
  // Fill the device so reads touch real pages.
  const fill = Buffer.alloc(MiB, 0x5a);
  for (let off = 0; off < size; off += MiB) {
    backend.queueBio(new Bio(ReqOp.WRITE, disk.part0, off / SECTOR_SIZE, MiB, [new BioVec(fill)]), { complete() {} });
  }
  for (const [bs, qd, batch] of [
    [4096, 16, quick ? 2048 : 8192],
    [MiB, 8, quick ? 32 : 128],
  ] as const) {
    for (const op of [ReqOp.WRITE, ReqOp.READ] as const) {
      const blocks = size / bs;
      const order = bs === 4096 ? randomBlocks(batch, blocks) : Uint32Array.from({ length: batch }, (_, i) => i % blocks);
      const ours = pooledBioTask(disk, op, bs, qd, order);
      const direct = pooledBioTask(disk, op, bs, qd, order, backend);
      const name = `memory ${bs === MiB ? '1MiB seq' : '4KiB rand'} ${op === ReqOp.WRITE ? 'write' : 'read'}`;
      results.push(await compare(makeBench, name, bs, qd, batch, ours, 'MemoryBackend.queueBio directly', direct));
    }
  }
  await disk.remove();
  return results;
}

/**
 * Sparse 1 TiB memory device with a few pages: block status over the whole device and a discard
 * of it should walk the allocated pages, not 2^28 page numbers (the tests check the answers;
 * these figures are how long they take). Median of 5 each.
 */
export async function runMemoryFigures(): Promise<Figure[]> {
  const TiB = 1024 ** 4;
  const median = (xs: number[]): number => Math.round(([...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number) * 100) / 100;
  const status: number[] = [];
  const discard: number[] = [];
  for (let r = 0; r < 5; r++) {
    const disk = createDiskSync({ name: `bench-mem-tib${r}`, backend: new MemoryBackend({ sizeBytes: TiB }), scanPartitions: false });
    for (const off of [0, MiB, 5 * 2 ** 32, TiB - MiB]) await blkdevWrite(disk.part0, off, Buffer.alloc(MiB, 1));
    let t0 = performance.now();
    blkdevBlockStatus(disk.part0, 0, TiB);
    status.push(performance.now() - t0);
    t0 = performance.now();
    await blkdevDiscard(disk.part0, 0, TiB);
    discard.push(performance.now() - t0);
    await disk.remove();
  }
  return [
    { name: 'memory blockStatus over a 1 TiB device with 4 MiB written, median of 5', value: median(status), unit: 'ms', target: '< 100 ms' },
    { name: 'memory discard of a 1 TiB device with 4 MiB written, median of 5', value: median(discard), unit: 'ms', target: '< 2000 ms' },
  ];
}
