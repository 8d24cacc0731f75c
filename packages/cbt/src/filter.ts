import type { BlockDev } from '@blkfilter/bio';
import { FILTER_API_VERSION, filterCtl, listRegisteredFilters, registerFilter, type FilterDefinition } from '@blkfilter/registry';
import { attachCbt } from './tracker.js';
import {
  CBT_DEFAULT_ALTITUDE,
  CBT_FILTER_NAME,
  type CbtInfo,
  type CbtMapRange,
  type CbtOptions,
  type CbtSectorRange,
  type ChangedExtentsQuery,
  type ChangedExtentsResult,
} from './types.js';

/**
 * The `cbt` filter definition. Register it once with {@link registerCbtFilter} (or
 * `registerFilter(cbtFilter)`), then `attachFilter(device, 'cbt', { options })`. Attach runs
 * while the device is frozen and may read and write the state file.
 */
export const cbtFilter: FilterDefinition<CbtOptions | undefined> = Object.freeze({
  name: CBT_FILTER_NAME,
  apiVersion: FILTER_API_VERSION,
  description: 'changed-block tracking: one byte per block, generation switched at snapshot takes',
  defaultAltitude: CBT_DEFAULT_ALTITUDE,
  attach: attachCbt,
});

/**
 * Registers the `cbt` filter with the registry unless it is registered already (importing this
 * package registers nothing: it has no side effects).
 */
export function registerCbtFilter(): void {
  if (listRegisteredFilters().some((f) => f.name === CBT_FILTER_NAME)) return;
  registerFilter(cbtFilter);
}

/**
 * The CBT state of a device (ctl `info`). Checks the capacity first: a resized device gets a
 * new generation. Throws the registry's `FilterNotFoundError` when no CBT is attached there.
 */
export async function cbtInfo(device: string | BlockDev): Promise<CbtInfo> {
  return (await filterCtl(device, CBT_FILTER_NAME, 'info')) as CbtInfo;
}

/**
 * A copy of blocks `[offset, offset + length)` of the read map (ctl `map`): per block, the take
 * number in which it last changed, 0 for unchanged in this generation. Throws
 * `CbtNoSnapshotError` before the first take and `InvalidArgumentError` for a range outside the map.
 */
export async function cbtMap(device: string | BlockDev, range: CbtMapRange): Promise<Uint8Array> {
  return (await filterCtl(device, CBT_FILTER_NAME, 'map', range)) as Uint8Array;
}

/**
 * The sector extents that changed after take `since` of generation `generationId`, read from
 * the map frozen at the last take (ctl `extents`); or `{ kind: 'full-copy-needed', reason }`
 * when that cannot be answered (another generation, no take yet, `since` past the last take).
 * Record the answer's `generationId` and `snapNumber` for the next incremental.
 */
export async function changedExtents(device: string | BlockDev, query: ChangedExtentsQuery): Promise<ChangedExtentsResult> {
  return (await filterCtl(device, CBT_FILTER_NAME, 'extents', query)) as ChangedExtentsResult;
}

/**
 * Counts sector `ranges` of the device as changed (ctl `mark-dirty`, blksnap's CBTDIRTY): in
 * the active generation, and in the read map so a backup from the last take copies them too.
 * Throws `InvalidArgumentError` for a range outside the device (nothing is marked then).
 */
export async function markDirty(device: string | BlockDev, ranges: readonly CbtSectorRange[]): Promise<void> {
  await filterCtl(device, CBT_FILTER_NAME, 'mark-dirty', { ranges });
}

/** Clears the map under a new generation id (ctl `reset`); every earlier generation then needs a full copy. */
export async function resetCbt(device: string | BlockDev): Promise<CbtInfo> {
  return (await filterCtl(device, CBT_FILTER_NAME, 'reset')) as CbtInfo;
}
