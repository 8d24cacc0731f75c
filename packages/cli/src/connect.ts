import { randomBytes } from 'node:crypto';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { BlkError } from '@blkfilter/bio';
import { pidAlive, readMounts, run, which, type Runner } from './sys.js';

// `blkfilter connect`: hands an NBD export to the kernel as a block device, with system tools.
//
// - nbd-client (package nbd-client) where the kernel has the NBD driver (/dev/nbd0 exists):
//   /dev/nbdN talks NBD to our server directly.
// - Otherwise (CONFIG_BLK_DEV_NBD off, as on our CI machines) nbdfuse (package libnbd-bin, on
//   fuse3) shows the export as one file in a private FUSE mount, and `losetup --direct-io=on`
//   makes /dev/loopN of that file. Direct I/O keeps the page cache out, so a FLUSH from the
//   filesystem reaches the NBD server as a FLUSH.
//
// Every connection has a folder `<connectionsDir>/<id>/` holding `connection.json` (the
// record), the nbdfuse log and pid file, and the FUSE mount point `fuse/`. The records are the
// registry: a restarted daemon lists them again, and `disconnect` finds the record from the
// loop device's backing file even when no daemon runs. Nothing here knows about the daemon.

/** How a device was connected. */
export type ConnectMethod = 'nbdfuse' | 'nbd-client';

/** One connected device, as recorded in `connection.json`. */
export interface Connection {
  readonly id: string;
  /** The kernel block device, e.g. `/dev/loop3` or `/dev/nbd0`. */
  readonly device: string;
  readonly exportName: string;
  /** The NBD URI the device talks to. */
  readonly uri: string;
  readonly method: ConnectMethod;
  readonly readOnly: boolean;
  /** Who made it (the daemon's control socket): a daemon lists only its own. */
  readonly owner: string;
  /** The connection's folder. */
  readonly dir: string;
  /** nbdfuse's pid (nbdfuse method) or nbd-client's (none once it daemonized). */
  readonly pid: number | null;
  readonly createdAt: string;
}

/** A {@link Connection} with what is true of it now. */
export interface ConnectionStatus extends Connection {
  /** `connected`: device and helper alive; `stale`: the helper (nbdfuse) died or the device is gone; disconnect it. */
  readonly state: 'connected' | 'stale';
  /** Where a filesystem on the device is mounted, if anywhere. */
  readonly mountedAt: readonly string[];
}

/** Connecting or disconnecting failed; `code` is errno-style (ENOENT for a missing tool, EPERM, EBUSY, ...). */
export class ConnectError extends BlkError {}

/** Options of {@link connectExport}. */
export interface ConnectOptions {
  /** `nbd://HOST:PORT/EXPORT` or `nbd+unix:///EXPORT?socket=PATH`. */
  readonly uri: string;
  readonly exportName: string;
  readonly readOnly?: boolean;
  /** The registry folder (one sub-folder per connection). */
  readonly connectionsDir: string;
  /** Recorded in the connection; {@link listConnections} filters on it. */
  readonly owner: string;
  /** Default `auto`: nbd-client when /dev/nbd0 exists and nbd-client is installed, else nbdfuse. */
  readonly method?: ConnectMethod | 'auto';
  /** Bound on each step (nbdfuse ready, losetup): default 15 s. */
  readonly timeoutMs?: number;
  /** For tests: runs the system tools. */
  readonly runner?: Runner;
}

const RECORD = 'connection.json';

function missingTool(tool: string, pkg: string): ConnectError {
  return new ConnectError('ENOENT', `${tool} is not installed: install Debian's package ${pkg} (apt-get install ${pkg})`);
}

/**
 * Which way {@link connectExport} would connect here, or why it cannot: names the missing
 * prerequisite (root, /dev/fuse, /dev/loop-control, a package). Never throws.
 */
