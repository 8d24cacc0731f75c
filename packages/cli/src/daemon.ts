import fs from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import {
  BlkError,
  createDisk,
  FileBackend,
  getBlockDevice,
  InvalidArgumentError,
  listBlockDevices,
  type BlockBackend,
  type BlockDev,
  type Disk,
} from '@blkfilter/bio';
import { backupSnapshot } from '@blkfilter/backup';
import { cbtInfo, cbtMap, markDirty, registerCbtFilter } from '@blkfilter/cbt';
import { createNbdServer, isNbdUri, NbdClientBackend, parseNbdUri, type NbdServer, type NbdServerAddress } from '@blkfilter/nbd';
import { attachFilter, detachFilter, listFilters, listRegisteredFilters } from '@blkfilter/registry';
import { createSnapshot, getSnapshot, listSnapshots, type DiffStorageOptions, type Snapshot, type SnapshotInfo } from '@blkfilter/snapshot';
import { connectControlMethods, connectionsDirOf, daemonConnections } from './connect-control.js';
import { startControlServer, type ControlMethod } from './control.js';
import type { StatusHttpServer } from './http.js';
import { DaemonIoStats } from './io-stats.js';
import { defaultStateDir } from './paths.js';
import { claimControlPath, claimSource, RunDir, type ClaimedSource } from './serve-state.js';
import { serveBackup, servedBackupJson, type BackupExportSpec, type ServedBackup } from './serve-backup.js';
import { startStatusPage } from './status-page.js';

/** A backup running in the daemon: visible in `status`, cancellable. */
interface BackupJob {
  readonly id: string;
  readonly snapshot: string;
  readonly dir: string;
  bytesDone: number;
  bytesTotal: number;
  readonly startedAt: string;
  readonly abort: AbortController;
}

function pickCbt(i: { generationReason: string; generationDetail: string | null }): { generationReason: string; generationDetail: string | null } {
  return { generationReason: i.generationReason, generationDetail: i.generationDetail };
}

/** Options of {@link startDaemon}. */
export interface DaemonOptions {
  /** Raw image files or `nbd://HOST[:PORT]/EXPORT`, `nbds://...`, `nbd+unix:///EXPORT?socket=PATH` URIs. */
  readonly sources: readonly string[];
  /** NBD sources: keep reconnecting this long while the server is unreachable (default 60 s; 0: fail at once). */
  readonly retryForMs?: number;
  /** NBD sources: connections per source when the server allows multi-conn (default 4). */
  readonly connections?: number;
  /** NBD sources over TLS (`nbds://`) that name no `tls-certificates`: a folder with `ca-cert.pem` (and `client-cert.pem`, `client-key.pem`). */
  readonly sourceTlsCerts?: string;
  /** Device names, one per source (default: from the file or export name). */
  readonly names?: readonly string[];
  /** Backup points to serve (`serve --backup`) or restore live (`restore --live`). */
  readonly backups?: readonly BackupExportSpec[];
  /** Attach changed-block tracking to every device (state saved next to each image). */
  readonly cbt?: boolean;
  /** `HOST:PORT`, `unix:PATH` or an inherited listening socket `fd:N` for NBD (default 127.0.0.1:10809). */
  readonly listen?: string;
  /** The control socket path. */
  readonly control: string;
  /** A folder with `server-cert.pem` and `server-key.pem`: NBD then requires TLS. */
  readonly tlsCerts?: string;
  /**
   * Where state that outlives the daemon lives (default `$XDG_STATE_HOME/blkfilter`, or
   * `/var/lib/blkfilter` for root): per source, keyed by its identity, the CBT state and who
   * serves it; per run, the diff storage of snapshots (removed at exit, and at the next start
   * after a crash).
   */
  readonly stateDir?: string;
  /**
   * `HOST:PORT` or `PORT` (host 127.0.0.1): serve the read-only status page, its API and
   * Prometheus `/metrics` there, and count I/O per device and export. Off by default.
   */
  readonly http?: string;
  /** Progress and events, one line each. */
  readonly log?: (line: string) => void;
  /** Called after a `shutdown` request stopped the daemon. */
  readonly onShutdown?: () => void;
}

