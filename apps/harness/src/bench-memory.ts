import { Bio, BioVec, createDiskSync, MemoryBackend, ReqOp, SECTOR_SIZE, submitBio, type BlkStatus, type CompletionSink } from '@blkfilter/bio';
import type { Bench } from 'tinybench';
import { compare, randomBlocks, runAtDepth, type CaseResult } from './bench-util.js';

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
      const bufs = Array.from({ length: qd }, () => Buffer.alloc(bs, 0xa5));
      const bios = bufs.map((b) => new Bio(op, disk.part0, 0, bs, [new BioVec(b)]));
      const vecs = bios.map((b) => b.vecs);
      const slotDone: Array<(slot: number) => void> = new Array(qd);
      const endIo = (bio: Bio): void => (slotDone[bio.private as number] as (slot: number) => void)(bio.private as number);
      const ours = (): Promise<void> =>
        runAtDepth(batch, qd, (i, slot, done) => {
          const bio = (bios[slot] as Bio).reset(op, disk.part0, ((order[i] as number) * bs) / SECTOR_SIZE, bs, vecs[slot]);
          bio.private = slot;
          bio.endIo = endIo;
          slotDone[slot] = done;
          submitBio(bio);
        });
      const sink: CompletionSink = {
        complete(bio: Bio, _status: BlkStatus) {
          (slotDone[bio.private as number] as (slot: number) => void)(bio.private as number);
        },
      };
      const direct = (): Promise<void> =>
        runAtDepth(batch, qd, (i, slot, done) => {
          const bio = (bios[slot] as Bio).reset(op, disk.part0, ((order[i] as number) * bs) / SECTOR_SIZE, bs, vecs[slot]);
          bio.private = slot;
          slotDone[slot] = done;
          backend.queueBio(bio, sink);
        });
      const name = `memory ${bs === MiB ? '1MiB seq' : '4KiB rand'} ${op === ReqOp.WRITE ? 'write' : 'read'}`;
      results.push(await compare(makeBench, name, bs, qd, batch, ours, 'MemoryBackend.queueBio directly', direct));
    }
  }
  await disk.remove();
  return results;
}
