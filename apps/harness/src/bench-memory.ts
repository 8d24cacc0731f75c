import { Bio, BioVec, createDiskSync, MemoryBackend, ReqOp, SECTOR_SIZE } from '@blkfilter/bio';
import type { Bench } from 'tinybench';
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
