import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { BlkError } from '@blkfilter/bio';
import { list } from '@blkfilter/backup';
import { connectPrerequisites, disconnectDevice, findConnection, type Connection } from './connect.js';
import { callControl } from './control.js';
import { runtimeDir } from './paths.js';
import { isMountPoint, pidAlive, readMounts, run, which, type Runner } from './sys.js';

// `blkfilter mount DIR MOUNTPOINT`: file-level restore. A backup point is served by a daemon of
// its own (`serve --backup`, detached, in a folder of its own), connected read-only
// (nbdfuse + loop through that daemon's `connect`), and the chosen partition's filesystem is
// mounted read-only with no journal replay. `blkfilter umount MOUNTPOINT` finds all of it
// again from the mount table alone: mountpoint -> loop device -> its connection record, which
// lives in `<mount folder>/connections/<id>/`, next to `mount.json`.
//
// Either everything is made, or everything made on the way is undone (reverse order) and the
// error says which step failed.

/** A mount made by {@link mountBackup}, as recorded in `<folder>/mount.json`. */
export interface BackupMount {
  readonly id: string;
  /** The mount's folder: control and NBD sockets, the daemon's state and log, this record. */
  readonly folder: string;
  readonly dir: string;
  readonly at: number;
  readonly points: number;
  readonly device: string | null;
  readonly mountpoint: string;
  /** 0: the whole disk; else the partition number. */
  readonly partition: number;
  /** The export connected (`backup-N` or `backup-Np1`...). */
  readonly exportName: string;
  /** The kernel block device (`/dev/loopN`). */
  readonly blockDevice: string;
  readonly fsType: string;
  readonly options: string;
  readonly control: string;
  readonly daemonPid: number;
  readonly createdAt: string;
}

/** A partition of a served point. */
export interface PointPartition {
  readonly partno: number;
  readonly name: string;
  readonly start: number;
  readonly sectors: number;
}

/** Mounting or unmounting failed; `code` is errno-style. */
export class MountError extends BlkError {}

/** Options of {@link mountBackup}. */
export interface MountOptions {
  readonly dir: string;
  readonly mountpoint: string;
  readonly at?: number;
  /** Which device of a folder that holds several. */
  readonly device?: string;
  /** Partition number; 0 is the whole disk; default: the whole disk, or its only partition. */
  readonly partition?: number;
  /** Where mount folders live (default `<runtime dir>/mounts`, /run/blkfilter/mounts for root). */
  readonly mountsDir?: string;
  /** The blkfilter program to run the daemon with (default: dist/cli.js next to this code). */
  readonly cliPath?: string;
  /** Progress lines. */
  readonly log?: (line: string) => void;
  /** Bound on each step (daemon ready, connect, mount): default 60 s. */
  readonly timeoutMs?: number;
  readonly runner?: Runner;
}

const RECORD = 'mount.json';

/** The default folder of mount folders. */
export function defaultMountsDir(): string {
  return path.join(runtimeDir(), 'mounts');
}

function cliProgram(): string {
  const here = fileURLToPath(new URL('./cli.js', import.meta.url));
  if (fs.existsSync(here)) return here;
  return process.argv[1] ?? here;
}

function tail(s: string, n = 3): string {
  const t = s.trim().split('\n').slice(-n).join(' / ');
  return t === '' ? '' : `: ${t}`;
}

async function until(cond: () => boolean | Promise<boolean>, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (let wait = 20; ; wait = Math.min(200, wait * 2)) {
    if (await cond()) return true;
    if (Date.now() >= end) return false;
    await new Promise((r) => setTimeout(r, wait));
  }
}

/** True when `pid` runs blkfilter with control socket `control` (never signal a reused pid). */
function isDaemonOf(pid: number, control: string): boolean {
  try {
    return fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(control);
  } catch {
    return false;
  }
}

function writeRecord(m: BackupMount): void {
  const tmp = path.join(m.folder, `${RECORD}.tmp`);
  fs.writeFileSync(tmp, `${JSON.stringify(m, null, 2)}\n`);
  fs.renameSync(tmp, path.join(m.folder, RECORD));
}

function readRecord(folder: string): BackupMount | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(folder, RECORD), 'utf8')) as BackupMount;
  } catch {
    return null;
  }
}

/** The mount table entry at `mountpoint` (its canonical path), if any. */
function mountAt(mountpoint: string): { source: string; fsType: string; dev: string } | null {
  const e = readMounts().filter((m) => m.mountPoint === mountpoint);
  return e.at(-1) ?? null;
}

function canonical(p: string): string {
  try {
    return fs.realpathSync(p);
  } catch {
    return path.resolve(p);
  }
}

