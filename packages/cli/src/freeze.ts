import { spawn } from 'node:child_process';
import fs from 'node:fs';
import { BlkError } from '@blkfilter/bio';
import { isMountPoint, run, which, type Runner } from './sys.js';

// `snapshot take --freeze`: freeze filesystems (fsfreeze -f), take, thaw (fsfreeze -u), with
// pre-freeze / post-thaw hooks as blksnap's and Veeam's. A filesystem left frozen blocks every
// writer on the machine, so thawing is guarded three times over:
//   1. try/finally around the take: an error thaws;
//   2. a timeout: a take that hangs is abandoned, and the filesystems thawed, after timeoutMs;
//   3. a watchdog process (`sleep; fsfreeze -u`), started before the first freeze and ended
//      after the last thaw: when this process dies (SIGKILL, OOM), the watchdog thaws.
// SIGINT/SIGTERM/SIGHUP that arrive while frozen are held until the thaw, then re-raised.

/** Freezing, the hooks, or thawing failed. `code`: ETIMEDOUT for a take that outran the freeze timeout. */
export class FreezeError extends BlkError {}

/** Options of {@link withFrozenFilesystems}. */
export interface FreezeOptions {
  /** Mount points to freeze, in this order (thawed in reverse). */
  readonly mountpoints: readonly string[];
  /** The longest the filesystems may stay frozen: then they are thawed and the call fails (default 10 s). */
  readonly timeoutMs?: number;
  /** Shell commands run before freezing (an application flushes): any failure aborts, nothing frozen. */
  readonly pre?: readonly string[];
  /** Shell commands run after thawing, on every path (also after a failed take or pre hook). */
  readonly post?: readonly string[];
  /** Bound on each hook (default 60 s). */
  readonly hookTimeoutMs?: number;
  /** Start the watchdog process (default true; tests with a fake runner turn it off). */
  readonly watchdog?: boolean;
  /** For tests: runs fsfreeze and the hooks. */
  readonly runner?: Runner;
  readonly log?: (line: string) => void;
}

/** What {@link withFrozenFilesystems} returns. */
export interface FrozenResult<T> {
  readonly result: T;
  /** From the first freeze done to the last thaw done. */
  readonly frozenMs: number;
}

function tail(s: string): string {
  const t = s.trim().split('\n').slice(-3).join(' / ');
  return t === '' ? '' : `: ${t}`;
}

async function runHooks(kind: 'pre' | 'post', hooks: readonly string[], exec: Runner, timeoutMs: number, mountpoints: readonly string[]): Promise<void> {
  for (const cmd of hooks) {
    const r = await exec('sh', ['-c', cmd, 'blkfilter-hook', ...mountpoints], { timeoutMs });
    if (r.code !== 0) throw new FreezeError('EIO', `--${kind} hook \`${cmd}\` ${r.code === null ? `was killed (${r.signal ?? 'timeout'}) after ${timeoutMs} ms` : `exited ${r.code}`}${tail(r.stderr)}`);
  }
}

function startWatchdog(mountpoints: readonly string[], afterMs: number): number | null {
  const fsfreeze = which('fsfreeze') ?? 'fsfreeze';
  const secs = Math.ceil(afterMs / 1000) + 2;
  try {
    const child = spawn('sh', ['-c', `sleep ${secs}; for m in "$@"; do ${fsfreeze} -u "$m" 2>/dev/null; done`, 'blkfilter-thaw-watchdog', ...mountpoints], { detached: true, stdio: 'ignore' });
    child.on('error', () => {});
    child.unref();
    return child.pid ?? null;
  } catch {
    return null;
  }
}

function stopWatchdog(pid: number | null): void {
  if (pid === null) return;
  try {
    process.kill(-pid, 'SIGKILL'); // its own process group: sh and its sleep
  } catch {
    // already gone
  }
}

/**
 * Runs `pre` hooks, freezes `mountpoints`, calls `fn` (the take), thaws, runs `post` hooks.
 * The filesystems are thawed on every path: `fn` failing, `fn` outrunning `timeoutMs` (then
 * FreezeError ETIMEDOUT, and `fn` is left to finish on its own), a freeze failing half-way, a
 * signal. Needs root (fsfreeze). Returns `fn`'s result and how long the filesystems were frozen.
 */
