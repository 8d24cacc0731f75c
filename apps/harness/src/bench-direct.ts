import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { allocIoBuffer, createDiskSync, FileBackend, MemoryBackend, type Disk } from '@blkfilter/bio';
import { openDirect, type DirectHandle } from '@blkfilter/direct-io';
import type { Bench } from 'tinybench';
import { compare, randomBlocks, type CaseResult } from './bench-util.js';

const MiB = 1 << 20;

interface Workload {
  readonly name: string;
  readonly rw: 'randread' | 'randwrite' | 'read' | 'write';
  readonly bs: number;
  readonly qd: number;
  /** Issue 19's goal for the AIO engine against fio, where it sets one. */
  readonly goal?: number;
}

const WORKLOADS: readonly Workload[] = [
  { name: '4KiB randread QD1', rw: 'randread', bs: 4096, qd: 1 },
  { name: '4KiB randwrite QD1', rw: 'randwrite', bs: 4096, qd: 1 },
  { name: '4KiB randread QD16', rw: 'randread', bs: 4096, qd: 16, goal: 0.8 },
  { name: '4KiB randwrite QD16', rw: 'randwrite', bs: 4096, qd: 16, goal: 0.8 },
  { name: '1MiB seq read QD4', rw: 'read', bs: MiB, qd: 4, goal: 1 },
  { name: '1MiB seq write QD4', rw: 'write', bs: MiB, qd: 4, goal: 1 },
];

/** One run: requests per second, and CPU seconds (user + system, every thread) per 100k requests. */
interface Run {
  readonly ops: number;
  readonly cpu: number;
}

/** Runs `workload` through the handle for `seconds`. */
async function runOurs(h: DirectHandle, w: Workload, size: number, seconds: number): Promise<Run> {
  const blocks = size / w.bs;
  const order = randomBlocks(1 << 16, blocks, 99);
  const bufs = Array.from({ length: w.qd }, () => allocIoBuffer(w.bs, 4096).fill(0x6b));
  const random = w.rw.startsWith('rand');
  const write = w.rw.endsWith('write');
  const deadline = performance.now() + seconds * 1000;
  let ops = 0;
  let seq = 0;
  const worker = async (slot: number): Promise<void> => {
    const buf = bufs[slot] as Buffer;
    while (performance.now() < deadline) {
      const i = seq++;
      const block = random ? (order[i & 0xffff] as number) : i % blocks;
      if (write) await h.write(buf, block * w.bs);
      else await h.read(buf, block * w.bs);
      ops++;
    }
  };
  const cpu0 = process.cpuUsage();
  const t0 = performance.now();
  await Promise.all(Array.from({ length: w.qd }, (_, s) => worker(s)));
  const elapsed = performance.now() - t0;
  const cpu = process.cpuUsage(cpu0);
  return { ops: (ops * 1000) / elapsed, cpu: ((cpu.user + cpu.system) / 1e6 / ops) * 1e5 };
}

function runFio(file: string, w: Workload, size: number, seconds: number): Run {
  const out = execFileSync(
    'fio',
    [
      '--name=bench',
      `--filename=${file}`,
      '--direct=1',
      `--rw=${w.rw}`,
      `--bs=${w.bs}`,
      `--iodepth=${w.qd}`,
      '--ioengine=libaio',
      `--size=${size}`,
      `--runtime=${seconds}`,
      '--time_based',
      '--randrepeat=1',
      '--output-format=json',
    ],
    { encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] },
  );
  interface Side {
    iops: number;
    total_ios: number;
  }
  const json = JSON.parse(out.slice(out.indexOf('{'))) as { jobs: Array<{ read: Side; write: Side; usr_cpu: number; sys_cpu: number; job_runtime: number }> };
  const job = json.jobs[0];
  if (job === undefined) throw new Error('fio printed no job');
  const side = w.rw.endsWith('write') ? job.write : job.read;
  // usr_cpu and sys_cpu are percent of one CPU over the job's runtime (ms).
  const cpuSec = ((job.usr_cpu + job.sys_cpu) / 100) * (job.job_runtime / 1000);
  return { ops: side.iops, cpu: (cpuSec / Math.max(1, side.total_ios)) * 1e5 };
}

