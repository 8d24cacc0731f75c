import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';

// Running system tools for `connect`, `disconnect` and `--freeze`. Always asynchronous: the
// tools often do I/O that ends in this very process (losetup opens a FUSE file that nbdfuse
// serves from our NBD server), so a spawnSync here would deadlock the daemon.

/** What a finished command left. */
export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs `cmd args` to completion, capturing its output; kills it (SIGKILL) after `timeoutMs`. */
export type Runner = (cmd: string, args: readonly string[], options?: { timeoutMs?: number }) => Promise<RunResult>;

/** The real {@link Runner}: `child_process.spawn`, no shell. A missing program gives code 127. */
export const run: Runner = (cmd, args, options = {}) =>
  new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
    child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
    const timer = options.timeoutMs === undefined ? null : setTimeout(() => child.kill('SIGKILL'), options.timeoutMs);
    child.on('error', (err: NodeJS.ErrnoException) => {
      if (timer !== null) clearTimeout(timer);
      resolve({ code: err.code === 'ENOENT' ? 127 : 126, signal: null, stdout, stderr: stderr + err.message });
    });
    child.on('close', (code, signal) => {
      if (timer !== null) clearTimeout(timer);
      resolve({ code, signal, stdout, stderr });
    });
  });

/** The path of `program` on `$PATH` (plus the sbin folders, which a non-login root shell may lack), or null. */
export function which(program: string): string | null {
  const dirs = [...(process.env.PATH ?? '').split(':'), '/usr/local/sbin', '/usr/sbin', '/sbin', '/usr/bin', '/bin'];
  for (const d of dirs) {
    if (d === '') continue;
    const p = path.join(d, program);
    try {
      fs.accessSync(p, fs.constants.X_OK);
      return p;
    } catch {
      // not here
    }
  }
  return null;
}

/** One line of /proc/self/mountinfo, the fields we use. */
export interface MountEntry {
  /** `major:minor` of the filesystem's device. */
  readonly dev: string;
  readonly mountPoint: string;
  readonly fsType: string;
  readonly source: string;
}

function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(parseInt(o, 8)));
}

/** The mount table of this process's namespace. */
export function readMounts(): MountEntry[] {
  const out: MountEntry[] = [];
  for (const line of fs.readFileSync('/proc/self/mountinfo', 'utf8').split('\n')) {
    if (line === '') continue;
    const f = line.split(' ');
    const sep = f.indexOf('-');
    if (sep < 0 || f.length < sep + 3) continue;
    out.push({ dev: f[2] ?? '', mountPoint: unescapeMount(f[4] ?? ''), fsType: f[sep + 1] ?? '', source: unescapeMount(f[sep + 2] ?? '') });
  }
  return out;
}

/** True when `dir` is a mount point (its own entry in the mount table). */
export function isMountPoint(dir: string): boolean {
  const real = (() => {
    try {
      return fs.realpathSync(dir);
    } catch {
      return path.resolve(dir);
    }
  })();
  return readMounts().some((m) => m.mountPoint === real);
}

/** True when `pid` is a live process (a zombie answers kill(0) but serves nothing). */
export function pidAlive(pid: number | null): boolean {
  if (pid === null) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  try {
    return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
  } catch {
    return false;
  }
}
