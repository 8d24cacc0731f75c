import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { createDiskSync, FileBackend, ReqOp } from '@blkfilter/bio';
import type { Bench } from 'tinybench';
import { compare, pooledBioTask, randomBlocks, runAtDepth, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;

/**
 * File backend: submitBio on a FileBackend disk vs fs.read/fs.write callbacks on the same file
 * with the same offsets and queue depth (the raw `fs` baseline). The file is in the page cache.
 */
export async function runFileCases(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-bench-'));
  const file = path.join(dir, 'bench.raw');
  const size = 256 * MiB;
  fs.writeFileSync(file, Buffer.alloc(0));
  const fill = Buffer.alloc(MiB, 0x5a);
  const wfd = fs.openSync(file, 'r+');
  for (let off = 0; off < size; off += MiB) fs.writeSync(wfd, fill, 0, MiB, off);
  const backend = await FileBackend.open(file);
  const disk = createDiskSync({ name: 'bench-file', backend });
  const results: CaseResult[] = [];
  try {
    for (const [bs, qd, batch] of [
      [4096, 16, quick ? 1024 : 4096],
      [MiB, 8, quick ? 32 : 128],
    ] as const) {
      for (const op of [ReqOp.WRITE, ReqOp.READ] as const) {
        const blocks = size / bs;
        const order = bs === 4096 ? randomBlocks(batch, blocks) : Uint32Array.from({ length: batch }, (_, i) => i % blocks);
        const bufs = Array.from({ length: qd }, () => Buffer.alloc(bs, 0xa5));
        const ours = pooledBioTask(disk, op, bs, qd, order);
        // One callback per slot, made once: the baseline allocates no closure per I/O either.
        const fsDone: Array<() => void> = [];
        const slotDoneFs: Array<(slot: number) => void> = new Array(qd);
        for (let s = 0; s < qd; s++) fsDone.push(() => (slotDoneFs[s] as (slot: number) => void)(s));
        const raw = (): Promise<void> =>
          runAtDepth(batch, qd, (i, slot, done) => {
            slotDoneFs[slot] = done;
            const pos = (order[i] as number) * bs;
            if (op === ReqOp.WRITE) fs.write(wfd, bufs[slot] as Buffer, 0, bs, pos, fsDone[slot] as () => void);
            else fs.read(wfd, bufs[slot] as Buffer, 0, bs, pos, fsDone[slot] as () => void);
          });
        const name = `file ${bs === MiB ? '1MiB seq' : '4KiB rand'} ${op === ReqOp.WRITE ? 'write' : 'read'}`;
        results.push(await compare(makeBench, name, bs, qd, batch, ours, 'fs.read/fs.write callbacks, same file', raw));
      }
    }
  } finally {
    await disk.remove();
    fs.closeSync(wfd);
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}
