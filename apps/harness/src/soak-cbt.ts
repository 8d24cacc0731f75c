// Scenario "cbt": CBT on a disk whose backend injects write faults, snapshots taken through
// @blkfilter/snapshot (which emits the take event at the frozen instant). After each take,
// `changedExtents` since the previous take must cover every sector the workers wrote,
// discarded or zeroed in between, failed writes included: a false negative is never allowed.
import { ReqOp, SECTOR_SIZE } from '@blkfilter/bio';
import { FaultBackend } from '@blkfilter/bio/testing';
import { attachFilter } from '@blkfilter/registry';
import { CBT_FILTER_NAME, cbtInfo, changedExtents, registerCbtFilter, type ChangedExtentsResult } from '@blkfilter/cbt';
import { createSnapshot } from '@blkfilter/snapshot';
import type { StepContext } from './soak-context.js';
import { randomFaultRules } from './soak-faults.js';
import { randomIo, verifyRange, type Region } from './soak-io.js';
import { Gate, Model, sleep } from './soak-util.js';

const MiB = 1 << 20;
const DISK_BYTES = 16 * MiB;

/**
 * One step of the `cbt` scenario: a 16 MiB disk with CBT (random block size), four workers,
 * and a controller that takes a snapshot, checks the extents since the previous take against
 * the sectors the model saw change, checks the image, and destroys the snapshot.
 */
export async function cbtStep(ctx: StepContext): Promise<void> {
  registerCbtFilter();
  const rng = ctx.rng;
  let fault!: FaultBackend;
  const disk = ctx.memoryDisk('disk', DISK_BYTES, (inner) => (fault = new FaultBackend(inner, { seed: rng.u32() })));
  // Write faults only: a failed read of the original would (rightly) corrupt the snapshot.
  for (const rule of randomFaultRules(rng, { readErrors: false })) fault.addRule(rule);
  const dev = disk.part0;
  const blockSize = rng.pick([4096, 16384, 65536]);
  await attachFilter(dev, CBT_FILTER_NAME, { options: { blockSize, stateFile: false }, timeoutMs: ctx.limits.freezeTimeoutMs });
  const model = new Model(DISK_BYTES);
  /**
   * Per sector, how many bios may have changed it since the last take: counted before each bio
   * is submitted (CBT counts at submission, failed writes included), uncounted for a NOWAIT bio
   * refused at a frozen gate. Workers are paused across a take, so a bio's count and uncount
   * land in the same window.
   */
  let changed = new Uint32Array(DISK_BYTES / SECTOR_SIZE);
  const onChange = (offset: number, length: number): (() => void) => {
    const map = changed;
    const first = offset / SECTOR_SIZE;
    const end = (offset + length) / SECTOR_SIZE;
    for (let s = first; s < end; s++) (map[s] as number)++;
    return () => {
      for (let s = first; s < end; s++) (map[s] as number)--;
    };
  };
  const gate = new Gate();
  const quarter = DISK_BYTES / 4;
  const workers = [0, 1, 2, 3].map((i) => {
    const wr = rng.fork(`worker${i}`);
    const region: Region = { dev, modelBase: 0, start: i === 0 ? 4096 : i * quarter, bytes: i === 0 ? quarter - 4096 : quarter };
    return async (): Promise<void> => {
      await gate.enter();
      try {
        await randomIo(ctx, wr, region, model, {
          maxBytes: 128 * 1024,
          flags: true,
          onError: 'forget',
          onChange,
          ops: [
            [ReqOp.READ, 10],
            [ReqOp.WRITE, 60],
            [ReqOp.DISCARD, 12],
            [ReqOp.WRITE_ZEROES, 12],
            [ReqOp.FLUSH, 6],
          ],
        });
      } finally {
        gate.leave();
      }
    };
  });

  let prev: { generationId: string; since: number } | null = null;
  const controlRng = rng.fork('control');
  let takes = 0;
  const controller = async (): Promise<void> => {
    const n = takes++;
    ctx.phase = `take ${n}: create and add the device`;
    const snap = await createSnapshot({ chunkSize: 64 * 1024, storage: { kind: 'memory', limitBytes: 2 * DISK_BYTES, stepBytes: 4 * MiB } });
    ctx.onCleanup(() => snap.destroy());
    await snap.addDevice(dev);
    ctx.phase = `take ${n}: take with workers paused`;
    await gate.pause();
    const sinceLast = changed;
    const atTake = model.copy();
    try {
      changed = new Uint32Array(changed.length);
      await snap.take();
    } finally {
      gate.resume();
    }
    ctx.count('takes');
    ctx.phase = `take ${n}: changed extents since take ${n - 1}`;
    if (prev === null) {
      const info = await cbtInfo(dev);
      prev = { generationId: info.generationId, since: info.snapNumber };
    } else {
      const res = await changedExtents(dev, prev);
      checkNoFalseNegative(ctx, res, sinceLast, snap.id, blockSize);
      if (res.kind === 'extents') prev = { generationId: res.generationId, since: res.snapNumber };
    }
    ctx.phase = `take ${n}: image against the model at take`;
    if (controlRng.chance(0.5)) await verifyRange(ctx, snap.image(dev), 0, DISK_BYTES, atTake, 0, `snapshot image of take ${n}`);
    await snap.destroy();
    await sleep(controlRng.range(1, 10));
  };
  ctx.phase = 'workers with takes';
  await ctx.runWorkers([...workers, controller]);
  if (takes < 2) {
    await controller();
    await controller();
  }
  ctx.count('injected', fault.injected);
}

/** Every sector in `changedSectors` must lie in an extent of `res` (and the take must be ours). */
function checkNoFalseNegative(ctx: StepContext, res: ChangedExtentsResult, changedSectors: Uint32Array, snapshotId: string, blockSize: number): void {
  ctx.check(res.kind === 'extents', () => `changedExtents answered full-copy-needed (${res.kind === 'full-copy-needed' ? `${res.reason}: ${res.message}` : ''}) between two takes of one generation`);
  if (res.kind !== 'extents') return;
  ctx.check(res.snapshotId === snapshotId, () => `changedExtents reports snapshot ${String(res.snapshotId)}, the take was snapshot ${snapshotId}`);
  const covered = new Uint8Array(changedSectors.length);
  for (const e of res.extents) covered.fill(1, e.sector, e.sector + e.sectors);
  let dirty = 0;
  let reported = 0;
  for (let s = 0; s < changedSectors.length; s++) {
    if (covered[s] === 1) reported++;
    if (changedSectors[s] === 0) continue;
    dirty++;
    if (covered[s] === 0) {
      ctx.check(false, () => `CBT false negative: sector ${s} (block ${Math.floor((s * SECTOR_SIZE) / blockSize)}) changed since the previous take but is in no extent of ${JSON.stringify(res.extents.slice(0, 8))}${res.extents.length > 8 ? '...' : ''}`);
    }
  }
  ctx.stats.checks += dirty;
  ctx.count('changed-sectors', dirty);
  ctx.count('reported-sectors', reported);
}
