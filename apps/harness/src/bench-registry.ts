import { createDiskSync, MemoryBackend, ReqOp, type Disk } from '@blkfilter/bio';
import { attachFilter, detachFilter, FILTER_API_VERSION, FilterVerdict, registerFilter } from '@blkfilter/registry';
import type { Bench } from 'tinybench';
import { compare, pooledBioTask, randomBlocks, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;
const pass = (): FilterVerdict => FilterVerdict.PASS;

/** A 4 KiB random-write workload at QD16 on `disk`, with pooled bios. */
export function randomWriteTask(disk: Disk, batch: number, qd: number, size: number): () => Promise<void> {
  return pooledBioTask(disk, ReqOp.WRITE, 4096, qd, randomBlocks(batch, size / 4096, 777));
}

/**
 * Registry cost: 4 KiB random writes on the memory backend through 1 and 3 pass-through
 * filters (each implements write and passes), against the same disk setup with none.
 */
export async function runRegistryCases(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const size = 64 * MiB;
  const batch = quick ? 2048 : 8192;
  const qd = 16;
  registerFilter({ name: 'bench-pass', apiVersion: FILTER_API_VERSION, attach: () => ({ write: pass, read: pass }) });
  for (const n of [2, 3]) registerFilter({ name: `bench-pass${n}`, apiVersion: FILTER_API_VERSION, attach: () => ({ write: pass }) });
  const bare = createDiskSync({ name: 'bench-reg0', backend: new MemoryBackend({ sizeBytes: size }) });
  const one = createDiskSync({ name: 'bench-reg1', backend: new MemoryBackend({ sizeBytes: size }) });
  const three = createDiskSync({ name: 'bench-reg3', backend: new MemoryBackend({ sizeBytes: size }) });
  await attachFilter(one.part0, 'bench-pass', { altitude: 1 });
  for (const [i, name] of ['bench-pass', 'bench-pass2', 'bench-pass3'].entries()) await attachFilter(three.part0, name, { altitude: i + 1 });
  const results: CaseResult[] = [];
  try {
    const base = randomWriteTask(bare, batch, qd, size);
    results.push(await compare(makeBench, 'registry 1 pass-through filter, 4KiB rand write', 4096, qd, batch, randomWriteTask(one, batch, qd, size), 'no filter attached', base));
    results.push(await compare(makeBench, 'registry 3 pass-through filters, 4KiB rand write', 4096, qd, batch, randomWriteTask(three, batch, qd, size), 'no filter attached', base));
  } finally {
    await detachFilter(one.part0, 'bench-pass');
    for (const name of ['bench-pass', 'bench-pass2', 'bench-pass3']) await detachFilter(three.part0, name);
    for (const d of [bare, one, three]) await d.remove();
  }
  return results;
}
