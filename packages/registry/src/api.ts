import { ReqOp, type Bio, type BlockDev } from '@blkfilter/bio';
import type { SectorRange, SnapshotTakenData } from './events.js';

/** The filter API version this registry implements. */
export const FILTER_API_VERSION = 2;
/** The oldest filter API version this registry still accepts. */
export const FILTER_API_MIN_VERSION = 1;

/**
 * The ops each API version knows. A filter sees only ops its version knew; a bio with a newer op
 * completes with NOTSUPP rather than slipping past a filter that cannot track it (a CBT built
 * for v1 would otherwise miss WRITE_ZEROES).
 * v1: READ, WRITE, FLUSH, DISCARD. v2: + WRITE_ZEROES.
 */
export const OPS_BY_API_VERSION: Readonly<Record<number, readonly ReqOp[]>> = Object.freeze({
  1: [ReqOp.READ, ReqOp.WRITE, ReqOp.FLUSH, ReqOp.DISCARD],
  2: [ReqOp.READ, ReqOp.WRITE, ReqOp.FLUSH, ReqOp.DISCARD, ReqOp.WRITE_ZEROES],
});

/** What an op handler did with a bio. */
export const FilterVerdict = {
  /** Let the bio go on to the next filter below (or the device). */
  PASS: 0,
  /** The filter took the bio: it now owns it and must complete it or send it on with `next.submit`. */
  TAKEN: 1,
} as const;

/** One of the values in {@link FilterVerdict}. */
export type FilterVerdict = (typeof FilterVerdict)[keyof typeof FilterVerdict];

/** The layers below a filter (nbdkit's `next_ops`). */
export interface FilterNext {
  /**
   * Sends `bio` to the filters below this one and then the device: a bio the filter took, or
   * one of the filter's own I/O to the filtered device (which this filter then does not see).
   * May complete the bio before it returns.
   */
  submit(bio: Bio): void;
}

/** An op handler: runs synchronously for each bio of that op; must not throw. */
export type FilterOpHandler = (bio: Bio, next: FilterNext) => FilterVerdict;

/**
 * The ops a filter may implement, each with the same shape. An op a filter leaves out passes
 * through untouched, at no cost.
 */
export interface FilterOps {
  read?: FilterOpHandler;
  write?: FilterOpHandler;
  flush?: FilterOpHandler;
  discard?: FilterOpHandler;
  writeZeroes?: FilterOpHandler;
}

/** A control command: `ctl(device, filter, cmd, args)` calls it with `args`. */
export type FilterCtlHandler = (args: unknown) => unknown;

/** An attached filter: its op handlers, control commands and lifecycle hooks. */
export interface FilterInstance extends FilterOps {
  /** Control commands by name (the BLKFILTER_CTL channel). */
  readonly ctl?: Readonly<Record<string, FilterCtlHandler>>;
  /** Called while the device is frozen and drained, just before the filter leaves the stack. */
  detach?(reason: 'detach' | 'replace'): void | Promise<void>;
  /**
   * The registry's events about this filter's own device (`frozen`, `thawed`, `attached`,
   * `detached`, `reordered`) and custom events emitted on it, delivered synchronously.
   */
  onEvent?(event: FilterEvent): void;
  /**
   * A snapshot that includes this filter's device was taken at this instant: the device is
   * frozen and drained while this runs. Delivered once per device of the take.
   */
  onSnapshotTaken?(data: SnapshotTakenData): void;
  /**
   * Ranges of this filter's device changed outside its bio stream (writes to its snapshot
   * image), reported before the change is made. The ranges were checked against the device.
   */
  onRangesChanged?(ranges: readonly SectorRange[]): void;
}

/** What a filter knows about where it is attached. */
export interface FilterContext {
  /** The device (disk or partition) the filter is attached to. */
  readonly bdev: BlockDev;
  /** The filter's registered name. */
  readonly name: string;
  /** The filter's altitude on the device. */
  readonly altitude: number;
  /** The layers below this filter. */
  readonly next: FilterNext;
  /**
   * Announces that a snapshot of `data.devices` was taken at this instant; call it inside
   * `withFrozenDevices` of those devices. The filters of each device receive `onSnapshotTaken`,
   * global listeners one `snapshot-taken` event. Throws `InvalidArgumentError` for a device
   * name that is not a string or not known.
   */
  snapshotTaken(data: SnapshotTakenData): void;
  /**
   * Reports ranges of this filter's device that changed outside its bio stream. The filters of
   * the device receive `onRangesChanged`, global listeners one `ranges-changed` event. Throws
   * `InvalidArgumentError` for a range that is not whole sectors inside the device.
   */
  rangesChanged(ranges: readonly SectorRange[]): void;
  /**
   * Publishes a custom event on this filter's device to its filters' `onEvent` and to global
   * listeners. The contract's own types (`snapshot-taken`, `ranges-changed`) are refused: use
   * the typed calls above.
   */
  emit(type: string, data?: unknown): void;
}

/** A filter as registered by name (like a kernel module). */
export interface FilterDefinition<Options = unknown> {
  /** Unique name: letters, digits, `-`, `_`, `.`. */
  readonly name: string;
  /** The filter API version it was built for ({@link FILTER_API_VERSION}). */
  readonly apiVersion: number;
  /** One line for `listRegisteredFilters`. */
  readonly description?: string;
  /** Altitude used when `attachFilter` is given none. */
  readonly defaultAltitude?: number;
  /**
   * Creates the filter's state for one device. Runs while the device is frozen and drained:
   * may do I/O through `ctx.next`, which is not blocked by the freeze.
   */
  attach(ctx: FilterContext, options: Options): FilterInstance | Promise<FilterInstance>;
}

/** Something that happened to a device's filters, or that a filter announced. */
export interface FilterEvent {
  /** One of `FilterEventType`, or a filter-defined type. */
  readonly type: string;
  /** The device's name. */
  readonly device: string;
  /** The filter concerned (for filter events: the one that emitted it). */
  readonly filter?: string;
  /** Event data, as the emitter defined it. */
  readonly data?: unknown;
}

/** One line of {@link listFilters}: a filter attached to a device. */
export interface AttachedFilterInfo {
  readonly name: string;
  readonly altitude: number;
  readonly apiVersion: number;
}