/** A running daemon. */
export interface Daemon {
  readonly nbdAddress: NbdServerAddress;
  readonly control: string;
  readonly devices: readonly Disk[];
  /** Where the status page listens (`http`), else null. */
  readonly http: { readonly host: string; readonly port: number } | null;
  /** Stops everything cleanly: NBD, snapshots, filters (CBT saves its map), devices. */
  stop(): Promise<void>;
}

export { defaultControlPath } from './paths.js';

function deviceNameFor(source: string, taken: Set<string>): string {
  // An NBD export is named after the export, else the host (nbd://127.0.0.1:10810/ -> "127.0.0.1").
  let base = isNbdUri(source) ? parseNbdUri(source).defaultName : path.basename(source).replace(/\.(raw|img|bin)$/i, '');
  base = base.replace(/[^A-Za-z0-9_.:-]/g, '-').slice(0, 48) || 'disk';
  let name = base;
  for (let i = 2; taken.has(name); i++) name = `${base}-${i}`;
  taken.add(name);
  return name;
}

async function openSource(source: string, options: DaemonOptions, log: (line: string) => void): Promise<BlockBackend> {
  if (!isNbdUri(source)) return FileBackend.open(source);
  const uri = parseNbdUri(source, options.sourceTlsCerts !== undefined ? { tlsCertificates: options.sourceTlsCerts } : {});
  const backend = await NbdClientBackend.connect({
    ...uri,
    connections: options.connections ?? 4,
    retryForMs: options.retryForMs ?? 60_000,
  });
  // The remote going away and coming back is news for whoever reads the log; `status` shows it too.
  backend.onStateChange((state, error) => log(`${backend.description}: ${state}${error !== null ? ` (${error.message})` : ''}`));
  return backend;
}

/**
 * True when this process was started by systemd-style socket activation with one socket
 * (`LISTEN_PID` is ours, `LISTEN_FDS=1`): the listening socket is fd 3. libnbd's clients start
 * servers this way (`nbdinfo -- [ blkfilter serve disk.raw ]`).
 */
export function isSocketActivated(env: NodeJS.ProcessEnv = process.env): boolean {
  return env.LISTEN_PID === String(process.pid) && env.LISTEN_FDS === '1';
}

/** Parses `--listen`, saying which part is wrong. */
export function parseListen(listen: string): { port?: number; host?: string; path?: string; fd?: number } {
  if (listen.startsWith('unix:')) {
    if (listen.length === 5) throw new InvalidArgumentError(`--listen ${listen}: the socket path after "unix:" is missing`);
    return { path: listen.slice(5) };
  }
  if (/^fd:\d+$/.test(listen)) return { fd: Number(listen.slice(3)) };
  const m = /^(?:\[([^\]]+)\]|([^:]*)):([^:]*)$/.exec(listen);
  if (m === null) throw new InvalidArgumentError(`--listen ${listen}: expected HOST:PORT (e.g. 127.0.0.1:10809, [::1]:10809) or unix:PATH`);
  const host = m[1] ?? (m[2] || '127.0.0.1');
  const portText = m[3] as string;
  const port = Number(portText);
  if (!/^\d+$/.test(portText) || port > 65535) throw new InvalidArgumentError(`--listen ${listen}: port "${portText}" is not a number from 0 to 65535`);
  const v4 = /^\d+\.\d+\.\d+\.\d+$/.test(host);
  if ((v4 && net.isIPv4(host) === false) || (m[1] !== undefined && !net.isIPv6(host)) || (!v4 && m[1] === undefined && !/^[A-Za-z0-9.-]+$/.test(host))) {
    throw new InvalidArgumentError(`--listen ${listen}: host "${host}" is not an IP address or host name`);
  }
  return { host, port };
}

function str(params: Record<string, unknown>, key: string): string {
  const v = params[key];
  if (typeof v !== 'string' || v === '') throw new InvalidArgumentError(`missing ${key}`);
  return v;
}

