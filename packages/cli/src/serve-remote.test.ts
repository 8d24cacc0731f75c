import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, describe, expect, it } from 'vitest';

// `blkfilter serve nbd://...`: a proxy in front of nbdkit that survives nbdkit going away.
const CLI = path.join(path.dirname(fileURLToPath(import.meta.url)), '..', 'dist', 'cli.js');
const tools = ['nbdkit', 'qemu-io'].every((t) => spawnSync(t, ['--version'], { stdio: 'ignore' }).status === 0);

async function freePort(): Promise<number> {
  return new Promise((resolve) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

async function until(cond: () => boolean, what: string): Promise<void> {
  const t0 = Date.now();
  while (!cond()) {
    if (Date.now() - t0 > 30_000) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

describe.skipIf(!tools)('blkfilter serve nbd://', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-remote-'));
  const control = path.join(dir, 'ctl.sock');
  const children: ChildProcess[] = [];
  afterAll(() => {
    for (const c of children) c.kill('SIGKILL');
    fs.rmSync(dir, { recursive: true, force: true });
  });
  const status = (): { devices: Array<{ name: string; state?: string; remote?: { connections: number; reconnects: number } }> } => {
    const r = spawnSync(process.execPath, [CLI, '--control', control, 'status', '--json'], { encoding: 'utf8' });
    return JSON.parse(r.stdout) as ReturnType<typeof status>;
  };

  it('names the device after the host, shows it degraded while nbdkit is away, and serves again after', async () => {
    const img = path.join(dir, 'remote.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 16 << 20);
    const kport = await freePort();
    const nbdkit = (): ChildProcess => {
      const c = spawn('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(kport), 'file', img], { stdio: 'ignore' });
      children.push(c);
      return c;
    };
    let kit = nbdkit();
    const oport = await freePort();
    await until(() => spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${kport}/`]).status === 0, 'nbdkit');
    const daemon = spawn(process.execPath, [CLI, '--control', control, 'serve', '--cbt', '--state-dir', dir, '--retry-for', '60s', '--connections', '2', '--listen', `127.0.0.1:${oport}`, `nbd://127.0.0.1:${kport}/`], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(daemon);
    let log = '';
    daemon.stderr?.on('data', (d: Buffer) => (log += d.toString()));
    await until(() => log.includes('ready'), `the daemon: ${log}`);
    const before = status();
    expect(before.devices[0]).toMatchObject({ name: '127.0.0.1', state: 'connected', remote: { connections: 2 } });
    const uri = `nbd://127.0.0.1:${oport}/127.0.0.1`;
    expect(spawnSync('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5a 0 1M', uri]).status).toBe(0);

    kit.kill('SIGKILL');
    await new Promise((r) => kit.once('exit', r));
    await until(() => status().devices[0]?.state === 'degraded', 'status to show the device degraded');
    // A read while nbdkit is away waits, and completes once it is back.
    const reader = spawn('qemu-io', ['-f', 'raw', '-c', 'read -P 0x5a 0 1M', uri], { stdio: 'ignore' });
    const readDone = new Promise<number | null>((r) => reader.once('exit', r));
    kit = nbdkit();
    expect(await readDone).toBe(0);
    await until(() => status().devices[0]?.state === 'connected', 'the device to be connected again');
    expect(status().devices[0]?.remote?.reconnects).toBeGreaterThanOrEqual(2);
    expect(log).toMatch(/nbd:\/\/127\.0\.0\.1:\d+\/: degraded/);
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon.once('exit', r));
  }, 90_000);

  it('a full + incremental backup through the proxy completes and verifies with a restart of nbdkit in the middle of the incremental', async () => {
    const img = path.join(dir, 'bk.raw');
    fs.writeFileSync(img, '');
    fs.truncateSync(img, 64 << 20);
    const kport = await freePort();
    // Reads take 5 ms at nbdkit, so the incremental lasts long enough to be cut.
    const nbdkit = (): ChildProcess => {
      const c = spawn('nbdkit', ['-f', '--exit-with-parent', '-i', '127.0.0.1', '-p', String(kport), '--filter=delay', 'file', img, 'rdelay=5ms'], { stdio: 'ignore' });
      children.push(c);
      return c;
    };
    let kit = nbdkit();
    await until(() => spawnSync('nbdinfo', ['--size', `nbd://127.0.0.1:${kport}/`]).status === 0, 'nbdkit');
    const ctl = path.join(dir, 'bk.sock');
    const oport = await freePort();
    const daemon = spawn(process.execPath, [CLI, '--control', ctl, 'serve', '--cbt', '--state-dir', path.join(dir, 'bkstate'), '--connections', '1', '--listen', `127.0.0.1:${oport}`, '--name', 'remote', `nbd://127.0.0.1:${kport}/`], { stdio: ['ignore', 'ignore', 'pipe'] });
    children.push(daemon);
    let log = '';
    daemon.stderr?.on('data', (d: Buffer) => (log += d.toString()));
    await until(() => log.includes('ready'), `the daemon: ${log}`);
    const blk = (...args: string[]): string => {
      const r = spawnSync(process.execPath, [CLI, '--control', ctl, ...args], { encoding: 'utf8', timeout: 120_000 });
      if (r.status !== 0) throw new Error(`blkfilter ${args.join(' ')} exited ${r.status}: ${r.stderr}\n${log}`);
      return r.stdout;
    };
    const uri = `nbd://127.0.0.1:${oport}/remote`;
    const qio = (cmds: string[]): void => {
      const r = spawnSync('qemu-io', ['-f', 'raw', ...cmds.flatMap((c) => ['-c', c]), uri], { encoding: 'utf8' });
      expect(r.status, r.stderr).toBe(0);
    };
    const backups = path.join(dir, 'backups');
    qio(['write -P 0x11 0 32M']);
    const backupOf = (): string => {
      const id = (JSON.parse(blk('snapshot', 'create', 'remote', '--json')) as { id: string }).id;
      blk('snapshot', 'take', id);
      return id;
    };
    let id = backupOf();
    expect((JSON.parse(blk('backup', id, '--to', backups, '--json')) as { entry: { kind: string } }).entry.kind).toBe('full');
    blk('snapshot', 'destroy', id);
    // 4 KiB in every 64 KiB CBT block of 48 MiB: 768 changed blocks, each a read at nbdkit.
    const writes: string[] = [];
    for (let off = 0; off < 48 << 20; off += 64 << 10) writes.push(`write -P 0x${(0x20 + ((off >> 16) % 200)).toString(16)} ${off} 4k`);
    qio(writes);
    id = backupOf();
    const backup = spawn(process.execPath, [CLI, '--control', ctl, 'backup', id, '--to', backups, '--json'], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    backup.stdout.on('data', (d: Buffer) => (out += d.toString()));
    const backupExit = new Promise<number | null>((r) => backup.once('exit', r));
    // The backup has started reading (the remote's request counter moves), then nbdkit goes away for 1 s.
    const sent = (): number => {
      const r = spawnSync(process.execPath, [CLI, '--control', ctl, 'status', '--json'], { encoding: 'utf8' });
      const d = (JSON.parse(r.stdout) as { devices: Array<{ remote?: { requestsPerConnection: number[] } }> }).devices[0];
      return (d?.remote?.requestsPerConnection ?? []).reduce((a, b) => a + b, 0);
    };
    const base = sent();
    await until(() => sent() > base + 50, 'the backup to read');
    expect(backup.exitCode).toBe(null);
    kit.kill('SIGKILL');
    await new Promise((r) => kit.once('exit', r));
    const runningAtKill = backup.exitCode === null;
    await new Promise((r) => setTimeout(r, 1000));
    kit = nbdkit();
    expect(await backupExit).toBe(0);
    expect(runningAtKill).toBe(true);
    const entry = (JSON.parse(out) as { entry: { kind: string; changedBytes: number } }).entry;
    expect(entry.kind).toBe('incremental');
    expect(log).toMatch(/degraded/);
    blk('snapshot', 'destroy', id);
    // No writes since the take: the image at nbdkit is what the chain must hold at point 2.
    blk('verify', backups, '--against', img, '--at', '2');
    daemon.kill('SIGTERM');
    await new Promise((r) => daemon.once('exit', r));
  }, 180_000);
});