export function connectPrerequisites(method: ConnectMethod | 'auto' = 'auto'): { ok: true; method: ConnectMethod } | { ok: false; reason: string; code: string } {
  if (process.getuid?.() !== 0) return { ok: false, code: 'EPERM', reason: 'connecting a kernel block device needs root (losetup, FUSE mounts and nbd-client all do)' };
  const nbdDriver = fs.existsSync('/dev/nbd0');
  const chosen: ConnectMethod = method !== 'auto' ? method : nbdDriver && which('nbd-client') !== null ? 'nbd-client' : 'nbdfuse';
  if (chosen === 'nbd-client') {
    if (!nbdDriver) return { ok: false, code: 'ENODEV', reason: 'the kernel has no NBD driver (/dev/nbd0 is missing: CONFIG_BLK_DEV_NBD off or `modprobe nbd` not run)' };
    if (which('nbd-client') === null) return { ok: false, code: 'ENOENT', reason: missingTool('nbd-client', 'nbd-client').message };
    return { ok: true, method: chosen };
  }
  if (!fs.existsSync('/dev/fuse')) return { ok: false, code: 'ENODEV', reason: '/dev/fuse is missing: the kernel has no FUSE (nbdfuse needs it), and there is no /dev/nbd0 for nbd-client' };
  if (!fs.existsSync('/dev/loop-control')) return { ok: false, code: 'ENODEV', reason: '/dev/loop-control is missing: the kernel has no loop driver (`modprobe loop`)' };
  if (which('nbdfuse') === null) return { ok: false, code: 'ENOENT', reason: missingTool('nbdfuse', 'libnbd-bin').message + ' (with fuse3)' };
  if (which('fusermount3') === null) return { ok: false, code: 'ENOENT', reason: missingTool('fusermount3', 'fuse3').message };
  if (which('losetup') === null) return { ok: false, code: 'ENOENT', reason: missingTool('losetup', 'mount').message };
  return { ok: true, method: chosen };
}

function readRecord(dir: string): Connection | null {
  try {
    return JSON.parse(fs.readFileSync(path.join(dir, RECORD), 'utf8')) as Connection;
  } catch {
    return null;
  }
}

function writeRecord(c: Connection): void {
  const tmp = path.join(c.dir, `${RECORD}.tmp`);
  fs.writeFileSync(tmp, `${JSON.stringify(c, null, 2)}\n`);
  fs.renameSync(tmp, path.join(c.dir, RECORD));
}

/** True when `pid` is the nbdfuse serving `fuseDir` (never signal a pid that was reused). */
function isNbdfuseOf(pid: number, fuseDir: string): boolean {
  try {
    const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    return path.basename(argv[0] ?? '') === 'nbdfuse' && argv.some((a) => a.startsWith(fuseDir));
  } catch {
    return false;
  }
}

/** `major:minor` of a block device node and of its partitions (`/sys/class/block/X/dev`). */
function devNumbers(device: string): string[] {
  const name = path.basename(device);
  const out: string[] = [];
  try {
    out.push(fs.readFileSync(`/sys/class/block/${name}/dev`, 'utf8').trim());
    for (const e of fs.readdirSync(`/sys/class/block/${name}`)) {
      if (e.startsWith(name)) out.push(fs.readFileSync(`/sys/class/block/${name}/${e}/dev`, 'utf8').trim());
    }
  } catch {
    // no such device
  }
  return out;
}

/** Where filesystems on `device` (or its partitions) are mounted. */
export function mountsOf(device: string): string[] {
  const devs = new Set(devNumbers(device));
  const real = (() => {
    try {
      return fs.realpathSync(device);
    } catch {
      return device;
    }
  })();
  return readMounts()
    .filter((m) => devs.has(m.dev) || m.source === real)
    .map((m) => m.mountPoint);
}

/** Other kernel users of `device`: device-mapper, md, ... (`/sys/class/block/X/holders`). */
function holdersOf(device: string): string[] {
  try {
    return fs.readdirSync(`/sys/class/block/${path.basename(device)}/holders`);
  } catch {
    return [];
  }
}

function loopAttached(device: string): boolean {
  try {
    return fs.readFileSync(`/sys/class/block/${path.basename(device)}/loop/backing_file`, 'utf8').trim() !== '';
  } catch {
    return false;
  }
}

/** The connections recorded in `connectionsDir` (of `owner` when given), with their state now. */
export function listConnections(connectionsDir: string, owner?: string): ConnectionStatus[] {
  let entries: string[];
  try {
    entries = fs.readdirSync(connectionsDir);
  } catch {
    return [];
  }
  const out: ConnectionStatus[] = [];
  for (const e of entries.sort()) {
    const c = readRecord(path.join(connectionsDir, e));
    if (c === null || (owner !== undefined && c.owner !== owner)) continue;
    const deviceThere = c.method === 'nbdfuse' ? loopAttached(c.device) : fs.existsSync(`/sys/class/block/${path.basename(c.device)}/pid`);
    const helperOk = c.method === 'nbdfuse' ? c.pid !== null && pidAlive(c.pid) && isNbdfuseOf(c.pid, path.join(c.dir, 'fuse')) : true;
    out.push({ ...c, state: deviceThere && helperOk ? 'connected' : 'stale', mountedAt: mountsOf(c.device) });
  }
  return out;
}

