// `npm run bench`: throughput of the block layer against baselines measured in the same run,
// printed as JSON with ratios. Each case runs batches of I/O at a fixed queue depth with
// callbacks (no promise per bio), through submitBio and through the baseline, interleaved
// over several rounds; the median of the rounds is reported.
import { Bench } from 'tinybench';
import { runMemoryCases } from './bench-memory.js';
import { runFileCases } from './bench-file.js';
import { runRegistryCases } from './bench-registry.js';
import { runDirectCases } from './bench-direct.js';
import { runCbtCases, type Figure } from './bench-cbt.js';
import { runSnapshotCases } from './bench-snapshot.js';
import { saveReport } from './report.js';
import { runNbdCases } from './bench-nbd.js';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CaseResult } from './bench-util.js';

async function main(): Promise<void> {
  const quick = process.argv.includes('--quick');
  const started = Date.now();
  const results: CaseResult[] = [];
  const bench = (): Bench => new Bench({ time: quick ? 150 : 600, warmupTime: quick ? 30 : 150, throws: true });
  results.push(...(await runMemoryCases(bench, quick)));
  results.push(...(await runFileCases(bench, quick)));
  results.push(...(await runRegistryCases(bench, quick)));
  results.push(...(await runDirectCases(bench, quick)));
  const figures: Figure[] = [];
  const cbt = await runCbtCases(bench, quick);
  results.push(...cbt.results);
  figures.push(...cbt.figures);
  results.push(...(await runSnapshotCases(bench, quick)));
  results.push(...(await runNbdCases(quick)));
  const report = {
    tool: 'blkfilter bench',
    node: process.version,
    date: new Date().toISOString(),
    seconds: Math.round((Date.now() - started) / 100) / 10,
    results,
    figures,
  };
  console.log(JSON.stringify(report, null, 2));
  if (!quick) {
    const saved = saveReport(path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'reports'), report);
    console.error(`report saved: ${saved.json}, ${saved.svg}`);
  }
  // One line per case for people reading a terminal (stderr keeps stdout pure JSON).
  for (const f of figures) console.error(`${f.name}: ${f.value} ${f.unit}${f.target ? ` (target ${f.target})` : ''}`);
  for (const r of results) console.error(`${r.name.padEnd(52)} ${String(r.ours.opsPerSec).padStart(9)} ops/s  ratio ${r.ratio.toFixed(3)} vs ${r.baseline.what}`);
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
