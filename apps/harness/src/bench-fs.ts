import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { connectPrerequisites } from '@blkfilter/cli';
import type { Figure } from './bench-cbt.js';
import { run } from './bench-disks.js';
import type { CaseResult, Measure } from './bench-util.js';

// fio on files of an ext4 mounted through `blkfilter connect` (nbdfuse + loop over our NBD
// server, CBT on; then with an active snapshot) next to the same filesystem on the same path
// over qemu-nbd (nbdfuse + loop over qemu-nbd), in the same run; how long `--freeze` keeps
// the filesystem frozen; and issue 19's story (mkfs, a full backup, fstrim, 40 MiB of files, an
// incremental: bytes read against bytes stored). Every tool runs asynchronously: nothing here
// may block while the kernel waits on a FUSE file.

const CLI = path.join(path.dirname(fileURLToPath(import.meta.resolve('@blkfilter/cli'))), 'cli.js');

function background(cmd: string, args: readonly string[], readyText: string | null): Promise<ReturnType<typeof spawn>> {
  const p = spawn(cmd, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  if (readyText === null) return Promise.resolve(p);
  return new Promise((resolve, reject) => {
    let log = '';
    p.stderr?.on('data', (d: Buffer) => {
      log += d.toString();
      if (log.includes(readyText)) resolve(p);
    });
    p.once('exit', (code) => reject(new Error(`${cmd} exited ${code}: ${log}`)));
  });
}

async function waitFor(cond: () => boolean, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error('timed out');
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** What `blkfilter backup --json` says of the one image of a point. */
interface BackupEntry {
  readonly kind: string;
  readonly bytesRead: number;
  readonly bytesWritten: number;
  readonly changedBytes: number;
  readonly durationMs: number;
}

/**
 * Issue 19 on a real kernel: right after mkfs, a frozen take and a backup; then fstrim (every
 * free block discarded, so CBT marks it changed), 40 files of 1 MiB, a take and an incremental.
 * Returns both backups' entries and what fstrim said it trimmed.
 */
async function trimStory(cli: readonly string[], mnt: string, repo: string): Promise<{ full: BackupEntry; incremental: BackupEntry; trimmed: string }> {
  const backup = async (): Promise<BackupEntry> => {
    const id = (JSON.parse(await run(process.execPath, [...cli, 'snapshot', 'create', 'ours', '--storage', 'memory', '--limit', '768M', '--json'])) as { id: string }).id;
    try {
      await run(process.execPath, [...cli, 'snapshot', 'take', id, '--freeze', mnt, '--json']);
      return (JSON.parse(await run(process.execPath, [...cli, 'backup', id, '--to', repo, '--json'])) as { images: Array<{ entry: BackupEntry }> }).images[0]?.entry as BackupEntry;
    } finally {
      await run(process.execPath, [...cli, 'snapshot', 'destroy', id]);
    }
  };
  const full = await backup();
  const trimmed = (await run('fstrim', ['-v', mnt])).trim();
  const mb = Buffer.alloc(1 << 20);
  for (let i = 0; i < 40; i++) fs.writeFileSync(path.join(mnt, `story-${i}`), crypto.randomFillSync(mb));
  await run('sync', ['-f', mnt]);
  return { full, incremental: await backup(), trimmed };
}

const median = (xs: number[]): number => {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)] ?? 0;
};

async function fio(dir: string, name: string, bs: string, qd: number, seconds: number): Promise<Measure> {
  const out = await run('fio', ['--name', name, '--directory', dir, '--filename_format', `${name}.$jobnum`, '--size', '256M', '--rw', bs === '4k' ? 'randwrite' : 'write', '--bs', bs, '--iodepth', String(qd), '--ioengine', 'libaio', '--direct', '1', '--time_based', '--runtime', String(seconds), '--output-format', 'json']);
  const job = (JSON.parse(out) as { jobs: Array<{ write: { iops: number; bw_bytes: number } }> }).jobs[0];
  const iops = Math.round(job?.write.iops ?? 0);
  return { opsPerSec: iops, mbPerSec: Math.round(((job?.write.bw_bytes ?? 0) / 1e6) * 10) / 10, rmePercent: 0 };
}

