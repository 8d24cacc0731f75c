import path from 'node:path';
import { InvalidArgumentError } from '@blkfilter/bio';
import { staleFiles, type OpenedImage, type RepositoryView } from './chain.js';
import { ChainError } from './errors.js';
import { MANIFEST_FILE, type BackupPoint } from './manifest.js';

/** Picks the device and 1-based position a reader asked for. */
export function pick(view: RepositoryView, at: number | undefined, device: string | undefined): { position: number; deviceIndex: number; point: BackupPoint } {
  const m = view.manifest;
  const n = m.points.length;
  if (n === 0) throw new ChainError(path.join(view.dir, MANIFEST_FILE), null, 'records no points');
  const position = at ?? n;
  const point = m.points[position - 1];
  if (!Number.isInteger(position) || point === undefined) throw new InvalidArgumentError(`backup ${position} does not exist in ${view.dir}: choose 1 to ${n}`);
  let deviceIndex = 0;
  if (device !== undefined) {
    deviceIndex = m.devices.findIndex((d) => d.name === device);
    if (deviceIndex < 0) throw new InvalidArgumentError(`${view.dir} holds no device "${device}": it holds ${m.devices.map((d) => d.name).join(', ')}`);
  } else if (m.devices.length > 1) {
    throw new InvalidArgumentError(`${view.dir} holds ${m.devices.map((d) => d.name).join(', ')}: choose one device`);
  }
  return { position, deviceIndex, point };
}

/** Refuses "the newest point" when files newer than the manifest's newest point exist. */
export async function refuseStale(view: RepositoryView): Promise<void> {
  const stale = await staleFiles(view.dir, view.manifest);
  if (stale.length > 0) {
    throw new ChainError(
      path.join(view.dir, MANIFEST_FILE),
      null,
      `does not record ${stale.join(', ')}, newer than its newest point: the manifest is stale, so "the newest point" is unknown; give a point explicitly (--at) or put the right manifest back`,
    );
  }
}

/** Closes every reader of a chain, ignoring errors (cleanup). */
export async function closeAll(chain: readonly OpenedImage[]): Promise<void> {
  for (const c of chain) await c.reader.close().catch(() => {});
}
