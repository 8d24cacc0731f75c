import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { stop } from './bench-disks.js';
import { fio, freePort, have, ourCli, waitPort, type RunResult } from './bench-nbd.js';
import type { CaseResult } from './bench-util.js';

const MiB = 1 << 20;

async function nbdkitMemory(port: number, delay: boolean): Promise<ChildProcess> {
  // `memory` is nbdkit's fastest plugin: what the proxy costs shows against it undiluted. The
  // delay filter adds 5 ms to every read and write, as a storage network would.
  const args = ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(port)];
  if (delay) args.push('--filter=delay');
  args.push('memory', '1G');
  if (delay) args.push('rdelay=5ms', 'wdelay=5ms');
  const p = spawn('nbdkit', args, { stdio: 'ignore' });
  await waitPort(port);
  return p;
}

async function proxy(dir: string, upstream: string, connections: number): Promise<{ proc: ChildProcess; uri: string }> {
  const port = await freePort();
  const control = path.join(dir, `control-${port}.sock`);
  const proc = spawn(
    process.execPath,
    [ourCli(), '--control', control, 'serve', '--state-dir', `${control}.state`, '--connections', String(connections), '--listen', `127.0.0.1:${port}`, upstream],
    { stdio: 'ignore' },
  );
  await waitPort(port);
  return { proc, uri: `nbd://127.0.0.1:${port}/` };
}

/**
 * Proxy mode: `blkfilter serve nbd://...` in front of nbdkit's memory plugin, against fio
 * talking to the same nbdkit directly, in alternating rounds. Goals (issue 19): >= 0.8x of
 * nbdkit direct at QD16; with 5 ms of delay and 4 connections >= 0.9x.
 */
export async function runNbdProxyCases(quick: boolean): Promise<CaseResult[]> {
  if (!have('fio') || !have('nbdkit')) {
    console.error('nbd-proxy: skipped, needs fio and nbdkit');
    return [];
  }
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-proxy-'));
  const seconds = quick ? 1 : 3;
  const rounds = quick ? 1 : 3;
  const size = 1024 * MiB;
  const procs: ChildProcess[] = [];
  const results: CaseResult[] = [];
  try {
    const cases: Array<{ name: string; delay: boolean; connections: number; run: (uri: string) => RunResult; bs: number; qd: number }> = [
      { name: 'proxy 4KiB randread QD16', delay: false, connections: 1, bs: 4096, qd: 16, run: (uri) => fio(uri, 'randread', 4096, 16, seconds, size) },
      { name: 'proxy 4KiB randwrite QD16', delay: false, connections: 1, bs: 4096, qd: 16, run: (uri) => fio(uri, 'randwrite', 4096, 16, seconds, size) },
      { name: 'proxy 4KiB randread QD16 x 4 connections, 5 ms delay', delay: true, connections: 4, bs: 4096, qd: 64, run: (uri) => fio(uri, 'randread', 4096, 16, seconds, size, 4) },
      { name: 'proxy 4KiB randwrite QD16 x 4 connections, 5 ms delay', delay: true, connections: 4, bs: 4096, qd: 64, run: (uri) => fio(uri, 'randwrite', 4096, 16, seconds, size, 4) },
    ];
    const upstreams = new Map<boolean, string>();
    const proxies = new Map<string, string>();
    for (const c of cases) {
      if (!upstreams.has(c.delay)) {
        const port = await freePort();
        procs.push(await nbdkitMemory(port, c.delay));
        upstreams.set(c.delay, `nbd://127.0.0.1:${port}/`);
      }
      const upstream = upstreams.get(c.delay) as string;
      const key = `${upstream} ${c.connections}`;
      if (!proxies.has(key)) {
        const p = await proxy(dir, upstream, c.connections);
        procs.push(p.proc);
        proxies.set(key, p.uri);
      }
      const through = proxies.get(key) as string;
      const ours: number[] = [];
      const direct: number[] = [];
      for (let r = 0; r < rounds; r++) {
        if (r % 2 === 0) {
          ours.push(c.run(through).rate);
          direct.push(c.run(upstream).rate);
        } else {
          direct.push(c.run(upstream).rate);
          ours.push(c.run(through).rate);
        }
      }
      const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] ?? NaN;
      const o = med(ours);
      const d = med(direct);
      results.push({
        name: `nbd ${c.name}`,
        blockSize: c.bs,
        queueDepth: c.qd,
        ours: { opsPerSec: Math.round(o), minOpsPerSec: Math.round(Math.min(...ours)), mbPerSec: Math.round((o * c.bs) / 1e6), rmePercent: NaN },
        baseline: { opsPerSec: Math.round(d), minOpsPerSec: Math.round(Math.min(...direct)), mbPerSec: Math.round((d * c.bs) / 1e6), rmePercent: NaN, what: `nbdkit memory${c.delay ? ' + delay 5 ms' : ''}, direct` },
        ratio: Math.round((o / d) * 1000) / 1000,
        goal: c.delay ? 0.9 : 0.8,
      });
    }
  } finally {
    await Promise.all(procs.map(stop));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}
