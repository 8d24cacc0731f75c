import type { SectorRange } from '@blkfilter/registry';
import type { CbtStateIo } from './state-io.js';

/** The name the CBT filter is registered under. */
export const CBT_FILTER_NAME = 'cbt';

/** Altitude when `attachFilter` is given none: high, so CBT sees every write before other filters. */
export const CBT_DEFAULT_ALTITUDE = 1000;

/** Default tracking block size in bytes (doubled while the block count exceeds {@link CBT_MAX_DEFAULT_BLOCK_COUNT}). */
export const CBT_DEFAULT_BLOCK_SIZE = 64 * 1024;

/** The default block size doubles until the map has at most this many blocks (bytes). */
export const CBT_MAX_DEFAULT_BLOCK_COUNT = 2_097_152;

/** Largest block size a user may choose: 1 GiB. */
export const CBT_MAX_BLOCK_SIZE = 2 ** 30;

/** Largest map a user may ask for through a small block size: 1 GiB of map. */
export const CBT_MAX_BLOCK_COUNT = 2 ** 30;

/** The highest changes number; a take past it starts a new generation id. */
export const CBT_MAX_CHANGES_NUMBER = 255;

/**
 * A range of 512-byte sectors on the tracked device (relative to it: a partition's own sector 0).
 * The registry's `SectorRange`, the unit of the snapshot <-> CBT contract.
 */
export type CbtSectorRange = SectorRange;

/** Options of the `cbt` filter, given as `attachFilter(device, 'cbt', { options })`. */
export interface CbtOptions {
  /**
   * Tracking block size in bytes: a power of two, at least the device's logical block size, at
   * most 1 GiB. Default: 64 KiB, doubled while the device has more than 2,097,152 blocks.
   */
  readonly blockSize?: number;
  /**
   * Where the map is kept across clean restarts. Default: `<image path>.cbt` for a disk whose
   * backend has a string `path` (a `FileBackend`), `<image path>.p<N>.cbt` for its partition N,
   * none for other backends. `false`: never persist.
   */
  readonly stateFile?: string | false;
  /**
   * The file operations the state uses (default: `node:fs`). The harness injects a recording
   * one to replay power cuts; users leave it out.
   */
  readonly stateIo?: CbtStateIo;
  /** Journal size in bytes past which a checkpoint replaces it (default 4 MiB). */
  readonly checkpointBytes?: number;
}

/** Why the current generation id was drawn (or `resumed` when it came from the state file). */
export const CbtGenerationReason = {
  /** First attach with no usable state (no state file, or persistence off). */
  NEW: 'new',
  /** Loaded from a state file written at a clean detach. */
  RESUMED: 'resumed',
  /**
   * The previous attach crashed (kill -9, power loss) and its checkpoint + journal were replayed:
   * the same generation goes on, no full copy needed. `generationDetail` says what was replayed.
   */
  RESUMED_AFTER_CRASH: 'resumed-after-crash',
  /** A state file of a version without a journal says its attach never detached cleanly. */
  UNCLEAN_SHUTDOWN: 'unclean-shutdown',
  /**
   * The state was damaged: the state file or its journal was unreadable, truncated, of another
   * version or failed a CRC (anything but a torn last commit). `generationDetail` says which.
   */
  STATE_INVALID: 'state-invalid',
  /** The state file was for another geometry (block size, capacity, partition start). */
  GEOMETRY_CHANGED: 'geometry-changed',
  /** The active changes number would have passed 255 at a take. */
  OVERFLOW: 'overflow',
  /** The device's capacity changed under the map. */
  RESIZE: 'resize',
  /** A user asked for it (`resetCbt`, ctl `reset`). */
  RESET: 'reset',
  /** The map stopped being trustworthy (a write past its end, a malformed event, a take outside a freeze). */
  CORRUPTED: 'corrupted',
} as const;