export async function withFrozenFilesystems<T>(fn: () => Promise<T>, options: FreezeOptions): Promise<FrozenResult<T>> {
  const exec = options.runner ?? run;
  const log = options.log ?? (() => {});
  const timeoutMs = options.timeoutMs ?? 10_000;
  const hookTimeoutMs = options.hookTimeoutMs ?? 60_000;
  const mps: string[] = [];
  for (const m of options.mountpoints) {
    let real: string;
    try {
      real = fs.realpathSync(m);
    } catch {
      throw new FreezeError('ENOENT', `--freeze ${m}: no such folder`);
    }
    if (options.runner === undefined && !isMountPoint(real)) throw new FreezeError('EINVAL', `--freeze ${m}: not a mount point (give the folder a filesystem is mounted on, e.g. /mnt/data)`);
    if (mps.includes(real)) throw new FreezeError('EINVAL', `--freeze ${m}: given twice`);
    mps.push(real);
  }
  if (options.runner === undefined && mps.length > 0 && which('fsfreeze') === null) throw new FreezeError('ENOENT', 'fsfreeze is not installed: install Debian\'s package util-linux');

  let result: { value: T } | null = null;
  let failure: unknown = null;
  let frozenMs = 0;
  try {
    await runHooks('pre', options.pre ?? [], exec, hookTimeoutMs, mps);
    const frozen: string[] = [];
    const held: NodeJS.Signals[] = [];
    const hold = (sig: NodeJS.Signals): void => {
      held.push(sig);
      log(`${sig} while frozen: thawing first`);
    };
    const signals: NodeJS.Signals[] = ['SIGINT', 'SIGTERM', 'SIGHUP'];
    for (const s of signals) process.on(s, hold);
    const watchdog = options.watchdog === false || mps.length === 0 ? null : startWatchdog(mps, timeoutMs);
    let frozenAt = 0;
    let thawFailed = false;
    try {
      for (const m of mps) {
        const r = await exec('fsfreeze', ['-f', m], { timeoutMs });
        if (r.code !== 0) throw new FreezeError('EIO', `fsfreeze -f ${m} failed${tail(r.stderr)}`);
        if (frozen.length === 0) frozenAt = performance.now();
        frozen.push(m);
      }
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new FreezeError('ETIMEDOUT', `the take did not finish within ${timeoutMs} ms while ${mps.join(', ')} ${mps.length === 1 ? 'was' : 'were'} frozen: thawed; if the snapshot still completes it is not consistent, destroy it`)),
          timeoutMs,
        );
      });
      try {
        result = { value: await Promise.race([fn(), timeout]) };
      } finally {
        clearTimeout(timer);
      }
    } finally {
      const errors: string[] = [];
      for (const m of frozen.reverse()) {
        let ok = false;
        let last = '';
        for (let attempt = 0; attempt < 3 && !ok; attempt++) {
          const r = await exec('fsfreeze', ['-u', m], { timeoutMs: 10_000 });
          // EINVAL: not frozen (any more): thawed is what we want.
          ok = r.code === 0 || /invalid argument/i.test(r.stderr);
          last = r.stderr;
        }
        if (!ok) errors.push(`fsfreeze -u ${m} failed${tail(last)}`);
      }
      if (frozenAt > 0) frozenMs = performance.now() - frozenAt;
      for (const s of signals) process.off(s, hold);
      if (errors.length > 0) {
        thawFailed = true;
        // The watchdog stays: it is the last chance to thaw.
        log(`THAW FAILED: ${errors.join('; ')}; the watchdog retries in ${Math.ceil(timeoutMs / 1000) + 2} s, else run fsfreeze -u yourself`);
      } else stopWatchdog(watchdog);
      if (held.length > 0) setImmediate(() => process.kill(process.pid, held[0]));
    }
    if (thawFailed) throw new FreezeError('EIO', `could not thaw ${mps.join(', ')}: run \`fsfreeze -u MOUNTPOINT\` now`);
  } catch (err) {
    failure = err;
  }
  // Post hooks run on every path, as Veeam's post-thaw script: a pre hook that failed half-way
  // may have paused the application all the same.
  try {
    await runHooks('post', options.post ?? [], exec, hookTimeoutMs, mps);
  } catch (err) {
    failure ??= err;
  }
  if (failure !== null) throw failure;
  if (result === null) throw new FreezeError('EIO', 'internal: no result');
  return { result: result.value, frozenMs };
}
