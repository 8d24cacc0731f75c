// CBT across power cuts, in the manner of dm-log-writes (xfstests generic/482): one workload
// records every write and sync of the CBT state and of the device; then, for many crash points,
// the state and the device a power cut there could leave are rebuilt and CBT is restarted on
// them. Used by the package's test (hundreds of points) and the harness's soak (thousands).
import {
  Bio,
  blkdevDiscard,
  blkdevFlush,
  blkdevWrite,
  blkdevZeroout,
  createDiskSync,
  ReqFlag,
  ReqOp,
  submitBioWait,
  type Disk,
} from '@blkfilter/bio';
import {
  attachFilter,
  detachFilter,
  FILTER_API_VERSION,
  filterCtl,
  listRegisteredFilters,
  registerFilter,
  withFrozenDevices,
  type FilterNext,
} from '@blkfilter/registry';
import { cbtInfo, changedExtents, registerCbtFilter } from './filter.js';
import { PowerCutDevice } from './power-cut-device.js';
import { OpClock, RecordingStateIo } from './power-cut.js';
import { CbtGenerationReason } from './types.js';

const BLOCK = 4096;
const SIZE = 1 << 20;
const STATE = '/state/disk.cbt';
const FLUSHING_TAKER = 'cbt-test-flushing-taker';

/** mulberry32: a small seeded generator, so a failing crash point can be replayed. */
function rng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** A stand-in snapshot filter whose take flushes the device first, as a real take must. */
function registerFlushingTaker(): void {
  registerCbtFilter();
  if (listRegisteredFilters().some((f) => f.name === FLUSHING_TAKER)) return;
  registerFilter({
    name: FLUSHING_TAKER,
    apiVersion: FILTER_API_VERSION,
    defaultAltitude: 1,
    attach: (ctx) => ({
      ctl: {
        take: async () => {
          await flushBelow(ctx.next, ctx.bdev);
          ctx.snapshotTaken({ devices: [ctx.bdev.name] });
        },
      },
    }),
  });
}

function flushBelow(next: FilterNext, bdev: Bio['bdev']): Promise<void> {
  return new Promise((resolve, reject) => {
    const bio = new Bio(ReqOp.FLUSH, bdev, 0, 0);
    bio.endIo = (b) => (b.status === 0 ? resolve() : reject(b.error ?? new Error(`flush failed: ${b.status}`)));
    next.submit(bio);
  });
}

let seq = 0;

async function attach(clock: OpClock, io: RecordingStateIo, content: Buffer): Promise<{ disk: Disk; dev: PowerCutDevice }> {
  const dev = new PowerCutDevice(clock, content);
  const disk = createDiskSync({ name: `pc${process.pid}x${seq++}`, backend: dev, scanPartitions: false });
  await attachFilter(disk.part0, 'cbt', { options: { blockSize: BLOCK, stateFile: STATE, stateIo: io, checkpointBytes: 4096 } });
  await attachFilter(disk.part0, FLUSHING_TAKER);
  return { disk, dev };
}

interface Backup {
  /** The op number by which a backup tool could have recorded it (its take answered durably). */
  readonly recorded: number;
  readonly content: Buffer;
  readonly snapNumber: number;
  readonly generationId: string;
}

/** Takes a snapshot (flush, then the event, inside one freeze) and returns the image's content. */
async function takeSnapshot(disk: Disk, dev: PowerCutDevice): Promise<Buffer> {
  let content: Buffer | null = null;
  await withFrozenDevices([disk.part0], async () => {
    await filterCtl(disk.part0, FLUSHING_TAKER, 'take');
    content = dev.content();
  });
  return content as unknown as Buffer;
}

async function workload(random: () => number, clock: OpClock, disk: Disk, dev: PowerCutDevice, steps: number): Promise<Backup[]> {
  const backups: Backup[] = [];
  const blocks = SIZE / BLOCK;
  for (let step = 0; step < steps; step++) {
    const r = random();
    if (r < 0.62) {
      // Concurrent writes, some FUA, some within one block, some across blocks.
      const jobs: Array<Promise<void>> = [];
      const n = 1 + Math.floor(random() * 8);
      for (let i = 0; i < n; i++) {
        const sectors = 1 + Math.floor(random() * (random() < 0.7 ? 8 : 24));
        const sector = Math.floor(random() * (SIZE / 512 - sectors));
        const data = Buffer.alloc(sectors * 512, 1 + Math.floor(random() * 255));
        jobs.push(blkdevWrite(disk.part0, sector * 512, data, random() < 0.2 ? ReqFlag.FUA : 0));
      }
      await Promise.all(jobs);
    } else if (r < 0.7) {
      const b = Math.floor(random() * (blocks - 2));
      if (random() < 0.5) await blkdevDiscard(disk.part0, b * BLOCK, BLOCK * (1 + Math.floor(random() * 2)));
      else await blkdevZeroout(disk.part0, b * BLOCK, BLOCK);
    } else if (r < 0.8) {
      await blkdevFlush(disk.part0);
    } else if (r < 0.88) {
      // A NOWAIT write: may be refused with AGAIN while its mark is made durable; a retry passes.
      const sector = Math.floor(random() * (SIZE / 512 - 8));
      const data = Buffer.alloc(4096, 0x77);
      const bio = Bio.write(disk.part0, sector, data, ReqFlag.NOWAIT);
      await submitBioWait(bio).catch(async () => {
        await blkdevWrite(disk.part0, sector * 512, data);
      });
    } else {
      const content = await takeSnapshot(disk, dev);
      const info = await cbtInfo(disk.part0); // waits until the take is durable
      backups.push({ recorded: clock.now, content, snapNumber: info.snapNumber, generationId: info.snapGenerationId as string });
    }
  }
  return backups;
}