/** Polls `cond` every 20-100 ms until true or `timeoutMs` passed; returns its last value. */
async function until(cond: () => boolean, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  for (let wait = 20; ; wait = Math.min(100, wait * 2)) {
    if (cond()) return true;
    if (Date.now() >= end) return false;
    await new Promise((r) => setTimeout(r, wait));
  }
}

function tail(s: string): string {
  const t = s.trim().split('\n').slice(-3).join(' / ');
  return t === '' ? '' : `: ${t}`;
}

/**
 * Connects export `exportName` at `uri` as a kernel block device and records it. Either the
 * device exists and is recorded, or everything made on the way (folder, FUSE mount, nbdfuse,
 * loop device) is undone and a {@link ConnectError} says which step failed and why. Needs root.
 * Returns the record.
 */
export async function connectExport(options: ConnectOptions): Promise<Connection> {
  const pre = connectPrerequisites(options.method ?? 'auto');
  if (!pre.ok) throw new ConnectError(pre.code, `cannot connect ${options.exportName}: ${pre.reason}`);
  const exec = options.runner ?? run;
  const timeoutMs = options.timeoutMs ?? 15_000;
  const id = `${options.exportName.replace(/[^A-Za-z0-9_.-]/g, '_').slice(0, 40)}-${randomBytes(4).toString('hex')}`;
  const dir = path.join(options.connectionsDir, id);
  const undo: Array<() => Promise<void>> = [];
  fs.mkdirSync(dir, { recursive: true, mode: 0o700 });
  undo.push(async () => removeConnectionDir(dir));
  try {
    const base = { id, exportName: options.exportName, uri: options.uri, owner: options.owner, dir, createdAt: new Date().toISOString() };
    if (pre.method === 'nbd-client') {
      const c = await connectNbdClient(base, options, exec, timeoutMs);
      writeRecord(c);
      return c;
    }
    const fuseDir = path.join(dir, 'fuse');
    fs.mkdirSync(fuseDir);
    const pidFile = path.join(dir, 'nbdfuse.pid');
    const logFd = fs.openSync(path.join(dir, 'nbdfuse.log'), 'a');
    // Detached, in its own session: nbdfuse outlives the daemon that started it (a daemon
    // restart must not pull the FUSE file from under a mounted filesystem).
    const child = spawn(which('nbdfuse') ?? 'nbdfuse', [...(options.readOnly === true ? ['-r'] : []), '-P', pidFile, path.join(fuseDir, 'disk'), options.uri], {
      detached: true,
      stdio: ['ignore', logFd, logFd],
    });
    fs.closeSync(logFd);
    let exited = false;
    child.on('exit', () => (exited = true));
    child.on('error', () => (exited = true));
    child.unref();
    undo.push(async () => {
      await exec('fusermount3', ['-u', fuseDir], { timeoutMs });
      if (!(await until(() => exited, 5000))) child.kill('SIGKILL');
    });
    const ready = await until(() => exited || (fs.existsSync(pidFile) && fs.statSync(pidFile).size > 0), timeoutMs);
    if (exited || !ready) {
      const log = fs.readFileSync(path.join(dir, 'nbdfuse.log'), 'utf8');
      throw new ConnectError(exited ? 'EIO' : 'ETIMEDOUT', `nbdfuse could not open ${options.uri}${exited ? '' : ` within ${timeoutMs} ms`}${tail(log)}`);
    }
    const file = path.join(fuseDir, 'disk');
    const readOnly = options.readOnly === true || (fs.statSync(file).mode & 0o222) === 0;
    // `losetup -f` can race another losetup for the same free device: retry on EBUSY.
    let device = '';
    for (let attempt = 0; device === ''; attempt++) {
      const r = await exec('losetup', ['--find', '--show', '--direct-io=on', ...(readOnly ? ['--read-only'] : []), file], { timeoutMs });
      if (r.code === 0 && r.stdout.trim().startsWith('/dev/')) device = r.stdout.trim();
      else if (attempt >= 4 || !/busy|resource/i.test(r.stderr)) throw new ConnectError('EIO', `losetup could not attach ${file}${tail(r.stderr)}`);
    }
    undo.push(async () => void (await exec('losetup', ['-d', device], { timeoutMs })));
    const c: Connection = { ...base, device, method: 'nbdfuse', readOnly, pid: child.pid ?? null };
    writeRecord(c);
    return c;
  } catch (err) {
    for (const u of undo.reverse()) await u().catch(() => {});
    throw BlkError.isInstance(err) ? err : new ConnectError('EIO', `cannot connect ${options.exportName}: ${(err as Error).message}`, { cause: err });
  }
}

