import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { Figure } from './bench-cbt.js';
import { stop } from './bench-disks.js';
import { mountLoopFs } from '@blkfilter/bio/testing';
import type { CaseResult } from './bench-util.js';

const MiB = 1 << 20;

interface Server {
  readonly name: string;
  readonly uri: string;
  readonly proc: ChildProcess;
}

export function have(tool: string, arg = '--version'): boolean {
  return spawnSync(tool, [arg], { stdio: 'ignore' }).status === 0;
}

export async function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const a = s.address();
      s.close(() => resolve(typeof a === 'object' && a !== null ? a.port : 0));
    });
  });
}

export async function waitPort(port: number, ms = 10_000): Promise<void> {
  const until = Date.now() + ms;
  for (;;) {
    const ok = await new Promise<boolean>((resolve) => {
      const c = net.connect(port, '127.0.0.1', () => {
        c.destroy();
        resolve(true);
      });
      c.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > until) throw new Error(`nothing listens on 127.0.0.1:${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** `blkfilter serve`'s script: the `blkfilter` bin of @blkfilter/cli, next to its entry point. */
export function ourCli(): string {
  return path.join(path.dirname(fileURLToPath(import.meta.resolve('@blkfilter/cli'))), 'cli.js');
}

async function startServers(file: string): Promise<Server[]> {
  const servers: Server[] = [];
  try {
    return await startEach(file, servers);
  } catch (err) {
    // One did not come up: stop those that did, or they outlive the bench.
    for (const s of servers) s.proc.kill('SIGTERM');
    throw err;
  }
}

async function startEach(file: string, servers: Server[]): Promise<Server[]> {
  const ours = ourCli();
  const control = path.join(path.dirname(file), 'control.sock');
  let port = await freePort();
  servers.push({
    name: 'blkfilter',
    uri: `nbd://127.0.0.1:${port}/`,
    proc: spawn(process.execPath, [ours, '--control', control, 'serve', '--state-dir', `${control}.state`, '--listen', `127.0.0.1:${port}`, file], { stdio: 'ignore' }),
  });
  await waitPort(port);
  port = await freePort();
  // `blkfilter serve` holds a lock on the image (two daemons on one image would each miss the
  // other's writes), which qemu-nbd would refuse: it opens the file without locking.
  servers.push({ name: 'qemu-nbd', uri: `nbd://127.0.0.1:${port}/`, proc: spawn('qemu-nbd', ['--image-opts', '-e', '16', '-t', '-p', String(port), '-b', '127.0.0.1', `driver=raw,file.driver=file,file.filename=${file},file.locking=off`], { stdio: 'ignore' }) });
  await waitPort(port);
  if (have('nbdkit')) {
    port = await freePort();
    servers.push({ name: 'nbdkit', uri: `nbd://127.0.0.1:${port}/`, proc: spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), 'file', `file=${file}`], { stdio: 'ignore' }) });
    await waitPort(port);
  }
  return servers;
}

/** CPU seconds (user + system, every thread) process `pid` has used so far, from /proc. */
function cpuSeconds(pid: number | undefined): number {
  if (pid === undefined) return NaN;
  try {
    const stat = fs.readFileSync(`/proc/${pid}/stat`, 'utf8');
    // Fields after the command (which may hold spaces) start after the last ')'; utime and
    // stime are fields 14 and 15, in clock ticks (USER_HZ, 100 on Linux).
    const f = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return NaN;
  }
}

/** What one workload run did: its rate (ops or bytes per second) and the requests it made. */
export interface RunResult {
  readonly rate: number;
  readonly requests: number;
}

/** fio's nbd engine against `uri`: `jobs` connections, each at queue depth `qd`. */
export function fio(uri: string, rw: string, bs: number, qd: number, seconds: number, size: number, jobs = 1): RunResult {
  const out = execFileSync(
    'fio',
    [
      '--name=nbd',
      '--ioengine=nbd',
      `--uri=${uri}`,
      `--rw=${rw}`,
      `--bs=${bs}`,
      `--iodepth=${qd}`,
      `--size=${size}`,
      `--numjobs=${jobs}`,
      '--group_reporting',
      `--runtime=${seconds}`,
      '--time_based',
      '--output-format=json',
    ],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
  );
  // fio prints "fio: connected to NBD server" before the JSON.
  const json = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: { iops: number; total_ios: number }; write: { iops: number; total_ios: number } }> };
  const job = json.jobs[0];
  if (job === undefined) throw new Error('fio printed no job');
  const side = rw.includes('write') ? job.write : job.read;
  return { rate: side.iops, requests: side.total_ios };
}

