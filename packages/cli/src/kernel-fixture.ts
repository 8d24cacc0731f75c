import { spawn, type ChildProcess } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { connectPrerequisites, heldUnder } from './connect.js';
import { readMounts, run, which, type RunResult } from './sys.js';

// Shared by the tests that put a real kernel filesystem on a blkfilter device (not shipped:
// tsup bundles only what index.ts reaches). Every helper is asynchronous: the daemon runs as a
// child process, but a spawnSync on a tool that waits on the FUSE file would still stall the
// test's own timers.

export const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');

/** Whether this machine can run the kernel tests, and why not. */
export function kernelTestsPossible(tools: readonly string[] = []): { ok: boolean; reason: string } {
  const pre = connectPrerequisites();
  if (!pre.ok) return { ok: false, reason: pre.reason };
  for (const t of ['fsfreeze', 'mkfs.ext4', 'e2fsck', ...tools]) if (which(t) === null) return { ok: false, reason: `${t} is not installed` };
  return { ok: true, reason: '' };
}

/** Runs a tool; throws with its stderr unless it exits 0. */
export async function must(cmd: string, args: readonly string[], timeoutMs = 120_000): Promise<RunResult> {
  const r = await run(cmd, args, { timeoutMs });
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? r.signal}: ${r.stderr.trim()}`);
  return r;
}

/** Runs the built `blkfilter` with `--control control`. */
export function cli(control: string, args: readonly string[], timeoutMs = 300_000): Promise<RunResult> {
  return run(process.execPath, [CLI, '--control', control, ...args], { timeoutMs });
}

/** Runs `blkfilter ... --json` and parses its output; throws unless it exits 0. */
export async function cliJson<T>(control: string, args: readonly string[]): Promise<T> {
  const r = await cli(control, [...args, '--json']);
  if (r.code !== 0) throw new Error(`blkfilter ${args.join(' ')} exited ${r.code}: ${r.stderr.trim()}`);
  return JSON.parse(r.stdout) as T;
}

/** Starts `blkfilter serve ARGS` as a child process; resolves once it says ready. */
export function startServe(control: string, args: readonly string[]): Promise<ChildProcess> {
  const p = spawn(process.execPath, [CLI, '--control', control, 'serve', ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  return new Promise((resolve, reject) => {
    let log = '';
    p.stderr?.on('data', (b: Buffer) => {
      log += b.toString();
      if (log.includes('ready')) resolve(p);
    });
    p.once('exit', (code) => reject(new Error(`serve exited ${code}: ${log}`)));
  });
}

/** Resolves when `p` has exited (also when it already has). */
export function exited(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((r) => p.once('exit', () => r()));
}

/** Polls `cond` until true, at most `timeoutMs`; returns whether it became true. */
export async function until(cond: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    if (await cond()) return true;
    if (Date.now() >= end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
}

/**
 * Leaves nothing of a test behind under `dir`, whatever state it failed in: thaws and unmounts
 * filesystems, detaches loop devices, unmounts FUSE files, kills nbdfuse.
 */
export async function cleanupUnder(dir: string): Promise<void> {
  const mounts = () => readMounts().filter((m) => m.mountPoint.startsWith(dir));
  for (const m of mounts().filter((x) => !x.fsType.startsWith('fuse'))) await run('fsfreeze', ['-u', m.mountPoint], { timeoutMs: 10_000 });
  for (const m of mounts().filter((x) => !x.fsType.startsWith('fuse')).reverse()) {
    const r = await run('umount', [m.mountPoint], { timeoutMs: 30_000 });
    if (r.code !== 0) await run('umount', ['-l', m.mountPoint], { timeoutMs: 30_000 });
  }
  const l = await run('losetup', ['-a']);
  for (const line of l.stdout.split('\n').filter((x) => x.includes(dir))) {
    const dev = line.split(':')[0];
    if (dev !== undefined && dev !== '') await run('losetup', ['-d', dev], { timeoutMs: 30_000 });
  }
  for (const m of mounts().reverse()) {
    const r = await run('fusermount3', ['-u', m.mountPoint], { timeoutMs: 30_000 });
    if (r.code !== 0) await run('umount', ['-l', m.mountPoint], { timeoutMs: 30_000 });
  }
  for (const pid of (await heldUnder(dir)).nbdfuse) {
    try {
      process.kill(pid, 'SIGKILL');
    } catch {
      // gone
    }
  }
}

/** SHA-256 of every regular file under `root` (relative paths), skipping `skip` (relative folder names). */
export async function checksums(root: string, skip: readonly string[] = []): Promise<Record<string, string>> {
  const r = await must('sh', ['-c', `cd "$1" && find . -type f ${skip.map((s) => `-not -path './${s}/*'`).join(' ')} -print0 | sort -z | xargs -0 -r sha256sum`, 'sh', root]);
  const out: Record<string, string> = {};
  for (const line of r.stdout.split('\n')) {
    const m = /^([0-9a-f]{64}) {2}\.\/(.*)$/.exec(line);
    if (m !== null && m[1] !== undefined && m[2] !== undefined) out[m[2]] = m[1];
  }
  return out;
}
