import { ReqOp, type Bio, type BlockDev } from '@blkfilter/bio';

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
  /** Registry and filter events on any device, delivered synchronously. */
  onEvent?(event: FilterEvent): void;
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
  /** Publishes an event to every subscriber (other filters, users), e.g. `snapshot-taken`. */
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
  /** `attached`, `detached`, `frozen`, `thawed`, `reordered`, or a filter-defined type. */
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
