import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { backupPoint, restore } from '@blkfilter/backup';
import { createDiskSync, FileBackend } from '@blkfilter/bio';
import type { Figure } from './bench-cbt.js';
import { buildChain, CLUSTER, fillSource } from './bench-disks.js';
import type { CaseResult } from './bench-util.js';


function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

function timed(fn: () => void): number {
  const t = performance.now();
  fn();
  return (performance.now() - t) / 1000;
}

async function timedAsync(fn: () => Promise<unknown>): Promise<number> {
  const t = performance.now();
  await fn();
  return (performance.now() - t) / 1000;
}

function result(name: string, size: number, ours: number[], what: string, base: number[]): CaseResult {
  const ms = (xs: number[]): string => `median ${Math.round(median(xs) * 1000)} ms (min ${Math.round(Math.min(...xs) * 1000)}, max ${Math.round(Math.max(...xs) * 1000)}, n=${xs.length})`;
  process.stderr.write(`${name}: ours ${ms(ours)}; ${what}: ${ms(base)}\n`);
  const o = median(ours);
  const b = median(base);
  const measure = (s: number, all: number[]): { opsPerSec: number; minOpsPerSec: number; mbPerSec: number; rmePercent: number } => ({
    opsPerSec: Math.round((1 / s) * 1000) / 1000,
    minOpsPerSec: Math.round((1 / Math.max(...all)) * 1000) / 1000,
    mbPerSec: Math.round(size / s / 1e6),
    rmePercent: 0,
  });
  return { name, blockSize: CLUSTER, queueDepth: 1, ours: measure(o, ours), baseline: { ...measure(b, base), what }, ratio: Math.round((b / o) * 1000) / 1000 };
}

/**
 * Backup and restore throughput of `@blkfilter/backup` next to `qemu-img convert` of the same
 * data in the same run (raw file in the page cache -> qcow2, and the qcow2 chain -> raw), and
 * the size of a compressed backup next to `qemu-img convert -c`. Rounds interleave ours and
 * qemu's; medians of 5 (min and max of each go to stderr).
 */
export async function runBackupCases(quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  const size = (quick ? 128 : 512) << 20;
  const rounds = quick ? 1 : 5;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-bench-backup-'));
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  try {
    const raw = path.join(dir, 'src.raw');
    fillSource(raw, size, 'backup bench');
    const backend = await FileBackend.open(raw);
    const disk = createDiskSync({ name: `bench-backup-${process.pid}`, backend, scanPartitions: false });
    try {
      // Full backup vs qemu-img convert raw -> qcow2.
      const ours: number[] = [];
      const base: number[] = [];
      for (let r = 0; r < rounds; r++) {
        const repo = path.join(dir, `full-${r}`);
        ours.push(await timedAsync(() => backupPoint({ dir: repo, sources: [{ name: 'disk', image: disk.part0 }] })));
        const q = path.join(dir, `q-${r}.qcow2`);
        base.push(timed(() => execFileSync('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', raw, q])));
        fs.rmSync(repo, { recursive: true });
        fs.rmSync(q);
      }
      results.push(result(`backup: full, ${size >> 20} MiB (1/4 zeros)`, size, ours, 'qemu-img convert -O qcow2', base));

      // A chain of 1 full + 2 incrementals (5% of the clusters each), then restore vs convert.
      const repo = path.join(dir, 'chain');
      const top = await buildChain(disk, raw, repo, size);
      // Our restore checks every extent's digest and fsyncs before its rename; qemu-img convert
      // does neither, so it is measured twice: as is, and followed by an fsync of its output.
      const rOurs: number[] = [];
      const rBase: number[] = [];
      const rBaseSync: number[] = [];
      for (let r = 0; r < rounds; r++) {
        const a = path.join(dir, `restored-${r}.raw`);
        const b = path.join(dir, `converted-${r}.raw`);
        const c = path.join(dir, `converted-sync-${r}.raw`);
        // The three take turns at going first: whichever runs right after the previous round's
        // files were deleted (their blocks discarded) would otherwise always pay for that.
        const jobs = [
          async () => rOurs.push(await timedAsync(() => restore(repo, { to: a }))),
          async () => rBase.push(timed(() => execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, b]))),
          async () =>
            rBaseSync.push(
              timed(() => {
                execFileSync('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, c]);
                execFileSync('sync', [c]);
              }),
            ),
        ];
        for (let j = 0; j < jobs.length; j++) await (jobs[(r + j) % jobs.length] as () => Promise<number>)();
        if (r === 0) execFileSync('cmp', [a, b]);
        for (const f of [a, b, c]) fs.rmSync(f);
      }
      results.push(result(`restore: chain of 3 (full + 2 x 5%), ${size >> 20} MiB`, size, rOurs, 'qemu-img convert -O raw, then fsync of the output (same durability)', rBaseSync));
      results.push(result(`restore: chain of 3 (full + 2 x 5%), ${size >> 20} MiB`, size, rOurs, 'qemu-img convert -O raw (page cache only, no fsync)', rBase));

      // Compression: size and speed next to qemu-img convert -c.
      const cRepo = path.join(dir, 'compressed');
      const cq = path.join(dir, 'qc.qcow2');
      const cOurs = [await timedAsync(() => backupPoint({ dir: cRepo, compress: true, sources: [{ name: 'disk', image: disk.part0 }] }))];
      const cBase = [timed(() => execFileSync('qemu-img', ['convert', '-c', '-f', 'raw', '-O', 'qcow2', raw, cq]))];
      results.push(result(`backup --compress, ${size >> 20} MiB`, size, cOurs, 'qemu-img convert -c -O qcow2', cBase));
      const ourSize = fs.statSync(path.join(cRepo, '0001-disk.qcow2')).size;
      const qemuSize = fs.statSync(cq).size;
      figures.push({ name: 'backup --compress size', value: ourSize, unit: 'bytes' });
      figures.push({ name: 'qemu-img convert -c size (same data)', value: qemuSize, unit: 'bytes' });
      figures.push({ name: 'compressed size ratio ours/qemu', value: Math.round((ourSize / qemuSize) * 1000) / 1000, unit: 'x', target: '<= 1.05' });
      figures.push({ name: 'restore speed ratio ours/(qemu-img convert + fsync)', value: results[1]?.ratio ?? 0, unit: 'x', target: '>= 1.0' });
      figures.push({ name: 'restore speed ratio ours/qemu-img convert (no fsync)', value: results[2]?.ratio ?? 0, unit: 'x', target: '>= 1.0' });
    } finally {
      await disk.remove();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { results, figures };
}
