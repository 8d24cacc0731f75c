import { createDisk, InvalidArgumentError, type Disk } from '@blkfilter/bio';
import { ChainBackend, OverlayBackend, startLiveRestore, type LiveRestore } from '@blkfilter/backup';
import type { NbdServer } from '@blkfilter/nbd';

/** A backup point to serve (`serve --backup`) or restore live (`restore --live`). */
export interface BackupExportSpec {
  readonly dir: string;
  readonly at?: number;
  readonly device?: string;
  /** Export name (default `backup-<at>` or the image's name for a live restore). */
  readonly name?: string;
  /** Writable over an overlay: a file path, or `memory`. */
  readonly overlay?: string;
  /** Live restore into this raw image. */
  readonly liveTo?: string;
}

/** A served point, for `status` and `stop`. */
export interface ServedBackup {
  readonly disk: Disk;
  readonly spec: BackupExportSpec;
  readonly live: LiveRestore | null;
  state: 'serving' | 'restoring' | 'restored' | 'failed';
  error: string | null;
}

/**
 * Opens a backup point as a device and exports it: read-only with `base:allocation` and
 * `qemu:allocation-depth` from the chain, writable over an overlay, or as a live restore whose
 * background copy starts at once. The folder's shared lock is held until the disk is removed.
 */
export async function serveBackup(spec: BackupExportSpec, nbd: NbdServer, holder: string, log: (line: string) => void): Promise<ServedBackup> {
  if (spec.overlay !== undefined && spec.liveTo !== undefined) throw new InvalidArgumentError('--overlay and --live do not go together: a live restore writes into its image');
  let live: LiveRestore | null = null;
  let disk: Disk;
  let chain: ChainBackend | null = null;
  if (spec.liveTo !== undefined) {
    live = await startLiveRestore(spec.dir, { to: spec.liveTo, holder, ...(spec.at !== undefined ? { at: spec.at } : {}), ...(spec.device !== undefined ? { device: spec.device } : {}) });
    disk = await createDisk({ name: spec.name ?? `restore-${live.backend.base instanceof ChainBackend ? live.backend.base.position : 0}`, backend: live.backend });
  } else {
    chain = await ChainBackend.open(spec.dir, { holder, onDamage: (e) => log(`backup ${spec.dir}: ${e.message}`), ...(spec.at !== undefined ? { at: spec.at } : {}), ...(spec.device !== undefined ? { device: spec.device } : {}) });
    const backend = spec.overlay === undefined ? chain : new OverlayBackend({ base: chain, file: spec.overlay === 'memory' ? null : spec.overlay });
    disk = await createDisk({ name: spec.name ?? `backup-${chain.position}`, backend }).catch(async (err: unknown) => {
      await backend.close();
      throw err;
    });
  }
  const readOnly = chain !== null && spec.overlay === undefined;
  nbd.addExport(disk.name, {
    device: disk.part0,
    writable: !readOnly,
    description: live !== null ? `live restore of ${spec.dir} into ${live.image}` : `backup point ${chain?.position ?? ''} of ${spec.dir}`,
    ...(readOnly && chain !== null ? { allocationDepth: chain } : {}),
  });
  for (const p of disk.partitions) nbd.addExport(p.name, { device: p, writable: !readOnly, description: `partition ${p.partno} of ${disk.name}` });
  const served: ServedBackup = { disk, spec, live, state: live !== null ? 'restoring' : 'serving', error: null };
  if (live !== null) {
    const l = live;
    log(`live restore into ${l.image}${l.resumed ? ' (resumed)' : ''}: serving ${disk.name} now`);
    l.run(disk.part0).then(
      () => {
        if (served.state === 'restoring') served.state = 'restored';
        log(`live restore into ${l.image} complete: ${disk.name} is a plain device on it`);
      },
      (err: unknown) => {
        served.state = 'failed';
        served.error = (err as Error).message;
        log(`live restore into ${l.image} failed: ${(err as Error).message}`);
      },
    );
  }
  return served;
}

/** The `status` view of a served point. */
export function servedBackupJson(s: ServedBackup): Record<string, unknown> {
  const p = s.live?.progress() ?? null;
  return { device: s.disk.name, dir: s.spec.dir, at: s.spec.at ?? null, state: s.state, error: s.error, overlay: s.spec.overlay ?? null, image: s.live?.image ?? null, done: p?.done ?? null, total: p?.total ?? null, partitions: s.disk.partitions.map((x) => ({ partno: x.partno, name: x.name, start: x.startSect, sectors: x.nrSects })) };
}
