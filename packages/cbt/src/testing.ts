import type { BlockDev } from '@blkfilter/bio';
import { FILTER_API_VERSION, filterCtl, listRegisteredFilters, registerFilter, withFrozenDevices } from '@blkfilter/registry';
import { CBT_EVENT_MARK_DIRTY, CBT_EVENT_SNAPSHOT_TAKEN, type CbtSectorRange, type CbtSnapshotTakenData } from './types.js';

/** The name {@link registerTakerFilter} registers the taker under unless told otherwise. */
export const CBT_TAKER_FILTER = 'cbt-test-taker';

/**
 * Registers a stand-in for the snapshot filter (once per process and name): a filter that
 * handles no bios and emits the events of the CBT contract from its ctl commands, `take`
 * ({@link CBT_EVENT_SNAPSHOT_TAKEN} with the ctl's argument as data) and `dirty`
 * ({@link CBT_EVENT_MARK_DIRTY}). Attach it to a device, at any altitude, and drive it with
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
        take: (args) => ctx.emit(CBT_EVENT_SNAPSHOT_TAKEN, args),
        dirty: (args) => ctx.emit(CBT_EVENT_MARK_DIRTY, args),
      },
    }),
  });
  return name;
}

/**
 * Takes a "snapshot" of `devices` as the snapshot filter would: freezes them all and, inside that
 * one instant, emits {@link CBT_EVENT_SNAPSHOT_TAKEN} from the taker attached to `taker`. Every
 * CBT on those devices then moves to its next generation. Resolves once the devices thawed.
 */
export async function takeSnapshot(taker: BlockDev, devices: readonly BlockDev[], snapshotId?: string, name: string = CBT_TAKER_FILTER): Promise<void> {
  const data: CbtSnapshotTakenData = { devices: devices.map((d) => d.name), snapshotId };
  await withFrozenDevices(devices, () => filterCtl(taker, name, 'take', data));
}

/** Emits {@link CBT_EVENT_MARK_DIRTY} for `ranges` from the taker attached to `taker` (the event's device). */
export async function emitMarkDirty(taker: BlockDev, ranges: readonly CbtSectorRange[], name: string = CBT_TAKER_FILTER): Promise<void> {
  await filterCtl(taker, name, 'dirty', { ranges });
}
