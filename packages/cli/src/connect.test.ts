import type { ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import { connectExport, connectPrerequisites, heldUnder, listConnections } from './connect.js';
import { nbdUri } from './connect-control.js';
import { cleanupUnder, cli, cliJson, exited, kernelTestsPossible, must, startServe } from './kernel-fixture.js';
import type { Runner } from './sys.js';

// connect / disconnect with the real tools (nbdfuse + losetup; nbd-client cannot be tried on
// these machines: no NBD driver). Needs root, /dev/fuse and /dev/loop-control.

const can = kernelTestsPossible();
if (!can.ok) console.warn(`connect.test.ts: kernel tests skipped: ${can.reason}`);

const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-connect-'));
const control = path.join(dir, 'c.sock');
const stateDir = path.join(dir, 'state');
const img = path.join(dir, 'disk.raw');
let daemon: ChildProcess | null = null;

async function serve(): Promise<ChildProcess> {
  daemon = await startServe(control, ['--cbt', '--state-dir', stateDir, '--listen', `unix:${path.join(dir, 'nbd.sock')}`, img]);
  return daemon;
}

beforeAll(async () => {
  fs.writeFileSync(img, '');
  fs.truncateSync(img, 64 << 20);
  if (can.ok) await serve();
});

afterEach(async () => {
  if (can.ok) await cleanupUnder(dir);
});

afterAll(async () => {
  if (daemon !== null && daemon.exitCode === null) {
    daemon.kill('SIGKILL');
    await exited(daemon);
  }
  if (can.ok) await cleanupUnder(dir);
  fs.rmSync(dir, { recursive: true, force: true });
});

describe('prerequisites', () => {
  it('names what is missing for nbd-client when the kernel has no NBD driver', () => {
    const r = connectPrerequisites('nbd-client');
    if (fs.existsSync('/dev/nbd0')) return; // a machine with the driver: nothing to say
    expect(r.ok).toBe(false);
    if (!r.ok) expect(r.reason).toMatch(process.getuid?.() === 0 ? /no NBD driver.*\/dev\/nbd0/ : /needs root/);
  });
});

describe.skipIf(!can.ok)('connect and disconnect (nbdfuse + loop)', () => {
  it('connects, lists it in status, refuses a second connect and a stop, disconnects and leaves nothing behind', async () => {
    const before = await heldUnder(dir);
    const c = await cliJson<{ device: string; method: string; exportName: string }>(control, ['connect', 'disk']);
    expect(c.method).toBe('nbdfuse');
    expect(c.device).toMatch(/^\/dev\/loop\d+$/);
    expect((await heldUnder(dir)).loops).toHaveLength(1);

    const status = await cliJson<{ connections: Array<{ device: string; state: string }> }>(control, ['status']);
    expect(status.connections).toEqual([expect.objectContaining({ device: c.device, state: 'connected' })]);

    const twice = await cli(control, ['connect', 'disk']);
    expect(twice.code).toBe(1);
    expect(twice.stderr).toMatch(/already connected as \/dev\/loop\d+/);

    const stop = await cli(control, ['stop']);
    expect(stop.code).toBe(1);
    expect(stop.stderr).toMatch(/still connected.*--force/);

    // A filesystem on it: disconnect is refused while mounted.
    await must('mkfs.ext4', ['-q', '-F', c.device]);
    const mnt = path.join(dir, 'mnt');
    fs.mkdirSync(mnt, { recursive: true });
    await must('mount', [c.device, mnt]);
    const mountedSnapshot = await heldUnder(dir);
    const busy = await cli(control, ['disconnect', c.device]);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toMatch(/is mounted on .*mnt: unmount it first/);
    expect(await heldUnder(dir)).toEqual(mountedSnapshot);
    await must('umount', [mnt]);

    const d = await cli(control, ['disconnect', c.device]);
    expect(d.stderr).toBe('');
    expect(d.code).toBe(0);
    expect(await heldUnder(dir)).toEqual(before);
    expect(listConnections(path.join(stateDir, 'connections'))).toEqual([]);
  });

  it('refuses bad input with a clear message, a non-zero exit, and nothing half-made', async () => {
    const before = await heldUnder(dir);
    const unknown = await cli(control, ['connect', 'nope']);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toMatch(/no export "nope" on this daemon \(exports: disk\)/);

    const noDaemon = await cli(path.join(dir, 'none.sock'), ['connect', 'disk']);
    expect(noDaemon.code).toBe(3);
    expect(noDaemon.stderr).toMatch(/no blkfilter daemon/);

    // A loop device that is not ours.
    const other = path.join(dir, 'other.raw');
    fs.writeFileSync(other, Buffer.alloc(1 << 20));
    const loop = (await must('losetup', ['-f', '--show', other])).stdout.trim();
    try {
      const notOurs = await cli(control, ['disconnect', loop]);
      expect(notOurs.code).toBe(1);
      expect(notOurs.stderr).toMatch(/is not a device that blkfilter connected/);
      expect(fs.readFileSync(`/sys/class/block/${path.basename(loop)}/loop/backing_file`, 'utf8')).toContain('other.raw');
    } finally {
      await must('losetup', ['-d', loop]);
    }
    expect(await heldUnder(dir)).toEqual(before);
    expect(fs.readdirSync(path.join(stateDir, 'connections'))).toEqual([]);
  });

  it('undoes every step when one fails: nbdfuse that cannot reach the export, losetup that fails', async () => {
    const before = await heldUnder(dir);
    const connectionsDir = path.join(dir, 'half');
    await expect(connectExport({ uri: `nbd+unix:///disk?socket=${path.join(dir, 'missing.sock')}`, exportName: 'disk', connectionsDir, owner: 'test', timeoutMs: 10_000 })).rejects.toThrow(/nbdfuse could not open/);
    expect(fs.readdirSync(connectionsDir)).toEqual([]);
    expect(await heldUnder(dir)).toEqual(before);

    // nbdfuse up, then losetup fails: the FUSE mount and nbdfuse must go.
    const { run } = await import('./sys.js');
    const failingLosetup: Runner = (cmd, args, o) => (cmd === 'losetup' ? Promise.resolve({ code: 1, signal: null, stdout: '', stderr: 'losetup: planted failure' }) : run(cmd, args, o));
    const uri = nbdUri({ kind: 'unix', path: path.join(dir, 'nbd.sock') }, 'disk');
    await expect(connectExport({ uri, exportName: 'disk', connectionsDir, owner: 'test', runner: failingLosetup })).rejects.toThrow(/losetup could not attach .*planted failure/);
    expect(fs.readdirSync(connectionsDir)).toEqual([]);
    expect(await heldUnder(dir)).toEqual(before);
  });

  it('a daemon restart does not strand a connected device: the new daemon lists it, disconnect removes it', async () => {
    const before = await heldUnder(dir);
    const c = await cliJson<{ device: string }>(control, ['connect', 'disk']);
    const stop = await cli(control, ['stop', '--force']);
    expect(stop.code).toBe(0);
    if (daemon !== null) await exited(daemon);
    await serve();
    const status = await cliJson<{ connections: Array<{ device: string; state: string }> }>(control, ['status']);
    expect(status.connections.map((x) => x.device)).toEqual([c.device]);
    const d = await cli(control, ['disconnect', c.device]);
    expect(d.stderr).toBe('');
    expect(await heldUnder(dir)).toEqual(before);
  });
});
