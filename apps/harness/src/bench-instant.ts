import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { restore } from '@blkfilter/backup';
import { createDiskSync, FileBackend } from '@blkfilter/bio';
import { rawRequest, RawNbdClient } from '@blkfilter/nbd/testing';
import type { Figure } from './bench-cbt.js';
import { buildChain, CLUSTER, fillSource, run, stop } from './bench-disks.js';
import type { CaseResult, Measure } from './bench-util.js';

// Instant recovery (`serve --backup`) next to qemu-nbd serving the same chain's top image, in
// the same run, rounds alternating: time to first byte (spawn of the server to the first 4 KiB
// READ answered, polling the socket every 2 ms with the same minimal NBD client for both),
// random 4 KiB reads at QD16 (fio ioengine=nbd, one job, over a unix socket), and restore of
// the chain to a raw file next to `qemu-img convert` of it (as is, and followed by an fsync, as
// our restore ends with one). Warm page cache throughout: both servers read the same files.

const CLI = path.join(path.dirname(fileURLToPath(import.meta.resolve('@blkfilter/cli'))), 'cli.js');

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] as number;
}

async function makeChain(raw: string, repo: string, size: number): Promise<string> {
  const backend = await FileBackend.open(raw);
  const disk = createDiskSync({ name: `bench-instant-${process.pid}`, backend, scanPartitions: false });
  try {
    return await buildChain(disk, raw, repo, size);
  } finally {
    await disk.remove();
  }
}

/**
 * Starts `cmd args` and polls `socket` until a 4 KiB READ at offset 0 of `exportName` is
 * answered; returns the milliseconds from the spawn, and the server (still running).
 */
async function firstByte(cmd: string, args: readonly string[], socket: string, exportName: string, expect: Buffer): Promise<{ ms: number; server: ChildProcess }> {
  fs.rmSync(socket, { force: true });
  const t0 = performance.now();
  const server = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  server.stderr?.on('data', (d: Buffer) => (log += d.toString()));
  for (;;) {
    if (server.exitCode !== null) throw new Error(`${cmd} exited ${server.exitCode}: ${log}`);
    if (performance.now() - t0 > 60_000) throw new Error(`${cmd}: no answer within 60 s: ${log}`);
    let c: RawNbdClient;
    try {
      c = await RawNbdClient.connect({ path: socket });
    } catch {
      await new Promise((r) => setTimeout(r, 2));
      continue;
    }
    try {
      await c.handshake({ exportName, structured: false });
      c.write(rawRequest(0, 0, 1, 0, 4096));
      const reply = await c.read(16 + 4096);
      const ms = performance.now() - t0;
      if (reply.readUInt32BE(4) !== 0) throw new Error(`${cmd}: READ failed with error ${reply.readUInt32BE(4)}`);
      if (!reply.subarray(16).equals(expect)) throw new Error(`${cmd}: the first 4 KiB differ from the point's`);
      return { ms, server };
    } finally {
      c.socket.destroy();
    }
  }
}

/** Random 4 KiB reads at QD16 through fio's nbd engine; IOPS. */
async function fioRandRead(uri: string, seconds: number): Promise<number> {
  const out = await run('fio', ['--name=instant', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4k', '--iodepth=16', '--numjobs=1', '--time_based', `--runtime=${seconds}`, '--ramp_time=1', '--size=100%', '--output-format=json']);
  const j = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: { iops: number } }> };
  return j.jobs[0]?.read.iops ?? 0;
}

