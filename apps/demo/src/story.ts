// What both stories share: the timed story lines and the checks that decide the exit code.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

export const MiB = 1 << 20;
export const GiB = 1 << 30;

const t0 = performance.now();
const secs = (): string => `${((performance.now() - t0) / 1000).toFixed(1)} s`;
/** Prints one line of the story, with the time since the start. */
export const say = (line: string): void => console.log(`[${secs().padStart(6)}] ${line}`);
export const mib = (n: number): string => `${(n / MiB).toFixed(1)} MiB`;
/** Seconds since `t` (a `performance.now()`), for "... in 1.2 s". */
export const since = (t: number): string => `${((performance.now() - t) / 1000).toFixed(1)} s`;

let failures = 0;
/** Records one check: a failed one makes the demo exit non-zero. */
export function check(what: string, okay: boolean, detail = ''): boolean {
  if (!okay) failures++;
  say(`${okay ? 'ok  ' : 'FAIL'} ${what}${detail ? `: ${detail}` : ''}`);
  return okay;
}
export const failureCount = (): number => failures;

/** What a finished command left. */
export interface Ran {
  readonly code: number | null;
  readonly stdout: string;
  readonly stderr: string;
}

/**
 * Runs a tool asynchronously. Never spawnSync here: the daemon serving the device runs in this
 * process, and a tool doing I/O on the device (mkfs, mount, cp, sync, sha256sum) waits on it.
 */
export function exec(cmd: string, args: readonly string[], timeoutMs = 120_000): Promise<Ran> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      resolve({ code: 127, stdout, stderr: stderr + err.message });
    });
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
}

/** {@link exec}, throwing with the tool's stderr unless it exits 0. */
export async function must(cmd: string, args: readonly string[], timeoutMs = 120_000): Promise<Ran> {
  const r = await exec(cmd, args, timeoutMs);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code ?? 'on a signal/timeout'}: ${r.stderr.trim()}`);
  return r;
}

/** The path of `program` on `$PATH` or in the sbin folders (a non-login root shell may lack them), or null. */
export function which(program: string): string | null {
  for (const d of [...(process.env.PATH ?? '').split(':'), '/usr/local/sbin', '/usr/sbin', '/sbin', '/usr/bin', '/bin']) {
    if (d === '') continue;
    try {
      fs.accessSync(path.join(d, program), fs.constants.X_OK);
      return path.join(d, program);
    } catch {
      // not here
    }
  }
  return null;
}

/**
 * Runs `fn`, then `cleanup`, on every path: `fn` returning or throwing, and SIGINT/SIGTERM
 * (then cleanup runs, and the process exits 130). `cleanup` runs once.
 */
export async function withCleanup(fn: () => Promise<void>, cleanup: () => Promise<void>): Promise<void> {
  let cleaning: Promise<void> | null = null;
  const once = (): Promise<void> => (cleaning ??= cleanup());
  const onSignal = (sig: NodeJS.Signals): void => {
    if (cleaning === null) say(`${sig}: cleaning up before exiting`);
    void once().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  try {
    await fn();
  } finally {
    await once();
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }
}
