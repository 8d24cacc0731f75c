// The daemon as a service: one daemon per image and per control socket (locks, with the holder
// named), state that survives restarts of any source kind, a run folder cleaned after kill -9,
// systemd socket activation, a pidfile and JSON logs, and bad input to `serve` said plainly.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, afterEach, describe, expect, it } from 'vitest';

const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-service-'));
const children: ChildProcess[] = [];
afterEach(async () => {
  for (const p of children.splice(0)) {
    if (p.exitCode === null && p.signalCode === null) {
      p.kill('SIGKILL');
      await new Promise((r) => p.once('exit', r));
    }
  }
});
afterAll(() => fs.rmSync(dir, { recursive: true, force: true }));

function onPath(tool: string): boolean {
  return (process.env.PATH ?? '').split(path.delimiter).some((d) => fs.existsSync(path.join(d, tool)));
}

let n = 0;
function image(size = 16 << 20): string {
  const img = path.join(dir, `img${n++}.raw`);
  fs.writeFileSync(img, '');
  fs.truncateSync(img, size);
  return img;
}

/** Starts `blkfilter serve`; resolves once ready, or rejects with its stderr when it exits first. */
function serve(args: string[], env: NodeJS.ProcessEnv = process.env): Promise<{ p: ChildProcess; log: () => string }> {
  const p = spawn(process.execPath, [CLI, ...args], { stdio: ['ignore', 'ignore', 'pipe'], env });
  children.push(p);
  let log = '';
  return new Promise((resolve, reject) => {
    p.stderr?.on('data', (b: Buffer) => {
      log += b.toString();
      if (log.includes('ready')) resolve({ p, log: () => log });
    });
    p.once('exit', (code, signal) => reject(Object.assign(new Error(log), { code, signal })));
  });
}

