import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blkdevWrite, createDisk, createDiskSync, FileBackend, MemoryBackend, ReqOp, type Disk } from '@blkfilter/bio';
import { cbtInfo, registerCbtFilter } from '@blkfilter/cbt';
import { registerTakerFilter, takeSnapshot } from '@blkfilter/cbt/testing';
import { attachFilter, detachFilter } from '@blkfilter/registry';
import type { Bench } from 'tinybench';
import type { Figure } from './bench-cbt.js';
import { randomWriteTask } from './bench-registry.js';
import { compare, pooledBioTask, randomBlocks, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;
const TiB = 1024 ** 4;

async function fileDisk(dir: string, name: string, size: number): Promise<Disk> {
  const backend = await FileBackend.open(path.join(dir, `${name}.raw`), { create: { sizeBytes: size } });
  return createDisk({ name, backend, scanPartitions: false });
}

/** Median of `xs`. */
function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

/** The latency of one 512-byte write + fdatasync on the bench's file system (the cost a first touch must stay near). */
function fdatasyncLatencyUs(dir: string, n: number): number {
  const fd = fs.openSync(path.join(dir, 'sync-probe'), 'w');
  const buf = Buffer.alloc(512, 1);
  const times: number[] = [];
  for (let i = 0; i < n; i++) {
    const t0 = process.hrtime.bigint();
    fs.writeSync(fd, buf, 0, 512, (i % 64) * 512);
    fs.fdatasyncSync(fd);
    times.push(Number(process.hrtime.bigint() - t0) / 1000);
  }
  fs.closeSync(fd);
  return median(times);
}

/**
 * Crash-safe CBT on the file backend (state file + journal, every first touch synced before the
 * write goes down): writes over a working set already marked in this generation vs no CBT, and
 * first touches (each write the first to its block after a take) at QD1 and QD16 vs no CBT,
 * with the fdatasync latency of the same file system beside them; the state size and the
 * recovery time (attach after a crash) of a 1 TiB map.
 */
export async function runDurableCbtCases(makeBench: () => Bench, quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  registerCbtFilter();
  const taker = registerTakerFilter();
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-bench-cbt-'));
  const size = 64 * MiB;
  const batch = quick ? 1024 : 4096;
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  const bare = await fileDisk(dir, 'bench-dcbt0', size);
  const tracked = await fileDisk(dir, 'bench-dcbt1', size);
  try {
    await attachFilter(tracked.part0, 'cbt', { options: { stateFile: path.join(dir, 'tracked.cbt'), blockSize: 4096 } });
    await attachFilter(tracked.part0, taker, { altitude: 1 });
    // Mark the whole working set in this generation: the steady state of a busy disk.
    const fill = Buffer.alloc(MiB, 0x11);
    for (let off = 0; off < size; off += MiB) {
      await blkdevWrite(tracked.part0, off, fill);
      await blkdevWrite(bare.part0, off, fill);
    }
    results.push(
      await compare(
        makeBench,
        'crash-safe cbt, 4KiB rand write, blocks already marked (file)',
        4096,
        16,
        batch,
        randomWriteTask(tracked, batch, 16, size),
        'no cbt, same file backend',
        randomWriteTask(bare, batch, 16, size),
      ),
    );
    // First touches: after a take no block is marked; each write goes to a block of its own.
    const blocks = size / 4096;
    for (const qd of [1, 16]) {
      const n = qd === 1 ? (quick ? 200 : 600) : quick ? 1024 : 4096;
      const ours: number[] = [];
      const base: number[] = [];
      for (let round = 0; round < 3; round++) {
        await takeSnapshot(tracked.part0, [tracked.part0]);
        await cbtInfo(tracked.part0); // the take is durable
        const order = randomBlocks(n, blocks, 99 + round);
        const sides: Array<[() => Promise<void>, number[]]> = [
          [pooledBioTask(tracked, ReqOp.WRITE, 4096, qd, order), ours],
          [pooledBioTask(bare, ReqOp.WRITE, 4096, qd, order), base],
        ];
        if (round % 2 === 1) sides.reverse();
        for (const [task, out] of sides) {
          const t0 = performance.now();
          await task();
          out.push((n * 1000) / (performance.now() - t0));
        }
      }
      const o = median(ours);
      const b = median(base);
      results.push({
        name: `crash-safe cbt, 4KiB rand write, every write a first touch, QD${qd} (file)`,
        blockSize: 4096,
        queueDepth: qd,
        ours: { opsPerSec: Math.round(o), mbPerSec: Math.round((o * 4096) / 1e6), rmePercent: 0 },
        baseline: { what: 'no cbt, same file backend', opsPerSec: Math.round(b), mbPerSec: Math.round((b * 4096) / 1e6), rmePercent: 0 },
        ratio: Math.round((o / b) * 1000) / 1000,
      });
      if (qd === 1) {
        const sync = fdatasyncLatencyUs(dir, quick ? 100 : 300);
        figures.push(
          { name: 'crash-safe cbt first touch at QD1: latency per write', value: Math.round(1e6 / o), unit: 'us' },
          { name: 'crash-safe cbt first touch at QD1: latency added to a plain write (the durable mark)', value: Math.round(1e6 / o - 1e6 / b), unit: 'us', target: `<= fdatasync + 10% (${Math.round(sync * 1.1)} us)` },
          { name: 'fdatasync of a 512-byte write inside a file, same file system (median)', value: Math.round(sync), unit: 'us' },
        );
      }
    }
  } finally {
    for (const f of ['cbt', taker]) await detachFilter(tracked.part0, f).catch(() => {});
    await tracked.remove();
    await bare.remove();
  }

  // 1 TiB: the state's size, and how long an attach after a crash takes (checkpoint + journal).
  const stateFile = path.join(dir, 'big.cbt');
  const big = createDiskSync({ name: 'bench-dcbt-1t', backend: new MemoryBackend({ sizeBytes: TiB }), scanPartitions: false });
  await attachFilter(big.part0, 'cbt', { options: { stateFile } });
  await attachFilter(big.part0, taker, { altitude: 1 });
  await takeSnapshot(big.part0, [big.part0]);
  const info = await cbtInfo(big.part0);
  const touched = randomBlocks(Math.round(info.blockCount / 100), info.blockCount, 4242);
  const buf = Buffer.alloc(4096, 7);
  const jobs: Array<Promise<void>> = [];
  for (const b of touched) {
    jobs.push(blkdevWrite(big.part0, b * info.blockSize, buf));
    if (jobs.length === 64) await Promise.all(jobs.splice(0));
  }
  await Promise.all(jobs);
  await cbtInfo(big.part0);
  // As kill -9 leaves them: the live checkpoint and journal.
  const crashedState = fs.readFileSync(stateFile);
  const crashedJournal = fs.readFileSync(`${stateFile}.journal`);
  for (const f of [taker, 'cbt']) await detachFilter(big.part0, f);
  await big.remove();
  fs.writeFileSync(stateFile, crashedState);
  fs.writeFileSync(`${stateFile}.journal`, crashedJournal);
  const again = createDiskSync({ name: 'bench-dcbt-1t-again', backend: new MemoryBackend({ sizeBytes: TiB }), scanPartitions: false });
  const t0 = performance.now();
  await attachFilter(again.part0, 'cbt', { options: { stateFile } });
  const recoveryMs = performance.now() - t0;
  const resumed = await cbtInfo(again.part0);
  if (resumed.generationReason !== 'resumed-after-crash') throw new Error(`1 TiB recovery answered ${resumed.generationReason}: ${resumed.generationDetail ?? ''}`);
  await detachFilter(again.part0, 'cbt');
  await again.remove();
  figures.push(
    { name: `crash-safe cbt state for 1 TiB (${info.blockCount} blocks): checkpoint`, value: crashedState.length, unit: 'bytes' },
    { name: `crash-safe cbt journal after ${touched.length} first touches (1% of 1 TiB)`, value: crashedJournal.length, unit: 'bytes' },
    { name: 'crash-safe cbt recovery of a 1 TiB map after a crash (attach: read, replay, new live state)', value: Math.round(recoveryMs), unit: 'ms', target: 'seconds at most' },
  );
  fs.rmSync(dir, { recursive: true, force: true });
  return { results, figures };
}