/** The filesystem type on `dev` (blkid), or null when blkid finds none. */
async function fsTypeOf(dev: string, exec: Runner): Promise<string | null> {
  const r = await exec('blkid', ['-p', '-o', 'value', '-s', 'TYPE', dev], { timeoutMs: 60_000 });
  const t = r.stdout.trim();
  return r.code === 0 && t !== '' ? t : null;
}

/** Read-only mount options that never write: no journal replay (ext3/4, xfs), no UUID clash (xfs). */
export function readOnlyMountOptions(fsType: string): string {
  if (fsType === 'ext3' || fsType === 'ext4') return 'ro,norecovery';
  if (fsType === 'xfs') return 'ro,norecovery,nouuid';
  if (fsType === 'btrfs') return 'ro,rescue=nologreplay';
  return 'ro';
}

function describePartitions(parts: readonly PointPartition[]): string {
  return parts.map((p) => `${p.partno} (${humanSectors(p.sectors)})`).join(', ');
}

function humanSectors(sectors: number): string {
  const b = sectors * 512;
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let v = b;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v >= 10 || i === 0 ? Math.round(v) : v.toFixed(1)} ${units[i]}`;
}

/**
 * Serves point `at` of backup folder `dir`, connects it read-only and mounts the chosen
 * partition's filesystem read-only at `mountpoint`. Everything (daemon, connection, mount)
 * outlives the caller; {@link unmountBackup} undoes it. Needs root and FUSE + loop.
 */
export async function mountBackup(options: MountOptions): Promise<BackupMount> {
  const log = options.log ?? (() => {});
  const exec = options.runner ?? run;
  const timeoutMs = options.timeoutMs ?? 60_000;
  // 1. Everything that can be checked before anything is made.
  const pre = connectPrerequisites();
  if (!pre.ok) throw new MountError(pre.code, `cannot mount a backup point: ${pre.reason}`);
  if (which('blkid') === null) throw new MountError('ENOENT', 'blkid is not installed: install Debian\'s package util-linux (or blkid)');
  const dir = path.resolve(options.dir);
  const mountpoint = canonical(options.mountpoint);
  let st: fs.Stats;
  try {
    st = fs.statSync(mountpoint);
  } catch {
    throw new MountError('ENOENT', `mount point ${options.mountpoint} does not exist: create the folder first (mkdir -p ${options.mountpoint})`);
  }
  if (!st.isDirectory()) throw new MountError('ENOTDIR', `mount point ${options.mountpoint} is not a folder`);
  if (isMountPoint(mountpoint)) {
    const m = mountAt(mountpoint);
    throw new MountError('EBUSY', `mount point ${mountpoint} is busy: ${m !== null ? `${m.source} (${m.fsType})` : 'a filesystem'} is mounted there; unmount it or choose another folder`);
  }
  const manifest = (await list(dir)).manifest; // throws a clear error for a folder that is not a backup
  const points = manifest.points.length;
  if (points === 0) throw new MountError('ENOENT', `${dir} holds no backup points`);
  const at = options.at ?? points;
  if (!Number.isInteger(at) || at < 1 || at > points) throw new MountError('EINVAL', `--at ${at} is out of range: ${dir} holds points 1 to ${points}`);
  if (options.device !== undefined && !manifest.devices.some((d) => d.name === options.device)) {
    throw new MountError('EINVAL', `${dir} holds no device "${options.device}": it holds ${manifest.devices.map((d) => d.name).join(', ')}`);
  }
  if (options.device === undefined && manifest.devices.length > 1) {
    throw new MountError('EINVAL', `${dir} holds devices ${manifest.devices.map((d) => d.name).join(', ')}: choose one with --device NAME`);
  }

  // 2. The mount's folder, the daemon, the connection, the mount: each undone on failure.
  const mountsDir = path.resolve(options.mountsDir ?? defaultMountsDir());
  const id = `${path.basename(dir).replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 24)}-${at}-${randomBytes(4).toString('hex')}`;
  const folder = path.join(mountsDir, id);
  const control = path.join(folder, 'control.sock');
  const undo: Array<{ what: string; fn: () => Promise<void> }> = [];
  fs.mkdirSync(folder, { recursive: true, mode: 0o700 });
  undo.push({ what: 'remove the mount folder', fn: async () => removeFolder(folder) });
  try {
    const logFile = path.join(folder, 'daemon.log');
    const logFd = fs.openSync(logFile, 'a');
    const args = [
      cliProgramOf(options),
      '--control',
      control,
      'serve',
      '--backup',
      dir,
      '--at',
      String(at),
      ...(options.device !== undefined ? ['--backup-device', options.device] : []),
      '--listen',
      `unix:${path.join(folder, 'nbd.sock')}`,
      '--state-dir',
      folder,
      '--pidfile',
      path.join(folder, 'daemon.pid'),
    ];
    // Detached, in its own session: the daemon outlives this command; `umount` stops it.
    const child = spawn(process.execPath, args, { detached: true, stdio: ['ignore', logFd, logFd] });
    fs.closeSync(logFd);
    let exited = false;
    child.on('exit', () => (exited = true));
    child.on('error', () => (exited = true));
    child.unref();
    const daemonPid = child.pid ?? -1;
    undo.push({ what: 'stop the daemon', fn: async () => stopDaemon(control, daemonPid, timeoutMs) });
    const ready = await until(async () => exited || (fs.existsSync(control) && (await callControl(control, 'status').then(() => true, () => false))), timeoutMs);
    if (exited || !ready) {
      throw new MountError(exited ? 'EIO' : 'ETIMEDOUT', `the daemon serving point ${at} of ${dir} ${exited ? 'exited' : `was not ready within ${timeoutMs} ms`}${tail(fs.readFileSync(logFile, 'utf8'))}`);
    }
    log(`serving point ${at} of ${dir} (daemon pid ${daemonPid}, control ${control})`);

    // 3. Which export: the whole disk or a partition of it.
    const status = (await callControl(control, 'status')) as { served: Array<{ device: string; partitions?: PointPartition[] }> };
    const served = status.served[0];
    if (served === undefined) throw new MountError('EIO', 'the daemon serves no backup point');
    const parts = served.partitions ?? [];
    let partition = options.partition;
    if (partition === undefined) {
      if (parts.length > 1) throw new MountError('EINVAL', `point ${at} of ${dir} has ${parts.length} partitions: ${describePartitions(parts)}; choose one with --partition K`);
      partition = parts[0]?.partno ?? 0;
    }
    let exportName = served.device;
    if (partition !== 0) {
      const p = parts.find((x) => x.partno === partition);
      if (p === undefined) {
        throw new MountError('ENOENT', `point ${at} of ${dir} has no partition ${partition}: ${parts.length === 0 ? 'the disk has no partition table (mount it whole: --partition 0, or leave --partition out)' : `its partitions are ${describePartitions(parts)}`}`);
      }
      exportName = p.name;
    }

    // 4. A read-only kernel device through the daemon (its connection record is in <folder>/connections).
    const c = (await callControl(control, 'connect', { export: exportName, readOnly: true })) as Connection;
    undo.push({ what: `disconnect ${c.device}`, fn: async () => void (await disconnectDevice(c.device, { connectionsDir: path.join(folder, 'connections') })) });
    log(`connected ${exportName} read-only as ${c.device}`);

    // 5. The filesystem, mounted so that nothing is written (no journal replay).
    const fsType = await fsTypeOf(c.device, exec);
    if (fsType === null) {
      throw new MountError('EINVAL', `no filesystem found on ${partition === 0 ? `point ${at} of ${dir}` : `partition ${partition} of point ${at}`} (blkid)${partition === 0 && parts.length > 0 ? `; it has partitions ${describePartitions(parts)}: choose one with --partition K` : ''}`);
    }
    if (fsType === 'swap' || fsType === 'LVM2_member' || fsType === 'linux_raid_member' || fsType === 'crypto_LUKS') {
      throw new MountError('EINVAL', `${partition === 0 ? `point ${at}` : `partition ${partition}`} holds ${fsType}, not a filesystem mount can read${parts.length > 1 ? `; partitions: ${describePartitions(parts)}` : ''}`);
    }
    const mountOptions = readOnlyMountOptions(fsType);
    const r = await exec('mount', ['-t', fsType, '-o', mountOptions, c.device, mountpoint], { timeoutMs });
    if (r.code !== 0) throw new MountError('EIO', `mount -t ${fsType} -o ${mountOptions} ${c.device} ${mountpoint} failed${tail(r.stderr + r.stdout)}`);
    undo.push({ what: `unmount ${mountpoint}`, fn: async () => void (await exec('umount', [mountpoint], { timeoutMs })) });
    const record: BackupMount = {
      id,
      folder,
      dir,
      at,
      points,
      device: options.device ?? null,
      mountpoint,
      partition,
      exportName,
      blockDevice: c.device,
      fsType,
      options: mountOptions,
      control,
      daemonPid,
      createdAt: new Date().toISOString(),
    };
    writeRecord(record);
    log(`mounted ${fsType} of point ${at}${partition !== 0 ? `, partition ${partition}` : ''} on ${mountpoint} (${mountOptions})`);
    return record;
  } catch (err) {
    for (const u of undo.reverse()) {
      await u.fn().catch((e: unknown) => log(`cleanup: could not ${u.what}: ${(e as Error).message}`));
    }
    throw BlkError.isInstance(err) ? err : new MountError('EIO', `cannot mount point of ${dir}: ${(err as Error).message}`, { cause: err });
  }
}

function cliProgramOf(options: MountOptions): string {
  return options.cliPath ?? cliProgram();
}

/** Asks the daemon to stop (it refuses while its device is connected), waits, then kills it. */
async function stopDaemon(control: string, pid: number, timeoutMs: number): Promise<void> {
  await callControl(control, 'shutdown', { force: true }).catch(() => {});
  if (pid <= 0) return;
  if (await until(() => !pidAlive(pid), Math.min(timeoutMs, 15_000))) return;
  if (!isDaemonOf(pid, control)) return;
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // gone meanwhile
  }
  await until(() => !pidAlive(pid), 5000);
}

function removeFolder(folder: string): void {
  // Only once nothing is mounted under it (a FUSE mount must never be walked into).
  if (readMounts().some((m) => m.mountPoint.startsWith(`${folder}/`))) throw new MountError('EBUSY', `${folder} still has a mount under it; left in place`);
  fs.rmSync(folder, { recursive: true, force: true });
}

/** The mounts recorded in `mountsDir`. */
export function listBackupMounts(mountsDir: string = defaultMountsDir()): BackupMount[] {
  let entries: string[];
  try {
    entries = fs.readdirSync(mountsDir);
  } catch {
    return [];
  }
  return entries
    .sort()
    .map((e) => readRecord(path.join(mountsDir, e)))
    .filter((m): m is BackupMount => m !== null);
}

/**
 * Finds the record of the backup mount at `mountpoint`: from the mount table (its loop device's
 * connection record sits in the mount's folder), else among the records in `mountsDir`.
 */
export function findBackupMount(mountpoint: string, mountsDir?: string): BackupMount | null {
  const mp = canonical(mountpoint);
  const entry = mountAt(mp);
  if (entry !== null && entry.source.startsWith('/dev/')) {
    const c = findConnection(entry.source);
    if (c !== null) {
      const m = readRecord(path.dirname(path.dirname(c.dir)));
      if (m !== null && m.mountpoint === mp) return m;
    }
  }
  return listBackupMounts(mountsDir).find((m) => m.mountpoint === mp) ?? null;
}

/**
 * Undoes {@link mountBackup}: unmounts (EBUSY, nothing else done, while files there are open),
 * disconnects the device, stops the daemon and removes the mount's folder. Works when the
 * daemon died or the filesystem was unmounted by hand. Returns the removed record.
 */
export async function unmountBackup(mountpoint: string, options: { mountsDir?: string; runner?: Runner; timeoutMs?: number; log?: (line: string) => void } = {}): Promise<BackupMount> {
  const exec = options.runner ?? run;
  const timeoutMs = options.timeoutMs ?? 60_000;
  const log = options.log ?? (() => {});
  const m = findBackupMount(mountpoint, options.mountsDir);
  if (m === null) {
    const e = mountAt(canonical(mountpoint));
    throw new MountError('ENOENT', `${mountpoint} is not a backup point that \`blkfilter mount\` mounted${e !== null ? ` (${e.source} is mounted there: use umount(8))` : ''}; nothing done`);
  }
  if (process.getuid?.() !== 0) throw new MountError('EPERM', 'unmounting needs root');
  const here = mountAt(m.mountpoint);
  if (here !== null && here.source === m.blockDevice) {
    const r = await exec('umount', [m.mountpoint], { timeoutMs });
    if (r.code !== 0) {
      const busy = /busy/i.test(r.stderr);
      throw new MountError(busy ? 'EBUSY' : 'EIO', `umount ${m.mountpoint} failed${tail(r.stderr)}${busy ? ' (close the files and leave the folder first; `fuser -vm` names who holds it); nothing else undone' : ''}`);
    }
    log(`unmounted ${m.mountpoint}`);
  }
  const c = findConnection(m.blockDevice, path.join(m.folder, 'connections'));
  if (c !== null && c.dir.startsWith(`${m.folder}/`)) {
    // Through the daemon when it answers, else directly (the record is beside the device).
    await callControl(m.control, 'disconnect', { device: m.blockDevice }).catch(async () => disconnectDevice(m.blockDevice, { connectionsDir: path.join(m.folder, 'connections') }));
    log(`disconnected ${m.blockDevice}`);
  }
  await stopDaemon(m.control, m.daemonPid, timeoutMs);
  removeFolder(m.folder);
  return m;
}
