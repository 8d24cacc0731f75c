import { spawn, type ChildProcess } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { checksums, cleanupUnder, cli, cliJson, exited, kernelTestsPossible, must, startServe } from './kernel-fixture.js';
import { heldUnder } from './connect.js';
import { run } from './sys.js';

// A real kernel filesystem (ext4, then xfs) on a blkfilter device, end to end: connect a 1 GiB
// device served with --cbt, mkfs, mount, write a real tree and fio files, take frozen snapshots
// under a running writer, back up (full + 3 incrementals, fstrim between two), restore every
// point, connect it read-only, fsck, mount -o ro,norecovery, compare checksums; a writable
// image of an unfrozen snapshot replays its journal; a daemon crash gives I/O errors, not a hang.

const REPO = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');

/** The check's problems: none means clean. */
type Fsck = (dev: string) => Promise<string[]>;

const e2fsck: Fsck = async (dev) => {
  const r = await run('e2fsck', ['-fn', dev], { timeoutMs: 300_000 });
  return r.code === 0 ? [] : [`e2fsck -fn exited ${r.code}: ${r.stdout}${r.stderr}`];
};

// XFS's freeze covers the log (Linux 6.x): the frozen image's log holds superblock-counter
// transactions and nothing else, so `xfs_repair -n` (which will not replay a log) reports the
// lazy superblock free counters as stale and exits 1. Clean here means exactly that: every
// logged transaction is a superblock buffer, and repair reports nothing but those counters.
const xfsRepair: Fsck = async (dev) => {
  const r = await run('xfs_repair', ['-n', dev], { timeoutMs: 300_000 });
  if (r.code === 0) return [];
  const benign = [/^Phase \d/, /^ {8}- /, /^No modify flag set/, /^ALERT: The filesystem has valuable metadata changes in a log/, /^ignored because the -n option/, /^which may be resolved by first mounting/, /^sb_(fdblocks|icount|ifree|frextents) \d+, counted \d+$/, /^Cannot get host filesystem geometry/, /^Repair may fail if there is a sector size/, /^the image and the host filesystem/, /^$/];
  const problems = (r.stdout + r.stderr).split('\n').filter((l) => !benign.some((b) => b.test(l)));
  const log = (await must('xfs_logprint', ['-t', dev])).stdout;
  const trans = (log.match(/TRANS:/g) ?? []).length;
  const sb = (log.match(/SUPER Block Buffer/g) ?? []).length;
  if (trans !== sb) problems.push(`the log holds ${trans} transaction(s), only ${sb} of them superblock updates`);
  return problems;
};

type Fs = { type: 'ext4' | 'xfs'; mkfs: string[]; fsck: Fsck; tools: string[]; mountOpts: string[] };
const FILESYSTEMS: Fs[] = [
  { type: 'ext4', mkfs: ['mkfs.ext4', '-q', '-F'], fsck: e2fsck, tools: ['mkfs.ext4', 'e2fsck'], mountOpts: [] },
  // nouuid: a snapshot or a restored point carries the UUID of the mounted original.
  { type: 'xfs', mkfs: ['mkfs.xfs', '-q', '-f'], fsck: xfsRepair, tools: ['mkfs.xfs', 'xfs_repair', 'xfs_logprint'], mountOpts: ['nouuid'] },
];

