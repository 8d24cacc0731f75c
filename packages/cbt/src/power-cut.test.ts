// CBT that survives power loss: see power-cut-check.ts for how the crash points are made.
import { describe, expect, it } from 'vitest';
import { checkCbtAcrossPowerCuts } from './power-cut-check.js';

/** Crash points per run: `BLKFILTER_POWER_CUTS` (the soak runs thousands). */
const CUTS = Number(process.env.BLKFILTER_POWER_CUTS ?? 240);
const SEED = Number(process.env.BLKFILTER_POWER_CUT_SEED ?? 20261129);

describe('CBT across power cuts', () => {
  it(`resumes the generation and reports every changed block at ${CUTS} crash points of one workload`, async () => {
    const r = await checkCbtAcrossPowerCuts({ seed: SEED, cuts: CUTS });
    expect(r.backups).toBeGreaterThan(5);
    expect(r.incrementals).toBeGreaterThan(CUTS / 3);
  });
});
