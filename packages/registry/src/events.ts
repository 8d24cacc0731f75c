/**
 * The event contract between filters: the one place where what a snapshot tells a changed-block
 * tracker is defined. Filters never import each other (arrows point down), so both sides meet
 * here, one layer below them.
 */

/** Names of the events the registry delivers to global listeners ({@link onFilterEvent}). */
export const FilterEventType = {
  /** A filter joined a device's stack. Data: `{ altitude }`. */
  ATTACHED: 'attached',
  /** A filter left a device's stack. */
  DETACHED: 'detached',
  /** A device's gate closed for a stack change or `withFrozenDevices`. */
  FROZEN: 'frozen',
  /** A device's gate opened again. */
  THAWED: 'thawed',
  /** A filter moved to another altitude. Data: `{ altitude }`. */
  REORDERED: 'reordered',
  /**
   * A snapshot of `data.devices` was taken at this instant, while they were frozen. Data:
   * {@link SnapshotTakenData}. Filters receive it through `onSnapshotTaken`.
   */
  SNAPSHOT_TAKEN: 'snapshot-taken',
  /**
   * Ranges of the event's device changed outside its own bio stream (a write to its snapshot
   * image, which a backup of the image would copy). Data: {@link RangesChangedData}. Filters
   * receive it through `onRangesChanged`.
   */
  RANGES_CHANGED: 'ranges-changed',
} as const;

/** One of the values in {@link FilterEventType}. */
export type FilterEventType = (typeof FilterEventType)[keyof typeof FilterEventType];

/** A range of 512-byte sectors on one device (relative to it: a partition's own sector 0). */
export interface SectorRange {
  /** First sector. */
  readonly sector: number;
  /** Number of sectors. */
  readonly sectors: number;
}

/** Data of {@link FilterEventType.SNAPSHOT_TAKEN}. */
export interface SnapshotTakenData {
  /** Names of the original devices snapshotted at this instant. */
  readonly devices: readonly string[];
  /** The snapshot's id, echoed by trackers so a backup can check it matches its take. */
  readonly snapshotId?: string;
}

/** Data of {@link FilterEventType.RANGES_CHANGED}. */
export interface RangesChangedData {
  /** Ranges of the event's device that changed. */
  readonly ranges: readonly SectorRange[];
}
