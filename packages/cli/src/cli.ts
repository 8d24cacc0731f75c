#!/usr/bin/env node
import { spawnSync } from 'node:child_process';
import fs from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { BlkError } from '@blkfilter/bio';
import { Command, CommanderError, InvalidArgumentError as CommanderArgError, Option } from 'commander';
import { list, prune, RepositoryDamageError, restore, verify, verifyAgainst } from '@blkfilter/backup';
import { disconnectDevice, type Connection, type ConnectionStatus } from './connect.js';
import { callControl } from './control.js';
import { defaultControlPath, isSocketActivated, startDaemon } from './daemon.js';
import { createLogger, LogLevel, type LogLevelName } from './log.js';
import { defaultStateDir } from './paths.js';
import { withFrozenFilesystems } from './freeze.js';
import { defaultMountsDir, mountBackup, unmountBackup } from './mount.js';
import { humanBytes, progressBar } from './progress.js';

/** Exit codes, as documented in `blkfilter --help`. */
export const ExitCode = {
  OK: 0,
  FAILED: 1,
  USAGE: 2,
  NO_DAEMON: 3,
  DIFFERENT: 4,
  /** The backup folder is damaged or inconsistent (the message names the file and offset). */
  DAMAGED: 5,
  /** Nothing happened in time (`snapshot wait-event --timeout`). */
  TIMEOUT: 6,
  /** Interrupted (Ctrl-C): what was running was cancelled and nothing half-done was kept. */
  INTERRUPTED: 130,
} as const;

const EXIT_HELP = `
Exit codes:
  0  success
  1  the operation failed (I/O error, bad image, refused by the daemon)
  2  bad usage (unknown option, missing argument)
  3  no daemon is listening on the control socket (start one with \`blkfilter serve\`)
  4  verify --against found a difference
  5  the backup folder is damaged or inconsistent (the message names the file and offset)
  6  snapshot wait-event: no event came before --timeout
  130  interrupted (Ctrl-C): a backup was cancelled in the daemon, nothing was recorded

Environment:
  BLKFILTER_CONTROL  control socket path (default: control.sock in $XDG_RUNTIME_DIR/blkfilter,
                     /run/blkfilter for root)
  XDG_STATE_HOME     state of served sources (default ~/.local/state; /var/lib/blkfilter for root)`;

/** `blkfilter help TOPIC`: the concepts a user needs, in a screen each. */
const HELP_TOPICS: Record<string, string> = {
  devices: `
Devices
  A SOURCE given to \`serve\` (a raw image file, or an nbd:// URI of another NBD server) becomes a
  disk; its MBR or GPT partitions become devices too (disk p1, p2...). Every device is an NBD
  export of the daemon, and every bio to it passes through its filters (and a partition's bios
  through the disk's filters as well). \`blkfilter connect EXPORT\` makes a kernel block device
  of one (nbdfuse + loop here), so a real filesystem's I/O goes through blkfilter too.
  Only one daemon serves an image at a time (a lock; qemu programs refuse it meanwhile).`,
  cbt: `
Changed-block tracking (CBT)
  One byte per block (64 KiB by default): the "changes number" in which the block last changed.
  Each snapshot take freezes a copy of the map (the read map, what queries answer from) and
  moves the number on; "what changed since take N" is the blocks above N. A generation id names
  the map's lineage: a new one is drawn when the map can no longer be trusted (resize, reset,
  damaged state, 255 takes), and an incremental backup then becomes full, saying why.
  CBT survives restarts and crashes: first writes to a block wait for their mark to be durable
  (a journal in the state dir), so after kill -9 or a power cut the generation resumes.
  blkfilter cbt info DEVICE | cbt map DEVICE | cbt mark-dirty DEVICE SECTOR:COUNT...`,
  snapshots: `
Snapshots
  blkfilter snapshot create DEVICE... -> an id; snapshot take ID freezes the devices together,
  flushes them, and from that instant copies each chunk (256 KiB) before its first overwrite
  into diff storage (memory or files, growing up to --limit). The images (DEVICE-snapN) are
  exported read-only (or --writable) and read the devices as they were at the take. A snapshot
  whose diff storage overflows is marked corrupted (reads fail), never the device.
  --freeze MOUNTPOINT... makes a mounted filesystem's snapshot clean. snapshot destroy ID frees it.`,
  backups: `
Backup folders
  blkfilter backup ID --to DIR writes one point: per device a qcow2 image, full the first time,
  then incremental (only the blocks CBT reports, over the previous image as its backing file).
  manifest.json records every point with checksums; images are written under temporary names
  and recorded atomically, so an interrupted backup leaves the chain as it was. restore DIR --at N
  --to IMAGE checks every byte; verify DIR checks the whole folder offline; prune --keep-last N
  merges old points; serve --backup DIR --at N exports a point directly (instant recovery).
  qemu-img check/compare/convert read every folder as it is.`,
  'exit-codes': EXIT_HELP,
};


function parseSize(value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?$/i.exec(value.trim());
  if (m === null) throw new CommanderArgError(`"${value}" is not a size: use bytes or a suffix, e.g. 512M, 4G`);
  const mult = { '': 1, k: 1024, m: 1024 ** 2, g: 1024 ** 3, t: 1024 ** 4 }[(m[2] ?? '').toLowerCase()] ?? 1;
  return Math.round(Number(m[1]) * mult);
}

function parseIntArg(value: string): number {
  const n = Number(value);
  if (!Number.isSafeInteger(n) || n < 0) throw new CommanderArgError(`"${value}" is not a whole number`);
  return n;
}

/** `60s`, `5m`, `1h`, `500ms` or plain seconds, in milliseconds. */
function parseDuration(option: string, value: string): number {
  const m = /^(\d+(?:\.\d+)?)\s*(ms|s|m|h)?$/i.exec(value.trim());
  if (m === null) throw new CommanderArgError(`${option} "${value}" is not a duration: use e.g. 60s, 5m, 500ms or 0`);
  const mult = { ms: 1, s: 1000, m: 60_000, h: 3_600_000 }[(m[2] ?? 's').toLowerCase() as 'ms' | 's' | 'm' | 'h'];
  return Math.round(Number(m[1]) * mult);
}

function parseCount(option: string, value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 1 || n > 64) throw new CommanderArgError(`${option} "${value}" is not a whole number from 1 to 64`);
  return n;
}