/** Options of {@link checkCbtAcrossPowerCuts}. */
export interface PowerCutCheckOptions {
  /** Seeds the workload and every crash image: the same seed replays the same run. */
  readonly seed: number;
  /** Crash points to rebuild and restart from. */
  readonly cuts: number;
  /** Workload steps (writes, discards, flushes, NOWAIT writes, takes; default 160). */
  readonly steps?: number;
}

/** What {@link checkCbtAcrossPowerCuts} checked. */
export interface PowerCutCheckResult {
  readonly cuts: number;
  /** Crash points after a recorded backup, where backup + changed extents was compared with the device. */
  readonly incrementals: number;
  readonly backups: number;
  /** Ops recorded by the workload (state files and device together). */
  readonly ops: number;
}

/**
 * CBT across power cuts, in the manner of dm-log-writes: runs one workload on a 1 MiB disk with
 * crash-safe CBT (state in a {@link RecordingStateIo}, device a {@link PowerCutDevice}, one op
 * clock), then for `cuts` crash points rebuilds what a power cut there could leave, restarts CBT
 * on it and checks that the generation resumes (no full copy) and that the last backup a tool
 * could have recorded before the cut, plus the changed extents, equals the device. Throws an
 * Error naming the seed and crash point at the first violation.
 */
export async function checkCbtAcrossPowerCuts(options: PowerCutCheckOptions): Promise<PowerCutCheckResult> {
  registerFlushingTaker();
  const { seed, cuts } = options;
  const random = rng(seed);
  const clock = new OpClock();
  const io = new RecordingStateIo(clock);
  const first = await attach(clock, io, Buffer.alloc(SIZE));
  const started = clock.now; // the state file and journal exist from here
  let backups: Backup[];
  let detaching = Infinity;
  try {
    backups = await workload(random, clock, first.disk, first.dev, options.steps ?? 160);
  } finally {
    detaching = clock.now; // a cut from here may find the clean save done
    await release(first.disk);
  }
  const end = clock.now;
  let incrementals = 0;
  for (let k = 0; k < cuts; k++) {
    const cut = 1 + Math.floor(random() * end);
    const where = `crash point ${cut} of ${end} (seed ${seed}, cut #${k})`;
    const files = io.crashImage(cut, random);
    const content = first.dev.crashImage(cut, random);
    const clock2 = new OpClock();
    const after = await attach(clock2, new RecordingStateIo(clock2, files), content);
    try {
      const info = await cbtInfo(after.disk.part0);
      const okReasons: string[] =
        cut <= started
          ? [CbtGenerationReason.NEW, CbtGenerationReason.RESUMED_AFTER_CRASH]
          : cut > detaching
            ? [CbtGenerationReason.RESUMED_AFTER_CRASH, CbtGenerationReason.RESUMED]
            : [CbtGenerationReason.RESUMED_AFTER_CRASH];
      if (!okReasons.includes(info.generationReason)) {
        throw new Error(`${where}: CBT restarted with ${info.generationReason} (${info.generationDetail ?? ''}), expected ${okReasons.join(' or ')}`);
      }
      const last = backups.filter((b) => b.recorded < cut).at(-1);
      if (last === undefined) continue;
      if (info.generationId !== last.generationId) throw new Error(`${where}: generation ${info.generationId} after the crash, the last backup is of ${last.generationId}: a full copy would be needed`);
      await takeSnapshot(after.disk, after.dev);
      const r = await changedExtents(after.disk.part0, { since: last.snapNumber, generationId: last.generationId });
      if (r.kind !== 'extents') throw new Error(`${where}: full copy needed (${r.reason}): ${r.message}`);
      const restored = Buffer.from(last.content);
      for (const e of r.extents) content.copy(restored, e.sector * 512, e.sector * 512, (e.sector + e.sectors) * 512);
      if (!restored.equals(content)) {
        let b = 0;
        while (restored.subarray(b * BLOCK, (b + 1) * BLOCK).equals(content.subarray(b * BLOCK, (b + 1) * BLOCK))) b++;
        throw new Error(`${where}: block ${b} changed since take ${last.snapNumber} but CBT did not report it`);
      }
      incrementals++;
    } finally {
      await release(after.disk);
    }
  }
  return { cuts, incrementals, backups: backups.length, ops: end };
}

async function release(disk: Disk): Promise<void> {
  for (const f of ['cbt', FLUSHING_TAKER]) await detachFilter(disk.part0, f).catch(() => {});
  await disk.remove();
}