function ctl(control: string, ...args: string[]): unknown {
  const r = spawnSync(process.execPath, [CLI, '--control', control, ...args, '--json'], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(r.stderr);
  return JSON.parse(r.stdout);
}

function stop(p: ChildProcess): Promise<number | null> {
  p.kill('SIGTERM');
  return new Promise((r) => p.once('exit', (code) => r(code)));
}

describe('one daemon per image and per control socket', () => {
  it('refuses a second daemon on the same image, naming the first; the first goes on untouched', async () => {
    const img = image();
    const state = path.join(dir, 'state-a');
    const a = path.join(dir, 'a.sock');
    const first = await serve(['--control', a, 'serve', '--state-dir', state, '--cbt', '--listen', '127.0.0.1:0', '--name', 'vm', img]);
    const g = (ctl(a, 'cbt', 'info', 'vm') as { generationId: string }).generationId;
    const second = serve(['--control', path.join(dir, 'b.sock'), 'serve', '--state-dir', state, '--cbt', '--listen', '127.0.0.1:0', img]);
    await expect(second).rejects.toThrow(new RegExp(`image "${img.replace(/[.]/g, '\\.')}" is in use by another blkfilter \\(pid ${first.p.pid}, control socket ${a.replace(/[.]/g, '\\.')}\\)`));
    await expect(second).rejects.toMatchObject({ code: 1 });
    // Another state dir is no way around it: the lock is on the image itself.
    await expect(serve(['--control', path.join(dir, 'c.sock'), 'serve', '--state-dir', path.join(dir, 'state-other'), '--listen', '127.0.0.1:0', img])).rejects.toThrow(/is in use by another blkfilter/);
    const info = ctl(a, 'cbt', 'info', 'vm') as { generationId: string; generationReason: string };
    expect(info.generationId).toBe(g);
    expect(await stop(first.p)).toBe(0);
    // Released at exit: a new daemon may serve it, and resumes the generation.
    const again = await serve(['--control', a, 'serve', '--state-dir', state, '--cbt', '--listen', '127.0.0.1:0', '--name', 'vm', img]);
    expect(ctl(a, 'cbt', 'info', 'vm')).toMatchObject({ generationId: g, generationReason: 'resumed' });
    await stop(again.p);
  });

  it.skipIf(!onPath('qemu-img') || !onPath('qemu-nbd'))('makes qemu-img and qemu-nbd refuse an image it serves', async () => {
    const img = image();
    const c = path.join(dir, 'q.sock');
    const d = await serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-q'), '--listen', '127.0.0.1:0', img]);
    const convert = spawnSync('qemu-img', ['convert', '-O', 'raw', img, path.join(dir, 'copy.raw')], { encoding: 'utf8' });
    expect(convert.status).not.toBe(0);
    expect(convert.stderr).toMatch(/Failed to get shared "write" lock/);
    const io = spawnSync('qemu-io', ['-f', 'raw', '-c', 'write 0 4k', img], { encoding: 'utf8' });
    expect(io.status).not.toBe(0);
    expect(`${io.stdout}${io.stderr}`).toMatch(/Failed to get "write" lock/);
    await stop(d.p);
    expect(spawnSync('qemu-img', ['convert', '-O', 'raw', img, path.join(dir, 'copy.raw')]).status).toBe(0);
  });

  it('refuses a second daemon on the same control socket, and never removes the socket of one that answers', async () => {
    const c = path.join(dir, 'shared.sock');
    const first = await serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-c1'), '--listen', '127.0.0.1:0', image()]);
    const second = serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-c2'), '--listen', '127.0.0.1:0', image()]);
    await expect(second).rejects.toThrow(new RegExp(`another blkfilter daemon \\(pid ${first.p.pid}.*uses the control socket`));
    expect(fs.existsSync(c)).toBe(true);
    expect((ctl(c, 'status') as { devices: unknown[] }).devices).toHaveLength(1);
    await stop(first.p);
    expect(fs.existsSync(c)).toBe(false);
  });

  it('takes over the control socket of a daemon killed with -9 (nobody answers on it)', async () => {
    const c = path.join(dir, 'stale.sock');
    const first = await serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-s'), '--listen', '127.0.0.1:0', image()]);
    first.p.kill('SIGKILL');
    await new Promise((r) => first.p.once('exit', r));
    expect(fs.existsSync(c)).toBe(true); // left behind by the kill
    const second = await serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-s'), '--listen', '127.0.0.1:0', image()]);
    expect((ctl(c, 'status') as { devices: unknown[] }).devices).toHaveLength(1);
    await stop(second.p);
  });
});

describe('state that outlives the daemon', () => {
  it.skipIf(!onPath('nbdkit'))('resumes the CBT generation of an nbd:// source across a restart', async () => {
    const sock = path.join(dir, 'kit.sock');
    const kit = spawn('nbdkit', ['-f', '-U', sock, 'memory', '64M'], { stdio: 'ignore' });
    children.push(kit);
    for (let i = 0; i < 200 && !fs.existsSync(sock); i++) await new Promise((r) => setTimeout(r, 25));
    const c = path.join(dir, 'nbd.sock');
    const args = ['--control', c, 'serve', '--state-dir', path.join(dir, 'state-nbd'), '--cbt', '--listen', '127.0.0.1:0', '--name', 'remote', `nbd+unix:///?socket=${sock}`];
    const first = await serve(args);
    const before = ctl(c, 'cbt', 'info', 'remote') as { generationId: string };
    expect(await stop(first.p)).toBe(0);
    const second = await serve(args);
    expect(ctl(c, 'cbt', 'info', 'remote')).toMatchObject({ generationId: before.generationId, generationReason: 'resumed' });
    // And after kill -9 too: crash-safe CBT replays its journal.
    second.p.kill('SIGKILL');
    await new Promise((r) => second.p.once('exit', r));
    const third = await serve(args);
    expect(ctl(c, 'cbt', 'info', 'remote')).toMatchObject({ generationId: before.generationId, generationReason: 'resumed-after-crash' });
    await stop(third.p);
  });

  it('removes the diff storage of a daemon killed with -9 at the next start, and its own at exit', async () => {
    const state = path.join(dir, 'state-run');
    const c = path.join(dir, 'run.sock');
    const img = image();
    const first = await serve(['--control', c, 'serve', '--state-dir', state, '--listen', '127.0.0.1:0', '--name', 'r', img]);
    const id = (ctl(c, 'snapshot', 'create', 'r', '--limit', '64M') as { id: string }).id;
    ctl(c, 'snapshot', 'take', id);
    const runDir = path.join(state, 'run', String(first.p.pid));
    expect(fs.readdirSync(path.join(runDir, 'diff')).some((f) => f.endsWith('.diff'))).toBe(true);
    first.p.kill('SIGKILL');
    await new Promise((r) => first.p.once('exit', r));
    expect(fs.existsSync(runDir)).toBe(true);
    const second = await serve(['--control', c, 'serve', '--state-dir', state, '--listen', '127.0.0.1:0', '--name', 'r', img]);
    expect(fs.existsSync(runDir)).toBe(false);
    expect(second.log()).toMatch(/removed the run folder of a daemon that died/);
    const ownRun = path.join(state, 'run', String(second.p.pid));
    expect(fs.existsSync(ownRun)).toBe(true);
    await stop(second.p);
    expect(fs.existsSync(ownRun)).toBe(false);
  });
});

describe('a service', () => {
  it.skipIf(!onPath('systemd-socket-activate') || !onPath('nbdinfo'))('serves a socket systemd hands it (LISTEN_FDS), and nbdinfo reads through it', async () => {
    const img = image(8 << 20);
    const c = path.join(dir, 'act.sock');
    const port = 20000 + (process.pid % 20000);
    const p = spawn('systemd-socket-activate', ['-l', `127.0.0.1:${port}`, process.execPath, CLI, '--control', c, 'serve', '--state-dir', path.join(dir, 'state-act'), '--name', 'act', img], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(p);
    for (let i = 0; i < 200 && !fs.existsSync(c); i++) {
      // systemd-socket-activate starts the daemon at the first connection: make one.
      spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/act`], { timeout: 5000 });
      await new Promise((r) => setTimeout(r, 25));
    }
    const r = spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${port}/act`], { encoding: 'utf8' });
    expect(r.stdout.trim()).toBe(String(8 << 20));
    expect((ctl(c, 'status') as { nbd: { kind: string } }).nbd.kind).toBe('fd');
  });

  it('writes a pidfile and JSON log lines, and removes the pidfile at exit', async () => {
    const pidfile = path.join(dir, 'serve.pid');
    const logFile = path.join(dir, 'serve.log');
    const c = path.join(dir, 'pid.sock');
    const p = spawn(process.execPath, [CLI, '--control', c, 'serve', '--state-dir', path.join(dir, 'state-pid'), '--listen', '127.0.0.1:0', '--log-format', 'json', '--log-file', logFile, '--pidfile', pidfile, image()], { stdio: 'ignore' });
    children.push(p);
    for (let i = 0; i < 400 && !fs.existsSync(pidfile); i++) await new Promise((r) => setTimeout(r, 25));
    expect(fs.readFileSync(pidfile, 'utf8').trim()).toBe(String(p.pid));
    const lines = fs.readFileSync(logFile, 'utf8').trim().split('\n').map((l) => JSON.parse(l) as { level: string; msg: string; time: string });
    expect(lines.some((l) => l.msg === 'ready' && l.level === 'info')).toBe(true);
    // SIGHUP reopens the log: a rotated file is let go and a new one started.
    fs.renameSync(logFile, `${logFile}.1`);
    p.kill('SIGHUP');
    for (let i = 0; i < 400 && !fs.existsSync(logFile); i++) await new Promise((r) => setTimeout(r, 25));
    expect(fs.readFileSync(logFile, 'utf8')).toMatch(/SIGHUP: log reopened/);
    expect(await stop(p)).toBe(0);
    expect(fs.existsSync(pidfile)).toBe(false);
  });
});

describe('bad input to serve', () => {
  const run = (...args: string[]) => spawnSync(process.execPath, [CLI, '--control', path.join(dir, 'bad.sock'), 'serve', '--state-dir', path.join(dir, 'state-bad'), ...args], { encoding: 'utf8' });

  it('says how to create a missing image, and --create makes a sparse one', async () => {
    const missing = path.join(dir, 'new.raw');
    const r = run('--listen', '127.0.0.1:0', missing);
    expect(r.status).toBe(1);
    expect(r.stderr).toMatch(/no image at .*new\.raw: create one with `blkfilter serve --create SIZE/);
    const d = await serve(['--control', path.join(dir, 'create.sock'), 'serve', '--state-dir', path.join(dir, 'state-create'), '--listen', '127.0.0.1:0', '--create', '1G', missing]);
    expect(fs.statSync(missing).size).toBe(1 << 30);
    expect(fs.statSync(missing).blocks).toBeLessThan(64);
    await stop(d.p);
  });

  it('says which part of --listen is wrong', () => {
    const port = run('--listen', '999.1.1.1:99999', image());
    expect(port.status).toBe(1);
    expect(port.stderr).toMatch(/--listen 999\.1\.1\.1:99999: port "99999" is not a number from 0 to 65535/);
    const host = run('--listen', '999.1.1.1:80', image());
    expect(host.stderr).toMatch(/host "999\.1\.1\.1" is not an IP address or host name/);
    expect(run('--listen', 'localhost', image()).stderr).toMatch(/expected HOST:PORT/);
  });
});

describe('running work is visible and cancellable', () => {
  it('lists a running backup in status with bytes done; Ctrl-C cancels it in the daemon, leaves no partial file, and the next backup works', async () => {
    const img = image(512 << 20);
    // Data everywhere, so a full backup takes a while (a zero cluster is skipped quickly).
    const fd = fs.openSync(img, 'r+');
    const chunk = Buffer.alloc(4 << 20);
    for (let off = 0; off < 512 << 20; off += chunk.length) {
      chunk.fill(off >>> 20);
      fs.writeSync(fd, chunk, 0, chunk.length, off);
    }
    fs.closeSync(fd);
    const c = path.join(dir, 'bk.sock');
    const folder = path.join(dir, 'bk');
    const d = await serve(['--control', c, 'serve', '--state-dir', path.join(dir, 'state-bk'), '--cbt', '--listen', '127.0.0.1:0', '--name', 'big', img]);
    const id = (ctl(c, 'snapshot', 'create', 'big', '--storage', 'memory') as { id: string }).id;
    ctl(c, 'snapshot', 'take', id);
    const backup = spawn(process.execPath, [CLI, '--control', c, 'backup', id, '--to', folder], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(backup);
    let err = '';
    backup.stderr?.on('data', (b: Buffer) => (err += b.toString()));
    let running: { id: string; bytesDone: number; bytesTotal: number; dir: string } | undefined;
    for (let i = 0; i < 2000 && (running === undefined || running.bytesDone === 0); i++) {
      running = (ctl(c, 'status') as { backups: Array<{ id: string; bytesDone: number; bytesTotal: number; dir: string }> }).backups[0];
      if (running === undefined || running.bytesDone === 0) await new Promise((r) => setTimeout(r, 10));
    }
    expect(running).toMatchObject({ dir: folder, bytesTotal: 512 << 20 });
    backup.kill('SIGINT');
    const code = await new Promise<number | null>((r) => backup.once('exit', r));
    expect(code, err).toBe(130);
    expect(err).toMatch(/cancelled after \d+ of \d+ bytes; nothing was recorded/);
    expect((ctl(c, 'status') as { backups: unknown[] }).backups).toEqual([]);
    expect(fs.readdirSync(folder).filter((f) => f.endsWith('.partial'))).toEqual([]);
    const r = spawnSync(process.execPath, [CLI, 'backups', folder], { encoding: 'utf8' });
    expect(r.status).not.toBe(0); // no point recorded
    // The next backup works, and `backup --cancel` of a finished one says none runs.
    ctl(c, 'backup', id, '--to', folder);
    expect((JSON.parse(spawnSync(process.execPath, [CLI, 'backups', folder, '--json'], { encoding: 'utf8' }).stdout) as { points: unknown[] }).points).toHaveLength(1);
    const late = spawnSync(process.execPath, [CLI, '--control', c, 'backup', '--cancel', String(running?.id)], { encoding: 'utf8' });
    expect(late.status).toBe(1);
    expect(late.stderr).toMatch(/no backup b\d+ is running/);
    await stop(d.p);
  });
});
