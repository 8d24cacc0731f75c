// Scenario "power-cut": CBT across power cuts, as @blkfilter/cbt's test does, with a fresh
// workload per step and as many crash points as the step's time allows (thousands in a
// minute): after each cut the generation must resume and the last recorded backup plus the
// changed extents must equal the device.
import { checkCbtAcrossPowerCuts } from '@blkfilter/cbt/testing';
import type { StepContext } from './soak-context.js';

/** Crash points per workload: a workload is recorded once, then cut at this many points. */
const CUTS_PER_WORKLOAD = 250;

export async function powerCutStep(ctx: StepContext): Promise<void> {
  do {
    ctx.phase = 'power cuts';
    const seed = ctx.rng.u32();
    try {
      const r = await checkCbtAcrossPowerCuts({ seed, cuts: CUTS_PER_WORKLOAD, steps: 120 + (seed % 80) });
      ctx.stats.ops += r.ops;
      for (let i = 0; i < r.cuts; i++) ctx.check(true, '');
    } catch (err) {
      ctx.check(false, `CBT across power cuts (workload seed ${seed}): ${(err as Error).message}`);
    }
  } while (!ctx.expired);
}