async function waitSocket(socket: string, p: ChildProcess): Promise<void> {
  for (let i = 0; i < 3000 && !fs.existsSync(socket); i++) {
    if (p.exitCode !== null) throw new Error(`server exited ${p.exitCode}`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

function measure(opsPerSec: number[], bytesPerOp: number): Measure {
  const m = median(opsPerSec);
  return { opsPerSec: Math.round(m * 1000) / 1000, minOpsPerSec: Math.round(Math.min(...opsPerSec) * 1000) / 1000, mbPerSec: Math.round((m * bytesPerOp) / 1e6), rmePercent: 0 };
}

function ratioOf(ours: Measure, base: Measure): number {
  return Math.round((ours.opsPerSec / base.opsPerSec) * 1000) / 1000;
}

export async function runInstantCases(quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  for (const tool of ['qemu-nbd', 'qemu-img', 'fio']) {
    try {
      await run('sh', ['-c', `command -v ${tool}`]);
    } catch {
      throw new Error(`${tool} is not installed (apt-get install qemu-utils fio)`);
    }
  }
  const size = (quick ? 128 : 512) << 20;
  const rounds = quick ? 2 : 5;
  const fioSeconds = quick ? 3 : 8;
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-bench-instant-'));
  const results: CaseResult[] = [];
  const figures: Figure[] = [];
  try {
    const raw = path.join(dir, 'src.raw');
    fillSource(raw, size, 'instant bench');
    const repo = path.join(dir, 'chain');
    const top = await makeChain(raw, repo, size);
    const first4k = Buffer.alloc(4096);
    const fd = fs.openSync(raw, 'r');
    fs.readSync(fd, first4k, 0, 4096, 0);
    fs.closeSync(fd);

    const ourSock = path.join(dir, 'ours.sock');
    const qSock = path.join(dir, 'qemu.sock');
    const ourArgs = [CLI, '--control', path.join(dir, 'c.sock'), 'serve', '--backup', repo, '--at', '3', '--listen', `unix:${ourSock}`, '--state-dir', path.join(dir, 'state')];
    // -t: persistent (qemu-nbd otherwise exits when its client goes).
    const qArgs = ['-r', '-t', '-f', 'qcow2', '-k', qSock, '-x', 'p', top];

    // 1. Time to first byte.
    const tOurs: number[] = [];
    const tBase: number[] = [];
    for (let r = 0; r < rounds; r++) {
      const a = await firstByte(process.execPath, ourArgs, ourSock, 'backup-3', first4k);
      tOurs.push(a.ms);
      await stop(a.server);
      const b = await firstByte('qemu-nbd', qArgs, qSock, 'p', first4k);
      tBase.push(b.ms);
      await stop(b.server);
    }
    const ttfbOurs = median(tOurs);
    const ttfbBase = median(tBase);
    results.push({
      name: `instant: time to first 4 KiB read of a served point (chain of 3, ${size >> 20} MiB)`,
      blockSize: 4096,
      queueDepth: 1,
      ours: { opsPerSec: Math.round((1000 / ttfbOurs) * 1000) / 1000, minOpsPerSec: Math.round((1000 / Math.max(...tOurs)) * 1000) / 1000, mbPerSec: 0, rmePercent: 0 },
      baseline: { opsPerSec: Math.round((1000 / ttfbBase) * 1000) / 1000, minOpsPerSec: Math.round((1000 / Math.max(...tBase)) * 1000) / 1000, mbPerSec: 0, rmePercent: 0, what: 'qemu-nbd -r -f qcow2 (top image), spawn to first READ answered' },
      ratio: Math.round((ttfbBase / ttfbOurs) * 1000) / 1000,
    });
    figures.push({ name: 'instant: serve --backup time to first byte (median)', value: Math.round(ttfbOurs), unit: 'ms' });
    figures.push({ name: 'instant: qemu-nbd time to first byte (median)', value: Math.round(ttfbBase), unit: 'ms' });

    // 2. Random 4 KiB reads at QD16, both servers up, fio runs alternating.
    const ours = spawn(process.execPath, ourArgs, { stdio: 'ignore' });
    const q = spawn('qemu-nbd', qArgs, { stdio: 'ignore' });
    try {
      await waitSocket(ourSock, ours);
      await waitSocket(qSock, q);
      const iOurs: number[] = [];
      const iBase: number[] = [];
      const qUri = `nbd+unix:///p?socket=${qSock}`;
      for (let r = 0; r < rounds; r++) {
        iOurs.push(await fioRandRead(`nbd+unix:///backup-3?socket=${ourSock}`, fioSeconds));
        iBase.push(await fioRandRead(qUri, fioSeconds));
      }
      const o = measure(iOurs, 4096);
      const b = measure(iBase, 4096);
      results.push({ name: `instant: random 4 KiB reads of a served point, QD16 (fio nbd, ${size >> 20} MiB chain of 3)`, blockSize: 4096, queueDepth: 16, ours: o, baseline: { ...b, what: 'qemu-nbd -r -f qcow2 (top image)' }, ratio: ratioOf(o, b) });
      figures.push({ name: 'instant: random 4K read IOPS ratio ours/qemu-nbd', value: ratioOf(o, b), unit: 'x', target: '>= 1.0' });
    } finally {
      await stop(ours);
      await stop(q);
    }

    // 3. Restore of the chain next to qemu-img convert of it.
    const rOurs: number[] = [];
    const rBase: number[] = [];
    const rBaseSync: number[] = [];
    for (let r = 0; r < rounds; r++) {
      const a = path.join(dir, `restored-${r}.raw`);
      const b = path.join(dir, `converted-${r}.raw`);
      const c = path.join(dir, `converted-sync-${r}.raw`);
      let t = performance.now();
      await restore(repo, { to: a });
      rOurs.push(1000 / (performance.now() - t));
      t = performance.now();
      await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, b]);
      rBase.push(1000 / (performance.now() - t));
      t = performance.now();
      await run('qemu-img', ['convert', '-f', 'qcow2', '-O', 'raw', top, c]);
      await run('sync', [c]);
      rBaseSync.push(1000 / (performance.now() - t));
      if (r === 0) await run('cmp', [a, b]);
      for (const f of [a, b, c]) fs.rmSync(f);
    }
    const ro = measure(rOurs, size);
    for (const [base, what] of [
      [rBaseSync, 'qemu-img convert -O raw, then fsync of the output (same durability)'],
      [rBase, 'qemu-img convert -O raw (page cache only)'],
    ] as const) {
      const b = measure([...base], size);
      results.push({ name: `instant: restore of the chain (full + 2 x 5%), ${size >> 20} MiB`, blockSize: CLUSTER, queueDepth: 1, ours: ro, baseline: { ...b, what }, ratio: ratioOf(ro, b) });
    }
    figures.push({ name: 'instant: restore ratio ours/(qemu-img convert + fsync)', value: results.at(-2)?.ratio ?? 0, unit: 'x', target: '>= 1.0' });
    figures.push({ name: 'instant: restore ratio ours/qemu-img convert', value: results.at(-1)?.ratio ?? 0, unit: 'x', target: '>= 1.0' });
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return { results, figures };
}
