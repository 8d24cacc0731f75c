// A backup point as a device, judged by qemu's tools: every point of a chain served with
// `serve --backup` equals its restored file (qemu-img compare, nbdcopy), its allocation depth
// equals qemu-nbd -A's over the same chain, and a live restore written to while it runs ends as
// the point plus exactly those writes.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, describe, expect, it } from 'vitest';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const TOOLS = ['qemu-img', 'qemu-io', 'qemu-nbd', 'nbdinfo', 'nbdcopy'];
const missing = TOOLS.filter((t) => !(process.env.PATH ?? '').split(path.delimiter).some((d) => fs.existsSync(path.join(d, t))));
if (missing.length > 0) console.warn(`serve-backup.test: skipped: ${missing.join(', ')} not installed (apt-get install qemu-utils libnbd-bin)`);

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-serve-backup-'));
const children: ChildProcess[] = [];
afterEach(async () => {
  for (const p of children.splice(0)) {
    if (p.exitCode === null && p.signalCode === null) {
      p.kill('SIGTERM');
      await new Promise((r) => p.once('exit', r));
    }
  }
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function daemon(args: string[]): Promise<ChildProcess> {
  const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'] });
  children.push(p);
  return new Promise((resolve, reject) => {
    let log = '';
    let ready = false;
    p.stderr?.on('data', (b: Buffer) => {
      log += b.toString();
      if (!ready && log.includes('ready')) {
        ready = true;
        resolve(p);
      }
    });
    p.once('exit', (code) => reject(new Error(`exited ${code}: ${log}`)));
  });
}

function ok(cmd: string, args: string[]): string {
  const r = spawnSync(cmd, args, { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.stderr}${r.stdout}`);
  return r.stdout;
}
const ctl = (control: string, ...args: string[]): unknown => JSON.parse(ok(process.execPath, [CLI, '--control', control, ...args, '--json']));
const port = (control: string): number => (ctl(control, 'status') as { nbd: { port: number } }).nbd.port;

describe.skipIf(missing.length > 0)('a backup point as a device', () => {
  it('serves every point of a full + 3 incremental chain exactly, with qemu-nbd -A allocation depth, and restores live under writes', async () => {
    // A chain of 4 points, each after its own writes (and a discard), backed up through CBT.
    const img = path.join(dir, 'vm.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 64 << 20);
    const control = path.join(dir, 'src.sock');
    const folder = path.join(dir, 'backups');
    const src = await daemon(['--control', control, 'serve', '--state-dir', path.join(dir, 'state'), '--cbt', '--listen', '127.0.0.1:0', '--name', 'vm', img]);
    const writes = [
      ['write -P 0x11 0 4M', 'write -P 0x12 32M 1M'],
      ['write -P 0x21 1M 256k'],
      ['write -P 0x31 40M 2M', 'discard 32M 512k'],
      ['write -P 0x41 60M 64k', 'write -P 0x42 0 64k'],
    ];
    for (const ops of writes) {
      ok('qemu-io', ['-f', 'raw', `nbd://127.0.0.1:${port(control)}/vm`, ...ops.flatMap((c) => ['-c', c])]);
      const id = (ctl(control, 'snapshot', 'create', 'vm', '--storage', 'memory') as { id: string }).id;
      ctl(control, 'snapshot', 'take', id);
      ctl(control, 'backup', id, '--to', folder);
      ok(process.execPath, [CLI, '--control', control, 'snapshot', 'destroy', id]);
    }
    src.kill('SIGTERM');
    await new Promise((r) => src.once('exit', r));
    const files = fs.readdirSync(folder).filter((f) => f.endsWith('.qcow2')).sort();
    expect(files).toHaveLength(4);

    for (let at = 1; at <= 4; at++) {
      const restored = path.join(dir, `at${at}.raw`);
      ok(process.execPath, [CLI, 'restore', folder, '--at', String(at), '--to', restored]);
      const c = path.join(dir, `serve${at}.sock`);
      const served = await daemon(['--control', c, 'serve', '--state-dir', path.join(dir, 'state'), '--backup', folder, '--at', String(at), '--listen', '127.0.0.1:0']);
      const uri = `nbd://127.0.0.1:${port(c)}/backup-${at}`;
      ok('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', restored, uri]);
      const copy = path.join(dir, `copy${at}.raw`);
      ok('nbdcopy', [uri, copy]);
      expect(fs.readFileSync(copy).equals(fs.readFileSync(restored)), `nbdcopy of point ${at}`).toBe(true);
      // Allocation depth as qemu-nbd -A reports it for the same chain (its top image).
      const ours = ok('nbdinfo', ['--map=qemu:allocation-depth', uri]);
      const qsock = path.join(dir, `qemu${at}.sock`);
      const q = spawn('qemu-nbd', ['-r', '-A', '-f', 'qcow2', '-k', qsock, '-x', 'p', path.join(folder, files[at - 1] as string)], { stdio: 'ignore' });
      children.push(q);
      for (let i = 0; i < 400 && !fs.existsSync(qsock); i++) await new Promise((r) => setTimeout(r, 10));
      const theirs = ok('nbdinfo', ['--map=qemu:allocation-depth', `nbd+unix:///p?socket=${qsock}`]);
      expect(ours, `allocation depth of point ${at}`).toBe(theirs);
      // Holes where no image of the chain has data.
      expect(ok('nbdinfo', ['--map', uri])).toMatch(/hole,zero/);
      served.kill('SIGTERM');
      await new Promise((r) => served.once('exit', r));
      q.kill('SIGTERM');
    }

    // Live restore of point 2: usable at once; writes made during it survive the background copy.
    const live = path.join(dir, 'live.raw');
    const lc = path.join(dir, 'live.sock');
    const restoring = await daemon(['--control', lc, 'restore', folder, '--at', '2', '--to', live, '--live', '--listen', '127.0.0.1:0', '--state-dir', path.join(dir, 'state')]);
    const luri = `nbd://127.0.0.1:${port(lc)}/live`;
    ok('qemu-io', ['-f', 'raw', luri, '-c', 'write -P 0x99 2M 128k', '-c', 'write -P 0x98 48M 4k', '-c', 'read -P 0x21 1M 256k']);
    for (let i = 0; i < 2000; i++) {
      const s = ctl(lc, 'status') as { served?: Array<{ state: string }> };
      if (s.served?.[0]?.state === 'restored') break;
      await new Promise((r) => setTimeout(r, 25));
    }
    expect((ctl(lc, 'status') as { served: Array<{ state: string }> }).served[0]?.state).toBe('restored');
    restoring.kill('SIGTERM');
    await new Promise((r) => restoring.once('exit', r));
    const expected = fs.readFileSync(path.join(dir, 'at2.raw'));
    expected.fill(0x99, 2 << 20, (2 << 20) + (128 << 10));
    expected.fill(0x98, 48 << 20, (48 << 20) + 4096);
    expect(fs.readFileSync(live).equals(expected)).toBe(true);
  }, 180_000);
});
