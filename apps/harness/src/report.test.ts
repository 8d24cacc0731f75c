import { describe, expect, it } from 'vitest';
import type { CaseResult } from './bench-util.js';
import { reportSvg } from './report.js';

function result(name: string, ratio: number, goal?: number): CaseResult {
  const m = { opsPerSec: 1000, mbPerSec: 4, rmePercent: NaN };
  return { name, blockSize: 4096, queueDepth: 1, ours: m, baseline: { ...m, what: 'peer' }, ratio, ...(goal !== undefined ? { goal } : {}) };
}

describe('the report chart', () => {
  it('draws each goal across its bar, and colours a bar by whether it meets its goal', () => {
    const svg = reportSvg([result('met', 1.3, 1), result('missed', 0.6, 0.8), result('plain', 0.95)], 't');
    const rows = svg.split('\n').filter((l) => l.includes('<rect x="470"'));
    expect(rows).toHaveLength(3);
    expect(rows[0]).toContain('fill="#2f9e44"');
    expect(rows[1]).toContain('fill="#e03131"');
    // Without a goal, the old scale: >= 0.9 is green.
    expect(rows[2]).toContain('fill="#2f9e44"');
    expect(rows[0]).toContain('<title>goal 1x</title>');
    expect(rows[1]).toContain('(goal 0.8x)');
    expect(rows[2]).not.toContain('goal');
  });
});
