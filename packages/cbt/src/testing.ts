import type { BlockDev } from '@blkfilter/bio';
import {
  FILTER_API_VERSION,
  filterCtl,
  listRegisteredFilters,
  registerFilter,
  withFrozenDevices,
  type RangesChangedData,
  type SnapshotTakenData,
} from '@blkfilter/registry';
import type { CbtSectorRange } from './types.js';

/** The name {@link registerTakerFilter} registers the taker under unless told otherwise. */
export const CBT_TAKER_FILTER = 'cbt-test-taker';

/**
 * Registers a stand-in for the snapshot filter (once per process and name): a filter that
 * handles no bios and makes the announcements of the CBT contract from its ctl commands, `take`
 * (`ctx.snapshotTaken` with the ctl's argument as data) and `dirty` (`ctx.rangesChanged` with
 * its `ranges`). Attach it to a device, at any altitude, and drive it with
 * {@link takeSnapshot} and {@link emitMarkDirty}: tests and benchmarks of CBT then need no
 * snapshot package. Returns the name.
 */
export function registerTakerFilter(name: string = CBT_TAKER_FILTER): string {
  if (listRegisteredFilters().some((f) => f.name === name)) return name;
  registerFilter({
    name,
    apiVersion: FILTER_API_VERSION,
    defaultAltitude: 1,
    attach: (ctx) => ({
      ctl: {
        take: (args) => ctx.snapshotTaken(args as SnapshotTakenData),
        dirty: (args) => ctx.rangesChanged((args as RangesChangedData).ranges),
      },
    }),
  });
  return name;
}

/**
 * Takes a "snapshot" of `devices` as the snapshot filter would: freezes them all and, inside that
 * one instant, announces `snapshot-taken` from the taker attached to `taker`. Every
 * CBT on those devices then moves to its next generation. Resolves once the devices thawed.
 */
export async function takeSnapshot(taker: BlockDev, devices: readonly BlockDev[], snapshotId?: string, name: string = CBT_TAKER_FILTER): Promise<void> {
  const data: SnapshotTakenData = { devices: devices.map((d) => d.name), ...(snapshotId !== undefined ? { snapshotId } : {}) };
  await withFrozenDevices(devices, () => filterCtl(taker, name, 'take', data));
}

/** Announces `ranges-changed` for `ranges` from the taker attached to `taker` (of that device). */
export async function emitMarkDirty(taker: BlockDev, ranges: readonly CbtSectorRange[], name: string = CBT_TAKER_FILTER): Promise<void> {
  await filterCtl(taker, name, 'dirty', { ranges });
}

export { OpClock, RecordingStateIo, type Chance } from './power-cut.js';
export { PowerCutDevice } from './power-cut-device.js';
export { checkCbtAcrossPowerCuts, type PowerCutCheckOptions, type PowerCutCheckResult } from './power-cut-check.js';
