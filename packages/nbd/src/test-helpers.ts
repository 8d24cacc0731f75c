// Shared by the tests only (not an entry point, not exported). The protocol doubles (RawNbdClient,
// FakeSocket) are published in testing.ts; re-exported here under the names the tests use.
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';

/** Result of {@link run}. */
export interface RunResult {
  readonly code: number | null;
  readonly signal: string | null;
  readonly stdout: string;
  readonly stderr: string;
}

/** Runs a program without blocking the event loop (an in-process server must keep serving). */
export function run(cmd: string, args: readonly string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv; cwd?: string; stop?: AbortSignal } = {}): Promise<RunResult> {
  return new Promise((resolve, reject) => {
    const child = spawn(cmd, args, { env: options.env ?? process.env, cwd: options.cwd, stdio: ['ignore', 'pipe', 'pipe'] });
    // Asked to stop (SIGINT): fio, for one, then ends its jobs and still prints its results.
    options.stop?.addEventListener('abort', () => child.kill('SIGINT'), { once: true });
    const out: Buffer[] = [];
    const err: Buffer[] = [];
    child.stdout.on('data', (d: Buffer) => out.push(d));
    child.stderr.on('data', (d: Buffer) => err.push(d));
    const timer = setTimeout(() => child.kill('SIGKILL'), options.timeoutMs ?? 20_000);
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout: Buffer.concat(out).toString(), stderr: Buffer.concat(err).toString() });
    });
  });
}

/** Like {@link run} but throws with the output when the exit code is not 0. */
export async function runOk(cmd: string, args: readonly string[], options: { timeoutMs?: number; env?: NodeJS.ProcessEnv } = {}): Promise<RunResult> {
  const r = await run(cmd, args, options);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')} exited ${r.code} (${r.signal ?? ''})\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** True when `name` is an executable on PATH. */
export function hasTool(name: string): boolean {
  for (const dir of (process.env.PATH ?? '').split(path.delimiter)) {
    try {
      fs.accessSync(path.join(dir, name), fs.constants.X_OK);
      return true;
    } catch {
      // not here
    }
  }
  return false;
}

/** Names of missing tools among `names`, and a warning printed once per test file. */
export function missingTools(...names: string[]): string[] {
  const missing = names.filter((n) => !hasTool(n));
  if (missing.length > 0) console.warn(`[nbd tests] skipping tests that need ${missing.join(', ')}: not installed (apt-get install qemu-utils libnbd-bin nbdkit fio)`);
  return missing;
}

/** A fresh temporary directory under the OS tmpdir. */
export function tmpDir(prefix: string): string {
  return fs.mkdtempSync(path.join(os.tmpdir(), `blkfilter-nbd-${prefix}-`));
}

export { FakeSocket, RawNbdClient as RawNbd, u32, type RawReply } from './testing.js';

/**
 * Waits until a unix socket at `p` accepts connections. nbdkit and qemu-nbd create the file at
 * bind(), a moment before listen(): a client that only waits for the file can be refused.
 */
export async function waitForListener(p: string, timeoutMs = 10_000): Promise<void> {
  const { default: net } = await import('node:net');
  const until = Date.now() + timeoutMs;
  for (;;) {
    if (fs.existsSync(p)) {
      const ok = await new Promise<boolean>((resolve) => {
        const c = net.connect({ path: p }, () => {
          c.destroy();
          resolve(true);
        });
        c.on('error', () => resolve(false));
      });
      if (ok) return;
    }
    if (Date.now() > until) throw new Error(`nothing listens on ${p} after ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}
