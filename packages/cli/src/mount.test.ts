import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checksums, cleanupUnder, cli, cliJson, exited, kernelTestsPossible, must, startServe, until } from './kernel-fixture.js';
import { heldUnder } from './connect.js';
import { readMounts, run } from './sys.js';

// File-level restore, end to end: ext4 on a whole disk and ext4 in partition 1 of a GPT disk
// (made by sfdisk), both served with --cbt, written, snapshotted frozen and backed up twice;
// `blkfilter mount` of each point shows exactly the files of that point, read-only, and
// `blkfilter umount` leaves no mount, loop device, nbdfuse, daemon or folder behind. Every
// refusal (not a backup, --at out of range, a missing partition, a busy mount point, a disk
// with several partitions and no --partition) leaves nothing behind either.

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const can = kernelTestsPossible(['sfdisk', 'blkid', 'mkfs.ext4']);
if (!can.ok) console.warn(`mount.test.ts: skipped: ${can.reason}`);

interface Mounted {
  mountpoint: string;
  at: number;
  partition: number;
  blockDevice: string;
  fsType: string;
  options: string;
  daemonPid: number;
  folder: string;
}

describe.skipIf(!can.ok)('blkfilter mount / umount: file-level restore of a backup point', () => {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'blkfilter-mount-'));
  const control = path.join(dir, 'c.sock');
  const mountsDir = path.join(dir, 'mounts');
  const backups = { disk: path.join(dir, 'backups-disk'), gpt: path.join(dir, 'backups-gpt') };
  const sums: Record<'disk' | 'gpt', Array<Record<string, string>>> = { disk: [], gpt: [] };
  let daemon: ChildProcess | null = null;

  const pidAlive = (pid: number): boolean => {
    try {
      process.kill(pid, 0);
      return !/^\d+ \(.*\) Z/.test(fs.readFileSync(`/proc/${pid}/stat`, 'utf8'));
    } catch {
      return false;
    }
  };
  /** Daemons whose command line names our mounts folder. */
  const mountDaemons = (): number[] =>
    fs
      .readdirSync('/proc')
      .filter((e) => /^\d+$/.test(e))
      .filter((pid) => {
        try {
          return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').includes(mountsDir) && pidAlive(Number(pid));
        } catch {
          return false;
        }
      })
      .map(Number);
  const mountsLeft = (): string[] => (fs.existsSync(mountsDir) ? fs.readdirSync(mountsDir) : []);
  /** Nothing of a `mount` left: no mount, loop, nbdfuse, daemon or folder of it. */
  async function nothingLeft(): Promise<void> {
    expect(await heldUnder(mountsDir)).toEqual({ loops: [], mounts: [], nbdfuse: [] });
    expect(readMounts().filter((m) => m.mountPoint.startsWith(path.join(dir, 'mp')))).toEqual([]);
    expect(mountDaemons()).toEqual([]);
    expect(mountsLeft()).toEqual([]);
  }
  const mp = (name: string): string => {
    const p = path.join(dir, 'mp', name);
    fs.mkdirSync(p, { recursive: true });
    return p;
  };
  const mount = (args: string[]) => cli(control, ['mount', '--mounts-dir', mountsDir, ...args, '--json']);
  const umount = (p: string) => cli(control, ['umount', '--mounts-dir', mountsDir, p, '--json']);

  /** Writes files that differ between points: random data, a source tree, a changed and a removed file. */
  async function writeFiles(root: string, round: number): Promise<void> {
    if (round === 0) {
      await must('cp', ['-a', path.join(REPO, 'packages', 'bio', 'src'), path.join(root, 'tree')]);
      await must('dd', ['if=/dev/urandom', `of=${path.join(root, 'random.bin')}`, 'bs=1M', 'count=8']);
      fs.writeFileSync(path.join(root, 'note.txt'), 'point 1\n');
    } else {
      await must('dd', ['if=/dev/urandom', `of=${path.join(root, 'random.bin')}`, 'bs=64k', 'count=4', 'seek=3', 'conv=notrunc']);
      fs.writeFileSync(path.join(root, 'note.txt'), `point ${round + 1}\n`);
      fs.rmSync(path.join(root, 'tree', 'errors.ts'));
      await must('cp', ['-a', path.join(REPO, 'packages', 'registry', 'src'), path.join(root, `tree${round + 1}`)]);
    }
    await must('sync', []);
  }

  /** Two frozen points of `device` (mounted at `root`) into `folder`; records their checksums. */
  async function twoPoints(device: 'disk' | 'gpt', root: string): Promise<void> {
    for (let round = 0; round < 2; round++) {
      await writeFiles(root, round);
      sums[device].push(await checksums(root, ['lost+found']));
      const snap = await cliJson<{ id: string }>(control, ['snapshot', 'create', device, '--storage', 'memory', '--limit', '256M']);
      await cliJson(control, ['snapshot', 'take', snap.id, '--freeze', root]);
      await cliJson(control, ['backup', snap.id, '--to', backups[device]]);
      expect((await cli(control, ['snapshot', 'destroy', snap.id])).code).toBe(0);
    }
  }

  beforeAll(async () => {
    const disk = path.join(dir, 'disk.raw');
    const gpt = path.join(dir, 'gpt.raw');
    for (const f of [disk, gpt]) {
      fs.writeFileSync(f, '');
      fs.truncateSync(f, 256 << 20);
    }
    // A GPT disk: partition 1 (ext4 below), partition 2 left without a filesystem.
    const table = await new Promise<number | null>((resolve) => {
      const p = spawn('sfdisk', ['-q', gpt], { stdio: ['pipe', 'ignore', 'inherit'] });
      p.stdin.end('label: gpt\n,160MiB,L\n,,L\n');
      p.on('exit', resolve);
    });
    expect(table).toBe(0);
    daemon = await startServe(control, ['--cbt', '--state-dir', path.join(dir, 'state'), '--listen', `unix:${path.join(dir, 'nbd.sock')}`, disk, gpt]);
    for (const [device, exportName] of [['disk', 'disk'], ['gpt', 'gpt1']] as const) {
      const dev = (await cliJson<{ device: string }>(control, ['connect', exportName])).device;
      await must('mkfs.ext4', ['-q', '-F', dev]);
      const root = path.join(dir, `src-${device}`);
      fs.mkdirSync(root);
      await must('mount', [dev, root]);
      try {
        await twoPoints(device, root);
      } finally {
        await must('umount', [root]);
      }
      expect((await cli(control, ['disconnect', dev])).code).toBe(0);
    }
  }, 600_000);

  afterAll(async () => {
    await cleanupUnder(path.join(dir, 'mp'));
    for (const pid of mountDaemons()) process.kill(pid, 'SIGKILL');
    await cleanupUnder(dir);
    if (daemon !== null && daemon.exitCode === null && daemon.signalCode === null) {
      daemon.kill('SIGTERM');
      await exited(daemon);
    }
    await cleanupUnder(dir);
    fs.rmSync(dir, { recursive: true, force: true });
  }, 300_000);

  it('mounts each point of a whole-disk ext4 read-only with the files of that point; umount leaves nothing behind', async () => {
    const mounted: Mounted[] = [];
    for (const at of [1, 2]) {
      const r = await mount([backups.disk, '--at', String(at), mp(`disk${at}`)]);
      expect(r.code, r.stderr).toBe(0);
      mounted.push(JSON.parse(r.stdout) as Mounted);
    }
    // Both points at once, each exactly as it was, read-only, with no journal replay.
    for (const m of mounted) {
      expect(m.fsType).toBe('ext4');
      expect(m.partition).toBe(0);
      expect(await checksums(m.mountpoint, ['lost+found']), `files of point ${m.at}`).toEqual(sums.disk[m.at - 1]);
      const entry = readMounts().find((e) => e.mountPoint === m.mountpoint);
      expect(entry?.source).toBe(m.blockDevice);
      const opts = (await must('findmnt', ['-n', '-o', 'OPTIONS', m.mountpoint])).stdout;
      expect(opts.split(',')[0]).toBe('ro');
      expect(opts).toMatch(/norecovery|noload/);
      const w = await run('touch', [path.join(m.mountpoint, 'x')]);
      expect(w.code).not.toBe(0);
      expect(w.stderr).toMatch(/Read-only/i);
      expect(pidAlive(m.daemonPid)).toBe(true);
    }
    expect(sums.disk[0]).not.toEqual(sums.disk[1]);
    // Default point: the newest.
    const newest = await mount([backups.disk, mp('newest')]);
    expect(newest.code, newest.stderr).toBe(0);
    const n = JSON.parse(newest.stdout) as Mounted;
    expect(n.at).toBe(2);
    mounted.push(n);
    for (const m of mounted) {
      const u = await umount(m.mountpoint);
      expect(u.code, u.stderr).toBe(0);
      expect(pidAlive(m.daemonPid)).toBe(false);
      expect(fs.existsSync(m.folder)).toBe(false);
    }
    await nothingLeft();
  }, 300_000);

  it('mounts partition 1 of a GPT disk; a disk of several partitions needs --partition, a missing one is named, an empty one has no filesystem', async () => {
    const target = mp('gpt');
    const none = await mount([backups.gpt, '--at', '1', target]);
    expect(none.code).toBe(1);
    expect(none.stderr).toMatch(/has 2 partitions: 1 \(160 MiB\), 2 \(\d+(\.\d)? MiB\); choose one with --partition K/);
    await nothingLeft();
    const missing = await mount([backups.gpt, '--at', '1', target, '--partition', '3']);
    expect(missing.code).toBe(1);
    expect(missing.stderr).toMatch(/no partition 3: its partitions are 1 \(160 MiB\), 2 /);
    expect(JSON.parse(missing.stdout)).toMatchObject({ error: { code: 'ENOENT' } });
    await nothingLeft();
    const empty = await mount([backups.gpt, '--at', '1', target, '--partition', '2']);
    expect(empty.code).toBe(1);
    expect(empty.stderr).toMatch(/no filesystem found on partition 2 of point 1/);
    await nothingLeft();

    for (const at of [1, 2]) {
      const r = await mount([backups.gpt, '--at', String(at), target, '--partition', '1']);
      expect(r.code, r.stderr).toBe(0);
      const m = JSON.parse(r.stdout) as Mounted;
      expect(m.partition).toBe(1);
      expect(await checksums(target, ['lost+found']), `files of point ${at}, partition 1`).toEqual(sums.gpt[at - 1]);
      const u = await umount(target);
      expect(u.code, u.stderr).toBe(0);
      await nothingLeft();
    }
  }, 300_000);

  it('refuses, leaving nothing behind: not a backup folder, --at out of range, a busy mount point, --partition on a disk without a table, a mount point that does not exist', async () => {
    const target = mp('refused');
    const loopsBefore = (await run('losetup', ['-a'])).stdout.split('\n').filter((l) => l.includes(dir));
    const notBackup = path.join(dir, 'not-a-backup');
    fs.mkdirSync(notBackup, { recursive: true });
    const cases: Array<{ args: string[]; re: RegExp }> = [
      { args: [notBackup, target], re: /not-a-backup/ },
      { args: [backups.disk, '--at', '3', target], re: /--at 3 is out of range: .* holds points 1 to 2/ },
      { args: [backups.disk, '--partition', '1', target], re: /no partition 1: the disk has no partition table/ },
      { args: [backups.disk, path.join(dir, 'no-such-folder')], re: /does not exist/ },
    ];
    for (const c of cases) {
      const r = await mount(c.args);
      expect(r.code, c.args.join(' ')).toBe(1);
      expect(r.stderr).toMatch(c.re);
      await nothingLeft();
    }
    // Busy: something is already mounted there.
    const first = await mount([backups.disk, '--at', '1', target]);
    expect(first.code, first.stderr).toBe(0);
    const busy = await mount([backups.disk, '--at', '2', target]);
    expect(busy.code).toBe(1);
    expect(busy.stderr).toMatch(/mount point .* is busy: \/dev\/loop\d+ \(ext4\) is mounted there/);
    expect(mountsLeft()).toHaveLength(1);
    // Busy the other way: a process works in the mounted folder; umount refuses and undoes nothing.
    const holder = spawn('sleep', ['600'], { cwd: target, stdio: 'ignore' });
    try {
      const refused = await umount(target);
      expect(refused.code).toBe(1);
      expect(refused.stderr).toMatch(/busy.*nothing else undone/);
      expect(await checksums(target, ['lost+found'])).toEqual(sums.disk[0]);
    } finally {
      holder.kill('SIGKILL');
      await exited(holder);
    }
    const u = await umount(target);
    expect(u.code, u.stderr).toBe(0);
    await nothingLeft();
    expect((await run('losetup', ['-a'])).stdout.split('\n').filter((l) => l.includes(dir))).toEqual(loopsBefore);
    // Nothing of ours is mounted there any more: umount says so.
    const again = await umount(target);
    expect(again.code).toBe(1);
    expect(again.stderr).toMatch(/not a backup point that `blkfilter mount` mounted/);
  }, 300_000);

  it('as a user other than root: refused, naming the prerequisite', async () => {
    if ((await run('setpriv', ['--version'])).code !== 0) {
      console.warn('mount.test.ts: "not root" case skipped: setpriv (util-linux) is missing');
      return;
    }
    const target = mp('user');
    const r = await run('setpriv', ['--reuid=65534', '--regid=65534', '--clear-groups', process.execPath, path.join(REPO, 'packages/cli/dist/cli.js'), 'mount', '--mounts-dir', mountsDir, backups.disk, target, '--json']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/needs root/);
    expect(JSON.parse(r.stdout)).toMatchObject({ error: { code: 'EPERM' } });
    await nothingLeft();
  }, 60_000);

  it('umount still cleans up after the mount\'s daemon was killed', async () => {
    const target = mp('killed');
    const r = await mount([backups.disk, '--at', '2', target]);
    expect(r.code, r.stderr).toBe(0);
    const m = JSON.parse(r.stdout) as Mounted;
    process.kill(m.daemonPid, 'SIGKILL');
    expect(await until(() => !pidAlive(m.daemonPid), 10_000)).toBe(true);
    const u = await umount(target);
    expect(u.code, u.stderr).toBe(0);
    await nothingLeft();
  }, 300_000);
});