/** One of the values in {@link CbtGenerationReason}. */
export type CbtGenerationReason = (typeof CbtGenerationReason)[keyof typeof CbtGenerationReason];

/** What {@link cbtInfo} reports. */
export interface CbtInfo {
  /** Capacity of the tracked device, in 512-byte sectors, that the map covers. */
  readonly capacity: number;
  /** Tracking block size in bytes. */
  readonly blockSize: number;
  /** Number of blocks (bytes) in the map. */
  readonly blockCount: number;
  /** The active generation id (the one `changesNumber` belongs to). */
  readonly generationId: string;
  /** The active changes number: writes now mark their blocks with it (1..255). */
  readonly changesNumber: number;
  /** Take number of the read map (the frozen copy queries use); 0 before the first take. */
  readonly snapNumber: number;
  /**
   * Generation id of the read map: equals `generationId` except after a take that overflowed
   * past 255 (the read map still belongs to the old generation). Null before the first take.
   */
  readonly snapGenerationId: string | null;
  /** `snapshotId` of the take that froze the read map, when the emitter gave one. */
  readonly snapshotId: string | null;
  /** Why the active generation id was drawn (or `resumed*` when it came from the state). */
  readonly generationReason: CbtGenerationReason;
  /** More about the reason: what was replayed after a crash, or what was damaged. */
  readonly generationDetail: string | null;
  /**
   * Why the state on disk is no longer kept (a journal write failed; the files were removed
   * so the next attach starts a new generation), or null while it is kept exact.
   */
  readonly persistenceError: string | null;
  /** The state file, or null when the map is not persisted. */
  readonly stateFile: string | null;
  /** Bytes held by the map and its frozen copy. */
  readonly memoryBytes: number;
}

/** Arguments of {@link cbtMap}: a range of blocks of the read map. */
export interface CbtMapRange {
  /** First block. */
  readonly offset: number;
  /** Number of blocks. */
  readonly length: number;
}

/** Arguments of {@link changedExtents}: what the caller's previous copy was taken from. */
export interface ChangedExtentsQuery {
  /** The take number of the caller's previous copy (`snapNumber` of its `changedExtents` answer). */
  readonly since: number;
  /** The generation id of the caller's previous copy. */
  readonly generationId: string;
}

/** Why {@link changedExtents} cannot list extents. */
export const FullCopyReason = {
  /** The generation id differs: the map was reset (unclean shutdown, overflow, resize, reset) since. */
  GENERATION_CHANGED: 'generation-changed',
  /** No take has frozen a read map in this generation yet. */
  NO_SNAPSHOT: 'no-snapshot',
  /** `since` is past the read map's take number: that take never happened in this generation. */
  SINCE_AHEAD: 'since-ahead',
} as const;

/** One of the values in {@link FullCopyReason}. */
export type FullCopyReason = (typeof FullCopyReason)[keyof typeof FullCopyReason];

/** The answer of {@link changedExtents}. */
export type ChangedExtentsResult =
  | {
      readonly kind: 'extents';
      /** Generation id of the read map; record it with `snapNumber` for the next incremental. */
      readonly generationId: string;
      readonly since: number;
      /** Take number of the read map. */
      readonly snapNumber: number;
      /** `snapshotId` of that take, when the emitter gave one. */
      readonly snapshotId: string | null;
      /** Tracking block size in bytes (extents are whole blocks, clipped to the capacity). */
      readonly blockSize: number;
      /** Sorted, merged, non-adjacent sector extents of the blocks changed after take `since`. */
      readonly extents: CbtSectorRange[];
    }
  | {
      readonly kind: 'full-copy-needed';
      readonly reason: FullCopyReason;
      /** What happened and what to do, for people. */
      readonly message: string;
      /** The read map's generation id (null before any take): what a full copy made now belongs to. */
      readonly generationId: string | null;
      /** The read map's take number (0 before any take). */
      readonly snapNumber: number;
    };
