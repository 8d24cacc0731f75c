import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { blkdevRead, createDisk } from '@blkfilter/bio';
import { NbdClientBackend } from '@blkfilter/nbd';
import type { CaseResult } from './bench-util.js';

const MiB = 1 << 20;

async function startNbdkit(sock: string, threads: number): Promise<ChildProcess> {
  fs.rmSync(sock, { force: true });
  // 5 ms per read, as a storage network or a remote disk would add; nbdkit serves `threads`
  // requests at a time per connection.
  const p = spawn('nbdkit', ['-f', '--exit-with-parent', '-t', String(threads), '-U', sock, '--filter=delay', 'memory', '1G', 'rdelay=5ms'], { stdio: 'ignore' });
  const until = Date.now() + 10_000;
  while (!fs.existsSync(sock)) {
    if (Date.now() > until) throw new Error(`nbdkit did not create ${sock}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return p;
}

/** 1 MiB reads at QD16 through the NBD client backend for `ms`; bytes per second. */
async function readThroughput(sock: string, connections: number, ms: number): Promise<number> {
  const backend = await NbdClientBackend.connect({ path: sock, connections });
  if (backend.status.connections !== connections) throw new Error(`asked for ${connections} connections, got ${backend.status.connections}`);
  const disk = await createDisk({ name: `remote-bench-${process.pid}-${connections}-${Date.now()}`, backend, scanPartitions: false });
  const qd = 16;
  let bytes = 0;
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: qd }, async (_, k) => {
      for (let i = k; performance.now() - t0 < ms; i += qd) {
        await blkdevRead(disk.part0, (i % 1024) * MiB, MiB);
        bytes += MiB;
      }
    }),
  );
  const rate = bytes / ((performance.now() - t0) / 1000);
  await disk.remove();
  return rate;
}

/**
 * Multi-conn against latency: nbdkit's memory plugin behind its delay filter (5 ms per read),
 * read with 1 MiB requests at QD16 through the NBD client backend with 1 and with 4
 * connections. Two servers: one that serves one request at a time per connection (`-t 1`, as
 * many remote stores behave per session), where connections are what brings concurrency, and
 * one with 16 threads per connection, where one connection already pipelines.
 */
export async function runNbdRemoteCases(quick: boolean): Promise<CaseResult[]> {
  if (spawnSync('nbdkit', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('nbd-remote: skipped, needs nbdkit');
    return [];
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-remote-'));
  const sock = path.join(dir, 'nbdkit.sock');
  const ms = quick ? 1000 : 3000;
  const results: CaseResult[] = [];
  try {
    for (const threads of [1, 16]) {
      const p = await startNbdkit(sock, threads);
      try {
        const samples: Record<number, number[]> = { 1: [], 4: [] };
        for (let r = 0; r < (quick ? 1 : 3); r++) for (const c of r % 2 === 0 ? [1, 4] : [4, 1]) samples[c]?.push(await readThroughput(sock, c, ms));
        const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
        const one = med(samples[1] ?? []);
        const four = med(samples[4] ?? []);
        results.push({
          name: `nbd client 1MiB read QD16, 5 ms delay, nbdkit -t ${threads}: 4 connections vs 1`,
          blockSize: MiB,
          queueDepth: 16,
          ours: { opsPerSec: Math.round(four / MiB), mbPerSec: Math.round(four / 1e6), rmePercent: NaN },
          baseline: { opsPerSec: Math.round(one / MiB), mbPerSec: Math.round(one / 1e6), rmePercent: NaN, what: 'the same client with 1 connection' },
          ratio: Math.round((four / one) * 1000) / 1000,
        });
      } finally {
        p.kill('SIGTERM');
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}