function parseRange(value: string, previous: Array<{ sector: number; sectors: number }> = []): Array<{ sector: number; sectors: number }> {
  const m = /^(\d+):(\d+)$/.exec(value);
  if (m === null) throw new CommanderArgError(`"${value}" is not SECTOR:COUNT (512-byte sectors), e.g. 2048:128`);
  return [...previous, { sector: Number(m[1]), sectors: Number(m[2]) }];
}

/** A snapshot event in one line for people. */
function describeEvent(ev: Record<string, unknown> & { type: string }): string {
  const err = ev.error as { code?: string; message?: string } | undefined;
  const bits = Object.entries(ev)
    .filter(([k]) => k !== 'type' && k !== 'time' && k !== 'error')
    .map(([k, v]) => `${k} ${typeof v === 'number' && /bytes/i.test(k) ? humanBytes(v) : String(v)}`);
  return `${ev.type}${bits.length > 0 ? `: ${bits.join(', ')}` : ''}${err !== undefined ? ` (${err.code ?? ''}: ${err.message ?? ''})` : ''}`;
}

function print(json: boolean, value: unknown, human: () => string): void {
  process.stdout.write(json ? `${JSON.stringify(value, null, 2)}\n` : `${human()}\n`);
}

/**
 * Tells systemd the daemon is ready (Type=notify): Node cannot send to the NOTIFY_SOCKET
 * datagram socket itself, so `systemd-notify` does (the unit needs NotifyAccess=all).
 */
function notifySystemd(state: string): void {
  if (process.env.NOTIFY_SOCKET === undefined) return;
  const r = spawnSync('systemd-notify', [`--pid=${process.pid}`, ...state.split('\n')], { stdio: 'ignore' });
  if (r.error !== undefined || r.status !== 0) process.stderr.write('blkfilter: NOTIFY_SOCKET is set but systemd-notify failed; is the systemd package installed?\n');
}

