import type { BlockDev } from '@blkfilter/bio';
import { getBlockDevice } from '@blkfilter/bio';
import { CBT_FILTER_NAME, cbtInfo, changedExtents } from '@blkfilter/cbt';
import { listFilters } from '@blkfilter/registry';
import { listSnapshots } from '@blkfilter/snapshot';
import { backupPoint, type BackupPointOptions, type BackupResult, type BackupSource, type CbtTake } from './repository.js';

/** Options of {@link backupSnapshot}. */
export interface BackupSnapshotOptions extends Omit<BackupPointOptions, 'sources' | 'snapshotId'> {
  /**
   * The snapshot image(s) to copy: one device, or several images of one snapshot (one point
   * in one manifest). Images of `@blkfilter/snapshot` are matched to their original device,
   * their snapshot and that device's CBT take.
   */
  readonly image: BlockDev | readonly BlockDev[];
  /**
   * CBT: omitted, the original device's CBT is used when its last take is this snapshot;
   * `false`: no CBT (every backup full); or the take, for images not made by `@blkfilter/snapshot`
   * (one per image).
   */
  readonly cbt?: false | CbtTake | readonly CbtTake[];
  /** Names to record, one per image (default: the original device's name, else the image's). */
  readonly names?: readonly string[];
}

/** {@link backupSnapshot}'s result, plus why CBT could not be used for a device. */
export interface BackupSnapshotResult extends BackupResult {
  readonly notices: readonly string[];
}

/** The CBT take of a tracked device, as {@link backupPoint} wants it. */
export async function cbtTakeOf(device: BlockDev): Promise<CbtTake & { readonly snapshotId: string | null }> {
  const info = await cbtInfo(device);
  return {
    generationId: info.snapGenerationId ?? info.generationId,
    snapNumber: info.snapNumber,
    snapshotId: info.snapshotId,
    changedSince: (query) => changedExtents(device, query),
  };
}

/**
 * Backs up a snapshot into `dir` as one point, without the CLI or a daemon: finds which
 * snapshot and original device each image belongs to, uses the original device's CBT when its
 * last take is this snapshot (else the image is copied in full, saying why in `notices`), and
 * calls {@link backupPoint}.
 */
export async function backupSnapshot(options: BackupSnapshotOptions): Promise<BackupSnapshotResult> {
  const images = Array.isArray(options.image) ? (options.image as readonly BlockDev[]) : [options.image as BlockDev];
  const notices: string[] = [];
  const snapshots = listSnapshots();
  const sources: BackupSource[] = [];
  const snapshotIds = new Set<string>();
  for (const [i, image] of images.entries()) {
    const snap = snapshots.find((s) => s.devices.some((d) => d.image === image.name));
    const original = snap?.devices.find((d) => d.image === image.name)?.device ?? null;
    if (snap !== undefined) snapshotIds.add(snap.id);
    let cbt: CbtTake | null = null;
    if (options.cbt === false) cbt = null;
    else if (options.cbt !== undefined) cbt = (Array.isArray(options.cbt) ? (options.cbt as readonly CbtTake[])[i] : (options.cbt as CbtTake)) ?? null;
    else if (snap !== undefined && original !== null) {
      const dev = getBlockDevice(original);
      if (listFilters(dev).some((f) => f.name === CBT_FILTER_NAME)) {
        const take = await cbtTakeOf(dev);
        if (take.snapshotId === snap.id) cbt = take;
        else notices.push(`"${original}": CBT's last take is not snapshot ${snap.id} (a newer snapshot was taken): this backup cannot be incremental`);
      }
    }
    sources.push({ name: options.names?.[i] ?? original ?? image.name, image, cbt });
  }
  const snapshotId = snapshotIds.size === 1 ? [...snapshotIds][0] ?? null : null;
  const result = await backupPoint({
    ...options,
    sources,
    snapshotId,
    onNotice: (m) => {
      notices.push(m);
      options.onNotice?.(m);
    },
  });
  return { ...result, notices };
}
