// Scenario "faults": a FaultBackend under a disk (and a linear device on it) injects error
// statuses, delays and torn writes while workers run random bios and filters come and go.
// A failed write leaves its range unknown in the model until rewritten; reads of known ranges
// must still match, and every bio still completes exactly once.
import { BlkStatus, blkdevWrite, LinearBackend, ReqOp, SECTOR_SIZE } from '@blkfilter/bio';
import { FaultBackend, type FaultRule } from '@blkfilter/bio/testing';
import type { StepContext } from './soak-context.js';
import { changeFilters } from './soak-bios.js';
import { registerSoakFilters } from './soak-filters.js';
import { randomIo, verifyRange, type Region } from './soak-io.js';
import { Model, sleep, type Rng } from './soak-util.js';

const MiB = 1 << 20;
const DISK_BYTES = 4 * MiB;

/** A random set of fault rules: errors on every op, torn writes, delays; drawn per step. */
export function randomFaultRules(rng: Rng, options: { readErrors: boolean } = { readErrors: true }): FaultRule[] {
  const p = (max: number): number => Math.round(rng.float() * max * 1000) / 1000;
  const rules: FaultRule[] = [
    { op: ReqOp.WRITE, status: BlkStatus.IOERR, torn: true, probability: p(0.08) },
    { op: ReqOp.WRITE, status: rng.pick([BlkStatus.NOSPC, BlkStatus.MEDIUM, BlkStatus.TIMEOUT]), probability: p(0.04), delayMs: rng.pick([undefined, 0, 1]) },
    { op: ReqOp.DISCARD, status: BlkStatus.IOERR, probability: p(0.1) },
    { op: ReqOp.WRITE_ZEROES, status: BlkStatus.TIMEOUT, probability: p(0.1), delayMs: 1 },
    { delayMs: rng.range(0, 2), probability: p(0.4) },
  ];
  if (options.readErrors) {
    rules.push({ op: ReqOp.READ, status: rng.pick([BlkStatus.MEDIUM, BlkStatus.IOERR]), probability: p(0.06) });
    // A burst on one range, as a bad spot on a disk gives.
    const first = rng.int(DISK_BYTES / SECTOR_SIZE - 64);
    rules.unshift({ sectors: [first, first + 64], status: BlkStatus.IOERR, times: rng.range(1, 8) });
  }
  return rules;
}

/**
 * One step of the `faults` scenario: four workers on a fault-injecting disk and two through a
 * linear device on it, with filter changes; then faults off, every unknown range rewritten,
 * and the whole disk must equal the model exactly.
 */
export async function faultsStep(ctx: StepContext): Promise<void> {
  registerSoakFilters();
  const rng = ctx.rng;
  let fault!: FaultBackend;
  const disk = ctx.memoryDisk('disk', DISK_BYTES, (inner) => (fault = new FaultBackend(inner, { seed: rng.u32() })));
  const lin = ctx.disk('lin', new LinearBackend(disk.part0, { startSect: 4096, nrSects: 4096 }));
  const model = new Model(DISK_BYTES);
  for (const rule of randomFaultRules(rng)) fault.addRule(rule);

  const quarter = 512 * 1024;
  const regions: Region[] = [
    ...[0, 1, 2, 3].map((i) => ({ dev: disk.part0, modelBase: 0, start: i * quarter, bytes: quarter })),
    { dev: lin.part0, modelBase: 2 * MiB, start: 0, bytes: MiB },
    { dev: lin.part0, modelBase: 2 * MiB, start: MiB, bytes: MiB },
  ];
  ctx.phase = 'random bios under injected faults';
  const workers = regions.map((region, i) => {
    const wr = rng.fork(`worker${i}`);
    return () => randomIo(ctx, wr, region, model, { maxBytes: 32 * 1024, flags: true, onError: 'forget' });
  });
  const controlRng = rng.fork('control');
  const controller = async (): Promise<void> => {
    await changeFilters(ctx, controlRng, [disk.part0, lin.part0]);
    await sleep(controlRng.range(1, 6));
  };
  await ctx.runWorkers([...workers, controller]);
  ctx.count('injected', fault.injected);
  ctx.count('delayed', fault.delayed);
  ctx.checkViolations();

  ctx.phase = 'faults off: known ranges must match';
  fault.clearRules();
  await verifyRange(ctx, disk.part0, 0, DISK_BYTES, model, 0, 'known ranges after faults');
  ctx.phase = 'rewrite unknown ranges, then everything must match';
  const unknown = model.unknownSectors();
  ctx.count('unknown-sectors', unknown);
  for (let s = 0; s < model.known.length; ) {
    if (model.known[s] === 1) {
      s++;
      continue;
    }
    let e = s;
    while (e < model.known.length && model.known[e] === 0) e++;
    const data = rng.bytes((e - s) * SECTOR_SIZE);
    await blkdevWrite(disk.part0, s * SECTOR_SIZE, data);
    model.write(s * SECTOR_SIZE, data);
    s = e;
  }
  ctx.check(model.unknownSectors() === 0, 'the model still has unknown sectors after the rewrite');
  await verifyRange(ctx, disk.part0, 0, DISK_BYTES, model, 0, 'whole disk after rewriting unknown ranges');
  await verifyRange(ctx, lin.part0, 0, 2 * MiB, model, 2 * MiB, 'linear device after rewriting unknown ranges');
}