function hasFio(): boolean {
  try {
    execFileSync('fio', ['--version'], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/**
 * Direct I/O on the file backend opened O_DIRECT, through the filters' one submit path, with
 * each I/O engine (Linux native AIO, the threadpool), against fio --direct=1 (libaio) on the
 * same file in the same rounds, with CPU time per request on both sides; and polled vs
 * interrupt completion on memory.
 */
export async function runDirectCases(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const results: CaseResult[] = [];
  results.push(...(await pollVsInterrupt(makeBench, quick)));
  if (!hasFio()) {
    console.error('direct-io vs fio: skipped, fio is not installed (apt-get install fio)');
    return results;
  }
  const dir = fs.mkdtempSync(path.join(process.env.BLKFILTER_BENCH_DIR ?? os.tmpdir(), 'blkfilter-direct-'));
  const file = path.join(dir, 'direct.raw');
  const size = 256 * MiB;
  const seconds = quick ? 0.5 : 1.5;
  try {
    const fd = fs.openSync(file, 'w');
    const fill = Buffer.alloc(MiB, 0x33);
    for (let off = 0; off < size; off += MiB) fs.writeSync(fd, fill, 0, MiB, off);
    fs.closeSync(fd);
    // One backend per engine on the same file: Linux native AIO (the default) and the libuv
    // threadpool it replaced, each against fio in the same rounds.
    const engines: Array<{ engine: 'aio' | 'threadpool'; h: DirectHandle; disk: Disk }> = [];
    for (const engine of ['aio', 'threadpool'] as const) {
      let backend: FileBackend;
      try {
        backend = await FileBackend.open(file, { direct: true, ioEngine: engine });
      } catch (err) {
        console.error(`direct-io vs fio: skipped, O_DIRECT is not available in ${dir}: ${(err as Error).message}`);
        return results;
      }
      if (backend.stats.ioEngine !== engine) console.error(`direct-io: the ${engine} backend uses ${backend.stats.ioEngine}: ${backend.stats.ioEngineReason ?? ''}`);
      const disk = createDiskSync({ name: `bench-direct-${engine}`, backend, logicalBlockSize: 4096, scanPartitions: false });
      engines.push({ engine: backend.stats.ioEngine, h: await openDirect(disk.part0), disk });
    }
    const med = (xs: number[]): number => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)] as number;
    const r2 = (x: number): number => Math.round(x * 100) / 100;
    const fioWhat = 'fio --direct=1 --ioengine=libaio, same file';
    for (const w of WORKLOADS) {
      const ours = engines.map(() => [] as Run[]);
      const theirs: Run[] = [];
      for (let r = 0; r < (quick ? 1 : 3); r++) {
        for (let e = 0; e < engines.length; e++) (ours[e] as Run[]).push(await runOurs((engines[e] as (typeof engines)[number]).h, w, size, seconds));
        theirs.push(runFio(file, w, size, Math.max(1, Math.round(seconds))));
      }
      const t = med(theirs.map((x) => x.ops));
      const baseline = {
        opsPerSec: Math.round(t),
        minOpsPerSec: Math.round(Math.min(...theirs.map((x) => x.ops))),
        mbPerSec: Math.round((t * w.bs) / 1e6),
        rmePercent: NaN,
        cpuSecPer100k: r2(med(theirs.map((x) => x.cpu))),
        what: fioWhat,
      };
      for (let e = 0; e < engines.length; e++) {
        const runs = ours[e] as Run[];
        const o = med(runs.map((x) => x.ops));
        const cpus = runs.map((x) => x.cpu);
        const engine = (engines[e] as (typeof engines)[number]).engine;
        results.push({
          name: `direct-io file O_DIRECT ${w.name} (${engine})`,
          blockSize: w.bs,
          queueDepth: w.qd,
          ours: {
            opsPerSec: Math.round(o),
            minOpsPerSec: Math.round(Math.min(...runs.map((x) => x.ops))),
            mbPerSec: Math.round((o * w.bs) / 1e6),
            rmePercent: NaN,
            cpuSecPer100k: r2(med(cpus)),
            cpuSecPer100kRange: [r2(Math.min(...cpus)), r2(Math.max(...cpus))],
          },
          baseline,
          ratio: Math.round((o / t) * 1000) / 1000,
          ...(engine === 'aio' && w.goal !== undefined ? { goal: w.goal } : {}),
        });
      }
    }
    for (const { h, disk } of engines) {
      await h.close();
      await disk.remove();
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  return results;
}

/** QD1 4 KiB reads on memory: completion reaped by polling the cookie vs by interrupt. */
async function pollVsInterrupt(makeBench: () => Bench, quick: boolean): Promise<CaseResult[]> {
  const disk = createDiskSync({ name: 'bench-poll', backend: new MemoryBackend({ sizeBytes: 64 * MiB }), scanPartitions: false });
  const polled = await openDirect(disk.part0, { poll: true });
  const irq = await openDirect(disk.part0);
  const buf = allocIoBuffer(4096, 4096);
  const batch = quick ? 500 : 2000;
  const order = randomBlocks(batch, (64 * MiB) / 4096, 5);
  const loop = (h: DirectHandle) => async (): Promise<void> => {
    for (let i = 0; i < batch; i++) await h.read(buf, (order[i] as number) * 4096);
  };
  const res = await compare(makeBench, 'direct-io memory 4KiB read QD1, polled (latency = 1/ops)', 4096, 1, batch, loop(polled), 'interrupt completion', loop(irq));
  await disk.remove();
  return [res];
}