/** Reads the whole export with nbdcopy over `connections` connections: MiB per second. */
function nbdcopy(uri: string, size: number, connections: number): RunResult {
  const t0 = performance.now();
  execFileSync('nbdcopy', ['--request-size=1048576', `--connections=${connections}`, uri, 'null:'], { stdio: 'ignore' });
  return { rate: size / MiB / ((performance.now() - t0) / 1000), requests: size / MiB };
}

/** One workload of the matrix: a name, its request size and depth, and how to run it. */
interface Workload {
  readonly name: string;
  readonly bs: number;
  readonly qd: number;
  readonly run: (uri: string) => RunResult;
}


/**
 * Fills `file` (`size` bytes, each MiB its own byte), serves it with ours, qemu-nbd and nbdkit,
 * and runs every workload against each, rounds alternating; `label` prefixes the case names.
 */
async function runMatrix(
  file: string,
  size: number,
  quick: boolean,
  ws: readonly Workload[],
  label: string,
): Promise<{ results: CaseResult[]; medians: Map<string, Map<string, number>>; servers: string[] }> {
  const fd = fs.openSync(file, 'w');
  const fill = Buffer.alloc(MiB);
  for (let off = 0; off < size; off += MiB) {
    fill.fill(off / MiB);
    fs.writeSync(fd, fill, 0, MiB, off);
  }
  fs.closeSync(fd);
  const servers = await startServers(file);
  const rounds = quick ? 1 : 3;
  const results: CaseResult[] = [];
  // Medians per workload and server, for the connection-scaling figures.
  const medians = new Map<string, Map<string, number>>();
  // BLKFILTER_BENCH_NBD=regexp runs only the matching workloads (for profiling one case).
  const pick = process.env.BLKFILTER_BENCH_NBD;
  try {
    for (const w of ws) {
      if (pick !== undefined && !new RegExp(pick).test(w.name)) continue;
      const samples = new Map<string, number[]>(servers.map((s) => [s.name, []]));
      const cpu = new Map<string, number[]>(servers.map((s) => [s.name, []]));
      for (let r = 0; r < rounds; r++) {
        // Rotate the order each round so that no server always runs on a warm (or cold) cache.
        const order = servers.map((_, i) => servers[(i + r) % servers.length] as Server);
        for (const s of order) {
          // The server's own CPU time per request: on a loaded 2-core machine throughput moves
          // with the neighbours, CPU per request much less.
          const c0 = cpuSeconds(s.proc.pid);
          const res = w.run(s.uri);
          const c1 = cpuSeconds(s.proc.pid);
          samples.get(s.name)?.push(res.rate);
          cpu.get(s.name)?.push(((c1 - c0) / res.requests) * 100_000);
        }
      }
      const medOf = (values: readonly number[]): number => {
        const xs = [...values].sort((a, b) => a - b);
        return xs[Math.floor(xs.length / 2)] ?? NaN;
      };
      const med = (name: string): number => medOf(samples.get(name) ?? []);
      const r2 = (x: number): number => Math.round(x * 100) / 100;
      const cpuOf = (name: string): { cpuSecPer100k: number; cpuSecPer100kRange: [number, number] } => {
        const xs = cpu.get(name) ?? [];
        return { cpuSecPer100k: r2(medOf(xs)), cpuSecPer100kRange: [r2(Math.min(...xs)), r2(Math.max(...xs))] };
      };
      medians.set(w.name, new Map(servers.map((s) => [s.name, med(s.name)])));
      const ours = med('blkfilter');
      const min = (name: string): number => Math.min(...(samples.get(name) ?? [NaN]));
      for (const peer of servers.slice(1)) {
        const theirs = med(peer.name);
        results.push({
          name: `nbd ${label}${w.name}`,
          blockSize: w.bs,
          queueDepth: w.qd,
          ours: { opsPerSec: Math.round(ours), minOpsPerSec: Math.round(min('blkfilter')), mbPerSec: Math.round((ours * w.bs) / 1e6), rmePercent: NaN, ...cpuOf('blkfilter') },
          baseline: {
            opsPerSec: Math.round(theirs),
            minOpsPerSec: Math.round(min(peer.name)),
            mbPerSec: Math.round((theirs * w.bs) / 1e6),
            rmePercent: NaN,
            ...cpuOf(peer.name),
            what: peer.name === 'qemu-nbd' ? 'qemu-nbd -e 16, same file' : 'nbdkit file plugin, same file',
          },
          ratio: Math.round((ours / theirs) * 1000) / 1000,
          // Issue 19: ahead of the fastest peer on every workload.
          goal: 1,
        });
      }
    }
  } finally {
    // Waited for: the file's filesystem may be unmounted next.
    await Promise.all(servers.map((s) => stop(s.proc)));
  }
  return { results, medians, servers: servers.map((s) => s.name) };
}