async function connectNbdClient(base: Omit<Connection, 'device' | 'method' | 'readOnly' | 'pid'>, options: ConnectOptions, exec: Runner, timeoutMs: number): Promise<Connection> {
  // A free /dev/nbdN has no `pid` attribute in sysfs.
  const free = fs
    .readdirSync('/sys/class/block')
    .filter((n) => /^nbd\d+$/.test(n) && !fs.existsSync(`/sys/class/block/${n}/pid`))
    .sort((a, b) => Number(a.slice(3)) - Number(b.slice(3)))[0];
  if (free === undefined) throw new ConnectError('EBUSY', 'every /dev/nbdN is in use (load the module with more: modprobe nbd nbds_max=32)');
  const device = `/dev/${free}`;
  const u = new URL(options.uri);
  const where = u.protocol === 'nbd+unix:' ? ['-unix', u.searchParams.get('socket') ?? ''] : [u.hostname || '127.0.0.1', u.port || '10809'];
  // -persist: nbd-client reconnects when the server restarts (a daemon restart then costs a
  // pause, not an I/O error).
  const r = await exec('nbd-client', [...where, device, '-N', options.exportName, '-persist', ...(options.readOnly === true ? ['-readonly'] : [])], { timeoutMs });
  if (r.code !== 0) throw new ConnectError('EIO', `nbd-client could not connect ${options.exportName} to ${device}${tail(r.stderr)}`);
  let pid: number | null = null;
  try {
    pid = Number(fs.readFileSync(`/sys/class/block/${free}/pid`, 'utf8').trim());
  } catch {
    // not ready yet: only informative
  }
  return { ...base, device, method: 'nbd-client', readOnly: options.readOnly === true, pid };
}

function removeConnectionDir(dir: string): void {
  // Never a recursive remove: a FUSE mount still alive in fuse/ would be walked into.
  for (const f of [RECORD, `${RECORD}.tmp`, 'nbdfuse.pid', 'nbdfuse.log']) fs.rmSync(path.join(dir, f), { force: true });
  try {
    fs.rmdirSync(path.join(dir, 'fuse'));
  } catch {
    // absent, or still a mount point (then the folder stays, and says so by existing)
  }
  try {
    fs.rmdirSync(dir);
  } catch {
    // see above
  }
}

/**
 * Finds the record of `device` (`/dev/loopN`, `loopN`, `/dev/nbdN`): in `connectionsDir` when
 * given, else from the loop device's backing file (`<dir>/fuse/disk`), so a device can be
 * disconnected with no daemon running. Null when blkfilter did not connect it.
 */
export function findConnection(device: string, connectionsDir?: string): Connection | null {
  const dev = device.startsWith('/dev/') ? device : `/dev/${device}`;
  if (connectionsDir !== undefined) {
    const hit = listConnections(connectionsDir).find((c) => c.device === dev);
    if (hit !== undefined) return hit;
  }
  try {
    const back = fs.readFileSync(`/sys/class/block/${path.basename(dev)}/loop/backing_file`, 'utf8').trim();
    if (path.basename(back) === 'disk' && path.basename(path.dirname(back)) === 'fuse') {
      const c = readRecord(path.dirname(path.dirname(back)));
      if (c !== null && c.device === dev) return c;
    }
  } catch {
    // not a loop device
  }
  return null;
}

/**
 * Disconnects `device`: refuses (EBUSY) while a filesystem on it is mounted or another kernel
 * driver holds it, and (ENOENT) when blkfilter did not connect it. Then detaches the loop
 * device, unmounts the FUSE file (nbdfuse exits), and removes the record; or `nbd-client -d`.
 * Works on a stale connection (its daemon or nbdfuse died). Returns the removed record.
 */
