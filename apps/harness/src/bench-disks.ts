// What the benches that build disks and run tools share: a source disk of mixed clusters, a
// rewrite of some of them (an incremental's worth), and child processes run to completion.
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import path from 'node:path';
import { backupPoint, type CbtTake } from '@blkfilter/backup';
import type { Disk } from '@blkfilter/bio';

/** The qcow2 cluster the bench disks are built in. */
export const CLUSTER = 65536;

/** A source disk: a quarter each zeros, random, text-like (compressible) and random clusters. */
export function fillSource(file: string, size: number, label = 'bench'): void {
  const fd = fs.openSync(file, 'w');
  try {
    fs.ftruncateSync(fd, size);
    const text = Buffer.alloc(CLUSTER, `blkfilter ${label}: a line of fairly compressible text 0123456789\n`);
    const step = 4 << 20;
    for (let pos = 0; pos < size; pos += step) {
      const chunk = randomBytes(step);
      for (let c = 0; c < step / CLUSTER; c++) {
        const kind = (pos / CLUSTER + c) % 4;
        if (kind === 0) chunk.fill(0, c * CLUSTER, (c + 1) * CLUSTER);
        if (kind === 2) text.copy(chunk, c * CLUSTER);
      }
      fs.writeSync(fd, chunk, 0, step, pos);
    }
  } finally {
    fs.closeSync(fd);
  }
}

/** Rewrites `fraction` of the clusters with new random data (what an incremental carries); returns their extents. */
export function mutate(file: string, size: number, fraction: number, seed: number): Array<{ sector: number; sectors: number }> {
  const fd = fs.openSync(file, 'r+');
  const extents: Array<{ sector: number; sectors: number }> = [];
  try {
    const every = Math.max(1, Math.round(1 / fraction));
    for (let c = seed % every; c < size / CLUSTER; c += every) {
      fs.writeSync(fd, randomBytes(CLUSTER), 0, CLUSTER, c * CLUSTER);
      extents.push({ sector: (c * CLUSTER) / 512, sectors: CLUSTER / 512 });
    }
  } finally {
    fs.closeSync(fd);
  }
  return extents;
}

/**
 * Backs `disk` (a file disk over `raw`) up into `repo` as a chain of 1 full + 2 incrementals,
 * rewriting 5% of the clusters between points and telling the backup exactly those (a stand-in
 * for CBT). Returns the top image's path.
 */
export async function buildChain(disk: Disk, raw: string, repo: string, size: number): Promise<string> {
  const takes: Array<Array<{ sector: number; sectors: number }>> = [];
  for (let k = 1; k <= 3; k++) {
    if (k > 1) takes.push(mutate(raw, size, 0.05, k));
    const changed = takes;
    const cbt: CbtTake = {
      generationId: 'bench',
      snapNumber: k,
      changedSince: async ({ since }) => ({ kind: 'extents', generationId: 'bench', since, snapNumber: k, snapshotId: null, blockSize: CLUSTER, extents: changed.slice(since - 1).flat() }),
    };
    await backupPoint({ dir: repo, sources: [{ name: 'disk', image: disk.part0, cbt }] });
  }
  return path.join(repo, '0003-disk.qcow2');
}

/** Runs a command to completion; resolves with its stdout, rejects with its stderr on failure. */
export function run(cmd: string, args: readonly string[], timeoutMs = 600_000): Promise<string> {
  return new Promise((resolve, reject) => {
    const p = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const t = setTimeout(() => p.kill('SIGKILL'), timeoutMs);
    p.on('error', reject);
    p.on('close', (code) => {
      clearTimeout(t);
      if (code === 0) resolve(out);
      else reject(new Error(`${cmd} ${args.join(' ')} exited ${code}: ${err.trim()}`));
    });
  });
}

/** Stops a child: SIGTERM, then SIGKILL after 10 s. */
export async function stop(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return;
  const gone = new Promise((r) => p.once('exit', r));
  p.kill('SIGTERM');
  const t = setTimeout(() => p.kill('SIGKILL'), 10_000);
  await gone;
  clearTimeout(t);
}