/** The issue-19 matrix: every case the goal names, each run against every server. */
function workloads(seconds: number, size: number): Workload[] {
  const K4 = 4096;
  const w: Workload[] = [
    { name: 'nbdcopy read of the whole export, 1 connection', bs: MiB, qd: 64, run: (uri) => nbdcopy(uri, size, 1) },
    { name: 'nbdcopy read of the whole export, 4 connections', bs: MiB, qd: 64, run: (uri) => nbdcopy(uri, size, 4) },
  ];
  for (const rw of ['randread', 'randwrite']) {
    for (const qd of [1, 16, 32]) w.push({ name: `fio nbd 4KiB ${rw} QD${qd}`, bs: K4, qd, run: (uri) => fio(uri, rw, K4, qd, seconds, size) });
    w.push({ name: `fio nbd 4KiB ${rw} QD16 x 4 connections`, bs: K4, qd: 64, run: (uri) => fio(uri, rw, K4, 16, seconds, size, 4) });
  }
  w.push({ name: 'fio nbd 1MiB seq read QD8', bs: MiB, qd: 8, run: (uri) => fio(uri, 'read', MiB, 8, seconds, size) });
  w.push({ name: 'fio nbd 1MiB seq write QD8', bs: MiB, qd: 8, run: (uri) => fio(uri, 'write', MiB, 8, seconds, size) });
  return w;
}

export async function runNbdCases(quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  if (!have('fio') || !have('qemu-nbd') || !have('nbdcopy', '--version')) {
    console.error('nbd vs qemu-nbd: skipped, needs fio, qemu-nbd and nbdcopy (apt-get install fio qemu-utils libnbd-bin nbdkit)');
    return { results: [], figures: [] };
  }
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-nbd-'));
  const size = (quick ? 256 : 1024) * MiB;
  const seconds = quick ? 1 : 3;
  let run: { results: CaseResult[]; medians: Map<string, Map<string, number>>; servers: string[] };
  try {
    run = await runMatrix(path.join(dir, 'export.raw'), size, quick, workloads(seconds, size), '');
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const { results, medians, servers } = run;
  const figures: Figure[] = [];
  for (const rw of ['randread', 'randwrite']) {
    const one = medians.get(`fio nbd 4KiB ${rw} QD16`);
    const four = medians.get(`fio nbd 4KiB ${rw} QD16 x 4 connections`);
    if (one === undefined || four === undefined) continue;
    for (const name of servers) {
      const x = (four.get(name) ?? NaN) / (one.get(name) ?? NaN);
      figures.push({ name: `nbd 4KiB ${rw} QD16: 4 connections / 1 connection, ${name}`, value: Math.round(x * 100) / 100, unit: 'x' });
    }
  }
  return { results, figures };
}

/**
 * The write cases again on XFS, which takes buffered RWF_NOWAIT writes (ext4 refuses them), so
 * our server writes inline there (decision 0016): a loop-mounted XFS image. Needs root,
 * mkfs.xfs and a loop device; skipped, saying why, elsewhere.
 */
export async function runNbdXfsCases(quick: boolean): Promise<CaseResult[]> {
  if (!have('fio') || !have('qemu-nbd') || !have('mkfs.xfs', '-V')) {
    console.error('nbd on XFS: skipped, needs fio, qemu-nbd and mkfs.xfs');
    return [];
  }
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-nbd-xfs-'));
  const size = (quick ? 256 : 1024) * MiB;
  const seconds = quick ? 1 : 3;
  const xfs = mountLoopFs(dir, 'xfs', size + 512 * MiB);
  if ('why' in xfs) {
    console.error(`nbd on XFS: skipped, ${xfs.why}`);
    fs.rmSync(dir, { recursive: true, force: true });
    return [];
  }
  const K4 = 4096;
  const ws: Workload[] = [
    { name: 'fio nbd 4KiB randwrite QD1', bs: K4, qd: 1, run: (uri) => fio(uri, 'randwrite', K4, 1, seconds, size) },
    { name: 'fio nbd 4KiB randwrite QD16', bs: K4, qd: 16, run: (uri) => fio(uri, 'randwrite', K4, 16, seconds, size) },
    { name: 'fio nbd 1MiB seq write QD8', bs: MiB, qd: 8, run: (uri) => fio(uri, 'write', MiB, 8, seconds, size) },
  ];
  try {
    return (await runMatrix(path.join(xfs.mnt, 'export.raw'), size, quick, ws, 'on XFS: ')).results;
  } finally {
    xfs.unmount();
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

