import { execFileSync, spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import type { CaseResult } from './bench-util.js';

const MiB = 1 << 20;

interface Daemon {
  readonly proc: ChildProcess;
  readonly nbd: string;
  readonly http: string | null;
}

async function startDaemon(file: string, withHttp: boolean): Promise<Daemon> {
  const cli = path.join(path.dirname(fileURLToPath(import.meta.resolve('@blkfilter/cli'))), 'cli.js');
  const control = `${file}.sock`;
  const proc = spawn(process.execPath, [cli, '--control', control, 'serve', '--cbt', '--state-dir', `${file}.state`, '--listen', '127.0.0.1:0', ...(withHttp ? ['--http', '127.0.0.1:0'] : []), file], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  await new Promise<void>((resolve, reject) => {
    proc.stderr?.on('data', (d: Buffer) => {
      log += d.toString();
      if (log.includes('ready')) resolve();
    });
    proc.once('exit', (code) => reject(new Error(`blkfilter serve exited ${code}: ${log}`)));
  });
  const nbd = /nbd:\/\/127\.0\.0\.1:(\d+)\//.exec(log)?.[0] ?? '';
  const web = /status page on (http:\/\/\S+?)\//.exec(log)?.[1] ?? null;
  return { proc, nbd, http: web };
}

function fio(uri: string, seconds: number, size: number): number {
  const out = execFileSync('fio', ['--name=nbd', '--ioengine=nbd', `--uri=${uri}`, '--rw=randread', '--bs=4096', '--iodepth=32', `--size=${size}`, `--runtime=${seconds}`, '--time_based', '--output-format=json'], {
    encoding: 'utf8',
    stdio: ['ignore', 'pipe', 'ignore'],
  });
  const json = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: { iops: number } }> };
  return json.jobs[0]?.read.iops ?? NaN;
}

/**
 * What `serve --http` costs the NBD data path: fio's 4 KiB random reads at QD32 against two
 * daemons on copies of one image, one plain and one with --http while a page is open (an SSE
 * client) and Prometheus scrapes /metrics every second; rounds alternate between them.
 */
export async function runHttpCases(quick: boolean): Promise<CaseResult[]> {
  if (spawnSync('fio', ['--version'], { stdio: 'ignore' }).status !== 0) {
    console.error('serve --http cost: skipped, needs fio (apt-get install fio)');
    return [];
  }
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-http-'));
  const size = (quick ? 128 : 512) * MiB;
  const files = ['plain.raw', 'http.raw'].map((n) => path.join(dir, n));
  const fill = Buffer.alloc(MiB, 0x5a);
  for (const f of files) {
    const fd = fs.openSync(f, 'w');
    for (let off = 0; off < size; off += MiB) fs.writeSync(fd, fill, 0, MiB, off);
    fs.closeSync(fd);
  }
  const plain = await startDaemon(files[0] as string, false);
  const web = await startDaemon(files[1] as string, true);
  const viewer = http.get(`${web.http}/api/live`, (res) => res.resume());
  viewer.on('error', () => {});
  const scraper = setInterval(() => {
    http.get(`${web.http}/metrics`, (res) => res.resume()).on('error', () => {});
  }, 1000);
  const seconds = quick ? 2 : 4;
  const rounds = quick ? 3 : 5;
  const a: number[] = [];
  const b: number[] = [];
  try {
    for (let r = 0; r < rounds; r++) {
      // Alternate which goes first so neither always runs on the warmer machine.
      if (r % 2 === 0) {
        a.push(fio(plain.nbd, seconds, size));
        b.push(fio(web.nbd, seconds, size));
      } else {
        b.push(fio(web.nbd, seconds, size));
        a.push(fio(plain.nbd, seconds, size));
      }
    }
  } finally {
    clearInterval(scraper);
    viewer.destroy();
    for (const d of [plain, web]) d.proc.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 300));
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const med = (xs: number[]): number => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)] ?? NaN;
  console.error(`serve --http cost: plain ${a.map(Math.round).join(', ')} IOPS; --http ${b.map(Math.round).join(', ')} IOPS`);
  return [
    {
      name: 'nbd fio 4KiB randread QD32 with serve --http (page open, /metrics scraped each second)',
      blockSize: 4096,
      queueDepth: 32,
      ours: { opsPerSec: Math.round(med(b)), minOpsPerSec: Math.round(Math.min(...b)), mbPerSec: Math.round((med(b) * 4096) / 1e6), rmePercent: NaN },
      baseline: { opsPerSec: Math.round(med(a)), minOpsPerSec: Math.round(Math.min(...a)), mbPerSec: Math.round((med(a) * 4096) / 1e6), rmePercent: NaN, what: 'blkfilter serve without --http, same image content' },
      ratio: Math.round((med(b) / med(a)) * 1000) / 1000,
    },
  ];
}