/** Builds the `blkfilter` program (exported for tests). */
export function buildProgram(): Command {
  const program = new Command('blkfilter')
    .description('Intercept every I/O on block devices: changed-block tracking, point-in-time snapshots, and full + incremental qcow2 backups, served over NBD.')
    .version(cliVersion(), '-V, --version', 'print the version')
    .option('--control <path>', 'control socket of the daemon', defaultControlPath())
    .addHelpText('after', EXIT_HELP)
    .showHelpAfterError('(run with --help for usage)')
    // Remember that commander said something, so main() does not say it twice.
    .configureOutput({
      writeErr: (str) => {
        commanderSpoke = true;
        process.stderr.write(str);
      },
    })
    .exitOverride();
  program.helpCommand(false);
  program
    .command('help')
    .argument('[topic...]', `a command (e.g. "backup", "snapshot take") or a topic: ${Object.keys(HELP_TOPICS).join(', ')}`)
    .description('help on a command, or on a concept: devices, cbt, snapshots, backups, exit-codes')
    .action((words: string[]) => {
      const topic = HELP_TOPICS[words.join(' ')];
      if (topic !== undefined) {
        process.stdout.write(`${topic.trim()}\n`);
        return;
      }
      let cmd: Command = program;
      for (const w of words) {
        const next = cmd.commands.find((c) => c.name() === w || c.aliases().includes(w));
        if (next === undefined) throw new CommanderArgError(`no command or topic "${words.join(' ')}"; commands: ${program.commands.map((c) => c.name()).join(', ')}; topics: ${Object.keys(HELP_TOPICS).join(', ')}`);
        cmd = next;
      }
      cmd.outputHelp();
    });

  const ctl = (method: string, params: Record<string, unknown> = {}, onProgress?: (p: unknown) => void): Promise<unknown> =>
    callControl(program.opts<{ control: string }>().control, method, params, onProgress);

  program
    .command('serve')
    .description('run the daemon: open SOURCEs as devices, attach filters, export them (and snapshot images) over NBD')
    .argument('[source...]', 'raw image files or nbd://HOST[:PORT]/EXPORT (nbd+unix:///EXPORT?socket=PATH) URIs')
    .option('--backup <dir>', 'also serve a point of this backup folder, read-only, straight from its qcow2 chain (holds the folder: prune refuses meanwhile)')
    .option('--at <n>', 'with --backup: which point (1 = oldest; default: newest)', parseIntArg)
    .option('--overlay <path|memory>', 'with --backup: writable, writes go to this raw file (or memory), never into the backup folder')
    .option('--backup-name <name>', 'with --backup: export name (default backup-N)')
    .option('--backup-device <name>', 'with --backup: which device, when the folder holds several')
    .option('--cbt', 'attach changed-block tracking to every device (crash-safe; kept in the state dir)')
    .option('--create <size>', 'create each missing image file as a sparse raw file of SIZE (e.g. 10G)', parseSize)
    .option('--listen <addr>', 'NBD address: HOST:PORT or unix:PATH (socket activation, LISTEN_FDS=1: fd 3)', '127.0.0.1:10809')
    .option('--tls-certs <dir>', 'require TLS, with server-cert.pem and server-key.pem from DIR')
    .option('--name <name>', 'device name for the next SOURCE in order; repeat once per source (default: from the file name)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--state-dir <dir>', `state that outlives the daemon: CBT per source, diff storage per run (default: ${defaultStateDir()})`)
    .addOption(new Option('--log-level <level>', 'least severe events logged').choices(Object.keys(LogLevel)).default('info'))
    .addOption(new Option('--log-format <format>', 'one line per event, as text or JSON objects').choices(['text', 'json']).default('text'))
    .option('--log-file <path>', 'append the log here instead of stderr (SIGHUP reopens it, for logrotate)')
    .option('--pidfile <path>', 'write the daemon PID here (removed at exit)')
    .option('--retry-for <duration>', 'nbd:// sources: keep reconnecting this long (e.g. 60s, 5m, 0 to fail at once); I/O waits and is replayed', '60s')
    .option('--connections <n>', 'nbd:// sources: connections per source when the server allows multi-conn', '4')
    .option('--source-tls-certs <dir>', 'nbds:// sources: ca-cert.pem (and client-cert.pem, client-key.pem) from DIR, unless the URI has ?tls-certificates=')
    .option('--http <addr>', 'serve a read-only status page and Prometheus /metrics on HOST:PORT or PORT (host 127.0.0.1; off unless given)')
    .addHelpText(
      'after',
      '\nExample:\n  blkfilter serve --cbt disk.raw            # then: nbdinfo nbd://127.0.0.1:10809/disk\n  blkfilter serve --cbt --create 10G vm.raw # a new sparse image\n  blkfilter serve --backup /backups/disk --at 3   # then: nbdinfo --map=qemu:allocation-depth nbd://127.0.0.1:10809/backup-3\n  blkfilter serve --cbt --retry-for 2m nbd://storage:10809/vm1 nbds+unix:///?socket=/run/rbd.sock&tls-psk-file=keys.psk\n\nOnly one blkfilter serves an image at a time, and qemu programs refuse it while it does\n(locks). Under systemd: socket activation (LISTEN_FDS), readiness via systemd-notify when\nNOTIFY_SOCKET is set (NotifyAccess=all); see contrib/systemd/.',
    )
    .action(
      async (
        sources: string[],
        o: {
          cbt?: boolean;
          create?: number;
          listen: string;
          tlsCerts?: string;
          name?: string[];
          stateDir?: string;
          logLevel: LogLevelName;
          logFormat: 'text' | 'json';
          logFile?: string;
          pidfile?: string;
          retryFor: string;
          connections: string;
          sourceTlsCerts?: string;
          backup?: string;
          at?: number;
          overlay?: string;
          backupName?: string;
          backupDevice?: string;
          http?: string;
        },
      ) => {
        if (sources.length === 0 && o.backup === undefined) throw new CommanderArgError("missing required argument 'source' (or --backup DIR)");
        if (o.backup === undefined && (o.at !== undefined || o.overlay !== undefined || o.backupName !== undefined || o.backupDevice !== undefined)) throw new CommanderArgError('--at, --overlay, --backup-name and --backup-device go with --backup DIR');
        const control = program.opts<{ control: string }>().control;
        const logger = createLogger({ level: o.logLevel, format: o.logFormat, ...(o.logFile !== undefined ? { file: o.logFile } : {}) });
        let stopping = false;
        for (const source of sources) {
          if (o.create === undefined || /^nbds?(\+unix)?:\/\//.test(source) || fs.existsSync(source)) continue;
          fs.mkdirSync(path.dirname(path.resolve(source)), { recursive: true });
          const fd = fs.openSync(source, 'wx', 0o600);
          fs.ftruncateSync(fd, o.create);
          fs.closeSync(fd);
          logger.log('info', `created ${source}: a sparse raw image of ${humanBytes(o.create)}`);
        }
        // Started by socket activation (systemd, or nbdinfo/nbdcopy `-- [ blkfilter serve ... ]`):
        // serve fd 3, and keep the variables from our own children.
        const activated = isSocketActivated();
        if (activated) for (const v of ['LISTEN_PID', 'LISTEN_FDS', 'LISTEN_FDNAMES']) delete process.env[v];
        const daemon = await startDaemon({
          sources,
          ...(o.backup !== undefined
            ? { backups: [{ dir: path.resolve(o.backup), ...(o.at !== undefined ? { at: o.at } : {}), ...(o.overlay !== undefined ? { overlay: o.overlay === 'memory' ? 'memory' : path.resolve(o.overlay) } : {}), ...(o.backupName !== undefined ? { name: o.backupName } : {}), ...(o.backupDevice !== undefined ? { device: o.backupDevice } : {}) }] }
            : {}),
          cbt: o.cbt === true,
          listen: activated ? 'fd:3' : o.listen,
          control,
          ...(o.tlsCerts !== undefined ? { tlsCerts: o.tlsCerts } : {}),
          ...(o.name !== undefined ? { names: o.name } : {}),
          ...(o.stateDir !== undefined ? { stateDir: o.stateDir } : {}),
          retryForMs: parseDuration('--retry-for', o.retryFor),
          connections: parseCount('--connections', o.connections),
          ...(o.sourceTlsCerts !== undefined ? { sourceTlsCerts: o.sourceTlsCerts } : {}),
          ...(o.http !== undefined ? { http: o.http } : {}),
          log: (line) => logger.log('info', line),
          onShutdown: () => finish(ExitCode.OK),
        });
        if (o.pidfile !== undefined) fs.writeFileSync(o.pidfile, `${process.pid}\n`);
        const finish = (code: number): void => {
          if (o.pidfile !== undefined) fs.rmSync(o.pidfile, { force: true });
          logger.close();
          process.exit(code);
        };
        const shutdown = (signal: string): void => {
          if (stopping) return;
          stopping = true;
          logger.log('info', `${signal}: stopping (saving CBT maps)`);
          daemon.stop().then(
            () => finish(ExitCode.OK),
            (err: unknown) => {
              logger.log('error', `stop failed: ${(err as Error).message}`);
              finish(ExitCode.FAILED);
            },
          );
        };
        process.on('SIGINT', () => shutdown('SIGINT'));
        process.on('SIGTERM', () => shutdown('SIGTERM'));
        process.on('SIGHUP', () => {
          // Reopen the log (logrotate); nothing else is reloaded.
          logger.reopen();
          logger.log('info', 'SIGHUP: log reopened');
        });
        logger.log('info', 'ready');
        notifySystemd(`READY=1\nSTATUS=serving ${daemon.devices.map((d) => d.name).join(', ')}\nMAINPID=${process.pid}`);
        await new Promise(() => {}); // serve until a signal or a shutdown request
      },
    );

  program
    .command('status')
    .description("show the daemon's devices, filters, snapshots and NBD address")
    .option('--json', 'print JSON')
    .action(async (o: { json?: boolean }) => {
      const s = (await ctl('status')) as { nbd: { kind: string; host?: string; port?: number; path?: string }; devices: Array<{ name: string; sizeBytes: number; backend: string; state?: string; partitions: Array<{ name: string }>; filters: Array<{ name: string; altitude: number }> }>; snapshots: Array<{ id: string; state: string }>; connections?: ConnectionStatus[]; backups?: Array<{ id: string; snapshot: string; dir: string; bytesDone: number; bytesTotal: number }> };
      print(o.json === true, s, () =>
        [
          `nbd: ${s.nbd.kind === 'tcp' ? `nbd://${s.nbd.host}:${s.nbd.port}/` : String(s.nbd.path)}`,
          ...s.devices.map((d) => `device ${d.name}: ${humanBytes(d.sizeBytes)} ${d.backend}${d.state !== undefined && d.state !== 'connected' ? ` [${d.state.toUpperCase()}]` : ''}; partitions: ${d.partitions.map((p) => p.name).join(', ') || 'none'}; filters: ${d.filters.map((f) => `${f.name}@${f.altitude}`).join(', ') || 'none'}`),
          ...s.snapshots.map((x) => `snapshot ${x.id}: ${x.state}`),
          ...(s.backups ?? []).map((b) => `backup ${b.id} of snapshot ${b.snapshot} into ${b.dir}: ${humanBytes(b.bytesDone)} of ${humanBytes(b.bytesTotal)} (cancel: blkfilter backup --cancel ${b.id})`),
          ...(s.connections ?? []).map((c) => `connected ${c.exportName} as ${c.device} (${c.method}${c.readOnly ? ', read-only' : ''}): ${c.state}${c.mountedAt.length > 0 ? `, mounted on ${c.mountedAt.join(', ')}` : ''}`),
        ].join('\n'),
      );
    });

  const filter = program.command('filter').description('attach, detach and list block-layer filters on a device');
  filter
    .command('list')
    .argument('<device>')
    .option('--json', 'print JSON')
    .description('list the filters of DEVICE, in the order bios meet them')
    .addHelpText('after', '\nExample:\n  blkfilter filter list disk')
    .action(async (device: string, o: { json?: boolean }) => {
      const list = (await ctl('filter.list', { device })) as Array<{ name: string; altitude: number; apiVersion: number }>;
      print(o.json === true, list, () => (list.length === 0 ? `${device}: no filters` : list.map((f) => `${f.name}\taltitude ${f.altitude}\tapi v${f.apiVersion}`).join('\n')));
    });
  filter
    .command('attach')
    .argument('<device>')
    .argument('<filter>', 'a registered filter, e.g. cbt')
    .option('--altitude <n>', 'position: higher sees bios first', parseIntArg)
    .option('--options <json>', 'filter options as JSON, e.g. \'{"blockSize":65536}\'')
    .option('--json', 'print JSON')
    .description('attach FILTER to DEVICE, live')
    .addHelpText('after', '\nExample:\n  blkfilter filter attach disk cbt --options \'{"blockSize":131072}\'')
    .action(async (device: string, name: string, o: { altitude?: number; options?: string; json?: boolean }) => {
      let options: unknown;
      if (o.options !== undefined) {
        try {
          options = JSON.parse(o.options);
        } catch (err) {
          throw new CommanderArgError(`--options ${o.options} is not JSON (${(err as Error).message}); e.g. --options '{"blockSize":131072}'`);
        }
      }
      const r = (await ctl('filter.attach', { device, filter: name, ...(o.altitude !== undefined ? { altitude: o.altitude } : {}), ...(options !== undefined ? { options } : {}) })) as { altitude: number };
      print(o.json === true, { attached: name, device, altitude: r.altitude }, () => `attached ${name} to ${device} at altitude ${r.altitude}`);
    });
  filter
    .command('detach')
    .argument('<device>')
    .argument('<filter>')
    .option('--json', 'print JSON')
    .description('detach FILTER from DEVICE, live (no bio lost)')
    .action(async (device: string, name: string, o: { json?: boolean }) => {
      await ctl('filter.detach', { device, filter: name });
      print(o.json === true, { detached: name, device }, () => `detached ${name} from ${device}`);
    });

  const cbt = program.command('cbt').description('changed-block tracking: info, map, mark-dirty');
  cbt
    .command('info')
    .argument('<device>')
    .option('--json', 'print JSON')
    .description('block size, block count, generation id and numbers of the CBT map of DEVICE')
    .action(async (device: string, o: { json?: boolean }) => {
      const i = (await ctl('cbt.info', { device })) as Record<string, unknown>;
      print(o.json === true, i, () => Object.entries(i).map(([k, v]) => `${k}: ${String(v)}`).join('\n'));
    });
  cbt
    .command('map')
    .argument('<device>')
    .option('--offset <block>', 'first block', parseIntArg, 0)
    .option('--length <blocks>', 'number of blocks (default: all)', parseIntArg)
    .option('--json', 'print JSON')
    .description('the read map of the last take: one generation number per block')
    .action(async (device: string, o: { offset: number; length?: number; json?: boolean }) => {
      const info = (await ctl('cbt.info', { device })) as { blockCount: number };
      const length = o.length ?? info.blockCount - o.offset;
      const r = (await ctl('cbt.map', { device, offset: o.offset, length })) as { map: string };
      const bytes = [...Buffer.from(r.map, 'base64')];
      print(o.json === true, { offset: o.offset, map: bytes }, () => bytes.map((b, i) => `${o.offset + i}\t${b}`).filter((line) => !line.endsWith('\t0')).join('\n') || 'no block changed');
    });
  cbt
    .command('mark-dirty')
    .argument('<device>')
    .argument('<range...>', 'SECTOR:COUNT in 512-byte sectors')
    .option('--json', 'print JSON')
    .description('mark ranges as changed, so the next incremental backup copies them')
    .addHelpText('after', '\nExample:\n  blkfilter cbt mark-dirty disk 0:2048 409600:128')
    .action(async (device: string, ranges: string[], o: { json?: boolean }) => {
      const parsed = ranges.reduce<Array<{ sector: number; sectors: number }>>((acc, r) => parseRange(r, acc), []);
      await ctl('cbt.markDirty', { device, ranges: parsed });
      print(o.json === true, { device, marked: parsed }, () => `marked ${parsed.length} range(s) dirty on ${device}`);
    });

  const snap = program.command('snapshot').description('point-in-time snapshots: create, take, info, list, destroy, wait-event');
  snap
    .command('create')
    .argument('<device...>')
    .option('--storage <dir|memory>', 'diff storage: a folder (default: the state dir) or "memory"')
    .option('--limit <size>', 'diff storage limit, e.g. 2G', parseSize, 1024 ** 3)
    .option('--chunk-size <size>', 'copy-on-write chunk size (default 256K)', parseSize)
    .option('--json', 'print JSON')
    .description('create a snapshot of one or more devices (taken later, at one instant, by `take`)')
    .addHelpText('after', '\nExample:\n  id=$(blkfilter snapshot create disk --limit 4G --json | jq -r .id); blkfilter snapshot take $id')
    .action(async (devices: string[], o: { storage?: string; limit: number; chunkSize?: number; json?: boolean }) => {
      const info = (await ctl('snapshot.create', { devices, limitBytes: o.limit, ...(o.storage !== undefined ? { storage: o.storage } : {}), ...(o.chunkSize !== undefined ? { chunkSize: o.chunkSize } : {}) })) as { id: string };
      print(o.json === true, info, () => info.id);
    });
  snap
    .command('take')
    .argument('<id>')
    .option('--freeze <mountpoint...>', 'freeze these filesystems (fsfreeze) for the take: the images are then clean, no journal replay needed')
    .option('--pre <cmd>', 'shell command run before freezing, e.g. a database flush (repeatable; failure aborts)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--post <cmd>', 'shell command run after thawing, on every path (repeatable)', (v: string, prev: string[] = []) => [...prev, v])
    .option('--freeze-timeout <ms>', 'thaw and fail when the take keeps the filesystems frozen longer than this', parseIntArg, 10_000)
    .option('--writable', 'export the images writable (writes stay in diff storage): a filesystem snapshotted without --freeze can replay its journal')
    .option('--json', 'print JSON')
    .description('take the snapshot: its devices freeze together, copy-on-write starts, images appear as NBD exports')
    .addHelpText('after', '\nExample:\n  blkfilter snapshot take $id --freeze /mnt/data --pre "psql -c CHECKPOINT"')
    .action(async (id: string, o: { freeze?: string[]; pre?: string[]; post?: string[]; freezeTimeout: number; writable?: boolean; json?: boolean }) => {
      const take = async (): Promise<{ images: string[] }> => (await ctl('snapshot.take', { id, ...(o.writable === true ? { writable: true } : {}) })) as { images: string[] };
      if (o.freeze === undefined && o.pre === undefined && o.post === undefined) {
        const info = await take();
        print(o.json === true, info, () => `taken; images: ${info.images.join(', ')}`);
        return;
      }
      const r = await withFrozenFilesystems(take, {
        mountpoints: o.freeze ?? [],
        timeoutMs: o.freezeTimeout,
        pre: o.pre ?? [],
        post: o.post ?? [],
        log: (line) => process.stderr.write(`blkfilter: ${line}\n`),
      });
      const frozenMs = Math.round(r.frozenMs * 10) / 10;
      print(o.json === true, { ...r.result, frozen: o.freeze ?? [], frozenMs }, () => `taken; images: ${r.result.images.join(', ')}${o.freeze !== undefined ? `; ${o.freeze.join(', ')} frozen for ${frozenMs} ms` : ''}`);
    });
  snap
    .command('info')
    .argument('<id>')
    .option('--json', 'print JSON')
    .description('state, devices, images and diff-storage use of a snapshot')
    .action(async (id: string, o: { json?: boolean }) => {
      const info = (await ctl('snapshot.info', { id })) as { id: string; state: string; images: string[]; storage: { usedBytes: number; limitBytes: number }; error: { message: string } | null };
      print(o.json === true, info, () => `${info.id}: ${info.state}; images: ${info.images.join(', ') || 'none'}; storage ${humanBytes(info.storage.usedBytes)} of ${humanBytes(info.storage.limitBytes)}${info.error ? `; error: ${info.error.message}` : ''}`);
    });
  snap
    .command('list')
    .option('--json', 'print JSON')
    .description('list snapshots')
    .action(async (o: { json?: boolean }) => {
      const list = (await ctl('snapshot.list')) as Array<{ id: string; state: string; images: string[] }>;
      print(o.json === true, list, () => list.map((s) => `${s.id}\t${s.state}\t${s.images.join(',')}`).join('\n') || 'no snapshots');
    });
  snap
    .command('destroy')
    .argument('<id>')
    .option('--json', 'print JSON')
    .description('destroy a snapshot: images removed, diff storage freed (tracking goes on)')
    .action(async (id: string, o: { json?: boolean }) => {
      await ctl('snapshot.destroy', { id });
      print(o.json === true, { destroyed: id }, () => `destroyed ${id}`);
    });
  snap
    .command('wait-event')
    .argument('<id>')
    .option('--timeout <ms>', 'give up after this long', parseIntArg, 30_000)
    .option('--json', 'print JSON')
    .description('wait for the next event of a snapshot (low-space, corrupted, ...); exit 6 when none came in time')
    .action(async (id: string, o: { timeout: number; json?: boolean }) => {
      const ev = (await ctl('snapshot.waitEvent', { id, timeoutMs: o.timeout })) as Record<string, unknown> & { type: string };
      print(o.json === true, ev, () => describeEvent(ev));
      if (ev.type === 'timeout') process.exitCode = ExitCode.TIMEOUT;
    });

  program
    .command('connect')
    .argument('<export>', 'an NBD export of the daemon: a device, a partition or a snapshot image')
    .option('--read-only', 'a read-only kernel device')
    .option('--json', 'print JSON')
    .description('make a kernel block device whose every I/O goes to EXPORT through the filters (nbd-client where the kernel has NBD, else nbdfuse + loop); prints its path. Needs root')
    .addHelpText('after', '\nExample:\n  dev=$(blkfilter connect disk); mkfs.ext4 $dev; mount $dev /mnt/data')
    .action(async (exportName: string, o: { readOnly?: boolean; json?: boolean }) => {
      const c = (await ctl('connect', { export: exportName, readOnly: o.readOnly === true })) as Connection;
      print(o.json === true, c, () => c.device);
    });

  program
    .command('disconnect')
    .argument('<device>', 'a device that `connect` made, e.g. /dev/loop3')
    .option('--json', 'print JSON')
    .description('undo `connect` (refused while a filesystem on DEVICE is mounted); works without a daemon too')
    .addHelpText('after', '\nExample:\n  umount /mnt/data && blkfilter disconnect /dev/loop3')
    .action(async (device: string, o: { json?: boolean }) => {
      let c: Connection;
      try {
        c = (await ctl('disconnect', { device })) as Connection;
      } catch (err) {
        // No daemon (it crashed, or was stopped with --force): the record sits next to the
        // loop device's backing file, so disconnect here.
        const code = (err as { code?: string }).code;
        if (code !== 'ENOENT' && code !== 'ECONNREFUSED') throw err;
        if (!/no blkfilter daemon/.test((err as Error).message)) throw err;
        c = await disconnectDevice(device);
      }
      print(o.json === true, c, () => `disconnected ${c.device} (export ${c.exportName})`);
    });

  program
    .command('mount')
    .argument('<dir>', 'backup folder')
    .argument('<mountpoint>', 'an empty folder to mount the point on')
    .option('--at <n>', 'which point (1 = oldest; default: newest)', parseIntArg)
    .option('--partition <k>', 'partition number of the backed-up disk (0: the whole disk; default: the whole disk, or its only partition)', parseIntArg)
    .option('--device <name>', 'which device, when the folder holds several')
    .option('--mounts-dir <dir>', `where the mount's daemon, sockets and record live (default: ${defaultMountsDir()})`)
    .option('--json', 'print JSON')
    .description('file-level restore: serve a backup point, connect it read-only and mount its filesystem read-only (no journal replay) on MOUNTPOINT; `blkfilter umount MOUNTPOINT` undoes it. Needs root')
    .addHelpText('after', '\nExample:\n  blkfilter mount /backups/vm --at 3 /mnt/restore --partition 1 && cp /mnt/restore/etc/fstab . && blkfilter umount /mnt/restore')
    .action(async (dir: string, mountpoint: string, o: { at?: number; partition?: number; device?: string; mountsDir?: string; json?: boolean }) => {
      const m = await mountBackup({
        dir,
        mountpoint,
        ...(o.at !== undefined ? { at: o.at } : {}),
        ...(o.partition !== undefined ? { partition: o.partition } : {}),
        ...(o.device !== undefined ? { device: o.device } : {}),
        ...(o.mountsDir !== undefined ? { mountsDir: o.mountsDir } : {}),
        log: (line) => process.stderr.write(`blkfilter: ${line}\n`),
      });
      print(o.json === true, m, () => `mounted point ${m.at} of ${m.dir}${m.partition !== 0 ? ` (partition ${m.partition})` : ''} on ${m.mountpoint}: ${m.fsType}, ${m.options}, via ${m.blockDevice}`);
    });

  program
    .command('umount')
    .argument('<mountpoint>', 'where `blkfilter mount` mounted a backup point')
    .option('--mounts-dir <dir>', `where mount records live, if the filesystem is no longer mounted (default: ${defaultMountsDir()})`)
    .option('--json', 'print JSON')
    .description('undo `blkfilter mount`: unmount, disconnect the device, stop the daemon it started (refused while files there are in use)')
    .addHelpText('after', '\nExample:\n  blkfilter umount /mnt/restore')
    .action(async (mountpoint: string, o: { mountsDir?: string; json?: boolean }) => {
      const m = await unmountBackup(mountpoint, { ...(o.mountsDir !== undefined ? { mountsDir: o.mountsDir } : {}), log: (line) => process.stderr.write(`blkfilter: ${line}\n`) });
      print(o.json === true, { unmounted: m.mountpoint, dir: m.dir, at: m.at, blockDevice: m.blockDevice }, () => `unmounted point ${m.at} of ${m.dir} from ${m.mountpoint}; ${m.blockDevice} disconnected, daemon stopped`);
    });

  program
    .command('stop')
    .option('--force', 'stop even while devices are connected (their filesystems then see I/O errors)')
    .description('stop the daemon (CBT saves its maps); refused while `connect` devices exist, unless --force')
    .action(async (o: { force?: boolean }) => {
      await ctl('shutdown', o.force === true ? { force: true } : {});
      process.stdout.write('stopping\n');
    });

  program
    .command('backup')
    .argument('[snapshot]', 'a taken snapshot id')
    .option('--to <dir>', 'backup folder (qcow2 chains and manifest.json)')
    .option('--device <name>', 'back up only this device of the snapshot (default: all of them, as one point)')
    .addOption(new Option('--full', 'copy everything').conflicts('incremental'))
    .addOption(new Option('--incremental', 'copy only what CBT says changed since the last backup (falls back to full, saying why)').conflicts('full'))
    .option('--compress', 'write deflate-compressed qcow2 clusters (any qemu reads them)')
    .option('--cancel <id>', 'cancel a running backup (its id is in `blkfilter status`); the chain stays as it was')
    .option('--json', 'print JSON')
    .description('back up a snapshot into DIR as one new point: full, or incremental over the previous point (Ctrl-C cancels it in the daemon)')
    .addHelpText('after', '\nExample:\n  blkfilter backup $id --to /backups/disk        # full the first time, incremental after')
    .action(async (id: string | undefined, o: { to?: string; device?: string; full?: boolean; incremental?: boolean; compress?: boolean; cancel?: string; json?: boolean }) => {
      if (o.cancel !== undefined) {
        const r = await ctl('backup.cancel', { id: o.cancel });
        print(o.json === true, r, () => `cancelling backup ${o.cancel}: its partial files are removed and nothing is recorded`);
        return;
      }
      if (id === undefined || o.to === undefined) throw new CommanderArgError('give the SNAPSHOT id and --to DIR (or --cancel ID)');
      const bar = progressBar('backup ');
      const mode = o.full === true ? 'full' : o.incremental === true ? 'incremental' : 'auto';
      type Img = { entry: { kind: string; file: string; device: string; bytesRead: number; bytesWritten: number; durationMs: number }; fullBecause: string | null; verifiedExtents: number };
      type Cbt = { device: string; generationReason: string | null; generationDetail: string | null };
      let r: { position: number; images: Img[]; notices: string[]; clearedLeftovers: string[]; cbt?: Cbt[] };
      // Ctrl-C cancels the backup in the daemon (it removes its partial files), then exits 130.
      let jobId: string | null = null;
      let interrupted = false;
      const onSigint = (): void => {
        if (interrupted) return;
        interrupted = true;
        bar.stop();
        process.stderr.write(`blkfilter: cancelling backup${jobId !== null ? ` ${jobId}` : ''}...\n`);
        if (jobId !== null) void ctl('backup.cancel', { id: jobId }).catch(() => {});
      };
      process.on('SIGINT', onSigint);
      try {
        r = (await ctl('backup', { snapshot: id, to: path.resolve(o.to), mode, compress: o.compress === true, ...(o.device !== undefined ? { device: o.device } : {}) }, (p) => {
          const { id: job, done, total } = p as { id: string; done: number; total: number };
          if (jobId === null) {
            jobId = job;
            if (interrupted) void ctl('backup.cancel', { id: job }).catch(() => {});
          }
          if (!interrupted && total > 0) bar.update(done, total);
        })) as typeof r;
      } catch (err) {
        if (interrupted && BlkError.isInstance(err) && err.code === 'ECANCELED') {
          process.stderr.write(`blkfilter: ${err.message}\n`);
          process.exitCode = ExitCode.INTERRUPTED;
          return;
        }
        throw err;
      } finally {
        bar.stop();
        process.off('SIGINT', onSigint);
      }
      for (const n of r.notices) process.stderr.write(`blkfilter: ${n}\n`);
      for (const c of r.clearedLeftovers) process.stderr.write(`blkfilter: cleared ${c} (left by an interrupted backup or prune)\n`);
      for (const c of r.cbt ?? []) {
        if (c.generationReason === 'resumed-after-crash') process.stderr.write(`blkfilter: CBT of ${c.device} resumed after a crash (${c.generationDetail ?? 'journal replayed'}): its changes are still exact\n`);
      }
      print(o.json === true, r, () =>
        r.images
          .map(
            (i) =>
              `point ${r.position}: ${i.entry.kind} backup of ${i.entry.device} in ${i.entry.file}: read ${humanBytes(i.entry.bytesRead)}, stored ${humanBytes(i.entry.bytesWritten)} in ${(i.entry.durationMs / 1000).toFixed(1)} s; verified ${i.verifiedExtents} extent(s)` +
              (i.fullBecause !== null ? `\n(full because ${i.fullBecause})` : ''),
          )
          .join('\n'),
      );
    });

  program
    .command('restore')
    .argument('<dir>', 'backup folder')
    .requiredOption('--to <image>', 'raw image to create')
    .option('--at <n>', 'which point of the chain (1 = oldest; default: newest)', parseIntArg)
    .option('--device <name>', 'which device, when the folder holds several')
    .option('--force', 'overwrite IMAGE if it exists')
    .option('--sha256', 'print the SHA-256 of the restored disk')
    .option('--json', 'print JSON')
    .option('--live', 'export IMAGE over NBD at once while it is restored in the background (runs a daemon; progress in `status`; resumes after a crash)')
    .option('--listen <addr>', 'with --live: NBD address HOST:PORT or unix:PATH', '127.0.0.1:10809')
    .option('--state-dir <dir>', `with --live: the daemon's state dir (default: ${defaultStateDir()})`)
    .description('write the device as it was at a point into a new sparse raw image (no daemon needed); every byte is checked against the manifest first')
    .addHelpText('after', '\nExample:\n  blkfilter restore /backups/disk --at 1 --to disk-at-1.raw\n  blkfilter restore /backups/disk --at 1 --to disk.raw --live   # usable at once over NBD')
    .action(async (dir: string, o: { to: string; at?: number; device?: string; force?: boolean; sha256?: boolean; json?: boolean; live?: boolean; listen: string; stateDir?: string }) => {
      if (o.live === true) {
        const name = path.basename(o.to).replace(/\.(raw|img)$/i, '') || 'restore';
        const daemon = await startDaemon({
          sources: [],
          backups: [{ dir: path.resolve(dir), liveTo: path.resolve(o.to), name, ...(o.at !== undefined ? { at: o.at } : {}), ...(o.device !== undefined ? { device: o.device } : {}) }],
          listen: o.listen,
          control: program.opts<{ control: string }>().control,
          ...(o.stateDir !== undefined ? { stateDir: o.stateDir } : {}),
          log: (line) => process.stderr.write(`blkfilter: ${line}\n`),
          onShutdown: () => process.exit(ExitCode.OK),
        });
        const stop = (): void => void daemon.stop().then(() => process.exit(ExitCode.OK));
        process.on('SIGINT', stop);
        process.on('SIGTERM', stop);
        process.stderr.write('blkfilter: ready\n');
        await new Promise(() => {}); // serve until a signal or a shutdown request
      }
      const bar = progressBar('restore');
      try {
        const r = await restore(dir, { to: o.to, ...(o.at !== undefined ? { at: o.at } : {}), ...(o.device !== undefined ? { device: o.device } : {}), force: o.force === true, hash: o.sha256 === true, onProgress: bar.update });
        bar.stop();
        print(o.json === true, { position: r.position, file: r.image.file, device: r.image.device, bytes: r.bytes, sha256: r.sha256, to: o.to }, () =>
          `restored point ${r.position} (${r.image.file}, ${humanBytes(r.bytes)}) to ${o.to}${r.sha256 !== null ? `\nsha256 ${r.sha256}` : ''}`,
        );
      } finally {
        bar.stop();
      }
    });

  program
    .command('verify')
    .argument('<dir>', 'backup folder')
    .option('--against <image>', 'compare the point with this raw or qcow2 image, byte for byte, instead')
    .option('--at <n>', 'check only the chain of this point (default: every point)', parseIntArg)
    .option('--device <name>', 'check only this device')
    .option('--json', 'print JSON')
    .description('check a backup folder offline: structure (as qemu-img check), checksums, manifest; exit 5 with the bad file and offset when damaged')
    .action(async (dir: string, o: { against?: string; at?: number; device?: string; json?: boolean }) => {
      const bar = progressBar('verify ');
      if (o.against !== undefined) {
        const r = await verifyAgainst(dir, o.against, { ...(o.at !== undefined ? { at: o.at } : {}), ...(o.device !== undefined ? { device: o.device } : {}), onProgress: bar.update }).finally(() => bar.stop());
        print(o.json === true, r, () => (r.equal ? `equal (${humanBytes(r.bytes)})` : `different: first difference at byte ${r.firstDifference}`));
        if (!r.equal) process.exitCode = ExitCode.DIFFERENT;
        return;
      }
      const r = await verify(dir, { ...(o.at !== undefined ? { at: o.at } : {}), ...(o.device !== undefined ? { device: o.device } : {}), onProgress: bar.update }).finally(() => bar.stop());
      for (const n of r.notes) process.stderr.write(`blkfilter: note: ${n}\n`);
      print(o.json === true, r, () =>
        r.ok
          ? `ok: ${r.images} image(s), ${humanBytes(r.bytes)}: structure, checksums and manifest hold`
          : r.problems.map((p) => `DAMAGED ${p.file}${p.offset !== null ? ` at offset ${p.offset}` : ''} (${p.code}): ${p.message}`).join('\n'),
      );
      if (!r.ok) process.exitCode = ExitCode.DAMAGED;
    });

  program
    .command('prune')
    .argument('<dir>', 'backup folder')
    .requiredOption('--keep-last <n>', 'points to keep, the newest', parseIntArg)
    .option('--json', 'print JSON')
    .description('keep the newest N points: the oldest kept point becomes a full base, older points are deleted (crash-safe)')
    .addHelpText('after', '\nExample:\n  blkfilter prune /backups/disk --keep-last 7')
    .action(async (dir: string, o: { keepLast: number; json?: boolean }) => {
      const bar = progressBar('prune  ');
      const r = await prune(dir, { keepLast: o.keepLast, onProgress: bar.update }).finally(() => bar.stop());
      print(o.json === true, r, () => (r.removedPoints === 0 ? `nothing to prune: ${r.keptPoints} point(s)` : `removed ${r.removedPoints} point(s), kept ${r.keptPoints}; new base: ${r.rebased.join(', ') || 'none needed'}`));
    });

  program
    .command('backups')
    .argument('<dir>', 'backup folder')
    .option('--json', 'print JSON')
    .description('list the points of a backup folder (its manifest); fails when DIR holds none')
    .action(async (dir: string, o: { json?: boolean }) => {
      const l = await list(dir);
      for (const n of l.notes) process.stderr.write(`blkfilter: note: ${n}\n`);
      const m = l.manifest;
      print(o.json === true, m, () =>
        m.points
          .flatMap((p, i) => p.images.map((b) => `${i + 1}\t${b.device}\t${b.kind}\t${b.file}\t${p.createdAt}\t${humanBytes(b.size)}${b.compressed ? ' (compressed)' : ''}\tgen ${b.generationId ?? '-'}#${b.snapNumber ?? '-'}`))
          .join('\n') || `${dir}: no points`,
      );
    });

  addExamples(program);
  return program;
}

// An example for every command that does not carry its own above, so `--help` always shows one.
const EXAMPLES: Record<string, string> = {
  status: 'blkfilter status --json',
  filter: 'blkfilter filter list disk',
  'filter detach': 'blkfilter filter detach disk cbt',
  cbt: 'blkfilter cbt info disk',
  'cbt info': 'blkfilter cbt info disk --json',
  'cbt map': 'blkfilter cbt map disk --offset 0 --length 64',
  snapshot: 'blkfilter snapshot create disk && blkfilter snapshot take ID',
  'snapshot take': 'blkfilter snapshot take 3f2c...   # images appear as NBD exports (e.g. disk-snap0)',
  'snapshot info': 'blkfilter snapshot info 3f2c... --json',
  'snapshot list': 'blkfilter snapshot list',
  'snapshot destroy': 'blkfilter snapshot destroy 3f2c...',
  'snapshot wait-event': 'blkfilter snapshot wait-event 3f2c... --timeout 60000',
  verify: 'blkfilter verify /backups/disk          # or: --against disk-at-2.raw --at 2',
  backups: 'blkfilter backups /backups/disk --json',
};

function addExamples(cmd: Command, prefix = ''): void {
  for (const sub of cmd.commands) {
    const name = prefix === '' ? sub.name() : `${prefix} ${sub.name()}`;
    const example = EXAMPLES[name];
    if (example !== undefined) sub.addHelpText('after', `\nExample:\n  ${example}`);
    addExamples(sub, name);
  }
}

/** Runs the CLI with `argv` (as process.argv); resolves with the exit code. */
/** Set when commander printed an error itself (parse errors), so main() adds no second line. */
let commanderSpoke = false;

function cliVersion(): string {
  return (createRequire(import.meta.url)('../package.json') as { version: string }).version;
}

export async function main(argv: readonly string[]): Promise<number> {
  // `blkfilter ... | head -1`: the reader went away; stop quietly, as other Unix tools do.
  for (const stream of [process.stdout, process.stderr]) {
    stream.on('error', (err: NodeJS.ErrnoException) => {
      if (err.code === 'EPIPE') process.exit(typeof process.exitCode === 'number' ? process.exitCode : ExitCode.OK);
      throw err;
    });
  }
  commanderSpoke = false;
  const program = buildProgram();
  const json = argv.includes('--json');
  try {
    await program.parseAsync(argv as string[]);
    return typeof process.exitCode === 'number' ? process.exitCode : ExitCode.OK;
  } catch (err) {
    if (err instanceof CommanderError) {
      if (err.exitCode === 0) return ExitCode.OK; // --help, --version
      // Errors thrown by our own argument checks are not printed by commander: say what was
      // wrong and how the command is used.
      if (!commanderSpoke) {
        const usage = commandFor(program, argv.slice(2))?.usage() ?? program.usage();
        process.stderr.write(`blkfilter: ${err.message.replace(/^error: /, '')}\nusage: ${commandPath(program, argv.slice(2))} ${usage}\n(run with --help for usage)\n`);
      }
      if (json) printJsonError('EUSAGE', err.message.replace(/^error: /, ''), ExitCode.USAGE);
      return ExitCode.USAGE;
    }
    const code = BlkError.isInstance(err) ? err.code : ((err as NodeJS.ErrnoException).code ?? 'EIO');
    process.stderr.write(`blkfilter: ${(err as Error).message}${code ? ` (${code})` : ''}\n`);
    const exit = RepositoryDamageError.isDamage(err)
      ? ExitCode.DAMAGED
      : (code === 'ENOENT' && /no blkfilter daemon/.test((err as Error).message)) || code === 'ECONNREFUSED'
        ? ExitCode.NO_DAEMON
        : ExitCode.FAILED;
    if (json) printJsonError(code, (err as Error).message, exit);
    return exit;
  }
}

/** `{"error":{"code","message","exitCode"}}` on stdout, for scripts that asked for --json. */
function printJsonError(code: string, message: string, exitCode: number): void {
  process.stdout.write(`${JSON.stringify({ error: { code, message, exitCode } })}\n`);
}

/** The words of argv that may name commands: options (and --control's value) left out. */
function commandWords(words: readonly string[]): string[] {
  const out: string[] = [];
  for (let i = 0; i < words.length; i++) {
    const w = words[i] as string;
    if (w === '--control') i++;
    else if (!w.startsWith('-')) out.push(w);
  }
  return out;
}

/** The deepest subcommand the words of argv name (for its usage line). */
function commandFor(program: Command, words: readonly string[]): Command | null {
  let cmd: Command | null = null;
  let cur: Command = program;
  for (const w of commandWords(words)) {
    const next = cur.commands.find((c) => c.name() === w);
    if (next === undefined) break;
    cmd = cur = next;
  }
  return cmd;
}

function commandPath(program: Command, words: readonly string[]): string {
  const names = ['blkfilter'];
  let cur: Command = program;
  for (const w of commandWords(words)) {
    const next = cur.commands.find((c) => c.name() === w);
    if (next === undefined) break;
    names.push(w);
    cur = next;
  }
  return names.join(' ');
}

// Run when executed as dist/cli.js itself (the `blkfilter` bin is bin/blkfilter.js, which
// imports this and calls main; tests import it without running anything).
const invoked = process.argv[1] ?? '';
if (/(?:^|[/\\])cli\.js$/.test(invoked)) {
  void main(process.argv).then((code) => {
    if (code !== ExitCode.OK || process.exitCode === undefined) process.exitCode = code;
  });
}