/** Runs the section; throws (the bench records why) when the machine cannot connect devices. */
export async function runFsCases(quick: boolean): Promise<{ results: CaseResult[]; figures: Figure[] }> {
  const pre = connectPrerequisites();
  if (!pre.ok) throw new Error(`fs section skipped: ${pre.reason}`);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-bench-fs-'));
  const seconds = quick ? 3 : 8;
  const rounds = quick ? 1 : 3;
  const control = path.join(dir, 'c.sock');
  const ours = { img: path.join(dir, 'ours.raw'), mnt: path.join(dir, 'ours') };
  const base = { img: path.join(dir, 'base.raw'), mnt: path.join(dir, 'base'), fuse: path.join(dir, 'base-fuse'), sock: path.join(dir, 'qemu.sock') };
  const procs: Array<ReturnType<typeof spawn>> = [];
  let ourDev = '';
  let baseLoop = '';
  try {
    for (const f of [ours.img, base.img]) {
      fs.writeFileSync(f, '');
      fs.truncateSync(f, 1 << 30);
    }
    for (const d of [ours.mnt, base.mnt, base.fuse]) fs.mkdirSync(d);
    procs.push(await background(process.execPath, [CLI, '--control', control, 'serve', '--cbt', '--state-dir', path.join(dir, 'state'), '--listen', `unix:${path.join(dir, 'nbd.sock')}`, ours.img], 'ready'));
    ourDev = (JSON.parse(await run(process.execPath, [CLI, '--control', control, 'connect', 'ours', '--json'])) as { device: string }).device;
    // The baseline on the same path: qemu-nbd, nbdfuse, losetup --direct-io=on.
    procs.push(await background('qemu-nbd', ['-t', '-f', 'raw', '--cache=none', '--aio=threads', '-k', base.sock, base.img], null));
    await waitFor(() => fs.existsSync(base.sock), 10_000);
    procs.push(await background('nbdfuse', [path.join(base.fuse, 'disk'), '--unix', base.sock], null));
    await waitFor(() => fs.existsSync(path.join(base.fuse, 'disk')), 10_000);
    baseLoop = (await run('losetup', ['--find', '--show', '--direct-io=on', path.join(base.fuse, 'disk')])).trim();
    for (const [dev, mnt] of [[ourDev, ours.mnt], [baseLoop, base.mnt]] as const) {
      await run('mkfs.ext4', ['-q', '-F', dev]);
      await run('mount', [dev, mnt]);
    }

    // Before any other I/O: the filesystem as mkfs left it.
    const story = await trimStory([CLI, '--control', control], ours.mnt, path.join(dir, 'repo'));
    const said = (e: BackupEntry): string => `${e.kind}: read ${e.bytesRead} B, stored ${e.bytesWritten} B, changed ${e.changedBytes} B, ${e.durationMs} ms`;
    process.stderr.write(`fs story: ${story.trimmed}; ${said(story.full)}; then ${said(story.incremental)}\n`);

    const results: CaseResult[] = [];
    const compare = async (name: string, bs: string, qd: number): Promise<void> => {
      const o: Measure[] = [];
      const b: Measure[] = [];
      for (let r = 0; r < rounds; r++) {
        o.push(await fio(ours.mnt, `f${bs}`, bs, qd, seconds));
        b.push(await fio(base.mnt, `f${bs}`, bs, qd, seconds));
      }
      const mo = median(o.map((m) => m.opsPerSec));
      const mb = median(b.map((m) => m.opsPerSec));
      results.push({
        name,
        blockSize: bs === '4k' ? 4096 : 1 << 20,
        queueDepth: qd,
        ours: { opsPerSec: mo, minOpsPerSec: Math.min(...o.map((m) => m.opsPerSec)), mbPerSec: median(o.map((m) => m.mbPerSec)), rmePercent: 0 },
        baseline: { what: 'same ext4 over qemu-nbd (nbdfuse + loop, same path)', opsPerSec: mb, minOpsPerSec: Math.min(...b.map((m) => m.opsPerSec)), mbPerSec: median(b.map((m) => m.mbPerSec)), rmePercent: 0 },
        ratio: mb === 0 ? 0 : Math.round((mo / mb) * 1000) / 1000,
      });
    };
    await compare('ext4 via connect, CBT: fio 4K randwrite QD16', '4k', 16);
    await compare('ext4 via connect, CBT: fio 1M write QD4', '1m', 4);

    // Frozen takes: the time --freeze keeps the filesystem frozen, under no other load.
    const frozen: number[] = [];
    let lastId = '';
    for (let i = 0; i < (quick ? 5 : 11); i++) {
      if (lastId !== '') await run(process.execPath, [CLI, '--control', control, 'snapshot', 'destroy', lastId]);
      lastId = (JSON.parse(await run(process.execPath, [CLI, '--control', control, 'snapshot', 'create', 'ours', '--storage', 'memory', '--limit', '768M', '--json'])) as { id: string }).id;
      const t = JSON.parse(await run(process.execPath, [CLI, '--control', control, 'snapshot', 'take', lastId, '--freeze', ours.mnt, '--json'])) as { frozenMs: number };
      frozen.push(t.frozenMs);
    }
    // The last snapshot stays active for the next cases: every first write to a chunk copies it.
    await compare('ext4 via connect, CBT + active snapshot: fio 4K randwrite QD16', '4k', 16);
    await compare('ext4 via connect, CBT + active snapshot: fio 1M write QD4', '1m', 4);

    const figures: Figure[] = [
      { name: 'fs: --freeze frozen time, median', value: Math.round(median(frozen) * 10) / 10, unit: 'ms', target: '< 100' },
      { name: 'fs: --freeze frozen time, max', value: Math.round(Math.max(...frozen) * 10) / 10, unit: 'ms' },
      { name: 'fs: incremental after fstrim + 40 MiB, bytes read / stored', value: Math.round((story.incremental.bytesRead / story.incremental.bytesWritten) * 1000) / 1000, unit: 'x', target: '<= 1.1' },
      { name: 'fs: incremental after fstrim + 40 MiB, MiB read', value: Math.round((story.incremental.bytesRead / (1 << 20)) * 10) / 10, unit: 'MiB' },
      { name: 'fs: incremental after fstrim + 40 MiB, MiB changed (CBT)', value: Math.round((story.incremental.changedBytes / (1 << 20)) * 10) / 10, unit: 'MiB' },
      { name: 'fs: full backup after mkfs, MiB read', value: Math.round((story.full.bytesRead / (1 << 20)) * 10) / 10, unit: 'MiB' },
      ...results.map((r) => ({ name: `fs ratio: ${r.name}`, value: r.ratio, unit: 'x', target: '>= 1.0' })),
    ];
    return { results, figures };
  } finally {
    for (const m of [ours.mnt, base.mnt]) await run('umount', [m]).catch(() => {});
    if (baseLoop !== '') await run('losetup', ['-d', baseLoop]).catch(() => {});
    if (ourDev !== '') await run(process.execPath, [CLI, '--control', control, 'disconnect', ourDev]).catch((e: Error) => console.error(e.message));
    await run('fusermount3', ['-u', base.fuse]).catch(() => {});
    for (const p of procs.reverse()) p.kill('SIGTERM');
    await new Promise((r) => setTimeout(r, 500));
    // Never walk into a FUSE mount that failed to go.
    if (!fs.readFileSync('/proc/self/mountinfo', 'utf8').includes(dir)) fs.rmSync(dir, { recursive: true, force: true });
    else console.error(`bench fs: left ${dir}: something is still mounted there`);
  }
}
