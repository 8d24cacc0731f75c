import { describe, expect, it } from 'vitest';
import { InjectedBug } from './soak-context.js';
import { runSoak, SOAK_SCENARIOS } from './soak-runner.js';

describe('soak', () => {
  it('holds every invariant through every scenario (seed 1, about 16 s)', async () => {
    const summary = await runSoak({ seconds: 16, seed: 1 });
    expect(summary.failures).toEqual([]);
    expect(summary.ok).toBe(true);
    expect(Object.keys(summary.scenarios)).toEqual(Object.keys(SOAK_SCENARIOS));
    for (const s of Object.values(summary.scenarios)) {
      expect(s.steps).toBeGreaterThan(0);
      expect(s.checks).toBeGreaterThan(0);
    }
  });

  it('reports a write that a filter took and never completed, with the seed to replay it', async () => {
    const summary = await runSoak({
      seconds: 2,
      seed: 5,
      scenarios: ['bios'],
      injectBug: InjectedBug.DROP_WRITE,
      bioTimeoutMs: 1000,
      freezeTimeoutMs: 1500,
    });
    expect(summary.ok).toBe(false);
    expect(summary.failures).toHaveLength(1);
    const [failure] = summary.failures;
    expect(failure?.scenario).toBe('bios');
    expect(failure?.message).toMatch(/never completed/);
    expect(failure?.replay).toBe('node --expose-gc dist/soak.js --seed 5 --scenario bios --step 0 --inject-bug drop-write');
  });
});
