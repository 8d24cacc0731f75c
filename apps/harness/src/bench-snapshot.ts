import { Bio, BioVec, blkdevWrite, createDiskSync, MemoryBackend, ReqOp, submitBio, type Disk } from '@blkfilter/bio';
import { createSnapshot } from '@blkfilter/snapshot';
import type { Bench } from 'tinybench';
import { randomWriteTask } from './bench-registry.js';
import { compare, runAtDepth, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;

/** 4 KiB writes at the given byte offsets, QD16, timed; returns ops/s. */
async function timedWrites(disk: Disk, offsets: readonly number[]): Promise<number> {
  const qd = 16;
  const bufs = Array.from({ length: qd }, () => Buffer.alloc(4096, 9));
  const t0 = performance.now();
  await runAtDepth(offsets.length, qd, (i, slot, done) => {
    const bio = new Bio(ReqOp.WRITE, disk.part0, (offsets[i] as number) / 512, 4096, [new BioVec(bufs[slot] as Buffer)]);
    bio.endIo = () => done(slot);
    submitBio(bio);
  });
  return (offsets.length * 1000) / (performance.now() - t0);
}

/**
 * Snapshot cost on 4 KiB random writes (memory backend, 256 KiB chunks): with an active
 * snapshot whose chunks are all copied (the steady state) vs no snapshot; and first touch
 * (every write copies its chunk first) vs the same writes with no snapshot.
 */
export async function runSnapshotCases(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const size = 256 * MiB;
  const batch = quick ? 2048 : 8192;
  const bare = createDiskSync({ name: 'bench-snap0', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
  const snapped = createDiskSync({ name: 'bench-snap1', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
  const results: CaseResult[] = [];
  // Steady state: every chunk already copied.
  const snap = await createSnapshot({ storage: { kind: 'memory', limitBytes: 2 * size } });
  await snap.addDevice(snapped.part0);
  await snap.take();
  for (let off = 0; off < size; off += snap.chunkSize) await blkdevWrite(snapped.part0, off, Buffer.alloc(4096));
  results.push(
    await compare(makeBench, 'snapshot active (chunks copied), 4KiB rand write', 4096, 16, batch, randomWriteTask(snapped, batch, 16, size), 'no snapshot', randomWriteTask(bare, batch, 16, size)),
  );
  await snap.destroy();

  // First touch: one write per chunk, each copying its chunk; a fresh snapshot per round.
  const chunk = snap.chunkSize;
  const offsets = Array.from({ length: size / chunk }, (_, i) => ((i * 7919) % (size / chunk)) * chunk + 4096 * (i % 8));
  const ours: number[] = [];
  const base: number[] = [];
  for (let r = 0; r < (quick ? 1 : 3); r++) {
    const s = await createSnapshot({ storage: { kind: 'memory', limitBytes: 2 * size } });
    await s.addDevice(snapped.part0);
    await s.take();
    ours.push(await timedWrites(snapped, offsets));
    await s.destroy();
    base.push(await timedWrites(bare, offsets));
  }
  const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
  const o = med(ours);
  const b = med(base);
  results.push({
    name: `snapshot first touch (each write copies a ${chunk / 1024} KiB chunk), 4KiB write`,
    blockSize: 4096,
    queueDepth: 16,
    ours: { opsPerSec: Math.round(o), minOpsPerSec: Math.round(Math.min(...ours)), mbPerSec: Math.round((o * 4096) / 1e6), rmePercent: NaN },
    baseline: { opsPerSec: Math.round(b), minOpsPerSec: Math.round(Math.min(...base)), mbPerSec: Math.round((b * 4096) / 1e6), rmePercent: NaN, what: 'no snapshot, same offsets' },
    ratio: Math.round((o / b) * 1000) / 1000,
  });
  await bare.remove();
  await snapped.remove();
  return results;
}