export async function disconnectDevice(device: string, options: { connectionsDir?: string; runner?: Runner; timeoutMs?: number } = {}): Promise<Connection> {
  const exec = options.runner ?? run;
  const timeoutMs = options.timeoutMs ?? 15_000;
  const c = findConnection(device, options.connectionsDir);
  if (c === null) throw new ConnectError('ENOENT', `${device} is not a device that blkfilter connected (see \`blkfilter status\`); nothing done`);
  const mounted = mountsOf(c.device);
  if (mounted.length > 0) throw new ConnectError('EBUSY', `${c.device} is mounted on ${mounted.join(', ')}: unmount it first (umount ${mounted[0]}), then disconnect`);
  const holders = holdersOf(c.device);
  if (holders.length > 0) throw new ConnectError('EBUSY', `${c.device} is held by ${holders.join(', ')} (device-mapper, md, ...): remove those first`);
  if (c.method === 'nbd-client') {
    const r = await exec('nbd-client', ['-d', c.device], { timeoutMs });
    if (r.code !== 0 && fs.existsSync(`/sys/class/block/${path.basename(c.device)}/pid`)) throw new ConnectError('EIO', `nbd-client -d ${c.device} failed${tail(r.stderr)}`);
    removeConnectionDir(c.dir);
    return c;
  }
  if (loopAttached(c.device)) {
    const r = await exec('losetup', ['-d', c.device], { timeoutMs });
    if (r.code !== 0) throw new ConnectError('EIO', `losetup -d ${c.device} failed${tail(r.stderr)}`);
  }
  // Never pull the FUSE file from under a loop device that still holds it (a lazy unmount
  // would hide it: the loop would live on, backed by a file no one can name).
  if (!(await until(() => !loopAttached(c.device), 10_000))) throw new ConnectError('EBUSY', `${c.device} still holds its backing file after losetup -d; nothing else undone, try again`);
  const fuseDir = path.join(c.dir, 'fuse');
  // The loop device lets go of the FUSE file asynchronously: retry the unmount while busy. A
  // dead nbdfuse leaves a mount that answers ENOTCONN; fusermount3 -u still removes it.
  let unmounted = false;
  let lastErr = '';
  for (let i = 0; i < 50 && !unmounted; i++) {
    if (!readMounts().some((m) => m.mountPoint === fuseDir)) {
      unmounted = true;
      break;
    }
    const r = await exec('fusermount3', ['-u', fuseDir], { timeoutMs });
    unmounted = r.code === 0;
    lastErr = r.stderr;
    if (!unmounted) await new Promise((res) => setTimeout(res, 100));
  }
  if (!unmounted) {
    const r = await exec('umount', ['-l', fuseDir], { timeoutMs });
    if (r.code !== 0) throw new ConnectError('EBUSY', `cannot unmount the FUSE file at ${fuseDir}${tail(lastErr + r.stderr)}`);
  }
  if (!(await until(() => !pidAlive(c.pid), 5000)) && c.pid !== null && isNbdfuseOf(c.pid, fuseDir)) {
    try {
      process.kill(c.pid, 'SIGKILL');
    } catch {
      // gone meanwhile
    }
  }
  removeConnectionDir(c.dir);
  return c;
}

/** What the system holds under `dir`: loop devices backed by files there, mounts there, nbdfuse serving there. */
export async function heldUnder(dir: string): Promise<{ loops: string[]; mounts: string[]; nbdfuse: number[] }> {
  const l = await run('losetup', ['-a']);
  const loops = l.stdout.split('\n').filter((line) => line.includes(dir)).sort();
  const mounts = readMounts()
    .filter((m) => m.mountPoint.startsWith(dir) || m.source.includes(dir))
    .map((m) => `${m.source} ${m.mountPoint} ${m.fsType}`)
    .sort();
  const nbdfuse: number[] = [];
  for (const pid of fs.readdirSync('/proc').filter((e) => /^\d+$/.test(e))) {
    try {
      const argv = fs.readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
      if (path.basename(argv[0] ?? '') === 'nbdfuse' && argv.some((a) => a.includes(dir))) nbdfuse.push(Number(pid));
    } catch {
      // exited meanwhile
    }
  }
  return { loops, mounts, nbdfuse };
}
