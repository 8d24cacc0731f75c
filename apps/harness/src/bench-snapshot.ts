import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { Bio, BioVec, blkdevWrite, createDiskSync, FileBackend, MemoryBackend, ReqOp, submitBio, type Disk } from '@blkfilter/bio';
import { createSnapshot, type DiffStorageOptions } from '@blkfilter/snapshot';
import type { Bench } from 'tinybench';
import type { Figure } from './bench-cbt.js';
import { randomWriteTask } from './bench-registry.js';
import { compare, runAtDepth, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;
const QD = 16;
/** A memory diff storage step, as the default: the plain copies below fill fresh ones too. */
const STEP = 64 * MiB;

/** 4 KiB writes at the given byte offsets, QD16, timed; returns ops/s. */
async function timedWrites(disk: Disk, offsets: readonly number[]): Promise<number> {
  const bufs = Array.from({ length: QD }, () => Buffer.alloc(4096, 9));
  const t0 = performance.now();
  await runAtDepth(offsets.length, QD, (i, slot, done) => {
    const bio = new Bio(ReqOp.WRITE, disk.part0, (offsets[i] as number) / 512, 4096, [new BioVec(bufs[slot] as Buffer)]);
    bio.endIo = () => done(slot);
    submitBio(bio);
  });
  return (offsets.length * 1000) / (performance.now() - t0);
}

function median(xs: readonly number[]): number {
  return [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
}

/**
 * First touch: one 4 KiB write per chunk, each copying its chunk first, on `snapped` under a
 * fresh snapshot per round, against the same writes on `bare` with no snapshot. Rounds
 * alternate which side goes first; medians.
 */
async function firstTouch(
  name: string,
  snapped: Disk,
  bare: Disk,
  offsets: readonly number[],
  storage: () => DiffStorageOptions,
  rounds: number,
): Promise<{ result: CaseResult; ours: number }> {
  const ours: number[] = [];
  const base: number[] = [];
  const oursRound = async (): Promise<void> => {
    const s = await createSnapshot({ storage: storage() });
    await s.addDevice(snapped.part0);
    await s.take();
    ours.push(await timedWrites(snapped, offsets));
    await s.destroy();
  };
  for (let r = 0; r < rounds; r++) {
    if (r % 2 === 0) {
      await oursRound();
      base.push(await timedWrites(bare, offsets));
    } else {
      base.push(await timedWrites(bare, offsets));
      await oursRound();
    }
  }
  const o = median(ours);
  const b = median(base);
  return {
    ours: o,
    result: {
      name,
      blockSize: 4096,
      queueDepth: QD,
      ours: { opsPerSec: Math.round(o), minOpsPerSec: Math.round(Math.min(...ours)), mbPerSec: Math.round((o * 4096) / 1e6), rmePercent: NaN },
      baseline: { opsPerSec: Math.round(b), minOpsPerSec: Math.round(Math.min(...base)), mbPerSec: Math.round((b * 4096) / 1e6), rmePercent: NaN, what: 'no snapshot, same offsets' },
      ratio: Math.round((o / b) * 1000) / 1000,
    },
  };
}

/** MB/s of `Buffer.copy` of `count` chunks into fresh zero-filled steps (as diff storage gets them) or into one warm buffer. */
function bufferCopyMBps(count: number, chunk: number, fresh: boolean): number {
  const src = Buffer.alloc(chunk, 0x5a);
  const perStep = STEP / chunk;
  let dst = Buffer.alloc(STEP, 1);
  const t0 = performance.now();
  for (let i = 0; i < count; i++) {
    if (fresh && i % perStep === 0) dst = Buffer.alloc(STEP);
    src.copy(dst, (i % perStep) * chunk);
  }
  return (count * chunk) / ((performance.now() - t0) * 1e3);
}

/**
 * MB/s of a plain copy of the chunks at `offsets` out of the file `fd`, QD16, `fs.read` into
 * pooled buffers then `fs.write` to a new sparse file in `dir` (as directory diff storage
 * does), or with `intoMemory`, `fs.read` straight into fresh zero-filled steps (as memory diff
 * storage does).
 */
async function fileCopyMBps(fd: number, offsets: readonly number[], chunk: number, dir: string, intoMemory: boolean): Promise<number> {
  const count = offsets.length;
  const bufs = Array.from({ length: QD }, () => Buffer.allocUnsafeSlow(chunk));
  const steps = intoMemory ? Array.from({ length: Math.ceil((count * chunk) / STEP) }, () => Buffer.alloc(STEP)) : [];
  const perStep = STEP / chunk;
  const file = path.join(dir, 'plain-copy.diff');
  const out = intoMemory ? -1 : fs.openSync(file, 'w+');
  if (out >= 0) fs.ftruncateSync(out, count * chunk);
  const t0 = performance.now();
  await runAtDepth(count, QD, (i, slot, done) => {
    const at = chunk * Math.floor((offsets[i] as number) / chunk);
    if (intoMemory) {
      fs.read(fd, steps[Math.floor(i / perStep)] as Buffer, (i % perStep) * chunk, chunk, at, () => done(slot));
      return;
    }
    const buf = bufs[slot] as Buffer;
    fs.read(fd, buf, 0, chunk, at, () => fs.write(out, buf, 0, chunk, i * chunk, () => done(slot)));
  });
  const mbps = (count * chunk) / ((performance.now() - t0) * 1e3);
  if (out >= 0) {
    fs.closeSync(out);
    fs.rmSync(file);
  }
  return mbps;
}

function mbFigure(name: string, mbps: readonly number[]): Figure {
  return { name: `${name} (median of ${mbps.length})`, value: Math.round(median(mbps)), unit: 'MB/s' };
}

/**
 * Snapshot cost on 4 KiB writes with 256 KiB chunks, each case against the same writes with no
 * snapshot: the steady state (every chunk already copied), and first touch (every write lands
 * on an uncopied chunk, which is read and saved first), on a memory device and on a file device.
 *
 * The goal of issue 19 (first touch >= 0.1x of no snapshot) is carried by the **file** case:
 * a first touch copies 64 times the data of the write, and on a memory device the write it is
 * compared with is a ~1 us memcpy, so there it can at best reach about 1/64 of it plus the
 * copy's own costs (~0.02x); on a file device (a raw image in the page cache, the common case)
 * a plain 4 KiB write costs a threadpool round trip, which is what LVM's published ~0.1x is
 * measured against too. The memory case stays, to watch the copy path's own cost. Note that the
 * memory case runs without a turn of the event loop (the backend completes synchronously), so
 * of the pre-fault of memory diff storage it gets only what `createSnapshot` maps before the
 * round (the first 64 MiB step, a quarter of the round); the background jobs cannot run in it.
 *
 * Figures: the copy path's MB/s (first touches per second x chunk size) next to a plain copy
 * of the same chunks: `Buffer.copy` into fresh and into warm memory for the memory case, a
 * plain `fs.read` + `fs.write` (directory storage) and `fs.read` into fresh memory (memory
 * storage) for the file case.
 */
export async function runSnapshotCases(makeBench: () => Bench, quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  const size = 256 * MiB;
  const batch = quick ? 2048 : 8192;
  const rounds = quick ? 1 : 5;
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-bench-snap-'));
  try {
    // --- memory device, memory diff storage ------------------------------------------------
    const bare = createDiskSync({ name: 'bench-snap0', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
    const snapped = createDiskSync({ name: 'bench-snap1', backend: new MemoryBackend({ sizeBytes: size }), scanPartitions: false });
    const memStorage = (): DiffStorageOptions => ({ kind: 'memory', limitBytes: 2 * size });
    // Steady state: every chunk already copied.
    const snap = await createSnapshot({ storage: memStorage() });
    const chunk = snap.chunkSize;
    await snap.addDevice(snapped.part0);
    await snap.take();
    for (let off = 0; off < size; off += chunk) await blkdevWrite(snapped.part0, off, Buffer.alloc(4096));
    results.push({
      ...(await compare(makeBench, 'snapshot active (chunks copied), 4KiB rand write', 4096, QD, batch, randomWriteTask(snapped, batch, QD, size), 'no snapshot', randomWriteTask(bare, batch, QD, size))),
      goal: 0.95,
    });
    await snap.destroy();
    // First touch: one write per chunk, spread over the device, each copying its chunk.
    const chunks = size / chunk;
    const offsets = Array.from({ length: chunks }, (_, i) => ((i * 7919) % chunks) * chunk + 4096 * (i % 8));
    const mem = await firstTouch(`snapshot first touch (each write copies a ${chunk / 1024} KiB chunk), 4KiB write`, snapped, bare, offsets, memStorage, rounds);
    results.push(mem.result);
    await bare.remove();
    await snapped.remove();
    const fresh: number[] = [];
    const warm: number[] = [];
    for (let r = 0; r < 3; r++) {
      fresh.push(bufferCopyMBps(chunks, chunk, true));
      warm.push(bufferCopyMBps(chunks, chunk, false));
    }
    figures.push(
      { name: `snapshot first-touch copy path, memory device -> memory diff storage, ${chunk / 1024} KiB chunks`, value: Math.round((mem.ours * chunk) / 1e6), unit: 'MB/s' },
      mbFigure(`plain Buffer.copy of ${chunks} ${chunk / 1024} KiB chunks into fresh 64 MiB Buffer.alloc steps`, fresh),
      mbFigure(`plain Buffer.copy of ${chunks} ${chunk / 1024} KiB chunks into warm memory`, warm),
    );

    // --- file device (a raw image in the page cache) ----------------------------------------
    const fill = Buffer.alloc(MiB, 0x5a);
    const files = ['snap-bare.raw', 'snap-snapped.raw'].map((f) => path.join(dir, f));
    for (const f of files) {
      const fd = fs.openSync(f, 'w');
      for (let off = 0; off < size; off += MiB) fs.writeSync(fd, fill, 0, MiB, off);
      fs.closeSync(fd);
    }
    const fbare = createDiskSync({ name: 'bench-snapf0', backend: await FileBackend.open(files[0] as string), scanPartitions: false });
    const fsnapped = createDiskSync({ name: 'bench-snapf1', backend: await FileBackend.open(files[1] as string), scanPartitions: false });
    try {
      const diffDir = path.join(dir, 'diff');
      const dirStorage = (): DiffStorageOptions => ({ kind: 'directory', path: diffDir, limitBytes: 2 * size });
      const fsnap = await createSnapshot({ storage: dirStorage() });
      await fsnap.addDevice(fsnapped.part0);
      await fsnap.take();
      for (let off = 0; off < size; off += chunk) await blkdevWrite(fsnapped.part0, off, Buffer.alloc(4096));
      const fbatch = quick ? 1024 : 4096;
      results.push({
        goal: 0.95,
        ...(await compare(
          makeBench,
          'snapshot active (chunks copied), file device, 4KiB rand write',
          4096,
          QD,
          fbatch,
          randomWriteTask(fsnapped, fbatch, QD, size),
          'no snapshot, file device',
          randomWriteTask(fbare, fbatch, QD, size),
        )),
      });
      await fsnap.destroy();
      const fdir = await firstTouch(
        `snapshot first touch, file device, directory diff storage (each write copies a ${chunk / 1024} KiB chunk), 4KiB write`,
        fsnapped,
        fbare,
        offsets,
        dirStorage,
        rounds,
      );
      results.push({ ...fdir.result, goal: 0.1 });
      const fmem = await firstTouch(
        `snapshot first touch, file device, memory diff storage (each write copies a ${chunk / 1024} KiB chunk), 4KiB write`,
        fsnapped,
        fbare,
        offsets,
        memStorage,
        rounds,
      );
      results.push(fmem.result);
      const rfd = fs.openSync(files[1] as string, 'r');
      const plainFile: number[] = [];
      const plainMem: number[] = [];
      try {
        for (let r = 0; r < 3; r++) {
          plainFile.push(await fileCopyMBps(rfd, offsets, chunk, dir, false));
          plainMem.push(await fileCopyMBps(rfd, offsets, chunk, dir, true));
        }
      } finally {
        fs.closeSync(rfd);
      }
      figures.push(
        { name: `snapshot first-touch copy path, file device -> directory diff storage, ${chunk / 1024} KiB chunks`, value: Math.round((fdir.ours * chunk) / 1e6), unit: 'MB/s' },
        mbFigure(`plain copy of the same ${chunks} chunks: fs.read + fs.write to a new file, QD16`, plainFile),
        { name: `snapshot first-touch copy path, file device -> memory diff storage, ${chunk / 1024} KiB chunks`, value: Math.round((fmem.ours * chunk) / 1e6), unit: 'MB/s' },
        mbFigure(`plain copy of the same ${chunks} chunks: fs.read into fresh 64 MiB Buffer.alloc steps, QD16`, plainMem),
      );
    } finally {
      await fbare.remove();
      await fsnapped.remove();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { results, figures };
}
