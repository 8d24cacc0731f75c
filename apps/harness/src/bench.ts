// `npm run bench`: throughput of every package against baselines measured in the same run
// (bare backend, raw fs, fio, qemu-nbd, nbdkit, qemu-img convert), printed as JSON with ratios, plus a table on
// stderr; the full run also saves reports/latest.json and reports/latest.svg. Each section
// runs on its own: one that fails is reported and the others still run.
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { Bench } from 'tinybench';
import { runBackupCases } from './bench-backup.js';
import { runCbtCases, type Figure } from './bench-cbt.js';
import { runDurableCbtCases } from './bench-cbt-durable.js';
import { runDirectCases } from './bench-direct.js';
import { runFileCases } from './bench-file.js';
import { runFsCases } from './bench-fs.js';
import { runHolesCases } from './bench-holes.js';
import { runHttpCases } from './bench-http.js';
import { runInstantCases } from './bench-instant.js';
import { runMemoryCases, runMemoryFigures } from './bench-memory.js';
import { runNbdCases, runNbdXfsCases } from './bench-nbd.js';
import { runNbdMemoryFigures } from './bench-nbd-memory.js';
import { runNbdProxyCases } from './bench-nbd-proxy.js';
import { runNbdRemoteCases } from './bench-nbd-remote.js';
import { runRegistryCases } from './bench-registry.js';
import { runSnapshotCases } from './bench-snapshot.js';
import type { CaseResult } from './bench-util.js';
import { saveReport } from './report.js';

type Section = () => Promise<{ results: CaseResult[]; figures?: Figure[] }>;

async function main(): Promise<void> {
  if (process.argv.includes('--redraw')) {
    // Draws reports/latest.svg again from reports/latest.json (after a change to the chart).
    const dir = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'reports');
    const saved = saveReport(dir, JSON.parse(fs.readFileSync(path.join(dir, 'latest.json'), 'utf8')) as Parameters<typeof saveReport>[1]);
    console.error(`report redrawn: ${saved.svg}`);
    return;
  }
  const quick = process.argv.includes('--quick');
  const only = process.argv.find((a) => a.startsWith('--only='))?.slice('--only='.length).split(',');
  const started = Date.now();
  const bench = (): Bench => new Bench({ time: quick ? 150 : 600, warmupTime: quick ? 30 : 150, throws: true });
  const sections: Record<string, Section> = {
    memory: async () => ({ results: await runMemoryCases(bench, quick), figures: await runMemoryFigures() }),
    file: async () => ({ results: await runFileCases(bench, quick) }),
    registry: async () => ({ results: await runRegistryCases(bench, quick) }),
    'direct-io': async () => ({ results: await runDirectCases(bench, quick) }),
    cbt: () => runCbtCases(bench, quick),
    'cbt-durable': () => runDurableCbtCases(bench, quick),
    snapshot: () => runSnapshotCases(bench, quick),
    nbd: () => runNbdCases(quick),
    'nbd-xfs': async () => ({ results: await runNbdXfsCases(quick) }),
    http: async () => ({ results: await runHttpCases(quick) }),
    backup: () => runBackupCases(quick),
    holes: () => runHolesCases(quick),
    'nbd-remote': async () => ({ results: await runNbdRemoteCases(quick) }),
    'nbd-proxy': async () => ({ results: await runNbdProxyCases(quick) }),
    'nbd-memory': async () => ({ results: [], figures: await runNbdMemoryFigures(quick) }),
    fs: () => runFsCases(quick),
    instant: () => runInstantCases(quick),
  };
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  const errors: Array<{ section: string; message: string }> = [];
  for (const [name, run] of Object.entries(sections)) {
    if (only !== undefined && !only.includes(name)) continue;
    try {
      const r = await run();
      results.push(...r.results);
      figures.push(...(r.figures ?? []));
    } catch (err) {
      errors.push({ section: name, message: (err as Error).stack ?? String(err) });
      console.error(`bench section ${name} failed: ${(err as Error).message}`);
    }
  }
  const report = {
    tool: 'blkfilter bench',
    node: process.version,
    date: new Date().toISOString(),
    quick,
    seconds: Math.round((Date.now() - started) / 100) / 10,
    results,
    figures,
    errors,
  };
  console.log(JSON.stringify(report, null, 2));
  if (!quick && only === undefined) {
    const saved = saveReport(path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'reports'), report);
    console.error(`report saved: ${saved.json}, ${saved.svg}`);
  }
  // One line per figure for people reading a terminal (stderr keeps stdout pure JSON).
  for (const f of figures) console.error(`${f.name}: ${f.value} ${f.unit}${f.target ? ` (target ${f.target})` : ''}`);
  for (const r of results) {
    const goal = r.goal === undefined ? '' : ` (goal ${r.goal}: ${r.ratio >= r.goal ? 'met' : 'NOT met'})`;
    console.error(`${r.name.padEnd(60)} ${String(r.ours.opsPerSec).padStart(9)} ops/s  ratio ${r.ratio.toFixed(3)} vs ${r.baseline.what}${goal}`);
  }
  if (errors.length > 0) process.exitCode = 1;
}

main().catch((err: unknown) => {
  console.error(err);
  process.exitCode = 1;
});
