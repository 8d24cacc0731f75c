import { spawn } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { FreezeError, withFrozenFilesystems } from './freeze.js';
import { cleanupUnder, exited, must, until } from './kernel-fixture.js';
import { run, which, type Runner } from './sys.js';

// Every path that freezes must thaw: a filesystem left frozen blocks the machine's writers.

function fakeRunner(fail: Partial<Record<string, string>> = {}): { runner: Runner; calls: string[] } {
  const calls: string[] = [];
  const runner: Runner = (cmd, args) => {
    const line = cmd === 'sh' ? `hook ${args[1] ?? ''}` : `${cmd} ${args.join(' ')}`;
    calls.push(line);
    const err = fail[line];
    return Promise.resolve(err === undefined ? { code: 0, signal: null, stdout: '', stderr: '' } : { code: 1, signal: null, stdout: '', stderr: err });
  };
  return { runner, calls };
}

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-freeze-'));
const a = fs.mkdtempSync(path.join(tmp, 'a'));
const b = fs.mkdtempSync(path.join(tmp, 'b'));

describe('withFrozenFilesystems (tools faked)', () => {
  it('runs pre, freezes in order, takes, thaws in reverse, runs post', async () => {
    const { runner, calls } = fakeRunner();
    const r = await withFrozenFilesystems(async () => 42, { mountpoints: [a, b], pre: ['flush'], post: ['resume'], runner, watchdog: false });
    expect(r.result).toBe(42);
    expect(calls).toEqual(['hook flush', `fsfreeze -f ${a}`, `fsfreeze -f ${b}`, `fsfreeze -u ${b}`, `fsfreeze -u ${a}`, 'hook resume']);
  });

  it('thaws every frozen filesystem and runs post when the take fails', async () => {
    const { runner, calls } = fakeRunner();
    await expect(withFrozenFilesystems(() => Promise.reject(new Error('take failed')), { mountpoints: [a, b], post: ['resume'], runner, watchdog: false })).rejects.toThrow('take failed');
    expect(calls).toEqual([`fsfreeze -f ${a}`, `fsfreeze -f ${b}`, `fsfreeze -u ${b}`, `fsfreeze -u ${a}`, 'hook resume']);
  });

  it('thaws after the timeout when the take hangs, and says so', async () => {
    const { runner, calls } = fakeRunner();
    const err = await withFrozenFilesystems(() => new Promise<never>(() => {}), { mountpoints: [a], timeoutMs: 50, runner, watchdog: false }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(FreezeError);
    expect((err as FreezeError).code).toBe('ETIMEDOUT');
    expect((err as Error).message).toMatch(/did not finish within 50 ms .* thawed/);
    expect(calls).toEqual([`fsfreeze -f ${a}`, `fsfreeze -u ${a}`]);
  });

  it('thaws the first when freezing the second fails, and never takes', async () => {
    const { runner, calls } = fakeRunner({ [`fsfreeze -f ${b}`]: 'fsfreeze: Operation not supported' });
    let took = false;
    await expect(withFrozenFilesystems(async () => (took = true), { mountpoints: [a, b], runner, watchdog: false })).rejects.toThrow(/fsfreeze -f .*b.* failed: fsfreeze: Operation not supported/);
    expect(took).toBe(false);
    expect(calls).toEqual([`fsfreeze -f ${a}`, `fsfreeze -f ${b}`, `fsfreeze -u ${a}`]);
  });

  it('freezes nothing when a pre hook fails, and still runs post', async () => {
    const { runner, calls } = fakeRunner({ 'hook flush': 'db down' });
    await expect(withFrozenFilesystems(async () => 1, { mountpoints: [a], pre: ['flush'], post: ['resume'], runner, watchdog: false })).rejects.toThrow(/--pre hook `flush` exited 1: db down/);
    expect(calls).toEqual(['hook flush', 'hook resume']);
  });

  it('retries a thaw that fails, and reports one that never works', async () => {
    const calls: string[] = [];
    const runner: Runner = (cmd, args) => {
      calls.push(`${cmd} ${args.join(' ')}`);
      const thaw = args[0] === '-u';
      return Promise.resolve(thaw ? { code: 1, signal: null, stdout: '', stderr: 'fsfreeze: Input/output error' } : { code: 0, signal: null, stdout: '', stderr: '' });
    };
    await expect(withFrozenFilesystems(async () => 1, { mountpoints: [a], runner, watchdog: false })).rejects.toThrow(/could not thaw/);
    expect(calls.filter((c) => c.startsWith('fsfreeze -u'))).toHaveLength(3);
  });

  it('refuses a folder that is not a mount point before freezing anything', async () => {
    await expect(withFrozenFilesystems(async () => 1, { mountpoints: [a] })).rejects.toThrow(/not a mount point/);
  });
});

// Real fsfreeze on an ext4 on a loop device over a plain file (no blkfilter needed).
const real = process.getuid?.() === 0 && fs.existsSync('/dev/loop-control') && which('fsfreeze') !== null && which('mkfs.ext4') !== null;
if (!real) console.warn('freeze.test.ts: real fsfreeze tests skipped: they need root, /dev/loop-control, fsfreeze and mkfs.ext4');

afterAll(async () => {
  if (real) await cleanupUnder(tmp);
  fs.rmSync(tmp, { recursive: true, force: true });
});

/** Resolves true when a write to `mnt` completes within `ms` (a frozen filesystem blocks it). */
async function writeCompletes(mnt: string, ms: number): Promise<boolean> {
  const p = spawn('sh', ['-c', `echo x > "${mnt}/probe-$$"`], { stdio: 'ignore' });
  return until(() => p.exitCode !== null, ms);
}

describe.skipIf(!real)('withFrozenFilesystems on a real ext4', () => {
  const mnt = path.join(tmp, 'mnt');
  const setup = async (): Promise<void> => {
    if (fs.existsSync(mnt)) return;
    const file = path.join(tmp, 'fs.img');
    fs.writeFileSync(file, '');
    fs.truncateSync(file, 64 << 20);
    await must('mkfs.ext4', ['-q', '-F', file]);
    fs.mkdirSync(mnt);
    await must('mount', ['-o', 'loop', file, mnt]);
  };

  it('the filesystem is frozen during the take and thawed after a failing take', async () => {
    await setup();
    await expect(
      withFrozenFilesystems(async () => {
        // A second freeze of a frozen filesystem is refused (EBUSY): proof it is frozen now.
        const again = await run('fsfreeze', ['-f', mnt]);
        expect(again.code).not.toBe(0);
        expect(again.stderr).toMatch(/busy/i);
        throw new Error('planted take failure');
      }, { mountpoints: [mnt] }),
    ).rejects.toThrow('planted take failure');
    expect(await writeCompletes(mnt, 30_000)).toBe(true);
  });

  it('the watchdog thaws when the process that froze is killed (SIGKILL) while frozen', async () => {
    await setup();
    const entry = path.join(path.dirname(new URL(import.meta.url).pathname), '..', 'dist', 'index.js');
    const script = `import { withFrozenFilesystems } from ${JSON.stringify(entry)};
      await withFrozenFilesystems(() => { process.stdout.write('frozen\\n'); return new Promise(() => {}); }, { mountpoints: [${JSON.stringify(mnt)}], timeoutMs: 1000 });`;
    const child = spawn(process.execPath, ['--input-type=module', '-e', script], { stdio: ['ignore', 'pipe', 'inherit'] });
    let out = '';
    child.stdout?.on('data', (d: Buffer) => (out += d.toString()));
    expect(await until(() => out.includes('frozen'), 30_000)).toBe(true);
    child.kill('SIGKILL');
    await exited(child);
    // Nobody thaws but the watchdog (timeout 1 s + 2 s): the write then completes.
    expect(await writeCompletes(mnt, 30_000)).toBe(true);
  }, 60_000);
});
