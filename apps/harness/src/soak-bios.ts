// Scenario "bios": random mixed bios from several workers on stacked devices (linear targets
// over an MBR partition of a memory disk) while filters are attached, detached and reordered
// under them. Each worker owns disjoint sectors, so the byte model is exact.
import { blkdevRead, LinearBackend, SECTOR_SIZE, type BlockDev } from '@blkfilter/bio';
import { attachFilter, detachFilter, listFilters, setFilterAltitude } from '@blkfilter/registry';
import { InjectedBug, partitionMbr, type StepContext } from './soak-context.js';
import { DEFER_FILTER, DROP_WRITE_FILTER, PASS_FILTER, PASS_FILTER_B, registerSoakFilters, type DeferFilterOptions } from './soak-filters.js';
import { randomIo, verifyRange, type Region } from './soak-io.js';
import { Model, sleep, type Rng } from './soak-util.js';

const MiB = 1 << 20;
const DISK_BYTES = 8 * MiB;
const S = SECTOR_SIZE;
/** The soak's filters the controller moves around (the planted bug's filter is not among them). */
const MOVABLE = [PASS_FILTER, PASS_FILTER_B, DEFER_FILTER] as const;

/**
 * One step of the `bios` scenario: a disk with two MBR partitions, a linear device on the
 * second and another linear device on that; six workers doing random bios through every
 * level; one controller changing filter stacks. Checks every read, then the whole disk and
 * every view of it against the model.
 */
export async function biosStep(ctx: StepContext): Promise<void> {
  registerSoakFilters();
  const rng = ctx.rng;
  const disk = ctx.memoryDisk('disk', DISK_BYTES);
  // p1: sectors [2048, 6144), p2: [6144, 12288); the last 2 MiB are reached through the whole disk.
  const [p1, p2] = (await partitionMbr(disk, [
    [2048, 4096],
    [6144, 6144],
  ])) as [BlockDev, BlockDev];
  const lin = ctx.disk('lin', new LinearBackend(p2));
  const lin2 = ctx.disk('lin2', new LinearBackend(lin.part0, { startSect: 1024, nrSects: 2048 }));
  const model = new Model(DISK_BYTES);
  model.write(0, await blkdevRead(disk.part0, 0, S)); // the MBR

  // [device, where its sector 0 is on the disk (sectors), region start and length (sectors)]
  const layout: Array<[BlockDev, number, number, number]> = [
    [p1, 2048, 0, 2048],
    [p1, 2048, 2048, 2048],
    [lin.part0, 6144, 0, 1024],
    [lin2.part0, 6144 + 1024, 0, 2048],
    [p2, 6144, 3072, 3072],
    [disk.part0, 0, 12288, 4096],
  ];
  const regions: Region[] = layout.map(([dev, base, start, sectors]) => ({ dev, modelBase: base * S, start: start * S, bytes: sectors * S }));

  if (ctx.limits.injectBug === InjectedBug.DROP_WRITE) {
    await attachFilter(p1, DROP_WRITE_FILTER, { altitude: 10_000, timeoutMs: ctx.limits.freezeTimeoutMs });
  }

  ctx.phase = 'random bios with filter changes';
  const stackable = [disk.part0, p1, p2, lin.part0, lin2.part0];
  const workers = regions.map((region, i) => {
    const wr = rng.fork(`worker${i}`);
    return () => randomIo(ctx, wr, region, model, { maxBytes: 64 * 1024, flags: true, onError: 'fail' });
  });
  const controlRng = rng.fork('control');
  const controller = async (): Promise<void> => {
    await changeFilters(ctx, controlRng, stackable);
    ctx.count('filter-changes');
    await sleep(controlRng.int(4));
  };
  await ctx.runWorkers([...workers, controller]);
  ctx.checkViolations();

  ctx.phase = 'verify every view against the model';
  await verifyRange(ctx, disk.part0, 0, DISK_BYTES, model, 0, 'whole disk after the step');
  for (const r of regions) await verifyRange(ctx, r.dev, r.start, r.bytes, model, r.modelBase, 'worker region after the step');

  ctx.phase = 'detach every filter';
  for (const dev of stackable) {
    for (const f of listFilters(dev)) await detachFilter(dev, f.name, { timeoutMs: ctx.limits.freezeTimeoutMs });
  }
  ctx.checkViolations();
}

/**
 * One random stack change on a random device of `devices`: attach one of the soak's filters at
 * a free altitude, detach one, or move one; checks that `listFilters` shows the change.
 */
export async function changeFilters(ctx: StepContext, rng: Rng, devices: readonly BlockDev[]): Promise<void> {
  const dev = rng.pick(devices);
  const attached = listFilters(dev);
  const mine = attached.filter((f) => (MOVABLE as readonly string[]).includes(f.name));
  const freeAltitude = (): number => {
    for (;;) {
      const a = rng.range(1, 64);
      if (!attached.some((f) => f.altitude === a)) return a;
    }
  };
  const timeoutMs = ctx.limits.freezeTimeoutMs;
  const action = mine.length === 0 ? 'attach' : mine.length === MOVABLE.length ? rng.pick(['detach', 'move']) : rng.pick(['attach', 'detach', 'move']);
  ctx.stats.ops++;
  if (action === 'attach') {
    const candidates = MOVABLE.filter((n) => !mine.some((f) => f.name === n));
    if (candidates.length === 0) return;
    const name = rng.pick(candidates);
    const options: DeferFilterOptions | undefined =
      name === DEFER_FILTER ? { seed: rng.u32(), probability: 0.3, maxDelayMs: 2, onViolation: (m) => ctx.violation(m) } : undefined;
    await attachFilter(dev, name, { altitude: freeAltitude(), options, timeoutMs });
    ctx.check(
      listFilters(dev).some((f) => f.name === name),
      () => `attachFilter("${dev.name}", "${name}") resolved but listFilters does not show it`,
    );
  } else if (action === 'detach') {
    const f = rng.pick(mine);
    await detachFilter(dev, f.name, { timeoutMs });
    ctx.check(!listFilters(dev).some((x) => x.name === f.name), () => `detachFilter("${dev.name}", "${f.name}") resolved but the filter is still listed`);
  } else {
    const f = rng.pick(mine);
    const altitude = freeAltitude();
    await setFilterAltitude(dev, f.name, altitude, { timeoutMs });
    const order = listFilters(dev);
    ctx.check(
      order.some((x) => x.name === f.name && x.altitude === altitude) && order.every((x, i) => i === 0 || (order[i - 1] as { altitude: number }).altitude > x.altitude),
      () => `after setFilterAltitude("${dev.name}", "${f.name}", ${altitude}) the stack is ${JSON.stringify(order)}`,
    );
  }
}