for (const fsx of FILESYSTEMS) {
  const can = kernelTestsPossible(['fio', 'fstrim', 'qemu-img', ...fsx.tools]);
  if (!can.ok) console.warn(`kernel-fs.test.ts (${fsx.type}): skipped: ${can.reason}`);

  describe.skipIf(!can.ok)(`a real ${fsx.type} on a blkfilter device`, () => {
    const dir = fs.mkdtempSync(path.join(os.tmpdir(), `blkfilter-${fsx.type}-`));
    const control = path.join(dir, 'c.sock');
    const img = path.join(dir, 'disk.raw');
    const mnt = path.join(dir, 'mnt');
    const backups = path.join(dir, 'backups');
    let daemon: ChildProcess | null = null;
    let device = '';
    let writer: ChildProcess | null = null;
    const points: Array<{ sums: Record<string, string> }> = [];

    beforeAll(async () => {
      fs.writeFileSync(img, '');
      fs.truncateSync(img, 1 << 30);
      fs.mkdirSync(mnt);
      daemon = await startServe(control, ['--cbt', '--state-dir', path.join(dir, 'state'), '--listen', `unix:${path.join(dir, 'nbd.sock')}`, img]);
      device = (await cliJson<{ device: string }>(control, ['connect', 'disk'])).device;
      await must(fsx.mkfs[0] ?? '', [...fsx.mkfs.slice(1), device]);
      await must('mount', [device, mnt]);
    }, 300_000);

    afterAll(async () => {
      writer?.kill('SIGKILL');
      await cleanupUnder(dir);
      if (daemon !== null && daemon.exitCode === null && daemon.signalCode === null) {
        daemon.kill('SIGKILL');
        await exited(daemon);
      }
      await cleanupUnder(dir);
      fs.rmSync(dir, { recursive: true, force: true });
    }, 300_000);

    const fio = (name: string, extra: string[] = []): Promise<unknown> =>
      must('fio', ['--name', name, '--directory', path.join(mnt, 'fio'), '--filename_format', `${name}.$jobnum.$filenum`, '--nrfiles', '2', '--size', '8M', '--rw', 'write', '--bs', '64k', '--ioengine', 'psync', '--verify', 'crc32c', '--do_verify', '1', '--verify_state_save', '0', ...extra]);

    /** Frozen take + backup; returns the backup's first image entry. */
    async function point(): Promise<{ kind: string; bytesRead: number; file: string }> {
      await must('sync', []);
      points.push({ sums: await checksums(mnt, ['writer', 'lost+found']) });
      const snap = await cliJson<{ id: string }>(control, ['snapshot', 'create', 'disk', '--storage', 'memory', '--limit', '512M']);
      const taken = await cliJson<{ frozenMs: number; images: string[] }>(control, ['snapshot', 'take', snap.id, '--freeze', mnt]);
      expect(taken.frozenMs).toBeGreaterThan(0);
      const b = await cliJson<{ images: Array<{ entry: { kind: string; bytesRead: number; file: string } }> }>(control, ['backup', snap.id, '--to', backups]);
      expect((await cli(control, ['snapshot', 'destroy', snap.id])).code).toBe(0);
      const e = b.images[0]?.entry;
      if (e === undefined) throw new Error('no backup entry');
      return e;
    }

    /** Blocks CBT recorded as changed since the previous take, in bytes (read map of the last take). */
    async function changedBytes(): Promise<number> {
      const info = await cliJson<{ snapNumber: number; blockSize: number }>(control, ['cbt', 'info', 'disk']);
      const map = await cliJson<{ map: number[] }>(control, ['cbt', 'map', 'disk']);
      return map.map.filter((v) => v > info.snapNumber - 1).length * info.blockSize;
    }

    it('connects, takes frozen snapshots under a running writer, backs up full + 3 incrementals with fstrim between two', async () => {
      await must('cp', ['-a', path.join(REPO, 'packages', 'bio', 'src'), path.join(mnt, 'tree')]);
      fs.mkdirSync(path.join(mnt, 'fio'));
      await fio('a');
      fs.mkdirSync(path.join(mnt, 'writer'));
      // The running writer: numbered lines, so a restored log can be checked for a torn tail.
      writer = spawn('sh', ['-c', 'i=0; while :; do echo "$i" >> "$1"; i=$((i+1)); [ $((i % 200)) = 0 ] && sleep 0.02; done', 'sh', path.join(mnt, 'writer', 'log')], { stdio: 'ignore' });

      const full = await point();
      expect(full.kind).toBe('full');

      // A filesystem-level change: new files, a changed file, a removed file.
      await must('cp', ['-a', path.join(REPO, 'packages', 'registry', 'src'), path.join(mnt, 'tree2')]);
      fs.appendFileSync(path.join(mnt, 'tree', 'index.ts'), '\n// changed after point 1\n');
      fs.rmSync(path.join(mnt, 'tree', 'errors.ts'));
      await must('sync', []);
      const inc1 = await point();
      expect(inc1.kind).toBe('incremental');
      const changed1 = await changedBytes();
      expect(inc1.bytesRead).toBeGreaterThan(0);
      expect(inc1.bytesRead).toBeLessThanOrEqual(changed1);

      // Discards: remove fio files and fstrim; the freed blocks become zero clusters.
      for (const f of fs.readdirSync(path.join(mnt, 'fio'))) if (f.startsWith('a.0.0')) fs.rmSync(path.join(mnt, 'fio', f));
      await must('sync', []);
      await must('fstrim', ['-v', mnt]);
      const inc2 = await point();
      expect(inc2.kind).toBe('incremental');
      expect(inc2.bytesRead).toBeLessThanOrEqual(await changedBytes());
      const map = JSON.parse((await must('qemu-img', ['map', '--output=json', path.join(backups, inc2.file)])).stdout) as Array<{ depth: number; zero: boolean; data: boolean; length: number }>;
      expect(map.filter((m) => m.depth === 0 && m.zero && !m.data).reduce((s, m) => s + m.length, 0)).toBeGreaterThan(0);

      await fio('b');
      const inc3 = await point();
      expect(inc3.kind).toBe('incremental');
      expect(inc3.bytesRead).toBeLessThanOrEqual(await changedBytes());
      const verify = await cli(control, ['verify', backups]);
      expect(verify.code).toBe(0);
    }, 600_000);

    it('restores every point; each, connected read-only, is fsck-clean, mounts -o ro,norecovery and holds the files as they were at its freeze', async () => {
      expect(points).toHaveLength(4);
      const restored = path.join(dir, 'restored');
      fs.mkdirSync(restored);
      const sources: string[] = [];
      for (let at = 1; at <= points.length; at++) {
        const to = path.join(restored, `p${at}.raw`);
        await must(process.execPath, [path.join(REPO, 'packages/cli/dist/cli.js'), 'restore', backups, '--at', String(at), '--to', to]);
        sources.push(to);
      }
      const control2 = path.join(dir, 'c2.sock');
      const d2 = await startServe(control2, ['--state-dir', path.join(dir, 'state2'), '--listen', `unix:${path.join(dir, 'nbd2.sock')}`, ...sources]);
      try {
        for (let at = 1; at <= points.length; at++) {
          const c = await cliJson<{ device: string; readOnly: boolean }>(control2, ['connect', `p${at}`, '--read-only']);
          expect(c.readOnly).toBe(true);
          expect(await fsx.fsck(c.device), `fsck of point ${at}`).toEqual([]);
          const m = path.join(dir, `ro${at}`);
          fs.mkdirSync(m);
          await must('mount', ['-o', ['ro', 'norecovery', ...fsx.mountOpts].join(','), c.device, m]);
          try {
            expect(await checksums(m, ['writer', 'lost+found'])).toEqual(points[at - 1]?.sums);
            // The writer's log at the freeze: whole lines 0..n-1, no torn tail.
            const lines = fs.readFileSync(path.join(m, 'writer', 'log'), 'utf8').split('\n');
            expect(lines.pop()).toBe('');
            expect(lines.every((l, i) => l === String(i))).toBe(true);
          } finally {
            await must('umount', [m]);
          }
          expect((await cli(control2, ['disconnect', c.device])).code).toBe(0);
        }
      } finally {
        await cleanupUnder(path.join(dir, 'ro'));
        d2.kill('SIGTERM');
        await exited(d2);
      }
    }, 600_000);

    it('a snapshot taken without --freeze, exported --writable, replays its journal when mounted; writes stay in diff storage', async () => {
      const snap = await cliJson<{ id: string }>(control, ['snapshot', 'create', 'disk', '--storage', 'memory', '--limit', '512M']);
      const taken = await cliJson<{ images: string[] }>(control, ['snapshot', 'take', snap.id, '--writable']);
      const image = taken.images[0] ?? '';
      const c = await cliJson<{ device: string; readOnly: boolean }>(control, ['connect', image]);
      expect(c.readOnly).toBe(false);
      const m = path.join(dir, 'rw-image');
      fs.mkdirSync(m);
      await must('mount', [...(fsx.mountOpts.length > 0 ? ['-o', fsx.mountOpts.join(',')] : []), c.device, m]);
      fs.writeFileSync(path.join(m, 'written-to-image'), 'only in the image');
      await must('umount', [m]);
      // Unmounted cleanly after the journal replay: clean by either check.
      expect(await fsx.fsck(c.device)).toEqual([]);
      expect((await cli(control, ['disconnect', c.device])).code).toBe(0);
      expect(fs.existsSync(path.join(mnt, 'written-to-image'))).toBe(false);
      const info = await cliJson<{ storage: { usedBytes: number } }>(control, ['snapshot', 'info', snap.id]);
      expect(info.storage.usedBytes).toBeGreaterThan(0);
      expect((await cli(control, ['snapshot', 'destroy', snap.id])).code).toBe(0);
    }, 600_000);

    it('a daemon crash with the filesystem mounted: I/O errors, not a hang; disconnect works; nothing else is affected', async () => {
      writer?.kill('SIGKILL');
      if (writer !== null) await exited(writer);
      writer = null;
      daemon?.kill('SIGKILL');
      if (daemon !== null) await exited(daemon);
      // A synced write must fail (EIO), within a bound, not hang.
      const w = await run('dd', ['if=/dev/zero', `of=${path.join(mnt, 'after-crash')}`, 'bs=1M', 'count=4', 'conv=fsync'], { timeoutMs: 120_000 });
      expect(w.signal).toBeNull(); // not killed by the bound: it returned
      expect(w.code).not.toBe(0);
      const um = await run('umount', [mnt], { timeoutMs: 120_000 });
      expect(um.signal).toBeNull();
      const d = await cli(control, ['disconnect', device]);
      expect(d.stderr).toBe('');
      expect(d.code).toBe(0);
      expect(await heldUnder(dir)).toEqual({ loops: [], mounts: [], nbdfuse: [] });
      // The rest of the machine: a write and fsync elsewhere completes.
      const other = await run('dd', ['if=/dev/zero', `of=${path.join(dir, 'elsewhere')}`, 'bs=1M', 'count=4', 'conv=fsync'], { timeoutMs: 60_000 });
      expect(other.code).toBe(0);
    }, 300_000);
  });
}