function num(params: Record<string, unknown>, key: string, fallback?: number): number {
  const v = params[key];
  if (v === undefined && fallback !== undefined) return fallback;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new InvalidArgumentError(`${key} must be a number`);
  return v;
}

/** A snapshot's info, as plain JSON (errors as messages). */
function snapshotJson(info: SnapshotInfo): Record<string, unknown> {
  const history = info.history.map((e) => ('error' in e ? { ...e, error: { code: e.error.code, message: e.error.message } } : e));
  return { ...info, error: info.error === null ? null : { code: info.error.code, message: info.error.message }, history };
}

/**
 * Starts `blkfilter serve`: opens each source as a disk (partitions read from its table),
 * attaches CBT when asked, exports every device over NBD, and answers the control socket that
 * the other commands use.
 */
export async function startDaemon(options: DaemonOptions): Promise<Daemon> {
  const log = options.log ?? (() => {});
  if (options.sources.length === 0 && (options.backups ?? []).length === 0) throw new InvalidArgumentError('give at least one SOURCE: a raw image file or an nbd:// URI (or --backup DIR)');
  registerCbtFilter();
  const disks: Disk[] = [];
  const taken = new Set(listBlockDevices().map((b) => b.name));
  const stateDir = path.resolve(options.stateDir ?? defaultStateDir());
  let nbd: NbdServer | null = null;
  let control: net.Server | null = null;
  // The control path first: a second daemon on it fails before touching any source.
  const controlClaim = await claimControlPath(options.control);
  const claims: ClaimedSource[] = [];
  let run: RunDir | null = null;
  const snapshots = new Map<string, Snapshot>();
  const snapshotExports = new Map<string, string[]>();
  const served: ServedBackup[] = [];
  // Connected kernel devices are recorded in the state dir, so a restarted daemon lists them again.
  const connectionsDir = connectionsDirOf(stateDir);
  const io = new DaemonIoStats(options.http !== undefined);
  const backupDirs = new Set<string>();
  const backupJobs = new Map<string, BackupJob>();
  let backupSeq = 0;
  let httpServer: StatusHttpServer | null = null;

  let stopped = false;
  const stop = async (): Promise<void> => {
    if (stopped) return;
    stopped = true;
    if (httpServer !== null) await httpServer.close();
    httpServer = null;
    if (control !== null) await new Promise<void>((r) => control?.close(() => r()));
    control = null;
    if (nbd !== null) await nbd.close();
    nbd = null;
    for (const s of snapshots.values()) await s.destroy().catch(() => {});
    snapshots.clear();
    for (const d of disks) {
      for (const dev of [d.part0, ...d.partitions]) {
        for (const f of listFilters(dev)) await detachFilter(dev, f.name).catch((err: Error) => log(`detach ${f.name} from ${dev.name}: ${err.message}`));
      }
    }
    for (const d of disks) await d.remove();
    disks.length = 0;
    for (const b of served) b.live?.stop();
    for (const b of served) await b.disk.remove().catch((err: Error) => log(`remove ${b.disk.name}: ${err.message}`));
    served.length = 0;
    // The locks go last: until the CBT maps are saved, the sources are still ours.
    for (const c of claims.splice(0)) c.release();
    run?.remove();
    run = null;
    controlClaim.release();
  };

  try {
    const created = RunDir.create(stateDir);
    run = created.run;
    for (const dir of created.removed) log(`removed the run folder of a daemon that died: ${dir}`);
    for (const [i, source] of options.sources.entries()) {
      const name = options.names?.[i] ?? deviceNameFor(source, taken);
      if (!/^nbds?(\+unix)?:\/\//.test(source) && !fs.existsSync(source)) {
        throw new BlkError('ENOENT', `no image at ${source}: create one with \`blkfilter serve --create SIZE ${source}\` (a sparse raw file, e.g. --create 10G), or give an existing image or an nbd:// URI`);
      }
      const claim = claimSource(stateDir, source, options.control);
      claims.push(claim);
      const backend = await openSource(source, options, log);
      const disk = await createDisk({ name, backend });
      disks.push(disk);
      log(`device ${name}: ${backend.description}, ${disk.capacity * 512} bytes, ${disk.partitions.length} partition(s)`);
      if (options.cbt === true) {
        // Keyed by the source's identity in the state dir, for files and NBD sources alike:
        // a restart of either resumes the generation.
        await attachFilter(disk.part0, 'cbt', { options: { stateFile: claim.cbtStateFile } });
        const info = await cbtInfo(disk.part0);
        log(`cbt on ${name}: generation ${info.generationId} (${info.generationReason}${info.generationDetail !== null ? `: ${info.generationDetail}` : ''}), block ${info.blockSize} bytes, state ${claim.cbtStateFile}`);
      }
    }
    nbd = createNbdServer({
      ...(options.tlsCerts !== undefined
        ? {
            tls: {
              key: fs.readFileSync(path.join(options.tlsCerts, 'server-key.pem')),
              cert: fs.readFileSync(path.join(options.tlsCerts, 'server-cert.pem')),
            },
          }
        : {}),
      defaultExport: disks[0]?.name ?? options.backups?.[0]?.name ?? '',
    });
    for (const spec of options.backups ?? []) {
      const b = await serveBackup(spec, nbd, `blkfilter daemon (control ${options.control})`, log);
      served.push(b);
      log(`device ${b.disk.name}: ${b.disk.backend.description}, ${b.disk.capacity * 512} bytes, ${b.disk.partitions.length} partition(s)`);
    }
    for (const d of disks) {
      nbd.addExport(d.name, { device: d.part0, writable: !d.part0.readOnly, description: `blkfilter device ${d.name}`, ...io.exportConfig(d.name, d.part0) });
      for (const p of d.partitions) nbd.addExport(p.name, { device: p, writable: !p.readOnly, description: `partition ${p.partno} of ${d.name}`, ...io.exportConfig(p.name, p) });
    }
    const address = await nbd.listen(parseListen(options.listen ?? '127.0.0.1:10809'));
    log(`nbd: listening on ${address.kind === 'tcp' ? `nbd://${address.host}:${address.port}/` : address.kind === 'unix' ? `nbd+unix:///?socket=${address.path}` : `inherited fd ${address.fd}`}`);

    const methods: Record<string, ControlMethod> = {
      status: () => ({
        nbd: address,
        devices: disks.map((d) => ({
          name: d.name,
          sizeBytes: d.capacity * 512,
          backend: d.backend.description,
          // NBD sources: connected, degraded (reconnecting, I/O waits) or failed (I/O fails).
          ...(d.backend instanceof NbdClientBackend ? { state: d.backend.state, remote: d.backend.status } : {}),
          partitions: d.partitions.map((p) => ({ name: p.name, start: p.startSect, sectors: p.nrSects })),
          filters: listFilters(d.part0),
        })),
        snapshots: listSnapshots().map(snapshotJson),
        // Backups running now, with bytes done (cancel with backup.cancel / `backup --cancel ID`).
        backups: [...backupJobs.values()].map((j) => ({ id: j.id, snapshot: j.snapshot, dir: j.dir, bytesDone: j.bytesDone, bytesTotal: j.bytesTotal, startedAt: j.startedAt })),
        // Backup points served as devices (serve --backup, restore --live).
        served: served.map(servedBackupJson),
        connections: daemonConnections({ connectionsDir, control: options.control }),
      }),
      ...connectControlMethods({
        control: options.control,
        connectionsDir,
        address: () => (nbd === null ? null : address),
        exportNames: () => nbd?.exportNames ?? [],
        tls: options.tlsCerts !== undefined,
        log,
      }),
      'filter.registered': () => listRegisteredFilters(),
      'filter.list': (p) => listFilters(str(p, 'device')),
      'filter.attach': async (p) =>
        attachFilter(str(p, 'device'), str(p, 'filter'), {
          ...(p.altitude !== undefined ? { altitude: num(p, 'altitude') } : {}),
          ...(p.options !== undefined ? { options: p.options } : {}),
        }),
      'filter.detach': async (p) => {
        await detachFilter(str(p, 'device'), str(p, 'filter'));
        return { detached: true };
      },
      'cbt.info': (p) => cbtInfo(str(p, 'device')),
      'cbt.map': async (p) => {
        const bytes = await cbtMap(str(p, 'device'), { offset: num(p, 'offset', 0), length: num(p, 'length') });
        return { offset: num(p, 'offset', 0), map: Buffer.from(bytes).toString('base64') };
      },
      'cbt.markDirty': async (p) => {
        const ranges = p.ranges as Array<{ sector: number; sectors: number }>;
        await markDirty(str(p, 'device'), ranges);
        return { marked: ranges.length };
      },
      'snapshot.create': async (p) => {
        const devices = p.devices as string[];
        if (!Array.isArray(devices) || devices.length === 0) throw new InvalidArgumentError('snapshot create needs at least one device');
        const limitBytes = num(p, 'limitBytes', 1 << 30);
        const storage: DiffStorageOptions =
          p.storage === 'memory'
            ? { kind: 'memory', limitBytes }
            : { kind: 'directory', path: typeof p.storage === 'string' && p.storage !== '' ? p.storage : (run as RunDir).diffDir, limitBytes };
        if (storage.kind === 'directory') fs.mkdirSync(storage.path, { recursive: true });
        const s = await createSnapshot({ storage, ...(p.chunkSize !== undefined ? { chunkSize: num(p, 'chunkSize') } : {}) });
        try {
          for (const d of devices) await s.addDevice(d);
        } catch (err) {
          await s.destroy().catch(() => {});
          throw err;
        }
        snapshots.set(s.id, s);
        return snapshotJson(s.info());
      },
      'snapshot.take': async (p) => {
        const s = getSnapshot(str(p, 'id'));
        await s.take();
        const info = s.info();
        // Export each image (read-only unless asked: writes to an image stay in diff storage),
        // with the CBT bitmap of what changed since the take before.
        const names: string[] = [];
        for (const dev of info.devices) {
          const imageName = dev.image;
          if (imageName === null || nbd === null) continue;
          const original = getBlockDevice(dev.device);
          const tracked = listFilters(original).some((f) => f.name === 'cbt');
          const bitmap = tracked ? await cbtInfo(original) : null;
          nbd.addExport(imageName, {
            device: getBlockDevice(imageName),
            writable: p.writable === true,
            description: `snapshot ${s.id} of ${dev.device}${p.writable === true ? ' (writable)' : ''}`,
            ...io.exportConfig(imageName, getBlockDevice(imageName)),
            ...(bitmap !== null && bitmap.snapNumber > 0
              ? { bitmap: { name: 'cbt', since: bitmap.snapNumber - 1, generationId: bitmap.snapGenerationId ?? bitmap.generationId, device: original } }
              : {}),
          });
          names.push(imageName);
        }
        snapshotExports.set(s.id, names);
        log(`snapshot ${s.id} taken: images ${names.join(', ')}`);
        return snapshotJson(info);
      },
      'snapshot.info': (p) => snapshotJson(getSnapshot(str(p, 'id')).info()),
      'snapshot.list': () => listSnapshots().map(snapshotJson),
      'snapshot.destroy': async (p) => {
        const id = str(p, 'id');
        const s = getSnapshot(id);
        for (const e of snapshotExports.get(id) ?? []) {
          nbd?.removeExport(e);
          io.dropExport(e);
          io.dropDevice(e);
        }
        snapshotExports.delete(id);
        await s.destroy();
        snapshots.delete(id);
        return { destroyed: id };
      },
      'snapshot.waitEvent': async (p) => {
        const ev = await getSnapshot(str(p, 'id')).waitEvent({ timeoutMs: num(p, 'timeoutMs', 30_000) });
        const e = ev as unknown as Record<string, unknown>;
        const err = e.error as BlkError | undefined;
        return err !== undefined && BlkError.isInstance(err) ? { ...e, error: { code: err.code, message: err.message } } : e;
      },
      backup: async (p, progress) => {
        const s = getSnapshot(str(p, 'snapshot'));
        const info = s.info();
        let devices = info.devices.map((d) => d.device);
        if (typeof p.device === 'string') {
          if (!devices.includes(p.device)) throw new InvalidArgumentError(`snapshot ${s.id} holds ${devices.join(', ')}, not "${p.device}"`);
          devices = [p.device];
        }
        if (devices.length === 0) throw new InvalidArgumentError(`snapshot ${s.id} has no devices`);
        const dir = path.resolve(str(p, 'to'));
        backupDirs.add(dir);
        const job: BackupJob = { id: `b${++backupSeq}`, snapshot: s.id, dir, bytesDone: 0, bytesTotal: 0, startedAt: new Date().toISOString(), abort: new AbortController() };
        backupJobs.set(job.id, job);
        progress({ id: job.id, done: 0, total: 0 });
        // What CBT says of each device, so the answer can say whether it resumed after a crash.
        const cbt = await Promise.all(
          devices.map(async (d) => (listFilters(d).some((f) => f.name === 'cbt') ? { device: d, ...pickCbt(await cbtInfo(d)) } : { device: d, generationReason: null, generationDetail: null })),
        );
        try {
          // The library matches each image to its device and that device's CBT take.
          const result = await backupSnapshot({
            dir,
            image: devices.map((d) => s.image(d)),
            mode: p.mode === 'full' || p.mode === 'incremental' ? p.mode : 'auto',
            compress: p.compress === true,
            signal: job.abort.signal,
            onProgress: (done, total) => {
              job.bytesDone = done;
              job.bytesTotal = total;
              progress({ id: job.id, done, total });
            },
          });
          const first = result.images[0];
          log(`backup ${job.id} of snapshot ${s.id} into ${dir}: point ${result.position}`);
          // `entry` and `fullBecause`: the first device's, as before several devices per point.
          return { ...result, id: job.id, cbt, entry: first?.entry, fullBecause: first?.fullBecause ?? null };
        } finally {
          backupJobs.delete(job.id);
        }
      },
      'backup.cancel': (p) => {
        const id = str(p, 'id');
        const job = backupJobs.get(id);
        if (job === undefined) {
          throw new BlkError('ENOENT', `no backup ${id} is running (running: ${[...backupJobs.keys()].join(', ') || 'none'}; see \`blkfilter status\`)`);
        }
        job.abort.abort();
        log(`backup ${id}: cancel asked`);
        return { cancelling: id };
      },
      shutdown: (p) => {
        const connected = daemonConnections({ connectionsDir, control: options.control });
        if (connected.length > 0 && p.force !== true) {
          throw new BlkError('EBUSY', `${connected.map((c) => `${c.device} (${c.exportName}${c.mountedAt.length > 0 ? `, mounted on ${c.mountedAt.join(', ')}` : ''})`).join(', ')} still connected: unmount and \`blkfilter disconnect\` them, or stop with --force (their filesystems then see I/O errors)`);
        }
        setImmediate(() => void stop().then(() => options.onShutdown?.()));
        return { stopping: true };
      },
    };
    control = await startControlServer(options.control, methods);
    log(`control: ${options.control}`);
    if (options.http !== undefined) {
      const status = methods.status as ControlMethod;
      httpServer = await startStatusPage({ listen: options.http, io, status: () => status({}, () => {}), nbd: () => nbd, backupDirs, log });
      log(`http: status page on http://${httpServer.host.includes(':') ? `[${httpServer.host}]` : httpServer.host}:${httpServer.port}/`);
    }
    const httpAddr = httpServer === null ? null : { host: httpServer.host, port: httpServer.port };
    return { nbdAddress: address, control: options.control, devices: disks, http: httpAddr, stop };
  } catch (err) {
    await stop().catch(() => {});
    throw err;
  }
}

export type { BlockDev };
