// A real daemon, killed with SIGKILL while fio (ioengine=nbd) writes to its export, again and
// again: after each restart CBT must resume its generation (no full copy) and report every
// 64 KiB block that differs from the image at the previous take. BLKFILTER_KILL_ROUNDS sets the
// rounds (3 in CI; 50 for the proof).
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const ROUNDS = Number(process.env.BLKFILTER_KILL_ROUNDS ?? 3);
const SIZE = 64 << 20;

function onPath(tool: string): boolean {
  return (process.env.PATH ?? '').split(path.delimiter).some((d) => fs.existsSync(path.join(d, tool)));
}
const fioNbd = onPath('fio') && spawnSync('fio', ['--enghelp=nbd'], { encoding: 'utf8' }).status === 0;
if (!fioNbd) console.warn('kill-under-fio.test: skipped: fio with ioengine=nbd is not installed (apt-get install fio)');

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-kill-'));
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function serve(img: string, control: string): Promise<{ p: ChildProcess; port: number }> {
  const p = spawn(process.execPath, [CLI, '--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', img], { stdio: ['ignore', 'ignore', 'pipe'] });
  return new Promise((resolve, reject) => {
    let log = '';
    let ready = false;
    p.stderr?.on('data', (b: Buffer) => {
      log += b.toString();
      if (!ready && log.includes('ready')) {
        ready = true;
        const port = (ctl(control, 'status') as { nbd: { port: number } }).nbd.port;
        resolve({ p, port });
      }
    });
    p.once('exit', (code) => reject(new Error(`serve exited ${code}: ${log}`)));
  });
}

function exited(p: ChildProcess): Promise<void> {
  if (p.exitCode !== null || p.signalCode !== null) return Promise.resolve();
  return new Promise((r) => p.once('exit', () => r()));
}

function ctl(control: string, ...args: string[]): unknown {
  const r = spawnSync(process.execPath, [CLI, '--control', control, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`blkfilter ${args.join(' ')}: ${r.stderr}`);
  return JSON.parse(r.stdout);
}

/** Takes a snapshot through the daemon (the CBT take) and returns the take number. */
function take(control: string): number {
  const id = (ctl(control, 'snapshot', 'create', 'disk', '--storage', 'memory') as { id: string }).id;
  ctl(control, 'snapshot', 'take', id);
  const r = spawnSync(process.execPath, [CLI, '--control', control, 'snapshot', 'destroy', id], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return (ctl(control, 'cbt', 'info', 'disk') as { snapNumber: number }).snapNumber;
}

describe('kill -9 of a serving daemon under fio', () => {
  it.skipIf(!fioNbd)(`resumes CBT and reports every changed block, ${ROUNDS} times`, async () => {
    const img = path.join(dir, 'disk.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, SIZE);
    const control = path.join(dir, 'ctl.sock');
    let { p, port } = await serve(img, control);
    const generationId = (ctl(control, 'cbt', 'info', 'disk') as { generationId: string }).generationId;
    let since = take(control);
    let backup = fs.readFileSync(img); // the image at take `since` (the take flushed it)
    for (let round = 0; round < ROUNDS; round++) {
      const fio = spawn(
        'fio',
        ['--name=w', '--ioengine=nbd', `--uri=nbd://127.0.0.1:${port}/disk`, '--rw=randwrite', '--bs=4k', '--iodepth=16', `--size=${SIZE}`, '--time_based', '--runtime=60', `--randseed=${round + 1}`],
        { stdio: 'ignore' },
      );
      // Kill once fio has changed the image (polling the file: no fixed sleep).
      for (;;) {
        await new Promise((r) => setTimeout(r, 20));
        if (!fs.readFileSync(img).equals(backup)) break;
      }
      p.kill('SIGKILL');
      await exited(p);
      fio.kill('SIGKILL');
      await exited(fio);
      ({ p, port } = await serve(img, control));
      const info = ctl(control, 'cbt', 'info', 'disk') as { generationId: string; generationReason: string; blockSize: number };
      expect(info.generationReason, `round ${round}`).toBe('resumed-after-crash');
      expect(info.generationId, `round ${round}`).toBe(generationId);
      const now = take(control);
      const map = (ctl(control, 'cbt', 'map', 'disk') as { map: number[] }).map;
      const current = fs.readFileSync(img);
      let changed = 0;
      for (let b = 0; b * info.blockSize < SIZE; b++) {
        const a = b * info.blockSize;
        if (current.subarray(a, a + info.blockSize).equals(backup.subarray(a, a + info.blockSize))) continue;
        changed++;
        expect(map[b] as number, `round ${round}: block ${b} changed after take ${since} but CBT says ${map[b]}`).toBeGreaterThan(since);
      }
      expect(changed, `round ${round}`).toBeGreaterThan(0);
      since = now;
      backup = current;
    }
    p.kill('SIGTERM');
    await exited(p);
  }, 120_000);
});
